"""Tests of the dataset layer (bench.data): readers, decoding, eval masks, support sampling.

Real-data tests read ../shared/datasets (relative to the repository root) and skip when it
is absent; everything else builds tiny fake datasets in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import (
    NAMED_DATASETS,
    Dataset,
    SupportSelection,
    dataset_names,
    default_data_root,
    describe_dataset,
    eval_mask,
    file_key,
    image_item,
    image_size,
    load_mask,
    load_mask_file,
    load_rgb,
    pixel_exclusions,
    read_bus_uclm,
    read_busi,
    read_manifest,
    register_dataset_provider,
    resize_mask,
    resolve_dataset,
    sample_support,
    support_pool,
    unregister_dataset_provider,
)
from bench.data.masks import EMPTY_LESION_MASK, MASK_SIZE_MISMATCH, NO_LESION_MASK
from bench.errors import DatasetError
from bench.types import CLASSES, ImageItem, Label, Sample

REAL = Path(__file__).parents[1] / ".." / "shared" / "datasets"

HESN_IDS = [f"HESN_{i:03d}" for i in range(13)]


# --------------------------------------------------------------------------- helpers


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write ``array`` as an image file (PNG unless the suffix says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def grey_image(height: int = 40, width: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 0/255 mask with the rectangle (top, left, bottom, right) set."""
    mask = np.zeros((height, width), dtype=np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return mask


def make_busi(root: Path, per_class: int = 6) -> Path:
    """A fake BUSI folder: ``per_class`` images per class, with BUSI's mask naming quirks.

    ``benign (1)`` has two extra masks (``_mask_1``, ``_mask_2``); ``malignant (2)`` has no
    mask at all; ``malignant (3)``'s mask has the wrong size; normals have all-zero masks
    except ``normal (6)`` which has none.
    """
    busi = root / "Dataset_BUSI_with_GT"
    for label in ("benign", "malignant", "normal"):
        for n in range(1, per_class + 1):
            stem = f"{label} ({n})"
            height, width = 40 + n, 60
            save(busi / label / f"{stem}.png", grey_image(height, width, seed=n))
            if label == "normal":
                if n != 6:
                    save(busi / label / f"{stem}_mask.png", np.zeros((height, width), np.uint8))
                continue
            if label == "malignant" and n == 2:
                continue
            if label == "malignant" and n == 3:
                save(busi / label / f"{stem}_mask.png", box_mask(height + 5, width, (5, 5, 15, 15)))
                continue
            save(busi / label / f"{stem}_mask.png", box_mask(height, width, (5, 5, 15, 15)))
            if label == "benign" and n == 1:
                save(busi / label / f"{stem}_mask_1.png", box_mask(height, width, (20, 30, 30, 40)))
                save(busi / label / f"{stem}_mask_2.png", box_mask(height, width, (0, 50, 3, 60)))
    return busi


def write_manifest(folder: Path, lines: list[str], name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_uclm(root: Path) -> Path:
    """A fake BUS-UCLM folder with two patients and one size-mismatched pair."""
    uclm = root / "BUS-UCLM"
    rows = ["Image;Resolution;Label;Doppler;Marks;Combined"]
    for name, label in [("AAAA_000", "Normal"), ("AAAA_001", "Benign"), ("BBBB_000", "Malignant")]:
        save(uclm / "images" / f"{name}.png", np.stack([grey_image(30, 50)] * 3, axis=2))
        colour = np.zeros((30, 50, 3), np.uint8)
        if label != "Normal":
            colour[5:10, 5:10, 0 if label == "Malignant" else 1] = 255
        save(uclm / "masks" / f"{name}.png", colour)
        rows.append(f"{name}.png;856x606;{label};No;Yes;No")
    (uclm / "INFO.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    return uclm


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real datasets not found at {REAL.resolve()}")
    return REAL


@pytest.fixture(scope="session")
def uclm(real_root: Path) -> Dataset:
    return resolve_dataset("bus-uclm", real_root)


@pytest.fixture(scope="session")
def udiat(real_root: Path) -> Dataset:
    return resolve_dataset("udiat", real_root)


@pytest.fixture(scope="session")
def breast(real_root: Path) -> Dataset:
    return resolve_dataset("breast", real_root)


@pytest.fixture
def busi_root(tmp_path: Path) -> Path:
    return make_busi(tmp_path)


@pytest.fixture
def busi(busi_root: Path) -> Dataset:
    return read_busi(busi_root)


# --------------------------------------------------------------------------- BUSI reader


def test_busi_reader_ids_labels_and_order(busi: Dataset, busi_root: Path) -> None:
    assert busi.name == "busi"
    assert busi.root == busi_root
    assert len(busi) == 18
    assert busi.counts() == {Label.NORMAL: 6, Label.BENIGN: 6, Label.MALIGNANT: 6}
    assert busi.samples[0].id == "normal/normal (1)"  # CLASSES order, then natural order
    assert [s.id for s in busi.of_class(Label.BENIGN)][:3] == [
        "benign/benign (1)",
        "benign/benign (2)",
        "benign/benign (3)",
    ]
    sample = busi["benign/benign (3)"]
    assert sample.label is Label.BENIGN and sample.dataset == "busi"
    assert sample.image_path == busi_root / "benign" / "benign (3).png"
    assert sample.mask_paths == (busi_root / "benign" / "benign (3)_mask.png",)
    assert busi["normal/normal (6)"].mask_paths == ()
    assert busi["malignant/malignant (2)"].mask_paths == ()


def test_busi_mask_union(busi: Dataset) -> None:
    sample = busi["benign/benign (1)"]
    assert [p.name for p in sample.mask_paths] == [
        "benign (1)_mask.png",
        "benign (1)_mask_1.png",
        "benign (1)_mask_2.png",
    ]
    mask = load_mask(sample)
    assert mask is not None and mask.dtype == bool and mask.shape == (41, 60)
    assert mask.sum() == 100 + 100 + 30
    assert mask[7, 7] and mask[25, 35] and mask[1, 55] and not mask[35, 10]


def test_busi_problems_report_missing_masks_and_mismatch(busi: Dataset) -> None:
    text = "\n".join(busi.problems)
    assert "1 image labelled benign/malignant without a mask file (malignant/malignant (2))" in text
    assert "1 image whose mask size differs from the image (malignant/malignant (3))" in text
    assert "normal (6)" not in text  # a normal image without a mask is fine


def test_busi_orphan_mask_and_missing_class_folder(tmp_path: Path) -> None:
    busi = tmp_path / "busi"
    save(busi / "benign" / "benign (1).png", grey_image())
    save(busi / "benign" / "benign (1)_mask.png", box_mask(40, 60, (1, 1, 5, 5)))
    save(busi / "benign" / "benign (9)_mask.png", box_mask(40, 60, (1, 1, 5, 5)))
    (busi / "benign" / "Thumbs.db").write_bytes(b"junk")
    dataset = read_busi(busi)
    assert [s.id for s in dataset.samples] == ["benign/benign (1)"]
    text = "\n".join(dataset.problems)
    assert "no normal/malignant folder" in text
    assert "benign (9)" in text


def test_busi_empty_folder_raises(tmp_path: Path) -> None:
    for label in ("benign", "malignant", "normal"):
        (tmp_path / "busi" / label).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        read_busi(tmp_path / "busi")


# --------------------------------------------------------------------------- BUS-UCLM reader


def test_uclm_counts_and_metadata(uclm: Dataset) -> None:
    assert uclm.name == "bus-uclm"
    assert len(uclm) == 683
    assert uclm.counts() == {Label.NORMAL: 419, Label.BENIGN: 174, Label.MALIGNANT: 90}
    sample = uclm["ALWI_000"]
    assert sample.label is Label.BENIGN
    assert sample.image_path.name == "ALWI_000.png" and sample.image_path.parent.name == "images"
    assert [p.parent.name for p in sample.mask_paths] == ["masks"]
    assert sample.metadata["patient"] == "ALWI"
    assert sample.metadata["device"] == "Siemens ACUSON S2000"
    assert sample.metadata["resolution"] == "856x606"
    assert {"doppler", "marks", "combined"} <= set(sample.metadata)
    assert len({s.metadata["patient"] for s in uclm.samples}) == 38
    assert all(s.mask_paths for s in uclm.samples)


def test_uclm_hesn_mismatches_reported_and_excluded(uclm: Dataset) -> None:
    mismatch_lines = [p for p in uclm.problems if "mask size differs" in p]
    assert (
        len(mismatch_lines) == 1
        and mismatch_lines[0].startswith("13 images")
        and "HESN_000" in mismatch_lines[0]
    )
    excluded = pixel_exclusions(uclm.samples)
    assert sorted(excluded) == HESN_IDS
    assert {e.kind for e in excluded.values()} == {MASK_SIZE_MISMATCH}
    for sample_id in ("HESN_000", "HESN_002"):  # one normal, one benign
        result = eval_mask(uclm[sample_id], 64)
        assert result.mask is None and not result.usable
        assert result.kind == MASK_SIZE_MISMATCH and "448x317" in result.reason
    pool = support_pool(uclm)
    pooled = {s.id for samples in pool.values() for s in samples}
    assert not pooled & set(HESN_IDS)
    assert {label: len(samples) for label, samples in pool.items()} == {
        Label.NORMAL: 410,
        Label.BENIGN: 170,
        Label.MALIGNANT: 90,
    }


def test_uclm_colour_masks_are_binary(uclm: Dataset) -> None:
    raw = np.asarray(Image.open(uclm["ALWI_000"].mask_paths[0]))
    assert raw.ndim == 3 and raw.shape[2] == 3  # RGB on disk
    benign = load_mask(uclm["ALWI_000"])
    assert benign is not None and benign.dtype == bool and benign.ndim == 2 and benign.any()
    assert np.array_equal(benign, raw.max(axis=2) > 0)
    normal = load_mask(uclm["ALWI_001"])
    assert normal is not None and not normal.any()


def test_uclm_fake_row_without_image_raises(tmp_path: Path) -> None:
    uclm = make_uclm(tmp_path)
    (uclm / "images" / "AAAA_001.png").unlink()
    with pytest.raises(DatasetError, match=r"INFO\.csv, line 3: image .*AAAA_001\.png does not exist"):
        read_bus_uclm(uclm)


def test_uclm_fake_image_without_row_is_a_problem(tmp_path: Path) -> None:
    uclm = make_uclm(tmp_path)
    save(uclm / "images" / "CCCC_000.png", grey_image())
    dataset = read_bus_uclm(uclm)
    assert "CCCC_000" not in dataset and len(dataset) == 3
    assert any("1 image(s) in images/ without an INFO.csv row (CCCC_000)" in p for p in dataset.problems)
    assert load_mask(dataset["BBBB_000"]).sum() == 25  # red = malignant, still lesion


def test_uclm_fake_unknown_label_and_missing_column(tmp_path: Path) -> None:
    uclm = make_uclm(tmp_path)
    info = uclm / "INFO.csv"
    info.write_text(info.read_text(encoding="utf-8-sig").replace("Benign", "Benigno"), encoding="utf-8-sig")
    with pytest.raises(DatasetError, match=r"line 3: unknown label 'Benigno'.*normal, benign, malignant"):
        read_bus_uclm(uclm)
    info.write_text("Image;Resolution\nAAAA_000.png;856x606\n", encoding="utf-8-sig")
    with pytest.raises(DatasetError, match=r"INFO\.csv: missing column\(s\) label"):
        read_bus_uclm(uclm)


# --------------------------------------------------------------------------- manifests (real)


def test_udiat_manifest(udiat: Dataset, real_root: Path) -> None:
    assert udiat.name == "udiat"
    assert len(udiat) == 163
    assert udiat.counts() == {Label.NORMAL: 0, Label.BENIGN: 109, Label.MALIGNANT: 54}
    sample = udiat["original/000001"]
    assert sample.metadata == {"diagnosis": "CYST"}
    assert sample.mask_paths[0].name == "000001.png" and sample.mask_paths[0].parent.name == "GT"
    assert udiat.problems == []


def test_breast_manifest(breast: Dataset) -> None:
    assert breast.name == "breast"
    assert len(breast) == 256
    assert breast.counts() == {Label.NORMAL: 4, Label.BENIGN: 154, Label.MALIGNANT: 98}
    sample = breast["images/case002"]
    assert set(sample.metadata) == {
        "diagnosis",
        "shape",
        "margin",
        "echogenicity",
        "posterior_features",
        "birads",
    }
    assert sample.metadata["birads"] == "4b"
    assert sample.mask_paths[0].name == "case002_tumor.png"
    normals = breast.of_class(Label.NORMAL)
    assert all(s.mask_paths == () for s in normals)
    assert breast.problems == []


def test_all_real_masks_load_cleanly(uclm: Dataset, udiat: Dataset, breast: Dataset) -> None:
    """Every real mask decodes to a binary mask; lesions are non-empty, normals empty.

    Covers BUS-UCLM's RGB colour masks, UDIAT's mixed mode-"1"/"L" masks and BrEaST's
    RGBA masks (one of which, case010, has a stray alpha=75 pixel).
    """
    for dataset in (uclm, udiat, breast):
        for sample in dataset.samples:
            mask = load_mask(sample)
            if mask is None:
                assert sample.label is Label.NORMAL, sample.id
                continue
            assert mask.dtype == bool and mask.ndim == 2, sample.id
            assert mask.any() == sample.is_lesion, (dataset.name, sample.id)


def test_breast_rgba_image_and_mask(breast: Dataset) -> None:
    sample = breast["images/case005"]  # RGBA: alpha is the scan sector
    rgb = load_rgb(sample.image_path)
    raw = np.asarray(Image.open(sample.image_path))
    assert raw.shape[2] == 4
    assert rgb.dtype == np.uint8 and rgb.shape == (*raw.shape[:2], 3)
    assert (rgb[raw[..., 3] == 0] <= 3).all()  # transparent = outside the sector = black
    mask = load_mask(breast["images/case010"])
    assert mask is not None and mask.sum() == 5993


# --------------------------------------------------------------------------- resolution


def test_named_resolution_is_case_insensitive(real_root: Path, udiat: Dataset) -> None:
    again = resolve_dataset("UDIAT", real_root)
    assert again.name == "udiat" and [s.id for s in again.samples] == [s.id for s in udiat.samples]
    assert set(NAMED_DATASETS) == {"bus-uclm", "busi", "udiat", "breast", "bus-bra"}
    assert dataset_names()[:5] == ["bus-uclm", "busi", "udiat", "breast", "bus-bra"]


def test_path_resolution_real(real_root: Path, uclm: Dataset) -> None:
    by_folder = resolve_dataset(str(real_root / "BUS-UCLM"), Path("/nonexistent"))
    assert by_folder.name == "BUS-UCLM" and len(by_folder) == len(uclm)
    by_csv = resolve_dataset(str(real_root / "BrEaST" / "manifest.csv"), Path("/nonexistent"))
    assert by_csv.name == "BrEaST" and len(by_csv) == 256
    by_manifest_folder = resolve_dataset(str(real_root / "UDIAT_DatasetB"), Path("/nonexistent"))
    assert len(by_manifest_folder) == 163


def test_named_and_path_resolution_busi(busi_root: Path) -> None:
    named = resolve_dataset("busi", busi_root.parent)
    assert named.name == "busi" and len(named) == 18
    by_path = resolve_dataset(str(busi_root), Path("/nonexistent"))
    assert by_path.name == "Dataset_BUSI_with_GT" and by_path.samples[0].dataset == "Dataset_BUSI_with_GT"


def test_missing_named_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset("busi", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "Dataset_BUSI_with_GT") in message
    assert "--data-root" in message and "BENCH_DATA_ROOT" in message
    assert "scholar.cu.edu.eg" in message


def test_unknown_spec_and_unrecognised_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'nope' is neither a dataset name \(bus-uclm, busi"):
        resolve_dataset("nope", tmp_path)
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="not a dataset folder I recognise"):
        resolve_dataset(str(tmp_path / "stuff"), tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"x\.txt: a dataset file must be a manifest \.csv"):
        resolve_dataset(str(tmp_path / "x.txt"), tmp_path)


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BENCH_DATA_ROOT", raising=False)
    assert default_data_root() == Path("data")
    monkeypatch.setenv("BENCH_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path


def test_dataset_provider_hook(tmp_path: Path, busi_root: Path) -> None:
    calls: list[tuple[str, Path]] = []

    def factory(spec: str, data_root: Path) -> Dataset:
        calls.append((spec, data_root))
        base = read_busi(busi_root, name=spec)
        return Dataset(name=spec, root=tmp_path / "cache", samples=base.samples)

    register_dataset_provider("fakephantom", factory)
    try:
        assert "fakephantom" in dataset_names()
        dataset = resolve_dataset("fakephantom:device-a", tmp_path)
        assert dataset.name == "fakephantom:device-a" and len(dataset) == 18
        resolve_dataset("FakePhantom", tmp_path)
        assert calls == [("fakephantom:device-a", tmp_path), ("FakePhantom", tmp_path)]
        with pytest.raises(DatasetError, match="already registered"):
            register_dataset_provider("fakephantom", factory)
        with pytest.raises(DatasetError, match="already registered"):
            register_dataset_provider("busi", factory)
        register_dataset_provider("fakephantom", lambda spec, root: "oops", replace=True)  # type: ignore[arg-type,return-value]
        with pytest.raises(DatasetError, match="returned str, not a Dataset"):
            resolve_dataset("fakephantom", tmp_path)
    finally:
        unregister_dataset_provider("fakephantom")
    assert "fakephantom" not in dataset_names()


# --------------------------------------------------------------------------- manifests (bad input)


@pytest.fixture
def manifest_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "set"
    save(folder / "img" / "a.png", grey_image(20, 30))
    save(folder / "img" / "b.png", grey_image(20, 30, seed=1))
    save(folder / "img" / "c.png", grey_image(20, 30, seed=2))
    save(folder / "gt" / "b.png", box_mask(20, 30, (2, 2, 8, 8)))
    save(folder / "gt" / "c.png", box_mask(20, 30, (10, 10, 12, 20)))
    save(folder / "gt" / "c2.png", box_mask(20, 30, (0, 0, 1, 1)))
    return folder


def test_manifest_reader_fake(manifest_folder: Path) -> None:
    path = write_manifest(
        manifest_folder,
        [
            "Image, Mask ,LABEL,site",
            "img/a.png,,Normal,x",
            "img/b.png,gt/b.png,BENIGN,y",
            "img/c.png,gt/c.png;gt/c2.png,malignant,",
            ",,,",
        ],
    )
    dataset = read_manifest(path)
    assert dataset.name == "set" and dataset.root == manifest_folder
    assert [s.id for s in dataset.samples] == ["img/a", "img/b", "img/c"]
    assert [s.label for s in dataset.samples] == list(CLASSES)
    assert dataset["img/a"].metadata == {"site": "x"} and dataset["img/a"].mask_paths == ()
    assert load_mask(dataset["img/c"]).sum() == 20 + 1


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (
            ["image,mask,label", "img/a.png,,normal", "img/zz.png,,benign"],
            r"line 3: image file .*zz\.png does not exist",
        ),
        (
            ["image,mask,label", "img/b.png,gt/nope.png,benign"],
            r"line 2: mask file .*nope\.png does not exist",
        ),
        (
            ["image,mask,label", "img/b.png,gt/b.png,cyst"],
            r"line 2: unknown label 'cyst' \(allowed: normal, benign, malignant",
        ),
        (["image,label", "img/a.png,normal"], r"manifest\.csv: missing required column\(s\) mask"),
        (["image,mask,label"], r"manifest\.csv: the manifest has a header but no rows"),
        ([], r"manifest\.csv: the manifest is empty"),
        (
            ["image,mask,label", "img/a.png,,normal", "./img/a.png,,normal"],
            r"line 3: image \./img/a\.png is already listed on line 2",
        ),
    ],
    ids=[
        "missing-image",
        "missing-mask",
        "unknown-label",
        "missing-column",
        "no-rows",
        "empty-file",
        "duplicate",
    ],
)
def test_manifest_bad_input(manifest_folder: Path, lines: list[str], pattern: str) -> None:
    path = manifest_folder / "manifest.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(DatasetError, match=pattern):
        read_manifest(path)


def test_manifest_naming_corrupt_image(manifest_folder: Path) -> None:
    (manifest_folder / "img" / "bad.png").write_bytes(b"this is not a png")
    path = write_manifest(manifest_folder, ["image,mask,label", "img/bad.png,,normal"])
    with pytest.raises(DatasetError, match=r"bad\.png: not a readable image.*re-download"):
        read_manifest(path)


# --------------------------------------------------------------------------- decoding


def test_load_rgb_corrupt_and_truncated(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"garbage\.png: not a readable image.*re-download.*remove"):
        load_rgb(garbage)
    good = save(tmp_path / "good.png", grey_image(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-200])
    assert image_size(truncated) == (64, 64)  # the header survives ...
    with pytest.raises(DatasetError, match=r"truncated\.png: not a readable image"):
        load_rgb(truncated)  # ... the pixels do not
    with pytest.raises(DatasetError, match=r"missing\.png: file not found"):
        load_rgb(tmp_path / "missing.png")


def test_load_rgb_conversions(tmp_path: Path) -> None:
    grey = grey_image(10, 12)
    rgb = load_rgb(save(tmp_path / "l.png", grey))
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 12, 3)
    assert (rgb == grey[..., None]).all()
    palette = load_rgb(save(tmp_path / "p.png", np.stack([grey] * 3, axis=2), mode="P"))
    assert palette.shape == (10, 12, 3)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 6:, 3] = 255
    composited = load_rgb(save(tmp_path / "rgba.png", rgba))
    assert (composited[:, :6] == 0).all() and (composited[:, 6:] == 200).all()
    wide = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
    sixteen = load_rgb(save(tmp_path / "i16.png", wide))
    assert sixteen.shape == (10, 12, 3) and sixteen[-1, -1, 0] == (119 * 500) >> 8
    assert image_size(tmp_path / "rgba.png") == (12, 10)


def test_mask_formats(tmp_path: Path) -> None:
    box = box_mask(10, 12, (2, 3, 6, 9)) > 0
    # mode "1" (UDIAT), "L", palette
    assert np.array_equal(load_mask_file(save(tmp_path / "one.png", box)), box)
    assert np.array_equal(load_mask_file(save(tmp_path / "l.png", box.astype(np.uint8) * 255)), box)
    assert np.array_equal(load_mask_file(save(tmp_path / "p.png", box.astype(np.uint8) * 255, mode="P")), box)
    # colour (BUS-UCLM): red and green are both lesion
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[2:4, 3:9, 0] = 255
    colour[4:6, 3:9, 1] = 255
    assert np.array_equal(load_mask_file(save(tmp_path / "rgb.png", colour)), box)
    # RGBA with colour and alpha (BrEaST): transparent pixels are background whatever their colour
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[box] = 255
    rgba[0, 0, :3] = 255  # white but transparent
    assert np.array_equal(load_mask_file(save(tmp_path / "rgba.png", rgba)), box)
    # alpha-only: flat colour, lesion drawn as opacity
    alpha_only = np.zeros((10, 12, 4), np.uint8)
    alpha_only[..., 3] = box * 255
    assert np.array_equal(load_mask_file(save(tmp_path / "alpha.png", alpha_only)), box)
    # opaque everywhere: alpha is ignored
    opaque = np.full((10, 12, 4), 255, np.uint8)
    opaque[..., :3] = (box * 255)[..., None]
    assert np.array_equal(load_mask_file(save(tmp_path / "opaque.png", opaque)), box)


def test_non_binary_mask_raises(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 12).astype(np.uint8), (10, 1))
    image = save(tmp_path / "img.png", grey_image(10, 12))
    mask = save(tmp_path / "grey_mask.png", gradient)
    sample = Sample("x", image, (mask,), Label.BENIGN, "fake")
    with pytest.raises(DatasetError, match=r"grey_mask\.png: mask is not binary \(12 distinct grey levels"):
        load_mask(sample)
    with pytest.raises(DatasetError, match=r"grey_mask\.png"):
        eval_mask(sample, 8)
    jpeg = tmp_path / "mask.jpg"
    Image.fromarray(box_mask(40, 40, (5, 5, 30, 30))).save(jpeg, quality=50)
    with pytest.raises(DatasetError, match=r"mask\.jpg: mask is not binary"):
        load_mask_file(jpeg)


def test_file_key_and_image_item(tmp_path: Path) -> None:
    path = save(tmp_path / "a.png", grey_image(8, 8))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    assert file_key(path) == expected
    sample = Sample("a", path, (), Label.NORMAL, "fake")
    item = image_item(sample)
    assert isinstance(item, ImageItem) and item.id == "a" and item.key == expected
    assert item.rgb().shape == (8, 8, 3)
    assert pickle.loads(pickle.dumps(item)).rgb().shape == (8, 8, 3)
    # the cache notices a rewritten file
    save(path, grey_image(8, 9, seed=5))
    assert file_key(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:32] != expected


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    sample = Sample("a", tmp_path / "a.png", (), Label.NORMAL, "fake")
    with pytest.raises(DatasetError, match=r"duplicate sample id.*: a"):
        Dataset("fake", tmp_path, [sample, sample])


# --------------------------------------------------------------------------- eval masks


def test_eval_masks_fake(busi: Dataset) -> None:
    lesion = eval_mask(busi["benign/benign (2)"], 32)
    assert lesion.usable and lesion.reason is None
    assert lesion.mask.shape == (32, 32) and lesion.mask.dtype == bool and lesion.mask.any()
    normal = eval_mask(busi["normal/normal (6)"], 32)  # no mask file
    assert normal.mask.shape == (32, 32) and normal.mask.dtype == bool and not normal.mask.any()
    normal_with_file = eval_mask(busi["normal/normal (1)"], 32)
    assert normal_with_file.usable and not normal_with_file.mask.any()
    no_mask = eval_mask(busi["malignant/malignant (2)"], 32)
    assert no_mask.mask is None and no_mask.kind == NO_LESION_MASK
    mismatch = eval_mask(busi["malignant/malignant (3)"], 32)
    assert mismatch.mask is None and mismatch.kind == MASK_SIZE_MISMATCH
    assert "is 60x48 but the image is 60x43" in mismatch.reason


def test_eval_mask_empty_lesion_mask(tmp_path: Path) -> None:
    image = save(tmp_path / "img.png", grey_image(10, 12))
    mask = save(tmp_path / "mask.png", np.zeros((10, 12), np.uint8))
    result = eval_mask(Sample("x", image, (mask,), Label.MALIGNANT, "fake"), 16)
    assert result.mask is None and result.kind == EMPTY_LESION_MASK


def test_resize_mask_bilinear_threshold() -> None:
    mask = np.zeros((100, 50), bool)
    mask[:, :25] = True  # left half of a non-square frame
    resized = resize_mask(mask, 20)
    assert resized.shape == (20, 20) and resized.dtype == bool
    assert resized[:, :10].all() and not resized[:, 10:].any()
    tiny = np.zeros((4, 4), bool)
    tiny[1:3, 1:3] = True
    assert resize_mask(tiny, 8).sum() == 16


def test_eval_masks_real(uclm: Dataset, breast: Dataset) -> None:
    result = eval_mask(uclm["ALWI_000"], 224)
    assert result.mask.shape == (224, 224) and result.mask.dtype == bool and result.mask.any()
    assert not eval_mask(uclm["ALWI_001"], 224).mask.any()
    normal = eval_mask(breast["images/case045"], 224)  # BrEaST normal: no mask file
    assert normal.usable and not normal.mask.any()


# --------------------------------------------------------------------------- support sampling


def test_support_counts_and_no_duplicates(busi: Dataset) -> None:
    selection = sample_support(busi, shots=3, seed=0)
    assert isinstance(selection, SupportSelection)
    assert {label: len(ids) for label, ids in selection.ids.items()} == dict.fromkeys(CLASSES, 3)
    ids = selection.all_ids()
    assert len(ids) == len(set(ids)) == 9
    assert [s.id for s in selection.samples] == ids == [i for label in CLASSES for i in selection.ids[label]]
    assert all(s.label is label for label in CLASSES for s in selection.samples_of(label))
    # never the lesion without a mask, nor the size mismatch
    assert "malignant/malignant (2)" not in ids and "malignant/malignant (3)" not in ids


def test_support_deterministic_and_pinned(busi: Dataset) -> None:
    first = sample_support(busi, shots=2, seed=0)
    assert first == sample_support(busi, shots=2, seed=0)
    # Pinned: the draw is sha256-based, so any change here means results are not comparable.
    assert first.to_json() == {
        "normal": ["normal/normal (1)", "normal/normal (3)"],
        "benign": ["benign/benign (2)", "benign/benign (3)"],
        "malignant": ["malignant/malignant (1)", "malignant/malignant (6)"],
    }
    seeds = {tuple(sample_support(busi, shots=2, seed=s).all_ids()) for s in range(5)}
    assert len(seeds) > 1


def test_support_pinned_real(uclm: Dataset) -> None:
    selection = sample_support(uclm, shots=4, seed=0)
    assert selection.to_json() == {
        "normal": ["COST_002", "FLBA_013", "NIRO_009", "PAGY_008"],
        "benign": ["ALWI_016", "DAPA_021", "ORPE_014", "PLBA_013"],
        "malignant": ["CHVI_004", "COPE_018", "FUHI_000", "SIBA_004"],
    }
    assert not set(selection.all_ids()) & set(HESN_IDS)


def test_support_json_roundtrip(busi: Dataset) -> None:
    selection = sample_support(busi, shots=2, seed=3)
    data = json.loads(json.dumps(selection.to_json()))
    assert SupportSelection.from_json(data, busi, seed=3) == selection
    data["normal"][0] = "normal/ghost"
    with pytest.raises(DatasetError, match="normal/ghost"):
        SupportSelection.from_json(data, busi, seed=3)


def test_support_too_many_shots(busi: Dataset) -> None:
    # malignant has 6 images but only 4 usable (one without mask, one mismatched)
    assert len(sample_support(busi, shots=4, seed=1).ids[Label.MALIGNANT]) == 4
    with pytest.raises(
        DatasetError, match=r"'busi': class malignant has 4 image\(s\) usable.*6 in total.*shots=5"
    ):
        sample_support(busi, shots=5, seed=0)
    with pytest.raises(DatasetError, match="positive integer"):
        sample_support(busi, shots=0, seed=0)


def test_support_without_normals(udiat: Dataset) -> None:
    with pytest.raises(DatasetError, match=r"'udiat': class normal has 0 image"):
        sample_support(udiat, shots=1, seed=0)


# --------------------------------------------------------------------------- summary


def test_describe_fake(busi: Dataset) -> None:
    summary = describe_dataset(busi)
    assert summary.counts == dict.fromkeys(CLASSES, 6)
    assert summary.with_mask == {Label.NORMAL: 5, Label.BENIGN: 6, Label.MALIGNANT: 5}
    assert summary.pixel_usable == {Label.NORMAL: 6, Label.BENIGN: 6, Label.MALIGNANT: 4}
    assert summary.width_range == (60, 60) and summary.height_range == (41, 46)
    rows = dict(summary.rows())
    assert rows["images"] == "18 (6 normal / 6 benign / 6 malignant)"
    assert rows["height"] == "41-46" and rows["width"] == "60"
    assert rows["problems"] == "2" and summary.problems == busi.problems
    assert summary.class_rows()[-1] == ("total", "18", "16", "16")
    json.dumps(summary.to_json())


def test_describe_real(uclm: Dataset) -> None:
    summary = describe_dataset(uclm)
    assert summary.total == 683
    assert summary.pixel_usable == {Label.NORMAL: 410, Label.BENIGN: 170, Label.MALIGNANT: 90}
    assert summary.width_range == (448, 448) and summary.height_range == (265, 358)
    assert any("13 images whose mask size differs" in p for p in summary.problems)
