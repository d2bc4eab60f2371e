"""Shared fixtures: tiny synthetic manifest datasets, a tiny-model run config, an isolated cache.

The synthetic images are small (48 x 40 RGB) grey speckle with a dark elliptic blob on
lesion images and a matching 0/255 mask; every file has distinct bytes (the feature cache
keys images by content, so tests can count encoded images exactly). Ids are prefixed with
the dataset's tag (``tgta_benign_001``), so ids never repeat across datasets.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from bench.config import RunConfig, load_config
from bench.method import Method, SupportSet
from bench.types import ImageItem

#: Synthetic image size (width, height): small and not square, to exercise the squash.
IMAGE_SIZE = (48, 40)
#: Evaluation resolution of every test run (keeps pixel metrics cheap).
EVAL_SIZE = 32
#: The tiny open_clip model shipped for tests (64 px, random init with pretrained="none").
TINY_MODEL = "bench-tiny-vit"
#: Images per class: the source (support pool) and the default targets.
SOURCE_COUNTS = {"normal": 6, "benign": 6, "malignant": 6}
TARGET_COUNTS = {"normal": 3, "benign": 3, "malignant": 3}

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def synthetic_image(rng: np.random.Generator, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(rgb uint8 (H, W, 3), mask uint8 0/255 (H, W) or None for normal images)."""
    width, height = IMAGE_SIZE
    base = rng.integers(110, 200, size=(height, width), dtype=np.uint8)
    rgb = np.repeat(base[:, :, None], 3, axis=2)
    if label == "normal":
        return rgb, None
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.integers(12, height - 12), rng.integers(14, width - 14)
    ry, rx = rng.integers(5, 9), rng.integers(6, 11)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    darkness = 90 if label == "benign" else 60
    rgb[inside] = np.clip(rgb[inside].astype(int) - darkness - 40, 0, 255).astype(np.uint8)
    return rgb, np.where(inside, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticDataset:
    """A manifest dataset written under ``folder`` (its name is the folder's name)."""

    folder: Path
    manifest: Path
    ids: dict[str, list[str]]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def all_ids(self) -> list[str]:
        return [i for ids in self.ids.values() for i in ids]

    def image_path(self, sample_id: str) -> Path:
        return self.folder / f"{sample_id}.png"

    def mask_path(self, sample_id: str) -> Path:
        return self.folder / f"{sample_id}_mask.png"


def build_dataset(
    folder: Path, counts: Mapping[str, int] | None = None, *, tag: str | None = None
) -> SyntheticDataset:
    """Write a manifest dataset (``manifest.csv``, PNG images and masks) into ``folder``."""
    counts = dict(TARGET_COUNTS if counts is None else counts)
    tag = tag or folder.name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    rows: list[dict[str, str]] = []
    ids: dict[str, list[str]] = {}
    for label, n in counts.items():
        for i in range(n):
            sample_id = f"{tag}_{label}_{i:03d}"
            rgb, mask = synthetic_image(rng, label)
            Image.fromarray(rgb).save(folder / f"{sample_id}.png")
            mask_cell = ""
            if mask is not None:
                Image.fromarray(mask).save(folder / f"{sample_id}_mask.png")
                mask_cell = f"{sample_id}_mask.png"
            rows.append({"image": f"{sample_id}.png", "mask": mask_cell, "label": label})
            ids.setdefault(label, []).append(sample_id)
    manifest = folder / "manifest.csv"
    write_manifest(manifest, rows)
    return SyntheticDataset(folder=folder, manifest=manifest, ids=ids)


def write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class SyntheticData:
    """A source (support pool) and two targets, all manifest datasets under ``root``."""

    root: Path
    source: SyntheticDataset
    target_a: SyntheticDataset
    target_b: SyntheticDataset

    @property
    def targets(self) -> list[SyntheticDataset]:
        return [self.target_a, self.target_b]

    @property
    def target_specs(self) -> str:
        return ",".join(str(t.folder) for t in self.targets)


def build_synthetic_data(root: Path) -> SyntheticData:
    return SyntheticData(
        root=root,
        source=build_dataset(root / "src", SOURCE_COUNTS),
        target_a=build_dataset(root / "tgta", TARGET_COUNTS),
        target_b=build_dataset(root / "tgtb", TARGET_COUNTS),
    )


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    on tiny tensors it is faster and immune to other processes' load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticData:
    """Read-only synthetic datasets shared by the whole session (do not modify them)."""
    return build_synthetic_data(tmp_path_factory.mktemp("synthetic-data"))


@pytest.fixture
def data(tmp_path: Path) -> SyntheticData:
    """Synthetic datasets private to one test (free to damage)."""
    return build_synthetic_data(tmp_path / "data")


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the feature cache and the data root at tmp folders; returns the cache folder.

    Nothing a test does may touch ``~/.cache`` or the developer's ``./data``.
    """
    cache = tmp_path / "feature-cache"
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("BENCH_DATA_ROOT", str(tmp_path / "no-data-root"))
    return cache


# --------------------------------------------------------------------------- damage


#: The metrics a detect+classify method's cell records.
CLASSIFIER_METRICS = {"image_auroc", "class_auroc", "class_accuracy", "class_balanced_accuracy"}


def random_items(n: int, seed: int, shape: tuple[int, int], prefix: str, key_prefix: str) -> list[ImageItem]:
    """``n`` random RGB images as ImageItems: ids ``<prefix>{i}``, keys ``<key_prefix>-<seed>-<i>``."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8) for _ in range(n)]
    return [
        ImageItem(id=f"{prefix}{i}", key=f"{key_prefix}-{seed}-{i:03d}", loader=lambda a=image: a)
        for i, image in enumerate(images)
    ]


def rewrite_row(manifest: Path, row: int, **cells: str) -> None:
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows[row].update(cells)
    write_manifest(manifest, rows)


def grey_mask(path: Path) -> None:
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[5:15, 5:15] = 128
    mask[20:30, 20:30] = 255
    Image.fromarray(mask).save(path)


def truncate(path: Path) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


#: Ways to damage target B: name -> (damage(data), fragments the error must contain(data)).
DAMAGES: dict[str, tuple[Callable[[SyntheticData], None], Callable[[SyntheticData], list[str]]]] = {
    "missing-image": (
        lambda d: d.target_b.image_path("tgtb_benign_001").unlink(),
        lambda d: [str(d.target_b.manifest), "line 6", "tgtb_benign_001.png", "does not exist"],
    ),
    "unknown-label": (
        lambda d: rewrite_row(d.target_b.manifest, 4, label="tumour"),
        lambda d: [str(d.target_b.manifest), "line 6", "unknown label 'tumour'", "normal, benign, malignant"],
    ),
    "empty-manifest": (
        lambda d: d.target_b.manifest.write_text(""),
        lambda d: [str(d.target_b.manifest), "the manifest is empty"],
    ),
    "header-only-manifest": (
        lambda d: d.target_b.manifest.write_text("image,mask,label\n"),
        lambda d: [str(d.target_b.manifest), "no rows"],
    ),
    "garbage-image": (
        lambda d: d.target_b.image_path("tgtb_normal_002").write_bytes(b"this is not a png at all" * 10),
        lambda d: [str(d.target_b.image_path("tgtb_normal_002")), "not a readable image"],
    ),
    "truncated-image": (  # header intact: fails only when decoded, at run time
        lambda d: truncate(d.target_b.image_path("tgtb_malignant_002")),
        lambda d: [str(d.target_b.image_path("tgtb_malignant_002")), "corrupt or truncated"],
    ),
    "grey-mask": (
        lambda d: grey_mask(d.target_b.mask_path("tgtb_benign_000")),
        lambda d: [str(d.target_b.mask_path("tgtb_benign_000")), "mask is not binary"],
    ),
}


# --------------------------------------------------------------------------- configs


def tiny_config(
    base: Path, data: SyntheticData, cache_dir: Path, config_path: Path | None = None, **overrides: Any
) -> RunConfig:
    """A tiny-model run config over ``data`` (see the ``make_config`` fixture for the defaults)."""
    values: dict[str, Any] = {
        "methods": "intensity",
        "shots": "2",
        "seeds": "0",
        "source": str(data.source.folder),
        "targets": data.target_specs,
        "backbone": TINY_MODEL,
        "pretrained": "none",
        "eval_size": EVAL_SIZE,
        "data_root": str(base / "no-data-root"),
        "out": str(base / "results"),
        "name": "grid",
        "device": "cpu",
        "batch_size": 8,
        "cache_dir": str(cache_dir),
    }
    values.update(overrides)
    return load_config(config_path, **values)


ConfigFactory = Callable[..., RunConfig]


@pytest.fixture
def make_config(tmp_path: Path, isolated_env: Path, shared_data: SyntheticData) -> ConfigFactory:
    """``make_config(config_path=None, **overrides)``: a tiny-model config over the shared synthetic data.

    Defaults: the tiny random-init model on CPU, eval size 32, method ``intensity``, shots 2,
    seed 0, the synthetic source and both targets, results under ``tmp_path/results`` (run
    name ``grid``) and a tmp feature cache. Overrides use :func:`load_config`'s keywords
    (strings such as ``shots="2,3"`` are parsed as on the command line).
    """

    def factory(config_path: Path | None = None, **overrides: Any) -> RunConfig:
        return tiny_config(tmp_path, shared_data, isolated_env, config_path, **overrides)

    return factory


def register_methods(monkeypatch: pytest.MonkeyPatch, *classes: type[Method]) -> None:
    """Register test-only Method classes beside the built-ins and plugins until ``monkeypatch`` undoes it.

    ``bench.registry.get_method`` and ``resolve_method_names`` (and ``bench methods``) look
    ``available_methods`` up on the module at call time, so patching that attribute with a
    wrapper over the (cached) original is enough; the cached dict itself is never mutated.
    """
    import bench.registry as registry

    original = registry.available_methods
    extra = {cls.name: cls for cls in classes}

    def available_methods() -> dict[str, type[Method]]:
        return {**original(), **extra}

    monkeypatch.setattr(registry, "available_methods", available_methods)


@pytest.fixture
def method_registry(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``method_registry(ClsA, ClsB)`` registers test-only methods for the current test."""

    def add(*classes: type[Method]) -> None:
        register_methods(monkeypatch, *classes)

    return add


def run_dir_of(config: RunConfig) -> Path:
    """Where a run with an explicit ``name`` (every test config has one) writes its cells."""
    assert config.name, "test configs always name their run"
    return Path(config.out) / config.name


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: relative path -> (mtime_ns, bytes)."""
    return {
        path.relative_to(root).as_posix(): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def cell_dirs(run_dir: Path) -> set[str]:
    """Relative folders (``method/target/shotsK_seedS``) of the finished cells under ``run_dir``."""
    return {p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("cell.json")}


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consoles wide enough that rich never wraps a message or truncates a table cell."""
    import bench.cli as cli
    import bench.cli_support as cli_support

    for module in (cli, cli_support):
        monkeypatch.setattr(module, "console", Console(width=2000))
        monkeypatch.setattr(module, "err_console", Console(stderr=True, width=2000))


def bench(*args: str | Path) -> tuple[int, str, str]:
    """Run ``bench ARGS`` in process; returns (exit code, stdout, stderr). Unexpected exceptions propagate."""
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def flat(text: str) -> str:
    """Whitespace collapsed, so assertions never depend on line wrapping."""
    return " ".join(text.split())


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of a rich box table: first cell -> all cells."""
    rows = {}
    for line in text.replace("┃", "│").splitlines():
        if "│" in line:
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


requires_shared_datasets = pytest.mark.skipif(
    not SHARED_DATASETS.is_dir(), reason=f"real datasets not found at {SHARED_DATASETS}"
)


def tiny_method(
    cls: type[Method],
    backbone: Any,
    *,
    seed: int = 0,
    shots: int = 2,
    eval_size: int = EVAL_SIZE,
    **config: Any,
) -> Any:
    """An instance of method ``cls`` on ``backbone`` for unit tests (no run, no scratch folder)."""
    from bench.method import MethodContext

    ctx = MethodContext(
        device=backbone.device,
        seed=seed,
        shots=shots,
        scratch_dir=Path("/nonexistent-scratch"),
        config=config,
        eval_size=eval_size,
        backbone_factory=lambda: backbone,
    )
    return cls(ctx)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pooled pixel AUROC of maps against masks (thresholded at 0.5)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(masks.reshape(-1) > 0.5, maps.reshape(-1)))


def lesion_support(shots: int, seed: int, tag: str, size: int, key_prefix: str) -> SupportSet:
    """``shots`` images per class (as tests/test_ultraad.py): normal speckle; benign a bright disc,
    malignant a dark disc, with the disc's mask at ``size``."""
    rng = np.random.default_rng(seed)
    items, labels, masks = [], [], []
    yy, xx = np.mgrid[:64, :64] + 0.5
    ys, xs = (np.mgrid[:size, :size] + 0.5) * 64 / size
    for c in range(3):
        for i in range(shots):
            image = rng.integers(70, 130, size=(64, 64), dtype=np.uint8)
            mask = np.zeros((size, size), np.float32)
            if c > 0:
                cy, cx = rng.uniform(18, 46, 2)
                r = rng.uniform(9, 14)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 235 if c == 1 else 10
                mask = ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r).astype(np.float32)
            rgb = np.repeat(image[:, :, None], 3, axis=2)
            items.append(
                ImageItem(
                    id=f"{tag}-{c}-{i}", key=f"{key_prefix}-{tag}-{seed}-{c}-{i}", loader=lambda a=rgb: a
                )
            )
            labels.append(c)
            masks.append(mask)
    return SupportSet(tuple(items), np.array(labels), np.stack(masks))
