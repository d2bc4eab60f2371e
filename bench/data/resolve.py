"""Turning a dataset spec (a name, a path, or a provider prefix) into a :class:`Dataset`.

Named sets live under a data root (``--data-root`` or ``BENCH_DATA_ROOT``, default
``./data``). Other modules can add generated datasets with
:func:`register_dataset_provider`; e.g. a procedural phantom registered under
``"phantom"`` answers both ``"phantom"`` and ``"phantom:device-a"``.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from bench.data.dataset import Dataset
from bench.data.readers import (
    is_bus_bra_layout,
    is_bus_uclm_layout,
    is_busi_layout,
    read_bus_bra,
    read_bus_uclm,
    read_busi,
    read_manifest,
)
from bench.errors import DatasetError

__all__ = [
    "DATA_ROOT_ENV",
    "DOWNLOAD_HINTS",
    "NAMED_DATASETS",
    "DatasetFactory",
    "dataset_names",
    "default_data_root",
    "read_path",
    "register_dataset_provider",
    "resolve_dataset",
    "unregister_dataset_provider",
]

#: Environment variable naming the folder that holds the named datasets.
DATA_ROOT_ENV = "BENCH_DATA_ROOT"

#: Named datasets: name -> path relative to the data root (a layout folder or a manifest CSV).
#: Other modules may add entries; the reader is chosen from the path's content.
NAMED_DATASETS: dict[str, str] = {
    "bus-uclm": "BUS-UCLM",
    "busi": "Dataset_BUSI_with_GT",
    "udiat": "UDIAT_DatasetB/manifest.csv",
    "breast": "BrEaST/manifest.csv",
    "bus-bra": "BUSBRA",
}

#: Where to get each named dataset, shown when it is missing.
DOWNLOAD_HINTS: dict[str, str] = {
    "bus-uclm": "BUS-UCLM (Vallez et al., Scientific Data 2025) is published on Mendeley Data; "
    "unpack it so that BUS-UCLM/INFO.csv, images/ and masks/ exist",
    "busi": "BUSI (Al-Dhabyani et al., Data in Brief 2020): "
    "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset; "
    "unpack it so that Dataset_BUSI_with_GT/{benign,malignant,normal}/ exist",
    "udiat": "UDIAT Dataset B (Yap et al., IEEE JBHI 2018) is available from its authors on request; "
    "the folder also needs a manifest.csv with columns image,mask,label",
    "breast": "BrEaST-Lesions-USG (Pawlowska et al., Scientific Data 2024) is on TCIA: "
    "https://www.cancerimagingarchive.net/collection/breast-lesions-usg/; "
    "the folder also needs a manifest.csv with columns image,mask,label",
    "bus-bra": "BUS-BRA (Gomez-Flores et al., Medical Physics 2024; CC BY 4.0) is on Zenodo: "
    "https://zenodo.org/records/8231412; unpack it so that BUSBRA/bus_data.csv, Images/ and Masks/ exist",
}

#: A provider builds a dataset from the full spec (e.g. ``"phantom:device-a"``) and the data root.
DatasetFactory = Callable[[str, Path], Dataset]

_providers: dict[str, DatasetFactory] = {}
_providers_lock = threading.Lock()

#: Providers that ship with the harness: prefix -> module that registers it on import. They
#: are imported on first use so ``resolve_dataset("phantom")`` works without an explicit import.
BUILTIN_PROVIDERS: dict[str, str] = {"phantom": "bench.phantom"}


def _load_builtin_providers() -> None:
    for prefix, module in BUILTIN_PROVIDERS.items():
        with _providers_lock:
            present = prefix in _providers
        if not present:
            importlib.import_module(module)


def default_data_root() -> Path:
    """The data root: ``$BENCH_DATA_ROOT`` when set and non-empty, else ``./data``."""
    value = os.environ.get(DATA_ROOT_ENV, "").strip()
    return Path(value).expanduser() if value else Path("data")


def register_dataset_provider(prefix: str, factory: DatasetFactory, *, replace: bool = False) -> None:
    """Let ``factory(spec, data_root)`` build every dataset whose spec is ``prefix`` or ``prefix:<anything>``.

    Prefixes are matched case-insensitively. Registering a prefix twice, or one that is
    also a name in :data:`NAMED_DATASETS`, raises :class:`DatasetError` unless
    ``replace`` is true (re-imports, tests).
    """
    key = prefix.strip().lower()
    if not key or ":" in key:
        raise DatasetError(f"dataset provider prefix {prefix!r} must be a non-empty name without ':'")
    with _providers_lock:
        if not replace and (key in _providers or key in NAMED_DATASETS):
            raise DatasetError(f"dataset name {key!r} is already registered; pick another prefix")
        _providers[key] = factory


def unregister_dataset_provider(prefix: str) -> None:
    """Remove the provider registered under ``prefix`` (no error if there is none)."""
    with _providers_lock:
        _providers.pop(prefix.strip().lower(), None)


def dataset_names() -> list[str]:
    """Every name :func:`resolve_dataset` knows without a path: named sets, then provider prefixes."""
    _load_builtin_providers()
    with _providers_lock:
        providers = sorted(_providers)
    return [*NAMED_DATASETS, *(p for p in providers if p not in NAMED_DATASETS)]


def _find_provider(spec: str) -> DatasetFactory | None:
    lowered = spec.strip().lower()
    prefix = lowered.split(":", 1)[0]
    _load_builtin_providers()
    with _providers_lock:
        return _providers.get(prefix)


def read_path(path: Path, name: str | None = None) -> Dataset:
    """Read a dataset from a path, choosing the reader from what is there.

    A ``.csv`` file is a manifest; a folder with ``INFO.csv``, ``images/`` and ``masks/`` is
    BUS-UCLM; a folder with ``bus_data.csv`` or ``Images/`` and ``Masks/`` is BUS-BRA; a
    folder with ``benign/``, ``malignant/`` or ``normal/`` is BUSI; a folder with a
    ``manifest.csv`` is read through it.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: a dataset file must be a manifest .csv (columns image,mask,label)")
        return read_manifest(path, name)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    if is_bus_uclm_layout(path):
        return read_bus_uclm(path, name or path.resolve().name)
    if is_bus_bra_layout(path):
        return read_bus_bra(path, name or path.resolve().name)
    if is_busi_layout(path):
        return read_busi(path, name or path.resolve().name)
    if (path / "manifest.csv").is_file():
        return read_manifest(path / "manifest.csv", name)
    raise DatasetError(
        f"{path}: not a dataset folder I recognise. Expected one of: BUS-UCLM layout (INFO.csv, images/, "
        "masks/), BUS-BRA layout (bus_data.csv, Images/, Masks/), BUSI layout (benign/, malignant/, "
        "normal/ subfolders), or a manifest.csv (columns image,mask,label); or pass the manifest .csv itself"
    )


def resolve_dataset(spec: str, data_root: Path) -> Dataset:
    """Read the dataset named or pointed to by ``spec``.

    In order: a registered provider prefix (``"phantom"``, ``"phantom:device-a"``); a name
    in :data:`NAMED_DATASETS` (case-insensitive), looked up under ``data_root``; otherwise
    ``spec`` is a path (see :func:`read_path`); write ``./BUS-UCLM`` to read a local folder
    whose name happens to match a named set.
    """
    spec = spec.strip()
    if not spec:
        raise DatasetError(f"empty dataset name; use one of {', '.join(dataset_names())} or a path")
    factory = _find_provider(spec)
    if factory is not None:
        dataset = factory(spec, Path(data_root))
        if not isinstance(dataset, Dataset):
            raise DatasetError(
                f"dataset provider for {spec!r} returned {type(dataset).__name__}, not a Dataset"
            )
        if not dataset.samples:
            raise DatasetError(f"dataset provider for {spec!r} produced no samples")
        return dataset
    key = spec.lower()
    if key in NAMED_DATASETS:
        data_root = Path(data_root).expanduser()
        path = data_root / NAMED_DATASETS[key]
        if not path.exists():
            hint = DOWNLOAD_HINTS.get(key, "")
            raise DatasetError(
                f"dataset {key!r} not found: expected {path} (data root {data_root}). Point --data-root or "
                f"{DATA_ROOT_ENV} at the folder that holds {NAMED_DATASETS[key].split('/')[0]}/"
                + (f". {hint}" if hint else "")
            )
        return read_path(path, key)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{spec!r} is neither a dataset name ({', '.join(dataset_names())}) nor an existing "
            "file or folder"
        )
    return read_path(path)
