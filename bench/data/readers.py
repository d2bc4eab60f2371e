"""Readers for the published dataset layouts (BUSI, BUS-UCLM, BUS-BRA) and the generic manifest CSV.

Each reader lists files and reads image headers (to report mask-size problems) but decodes
no pixels. Fatal inconsistencies raise :class:`~bench.errors.DatasetError` naming the file
and row; the rest are collected in :attr:`Dataset.problems`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable
from pathlib import Path

from bench.data.dataset import Dataset
from bench.data.io import image_size
from bench.data.masks import mask_problems
from bench.errors import DatasetError
from bench.types import CLASSES, Label, Sample

__all__ = [
    "BUS_BRA_CSV",
    "BUS_BRA_REQUIRED",
    "BUS_UCLM_DEVICE",
    "IMAGE_SUFFIXES",
    "MANIFEST_COLUMNS",
    "is_bus_bra_layout",
    "is_bus_uclm_layout",
    "is_busi_layout",
    "read_bus_bra",
    "read_bus_uclm",
    "read_busi",
    "read_manifest",
]

#: File suffixes (lower case) taken as images when listing a folder.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
#: Columns a manifest CSV must have; any other column is kept as sample metadata.
MANIFEST_COLUMNS = ("image", "mask", "label")
#: The single scanner BUS-UCLM was acquired with (Vallez et al. 2025).
BUS_UCLM_DEVICE = "Siemens ACUSON S2000"
#: BUS-BRA's table of images (Gomez-Flores et al. 2024), beside ``Images/`` and ``Masks/``.
BUS_BRA_CSV = "bus_data.csv"
#: Columns (lower case) ``bus_data.csv`` must have; the others are kept as metadata when present.
BUS_BRA_REQUIRED = ("id", "case", "pathology", "device")
# The id, the label, and Case (kept as ``patient``, the key every reader uses).
_BUS_BRA_NOT_METADATA = frozenset({"id", "case", "pathology"})

_ALLOWED_LABELS = ", ".join(label.value for label in CLASSES)
_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$")


def _parse_label(value: str) -> Label | None:
    try:
        return Label(value.strip().lower())
    except ValueError:
        return None


def _natural_key(text: str) -> list[object]:
    # "benign (2)" before "benign (10)", as the files are numbered.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _list_images(folder: Path) -> list[Path]:
    found = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(found, key=lambda p: _natural_key(p.name))


def _short_list(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _check_headers(samples: list[Sample]) -> None:
    # Fail at read time, naming the file, rather than minutes later inside a batch.
    for sample in samples:
        image_size(sample.image_path)
        for mask in sample.mask_paths:
            image_size(mask)


def _require_nonempty(samples: list[Sample], where: Path, what: str) -> None:
    if not samples:
        raise DatasetError(f"{where}: no images found ({what}); check the path or the dataset download")


# --------------------------------------------------------------------------- BUSI


def is_busi_layout(folder: Path) -> bool:
    """Whether ``folder`` looks like BUSI: ``benign/``, ``malignant/`` and/or ``normal/`` subfolders."""
    return folder.is_dir() and any((folder / label.value).is_dir() for label in CLASSES)


def read_busi(root: Path, name: str = "busi") -> Dataset:
    """Read BUSI in its published layout ``<root>/{benign,malignant,normal}/<class> (<n>).png``.

    Masks ``<class> (<n>)_mask.png`` and the optional ``_mask_1.png``, ``_mask_2.png`` are
    merged by union. Sample ids are ``"<class folder>/<image stem>"``, e.g.
    ``"benign/benign (12)"``. A missing class folder or a mask file without its image is
    reported in ``problems``. Two images with the same stem (``x.png`` and ``x.jpg``) or two
    mask files for the same slot (``x_mask.png`` and ``x_mask.bmp``; ``x_mask_1`` and
    ``x_mask_01``) raise :class:`DatasetError` naming both files: neither may be dropped silently.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: BUSI folder not found")
    samples: list[Sample] = []
    problems: list[str] = []
    missing = [label.value for label in CLASSES if not (root / label.value).is_dir()]
    if missing:
        problems.append(f"no {'/'.join(missing)} folder under {root}: those classes are empty")
    for label in CLASSES:
        folder = root / label.value
        if not folder.is_dir():
            continue
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for path in _list_images(folder):
            match = _BUSI_MASK.match(path.stem)
            if match:
                order = int(match["k"]) if match["k"] is not None else 0
                slot = masks.setdefault(match["stem"], [])
                clash = next((other for k, other in slot if k == order), None)
                if clash is not None:
                    raise DatasetError(
                        f"{folder}: mask files {clash.name} and {path.name} are the same mask of image "
                        f"{match['stem']!r}; keep one of them (merging or picking one would be a guess)"
                    )
                slot.append((order, path))
            elif path.stem in images:
                raise DatasetError(
                    f"{folder}: image files {images[path.stem].name} and {path.name} have the same name "
                    "apart from the extension, so their sample id and masks would clash; keep one of them"
                )
            else:
                images[path.stem] = path
        orphans = sorted(set(masks) - set(images), key=_natural_key)
        if orphans:
            problems.append(
                f"{len(orphans)} mask file(s) in {folder.name}/ without their image "
                f"({_short_list(orphans)}): ignored"
            )
        for stem, path in images.items():
            mask_paths = tuple(p for _, p in sorted(masks.get(stem, [])))
            samples.append(
                Sample(
                    id=f"{label.value}/{stem}",
                    image_path=path,
                    mask_paths=mask_paths,
                    label=label,
                    dataset=name,
                )
            )
    _require_nonempty(samples, root, "expected benign/, malignant/, normal/ folders of .png images")
    _check_headers(samples)
    return Dataset(name=name, root=root, samples=samples, problems=problems + mask_problems(samples))


# --------------------------------------------------------------------------- BUS-UCLM


def is_bus_uclm_layout(folder: Path) -> bool:
    """Whether ``folder`` looks like BUS-UCLM: ``INFO.csv`` beside ``images/`` and ``masks/``."""
    return (folder / "INFO.csv").is_file() and (folder / "images").is_dir() and (folder / "masks").is_dir()


def read_bus_uclm(root: Path, name: str = "bus-uclm") -> Dataset:
    """Read BUS-UCLM in its published layout: ``images/``, ``masks/`` and ``INFO.csv``.

    ``INFO.csv`` is ``;``-separated UTF-8 with a byte-order mark, columns
    ``Image;Resolution;Label;Doppler;Marks;Combined``. Ids are the image stems
    (``"ALWI_000"``); metadata holds ``patient`` (the name prefix), ``device`` and the other
    INFO columns in lower case. An INFO row whose image is missing is an error; an image
    without an INFO row is left out and reported in ``problems`` (its label is unknown,
    and one stray file should not block the whole set). A missing mask file is reported
    too (the sample is then kept out of pixel metrics if it is a lesion).
    """
    root = Path(root)
    info = root / "INFO.csv"
    if not is_bus_uclm_layout(root):
        raise DatasetError(f"{root}: not a BUS-UCLM folder (expected INFO.csv, images/ and masks/ inside)")
    images_dir, masks_dir = root / "images", root / "masks"
    samples: list[Sample] = []
    problems: list[str] = []
    missing_masks: list[str] = []
    listed: set[str] = set()
    try:
        with open(info, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=";")
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            absent = [c for c in ("image", "label") if c not in columns]
            if absent:
                raise DatasetError(
                    f"{info}: missing column(s) {', '.join(absent)} (found: {', '.join(columns) or 'none'}); "
                    "expected the published header Image;Resolution;Label;Doppler;Marks;Combined"
                )
            for row in reader:
                line = reader.line_num
                cells = {key: (row.get(original) or "").strip() for key, original in columns.items()}
                if not any(cells.values()):
                    continue
                file_name = cells["image"]
                if not file_name:
                    raise DatasetError(f"{info}, line {line}: empty Image cell")
                label = _parse_label(cells["label"])
                if label is None:
                    raise DatasetError(
                        f"{info}, line {line}: unknown label {cells['label']!r} for {file_name} "
                        f"(allowed: {_ALLOWED_LABELS}, any case)"
                    )
                image_path = images_dir / file_name
                if not image_path.is_file():
                    raise DatasetError(
                        f"{info}, line {line}: image {image_path} does not exist; re-download BUS-UCLM "
                        "or delete the row"
                    )
                if file_name in listed:
                    raise DatasetError(f"{info}, line {line}: {file_name} is listed twice")
                listed.add(file_name)
                mask_path = masks_dir / file_name
                if not mask_path.is_file():
                    missing_masks.append(Path(file_name).stem)
                stem = Path(file_name).stem
                metadata = {key: value for key, value in cells.items() if key not in ("image", "label")}
                metadata["patient"] = stem.rsplit("_", 1)[0]
                metadata["device"] = BUS_UCLM_DEVICE
                samples.append(
                    Sample(
                        id=stem,
                        image_path=image_path,
                        mask_paths=(mask_path,) if mask_path.is_file() else (),
                        label=label,
                        dataset=name,
                        metadata=metadata,
                    )
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{info}: cannot read ({exc}); re-download BUS-UCLM") from None
    unlisted = [p.stem for p in _list_images(images_dir) if p.name not in listed]
    if unlisted:
        problems.append(
            f"{len(unlisted)} image(s) in images/ without an INFO.csv row ({_short_list(unlisted)}): "
            "left out, their label is unknown"
        )
    if missing_masks:
        problems.append(
            f"{len(missing_masks)} image(s) without a file in masks/ ({_short_list(missing_masks)})"
        )
    _require_nonempty(samples, info, "INFO.csv has no rows")
    samples.sort(key=lambda s: _natural_key(s.id))
    _check_headers(samples)
    return Dataset(name=name, root=root, samples=samples, problems=problems + mask_problems(samples))


# --------------------------------------------------------------------------- BUS-BRA


def is_bus_bra_layout(folder: Path) -> bool:
    """Whether ``folder`` looks like BUS-BRA: ``bus_data.csv``, or ``Images/`` beside ``Masks/``.

    Either sign is enough so that a download missing its csv still reaches
    :func:`read_bus_bra` and gets an error naming the file. Names are compared exactly
    (capitalised ``Images``/``Masks``), so a BUS-UCLM folder (``images/``, ``masks/``) on a
    case-insensitive file system is not taken for BUS-BRA.
    """
    if not folder.is_dir():
        return False
    entries = set(os.listdir(folder))
    return BUS_BRA_CSV in entries or {"Images", "Masks"} <= entries


def _bus_bra_mask_name(sample_id: str) -> str | None:
    # The published pairing: Images/bus_0001-l.png <-> Masks/mask_0001-l.png.
    if not sample_id.startswith("bus_") or len(sample_id) == len("bus_"):
        return None
    return f"mask_{sample_id[len('bus_') :]}.png"


def _csv_int(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def read_bus_bra(root: Path, name: str = "bus-bra") -> Dataset:
    """Read BUS-BRA in its published layout: ``Images/``, ``Masks/`` and ``bus_data.csv``.

    ``bus_data.csv`` has the columns ``ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,
    Side,BBOX``. Ids are the ``ID`` cells (``"bus_0001-l"``, the image ``Images/bus_0001-l.png``,
    the mask ``Masks/mask_0001-l.png``); the label is ``Pathology`` (benign or malignant:
    BUS-BRA has no normal images). Metadata holds ``patient`` (from ``Case``) and every other
    column in lower case (``device``, ``birads``, ``histology``, ``side``, ``width``, ``height``,
    ``bbox``...), as strings. A missing csv, an unknown pathology, a duplicate id, or a row
    whose image or mask file is missing raise :class:`DatasetError` naming the file and line.
    Images or masks no row refers to, and images whose size differs from the csv's
    ``Width``/``Height``, are reported in ``problems``. The fold files
    (``5-fold-cv.csv``, ``10-fold-cv.csv``) are not needed and not read.
    """
    root = Path(root)
    table = root / BUS_BRA_CSV
    if not root.is_dir():
        raise DatasetError(f"{root}: BUS-BRA folder not found")
    if not table.is_file():
        raise DatasetError(
            f"{table}: not found. BUS-BRA's published folder holds {BUS_BRA_CSV} beside Images/ and Masks/; "
            "re-download or unpack it completely"
        )
    images_dir, masks_dir = root / "Images", root / "Masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"{folder}: folder not found; BUS-BRA's published folder holds Images/ and Masks/ "
                f"beside {BUS_BRA_CSV}"
            )
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    listed_sizes: dict[str, tuple[int, int]] = {}
    try:
        with open(table, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            absent = [c for c in BUS_BRA_REQUIRED if c not in columns]
            if absent:
                raise DatasetError(
                    f"{table}: missing column(s) {', '.join(absent)} "
                    f"(found: {', '.join(c for c in columns if c) or 'none'}); expected the published "
                    "header ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"
                )
            for row in reader:
                line = reader.line_num
                cells = {key: (row.get(original) or "").strip() for key, original in columns.items() if key}
                if not any(cells.values()):
                    continue
                sample_id = cells["id"]
                mask_name = _bus_bra_mask_name(sample_id)
                if mask_name is None:
                    raise DatasetError(
                        f"{table}, line {line}: ID {sample_id!r} is not of the published form bus_NNNN-x "
                        "(e.g. bus_0001-l)"
                    )
                if sample_id in first_line:
                    raise DatasetError(
                        f"{table}, line {line}: ID {sample_id} is already listed on line "
                        f"{first_line[sample_id]}; list each image once"
                    )
                first_line[sample_id] = line
                label = _parse_label(cells["pathology"])
                if label is None or label is Label.NORMAL:
                    raise DatasetError(
                        f"{table}, line {line}: unknown Pathology {cells['pathology']!r} for {sample_id} "
                        "(allowed: benign, malignant, any case)"
                    )
                image_path = images_dir / f"{sample_id}.png"
                mask_path = masks_dir / mask_name
                for what, path in (("image", image_path), ("mask", mask_path)):
                    if not path.is_file():
                        raise DatasetError(
                            f"{table}, line {line}: {what} {path} does not exist; re-download BUS-BRA "
                            "or delete the row"
                        )
                width, height = _csv_int(cells.get("width", "")), _csv_int(cells.get("height", ""))
                if "width" in cells and "height" in cells:
                    if width is None or height is None:
                        raise DatasetError(
                            f"{table}, line {line}: Width/Height {cells['width']!r}/{cells['height']!r} of "
                            f"{sample_id} are not positive whole numbers; fix the row or re-download BUS-BRA"
                        )
                    listed_sizes[sample_id] = (width, height)
                metadata = {key: value for key, value in cells.items() if key not in _BUS_BRA_NOT_METADATA}
                metadata["patient"] = cells["case"]
                samples.append(
                    Sample(
                        id=sample_id,
                        image_path=image_path,
                        mask_paths=(mask_path,),
                        label=label,
                        dataset=name,
                        metadata=metadata,
                    )
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{table}: cannot read ({exc}); re-download BUS-BRA") from None
    _require_nonempty(samples, table, f"{BUS_BRA_CSV} has no rows")
    samples.sort(key=lambda s: _natural_key(s.id))
    _check_headers(samples)
    problems: list[str] = []
    listed_images = {s.image_path.name for s in samples}
    unlisted = [p.name for p in _list_images(images_dir) if p.name not in listed_images]
    if unlisted:
        problems.append(
            f"{len(unlisted)} image(s) in Images/ without a {BUS_BRA_CSV} row ({_short_list(unlisted)}): "
            "left out, their label is unknown"
        )
    used_masks = {s.mask_paths[0].name for s in samples}
    stray_masks = [p.name for p in _list_images(masks_dir) if p.name not in used_masks]
    if stray_masks:
        problems.append(
            f"{len(stray_masks)} mask file(s) in Masks/ that no {BUS_BRA_CSV} row refers to "
            f"({_short_list(stray_masks)}): ignored"
        )
    resized = []
    for sample in samples:
        listed = listed_sizes.get(sample.id)
        actual = image_size(sample.image_path)
        if listed is not None and listed != actual:
            resized.append(f"{sample.id} {listed[0]}x{listed[1]} vs {actual[0]}x{actual[1]}")
    if resized:
        problems.append(
            f"{len(resized)} image(s) whose size differs from {BUS_BRA_CSV}'s Width x Height "
            f"({_short_list(resized)}): the csv and the file disagree (a resized copy of the dataset?)"
        )
    return Dataset(name=name, root=root, samples=samples, problems=problems + mask_problems(samples))


# --------------------------------------------------------------------------- manifest


def _relative_id(image_path: Path, base: Path) -> str:
    relative = os.path.relpath(image_path, base)
    return Path(relative).with_suffix("").as_posix()


def read_manifest(csv_path: Path, name: str | None = None) -> Dataset:
    """Read a manifest CSV with columns ``image,mask,label`` (any extra column kept as metadata).

    Paths are relative to the CSV's folder (absolute paths work too); ``mask`` may be empty,
    or list several files separated by ``;`` (merged by union). ``label`` is one of
    normal/benign/malignant in any case. Sample ids are the image paths relative to the
    CSV folder without extension (``"images/case001"``). ``name`` defaults to the CSV
    folder's name (plus ``-<stem>`` when the file is not called ``manifest.csv``). Missing
    files, unknown labels, duplicate images, missing columns and an
    empty manifest raise :class:`DatasetError` naming the line.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    # "<folder>" for the conventional manifest.csv, "<folder>-<stem>" for any other file name,
    # so two manifests in one folder never share a name (and so a results folder).
    folder = base.resolve().name
    if csv_path.stem == "manifest" and folder:
        default = folder
    else:
        default = f"{folder}-{csv_path.stem}" if folder else csv_path.stem
    name = name or default
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: manifest file not found")
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise DatasetError(
                    f"{csv_path}: the manifest is empty; it needs a header line image,mask,label "
                    "and one row per image"
                )
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames}
            absent = [c for c in MANIFEST_COLUMNS if c not in columns]
            if absent:
                raise DatasetError(
                    f"{csv_path}: missing required column(s) {', '.join(absent)} "
                    f"(found: {', '.join(c for c in columns if c) or 'none'}); "
                    "a manifest needs the columns image,mask,label"
                )
            for row in reader:
                line = reader.line_num
                cells = {key: (row.get(original) or "").strip() for key, original in columns.items() if key}
                if not any(cells.values()):
                    continue  # trailing ",,," lines that spreadsheets write
                if not cells["image"]:
                    raise DatasetError(f"{csv_path}, line {line}: empty image cell")
                label = _parse_label(cells["label"])
                if label is None:
                    raise DatasetError(
                        f"{csv_path}, line {line}: unknown label {cells['label']!r} "
                        f"(allowed: {_ALLOWED_LABELS}, any case)"
                    )
                image_path = Path(os.path.normpath(base / cells["image"]))
                if not image_path.is_file():
                    raise DatasetError(
                        f"{csv_path}, line {line}: image file {image_path} does not exist; fix the path "
                        "(relative to the manifest's folder) or delete the row"
                    )
                mask_paths: list[Path] = []
                for part in cells["mask"].split(";"):
                    if not part.strip():
                        continue
                    mask_path = Path(os.path.normpath(base / part.strip()))
                    if not mask_path.is_file():
                        raise DatasetError(
                            f"{csv_path}, line {line}: mask file {mask_path} does not exist; fix the path "
                            "(relative to the manifest's folder) or leave the mask cell empty"
                        )
                    mask_paths.append(mask_path)
                sample_id = _relative_id(image_path, base)
                if sample_id in first_line:
                    raise DatasetError(
                        f"{csv_path}, line {line}: image {cells['image']} is already listed on line "
                        f"{first_line[sample_id]}; list each image once"
                    )
                first_line[sample_id] = line
                metadata = {key: value for key, value in cells.items() if key not in MANIFEST_COLUMNS}
                samples.append(
                    Sample(
                        id=sample_id,
                        image_path=image_path,
                        mask_paths=tuple(mask_paths),
                        label=label,
                        dataset=name,
                        metadata=metadata,
                    )
                )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read the manifest ({exc}); save it as UTF-8 CSV") from None
    if not samples:
        raise DatasetError(f"{csv_path}: the manifest has a header but no rows; add one row per image")
    _check_headers(samples)
    return Dataset(name=name, root=base, samples=samples, problems=mask_problems(samples))
