"""BUS-BRA as a named dataset, and class counts per device (bench.data).

Every test builds a tiny fake BUS-BRA tree in tmp_path in the published layout:
``BUSBRA/Images/bus_NNNN-x.png``, ``BUSBRA/Masks/mask_NNNN-x.png`` and ``BUSBRA/bus_data.csv``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import (
    NOT_SET,
    Dataset,
    describe_dataset,
    is_bus_bra_layout,
    load_mask,
    metadata_columns,
    metadata_count_header,
    metadata_count_rows,
    metadata_counts,
    read_bus_bra,
    resolve_dataset,
    sample_support,
)
from bench.errors import DatasetError
from bench.types import Label, Sample

HEADER = ["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX"]
GE5, GE7, TOSHIBA = "GE Logiq 5", "GE Logiq 7 @10-14MHz", "Toshiba Aplio 300"

#: (ID, Case, Histology, Pathology, BIRADS, Device, Side), in csv order (line 2 onwards). The csv
#: is deliberately not sorted: the reader orders ids naturally.
ROWS = [
    ("bus_0001-l", "1", "Fibroadenoma", "benign", "3", GE5, "left"),
    ("bus_0001-r", "1", "Cyst", "Benign", "2", GE5, "right"),
    ("bus_0010-r", "10", "Invasive ductal carcinoma", "malignant", "5", GE7, "right"),
    ("bus_0002-s", "2", "Invasive ductal carcinoma", "MALIGNANT", "5", GE7, "not specified"),
    ("bus_0003-l", "3", "Fibroadenoma", "benign", "4", TOSHIBA, "left"),
    ("bus_0004-s", "4", "Invasive lobular carcinoma", "malignant", "4", TOSHIBA, "not specified"),
]
SORTED_IDS = ["bus_0001-l", "bus_0001-r", "bus_0002-s", "bus_0003-l", "bus_0004-s", "bus_0010-r"]


def image_shape(index: int) -> tuple[int, int]:
    """(height, width) of the index-th image of ROWS: every image has its own size."""
    return 20 + index, 30 + 2 * index


def lesion_box(index: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the index-th lesion: area (3 + index) * 4."""
    return 2, 3, 5 + index, 7


def write_rows(csv_path: Path, rows: list[list[str]]) -> None:
    with open(csv_path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)


def make_bus_bra(data_root: Path) -> Path:
    """The fake BUS-BRA tree under ``data_root/BUSBRA`` (returned)."""
    root = data_root / "BUSBRA"
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rows = []
    for index, (sample_id, case, histology, pathology, birads, device, side) in enumerate(ROWS):
        height, width = image_shape(index)
        grey = np.random.default_rng(index).integers(0, 256, size=(height, width), dtype=np.uint8)
        Image.fromarray(grey).save(root / "Images" / f"{sample_id}.png")
        mask = np.zeros((height, width), np.uint8)
        top, left, bottom, right = lesion_box(index)
        mask[top:bottom, left:right] = 255
        Image.fromarray(mask).save(root / "Masks" / f"mask_{sample_id[4:]}.png")
        bbox = f"[{left}, {top}, {right - left}, {bottom - top}]"
        rows.append(
            [sample_id, case, histology, pathology, birads, device, str(width), str(height), side, bbox]
        )
    write_rows(root / "bus_data.csv", rows)
    (root / "5-fold-cv.csv").write_text("ID,Fold\n", encoding="utf-8")
    return root


def csv_rows(root: Path) -> list[list[str]]:
    with open(root / "bus_data.csv", encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))[1:]


def edit_cell(root: Path, row: int, column: str, value: str) -> None:
    rows = csv_rows(root)
    rows[row][HEADER.index(column)] = value
    write_rows(root / "bus_data.csv", rows)


@pytest.fixture
def bus_bra_root(tmp_path: Path) -> Path:
    return make_bus_bra(tmp_path)


@pytest.fixture
def bus_bra(bus_bra_root: Path) -> Dataset:
    return resolve_dataset("bus-bra", bus_bra_root.parent)


# --------------------------------------------------------------------------- reading


def test_named_bus_bra_reads_ids_labels_and_files(bus_bra: Dataset, bus_bra_root: Path) -> None:
    assert bus_bra.name == "bus-bra" and bus_bra.root == bus_bra_root
    assert [s.id for s in bus_bra.samples] == SORTED_IDS
    assert bus_bra.counts() == {Label.NORMAL: 0, Label.BENIGN: 3, Label.MALIGNANT: 3}
    assert [bus_bra[i].label for i in ("bus_0001-r", "bus_0002-s")] == [Label.BENIGN, Label.MALIGNANT]
    sample = bus_bra["bus_0010-r"]
    assert sample.dataset == "bus-bra"
    assert sample.image_path == bus_bra_root / "Images" / "bus_0010-r.png"
    assert sample.mask_paths == (bus_bra_root / "Masks" / "mask_0010-r.png",)
    assert bus_bra.problems == []


def test_metadata_is_kept_as_lower_case_strings(bus_bra: Dataset) -> None:
    assert dict(bus_bra["bus_0002-s"].metadata) == {
        "patient": "2",
        "histology": "Invasive ductal carcinoma",
        "birads": "5",
        "device": GE7,
        "width": "36",
        "height": "23",
        "side": "not specified",
        "bbox": "[3, 2, 4, 6]",
    }
    assert {s.metadata["patient"] for s in bus_bra.samples} == {"1", "2", "3", "4", "10"}


def test_masks_pair_with_their_images(bus_bra: Dataset) -> None:
    for index, (sample_id, *_rest) in enumerate(ROWS):
        mask = load_mask(bus_bra[sample_id])
        assert mask is not None and mask.shape == image_shape(index)
        top, left, bottom, right = lesion_box(index)
        assert mask.sum() == (bottom - top) * (right - left)
        assert mask[top:bottom, left:right].all()


def test_path_resolution_and_layout_detection(bus_bra_root: Path, tmp_path: Path) -> None:
    by_path = resolve_dataset(str(bus_bra_root), tmp_path / "elsewhere")
    assert by_path.name == "BUSBRA" and [s.id for s in by_path.samples] == SORTED_IDS
    assert is_bus_bra_layout(bus_bra_root)
    uclm_like = tmp_path / "uclm"
    (uclm_like / "images").mkdir(parents=True)
    (uclm_like / "masks").mkdir()
    assert not is_bus_bra_layout(uclm_like)  # lower-case folders are BUS-UCLM's, not BUS-BRA's


def test_missing_named_set_gives_the_zenodo_hint(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset("BUS-BRA", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "BUSBRA") in message
    assert "https://zenodo.org/records/8231412" in message and "CC BY 4.0" in message


def test_bus_bra_cannot_be_a_support_source(bus_bra: Dataset) -> None:
    with pytest.raises(DatasetError, match=r"'bus-bra': class normal has 0 image\(s\), fewer than shots=1"):
        sample_support(bus_bra, shots=1, seed=0)


# --------------------------------------------------------------------------- bad input


def delete_csv(root: Path) -> None:
    (root / "bus_data.csv").unlink()


def delete_image(root: Path) -> None:
    (root / "Images" / "bus_0002-s.png").unlink()


def delete_mask(root: Path) -> None:
    (root / "Masks" / "mask_0003-l.png").unlink()


def unknown_pathology(root: Path) -> None:
    edit_cell(root, 1, "Pathology", "Benigno")


def normal_pathology(root: Path) -> None:
    edit_cell(root, 4, "Pathology", "normal")


def duplicate_id(root: Path) -> None:
    edit_cell(root, 4, "ID", "bus_0001-r")


def missing_column(root: Path) -> None:
    text = (root / "bus_data.csv").read_text(encoding="utf-8")
    (root / "bus_data.csv").write_text(text.replace("Pathology", "Diagnosis", 1), encoding="utf-8")


def malformed_id(root: Path) -> None:
    edit_cell(root, 0, "ID", "0001-l")


def bad_width(root: Path) -> None:
    edit_cell(root, 2, "Width", "wide")


BAD_INPUT: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-csv": (delete_csv, r"BUSBRA/bus_data\.csv: not found.*beside Images/ and Masks/"),
    "missing-image": (delete_image, r"bus_data\.csv, line 5: image .*Images/bus_0002-s\.png does not exist"),
    "missing-mask": (delete_mask, r"bus_data\.csv, line 6: mask .*Masks/mask_0003-l\.png does not exist"),
    "unknown-pathology": (
        unknown_pathology,
        r"bus_data\.csv, line 3: unknown Pathology 'Benigno' for bus_0001-r \(allowed: benign, malignant",
    ),
    "normal-pathology": (normal_pathology, r"line 6: unknown Pathology 'normal' for bus_0003-l"),
    "duplicate-id": (duplicate_id, r"bus_data\.csv, line 6: ID bus_0001-r is already listed on line 3"),
    "missing-column": (missing_column, r"bus_data\.csv: missing column\(s\) pathology \(found: id, case"),
    "malformed-id": (malformed_id, r"line 2: ID '0001-l' is not of the published form bus_NNNN-x"),
    "bad-width": (bad_width, r"line 4: Width/Height 'wide'/'22' of bus_0010-r are not positive whole"),
}


@pytest.mark.parametrize("damage", sorted(BAD_INPUT))
def test_bad_input_raises_naming_file_and_row(damage: str, bus_bra_root: Path) -> None:
    make_damage, pattern = BAD_INPUT[damage]
    make_damage(bus_bra_root)
    with pytest.raises(DatasetError, match=pattern):
        resolve_dataset("bus-bra", bus_bra_root.parent)


def test_unlisted_image_and_stray_mask_are_problems(bus_bra_root: Path) -> None:
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bus_bra_root / "Images" / "bus_0099-l.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bus_bra_root / "Masks" / "mask_0098-r.png")
    dataset = read_bus_bra(bus_bra_root)
    assert "bus_0099-l" not in dataset and len(dataset) == len(ROWS)
    assert dataset.problems == [
        "1 image(s) in Images/ without a bus_data.csv row (bus_0099-l.png): left out, their label is unknown",
        "1 mask file(s) in Masks/ that no bus_data.csv row refers to (mask_0098-r.png): ignored",
    ]


def test_size_disagreeing_with_the_csv_is_a_problem(bus_bra_root: Path) -> None:
    edit_cell(bus_bra_root, 3, "Height", "99")  # bus_0002-s is really 36 x 23
    dataset = read_bus_bra(bus_bra_root)
    assert dataset.problems == [
        "1 image(s) whose size differs from bus_data.csv's Width x Height (bus_0002-s 36x99 vs 36x23): "
        "the csv and the file disagree (a resized copy of the dataset?)"
    ]


# --------------------------------------------------------------------------- counts per device


EXPECTED_DEVICES = {
    GE5: {Label.NORMAL: 0, Label.BENIGN: 2, Label.MALIGNANT: 0},
    GE7: {Label.NORMAL: 0, Label.BENIGN: 0, Label.MALIGNANT: 2},
    TOSHIBA: {Label.NORMAL: 0, Label.BENIGN: 1, Label.MALIGNANT: 1},
}


def test_metadata_counts_per_device(bus_bra: Dataset) -> None:
    counts = metadata_counts(bus_bra, "Device")
    assert counts == EXPECTED_DEVICES and list(counts) == [GE5, GE7, TOSHIBA]
    assert metadata_counts(bus_bra, "birads") == {
        "2": {Label.NORMAL: 0, Label.BENIGN: 1, Label.MALIGNANT: 0},
        "3": {Label.NORMAL: 0, Label.BENIGN: 1, Label.MALIGNANT: 0},
        "4": {Label.NORMAL: 0, Label.BENIGN: 1, Label.MALIGNANT: 1},
        "5": {Label.NORMAL: 0, Label.BENIGN: 0, Label.MALIGNANT: 2},
    }
    assert metadata_count_header("device") == ("device", "normal", "benign", "malignant", "total")
    assert metadata_count_rows(counts) == [
        (GE5, "0", "2", "0", "2"),
        (GE7, "0", "0", "2", "2"),
        (TOSHIBA, "0", "1", "1", "2"),
        ("total", "0", "3", "3", "6"),
    ]
    assert "device" in metadata_columns(bus_bra) and "patient" in metadata_columns(bus_bra)


def test_describe_reports_class_by_device(bus_bra: Dataset) -> None:
    summary = describe_dataset(bus_bra)
    assert summary.device_counts == EXPECTED_DEVICES
    rows = summary.rows()
    keys = [key for key, _ in rows]
    assert keys[2:6] == ["images", f"device {GE5}", f"device {GE7}", f"device {TOSHIBA}"]
    assert dict(rows)[f"device {TOSHIBA}"] == "2 (0 normal / 1 benign / 1 malignant)"
    assert summary.device_rows()[-1] == ("total", "0", "3", "3", "6")
    assert json.loads(json.dumps(summary.to_json()))["devices"][GE7] == {
        "normal": 0,
        "benign": 0,
        "malignant": 2,
    }


def test_metadata_counts_natural_order_missing_values_and_unknown_column(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(image)
    devices = ["probe 10", "probe 9", "", "probe 9", None]
    labels = [Label.NORMAL, Label.BENIGN, Label.MALIGNANT, Label.BENIGN, Label.NORMAL]
    samples = [
        Sample(f"s{i}", image, (), label, "fake", {} if device is None else {"device": device})
        for i, (device, label) in enumerate(zip(devices, labels, strict=True))
    ]
    dataset = Dataset("fake", tmp_path, samples)
    counts = metadata_counts(dataset, "device")
    assert list(counts) == ["probe 9", "probe 10", NOT_SET]  # 9 before 10; missing and empty last
    assert counts["probe 9"] == {Label.NORMAL: 0, Label.BENIGN: 2, Label.MALIGNANT: 0}
    assert counts[NOT_SET] == {Label.NORMAL: 1, Label.BENIGN: 0, Label.MALIGNANT: 1}
    with pytest.raises(
        DatasetError, match=r"'fake': no image has a 'site' value \(metadata columns: device\)"
    ):
        metadata_counts(dataset, "site")
    without = Dataset("plain", tmp_path, [Sample("x", image, (), Label.NORMAL, "plain")])
    assert describe_dataset(without).device_counts == {} and describe_dataset(without).device_rows() == []
    assert not any(key.startswith("device") for key, _ in describe_dataset(without).rows())
