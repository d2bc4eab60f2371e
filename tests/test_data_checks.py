"""Input hardening in the data layer: clashing BUSI files, deep decoding checks, support sizes
checked up front, and target images shared with the source's support pool.

Every test builds tiny fake datasets in tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import (
    Dataset,
    check_no_overlap,
    check_support_sizes,
    deep_check,
    overlapping_images,
    read_busi,
    sample_support,
)
from bench.errors import DatasetError
from bench.types import Label, Sample


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def speckle(seed: int, height: int = 20, width: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def box(height: int = 20, width: int = 30, area_rows: int = 3) -> np.ndarray:
    """0/255 mask with a ``area_rows`` x 4 lesion in the top-left corner."""
    mask = np.zeros((height, width), np.uint8)
    mask[1 : 1 + area_rows, 1:5] = 255
    return mask


CLASS_OFFSETS = {"normal": 0, "benign": 100, "malignant": 200}


def make_busi(
    root: Path, counts: dict[str, int], *, without_mask: int = 0, mismatched: int = 0, seed: int = 0
) -> Path:
    """A BUSI folder with ``counts[class]`` images per class, each lesion with a mask.

    The first ``without_mask`` malignant images have no mask file; the first ``mismatched``
    normal images have a mask of the wrong size. Image content depends on ``seed``.
    """
    for label, count in counts.items():
        for n in range(1, count + 1):
            stem = f"{label} ({n})"
            save(root / label / f"{stem}.png", speckle(seed * 1000 + CLASS_OFFSETS[label] + n))
            if label == "normal":
                if n <= mismatched:
                    save(root / label / f"{stem}_mask.png", np.zeros((25, 30), np.uint8))
                continue
            if label == "malignant" and n <= without_mask:
                continue
            save(root / label / f"{stem}_mask.png", box())
    return root


# --------------------------------------------------------------------------- BUSI name clashes


def test_busi_two_images_with_one_stem_name_both(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "busi", {"normal": 1, "benign": 2, "malignant": 1})
    save(root / "benign" / "benign (2).jpg", speckle(99))
    with pytest.raises(DatasetError) as info:
        read_busi(root)
    message = str(info.value)
    assert str(root / "benign") in message
    assert (
        "image files benign (2).jpg and benign (2).png have the same name apart from the extension" in message
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("benign (1)_mask.bmp", "benign (1)_mask.png"), ("benign (1)_mask_01.png", "benign (1)_mask_1.png")],
    ids=["extension", "number-spelling"],
)
def test_busi_two_masks_for_one_slot_name_both(tmp_path: Path, first: str, second: str) -> None:
    root = make_busi(tmp_path / "busi", {"normal": 1, "benign": 2, "malignant": 1})
    for name in (first, second):
        save(root / "benign" / name, box())
    with pytest.raises(DatasetError) as info:
        read_busi(root)
    assert f"mask files {first} and {second} are the same mask of image 'benign (1)'" in str(info.value)


def test_busi_extra_numbered_masks_still_merge(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "busi", {"normal": 1, "benign": 1, "malignant": 1})
    save(root / "benign" / "benign (1)_mask_1.png", box())
    save(root / "benign" / "benign (1)_mask_2.png", box())
    dataset = read_busi(root)
    assert [p.name for p in dataset["benign/benign (1)"].mask_paths] == [
        "benign (1)_mask.png",
        "benign (1)_mask_1.png",
        "benign (1)_mask_2.png",
    ]


# --------------------------------------------------------------------------- deep check


def truncated_copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[:-150])
    return target


def test_deep_check_names_every_bad_file(tmp_path: Path) -> None:
    good_image = save(tmp_path / "good.png", speckle(1))
    good_mask = save(tmp_path / "good_mask.png", box())
    empty_mask = save(tmp_path / "empty_mask.png", np.zeros((20, 30), np.uint8))
    broken_image = truncated_copy(save(tmp_path / "whole.png", speckle(2)), tmp_path / "broken.png")
    broken_mask = truncated_copy(save(tmp_path / "whole_mask.png", speckle(3) // 2 * 2), tmp_path / "bm.png")
    grey_mask = save(tmp_path / "grey_mask.png", np.tile(np.arange(30, dtype=np.uint8) * 8, (20, 1)))
    small_mask = save(tmp_path / "small_mask.png", box(10, 15))
    samples = [
        Sample("ok-lesion", good_image, (good_mask,), Label.BENIGN, "fake"),
        Sample("ok-normal", good_image, (empty_mask,), Label.NORMAL, "fake"),
        Sample("ok-normal-no-mask", good_image, (), Label.NORMAL, "fake"),
        Sample("truncated-image", broken_image, (good_mask,), Label.MALIGNANT, "fake"),
        Sample("truncated-mask", good_image, (broken_mask,), Label.BENIGN, "fake"),
        Sample("grey-mask", good_image, (grey_mask,), Label.BENIGN, "fake"),
        Sample("lesion-on-normal", good_image, (empty_mask, good_mask), Label.NORMAL, "fake"),
        Sample("black-lesion-mask", good_image, (empty_mask,), Label.MALIGNANT, "fake"),
        Sample("masks-disagree", good_image, (good_mask, small_mask), Label.BENIGN, "fake"),
    ]
    dataset = Dataset("fake", tmp_path, samples)
    ticks: list[int] = []
    problems = deep_check(dataset, progress=lambda: ticks.append(1))
    assert len(ticks) == len(samples)
    assert len(problems) == 6, problems
    truncated_image, truncated_mask, grey, on_normal, black, disagree = problems
    assert truncated_image.startswith(f"{broken_image}: not a readable image")
    assert truncated_mask.startswith(f"{broken_mask}: not a readable image")
    assert grey.startswith(f"{grey_mask}: mask is not binary (30 distinct grey levels")
    assert on_normal == (
        f"{empty_mask} + {good_mask}: the image {good_image} is labelled normal but its mask marks 12 "
        "lesion pixel(s); fix the label or blank the mask (kept out of pixel metrics)"
    )
    assert black.startswith(
        f"{empty_mask}: the image {good_image} is labelled malignant but its mask is all black"
    )
    assert disagree.startswith(f"{small_mask}: 15x10, but {good_mask} (a mask of the same image")


def test_deep_check_of_a_clean_dataset_is_empty(tmp_path: Path) -> None:
    dataset = read_busi(make_busi(tmp_path / "busi", {"normal": 2, "benign": 2, "malignant": 2}))
    assert deep_check(dataset) == []


# --------------------------------------------------------------------------- support sizes


def test_shortfall_mentions_missing_masks_only_when_there_are_some(tmp_path: Path) -> None:
    plain = read_busi(make_busi(tmp_path / "plain", {"normal": 2, "benign": 5, "malignant": 5}), "plain")
    with pytest.raises(DatasetError) as info:
        sample_support(plain, shots=3, seed=0)
    assert str(info.value) == (
        "dataset 'plain': class normal has 2 image(s), fewer than shots=3; "
        "lower --shots to at most 2 or use another source dataset"
    )
    root = make_busi(tmp_path / "masks", {"normal": 5, "benign": 5, "malignant": 5}, without_mask=2)
    masks = read_busi(root, "masks")
    with pytest.raises(DatasetError) as info:
        sample_support(masks, shots=4, seed=0)
    assert str(info.value) == (
        "dataset 'masks': class malignant has 3 image(s) usable for the support set "
        "(5 in total; left out: 2 lacking a mask file), fewer than shots=4; "
        "lower --shots to at most 3 or use another source dataset"
    )


def test_shortfall_names_size_mismatches_and_every_short_class(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "mixed", {"normal": 4, "benign": 2, "malignant": 4}, mismatched=1)
    with pytest.raises(DatasetError) as info:
        sample_support(read_busi(root, "mixed"), shots=4, seed=0)
    message = str(info.value)
    assert message == (
        "dataset 'mixed': class normal has 3 image(s) usable for the support set "
        "(4 in total; left out: 1 whose mask size differs from the image); "
        "class benign has 2 image(s), fewer than shots=4; "
        "lower --shots to at most 2 or use another source dataset"
    )
    assert "lacking" not in message


def test_check_support_sizes_fails_up_front_for_the_largest_shots(tmp_path: Path) -> None:
    dataset = read_busi(
        make_busi(tmp_path / "src", {"normal": 6, "benign": 6, "malignant": 6}, without_mask=2)
    )
    check_support_sizes(dataset, [1, 2, 4])  # malignant has exactly 4 usable: fine
    with pytest.raises(DatasetError) as info:
        check_support_sizes(dataset, [16, 4, 5, 2])
    with pytest.raises(DatasetError) as single:
        sample_support(dataset, shots=16, seed=0)
    assert str(info.value) == f"{single.value} (shots 5, 16 cannot be drawn)"
    with pytest.raises(DatasetError) as only_one:
        check_support_sizes(dataset, [5])
    with pytest.raises(DatasetError) as drawn:
        sample_support(dataset, shots=5, seed=0)
    assert str(only_one.value) == str(drawn.value)
    with pytest.raises(DatasetError, match="shots must be a positive integer, got 0"):
        check_support_sizes(dataset, [4, 0])


def test_source_without_a_class_is_told_to_change_source(tmp_path: Path) -> None:
    dataset = read_busi(make_busi(tmp_path / "lesions", {"benign": 3, "malignant": 3}), "lesions")
    with pytest.raises(DatasetError) as info:
        check_support_sizes(dataset, [1])
    assert str(info.value) == (
        "dataset 'lesions': class normal has 0 image(s), fewer than shots=1; "
        "use another source dataset (the support set needs images of every class)"
    )


# --------------------------------------------------------------------------- source/target overlap


def test_overlap_found_by_content_under_another_name(tmp_path: Path) -> None:
    counts = {"normal": 3, "benign": 3, "malignant": 3}
    source = read_busi(make_busi(tmp_path / "src", counts, without_mask=1, seed=0), name="src")
    target_root = make_busi(tmp_path / "tgt", counts, seed=1)
    assert overlapping_images(source, read_busi(target_root, name="tgt")) == []
    check_no_overlap(source, read_busi(target_root, name="tgt"))
    # a pool image copied under another name, and a source image that can never be drawn
    shutil.copy(source["benign/benign (2)"].image_path, target_root / "normal" / "normal (9).png")
    shutil.copy(source["malignant/malignant (1)"].image_path, target_root / "benign" / "benign (9).png")
    save(target_root / "benign" / "benign (9)_mask.png", box())
    target = read_busi(target_root, name="tgt")
    assert overlapping_images(source, target) == [("benign/benign (2)", "normal/normal (9)")]
    with pytest.raises(DatasetError) as info:
        check_no_overlap(source, target)
    assert str(info.value).startswith(
        "target 'tgt' shares 1 image(s) with the support pool of source 'src' "
        "(identical file content: benign/benign (2) = normal/normal (9)); "
    )


def test_same_dataset_as_source_and_target_overlaps_entirely(tmp_path: Path) -> None:
    dataset = read_busi(make_busi(tmp_path / "busi", {"normal": 2, "benign": 2, "malignant": 2}))
    pairs = overlapping_images(dataset, dataset)
    assert pairs == [(s.id, s.id) for s in dataset.samples]
    with pytest.raises(DatasetError, match=r"shares 6 image\(s\).*normal/normal \(1\) = normal/normal \(1\)"):
        check_no_overlap(dataset, dataset, limit=2)
    with pytest.raises(DatasetError, match=r"\(2\) = normal/normal \(2\), \.\.\. 4 more\)"):
        check_no_overlap(dataset, dataset, limit=2)


def test_datasets_deep_and_by_through_the_cli(tmp_path: Path) -> None:
    import csv

    from conftest import bench, build_dataset, flat, truncate

    data = build_dataset(tmp_path / "ds", {"normal": 2, "benign": 2, "malignant": 2})
    with data.manifest.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with data.manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "device"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "device": "GE" if i < 3 else "Siemens"} for i, row in enumerate(rows))
    code, out, err = bench("datasets", data.manifest, "--by", "device")
    assert code == 0, err
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    assert ["GE", "2", "1", "0", "3"] in rows and ["Siemens", "0", "1", "2", "3"] in rows
    assert ["device GE", "3 (2 normal / 1 benign / 0 malignant)"] in rows  # the summary's device rows
    assert "no problems found" in out and "decoded" not in out  # headers only without --deep
    damaged = data.image_path(data.ids["benign"][0])
    truncate(damaged)
    code, out, _ = bench("datasets", data.manifest, "--deep")
    assert code == 0
    assert damaged.name in flat(out) and "problems found" in out
    code, _, err = bench("datasets", data.manifest, "--by", "scanner")
    assert code == 2 and "device" in flat(err)  # names the columns there are
