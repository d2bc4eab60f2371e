"""Checks that need more than file headers: decoding every file, and source/target overlap.

Reading a dataset only looks at headers (fast). :func:`deep_check` decodes every image and
mask, which finds what headers cannot show: truncated or corrupt pixel data, non-binary
masks, and masks whose content contradicts the label. :func:`overlapping_images` compares
file contents between a source's support pool and a target, because evaluating on images a
method may have been adapted on inflates its scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bench.data.dataset import Dataset
from bench.data.io import file_key, load_mask_file, load_rgb
from bench.data.support import support_pool
from bench.errors import DatasetError
from bench.types import CLASSES, Sample

__all__ = ["check_no_overlap", "deep_check", "overlapping_images"]


def _decoded_masks(sample: Sample, problems: list[str]) -> list[tuple[str, np.ndarray]]:
    decoded = []
    for path in sample.mask_paths:
        try:
            decoded.append((str(path), load_mask_file(path)))
        except DatasetError as exc:
            problems.append(str(exc))
    return decoded


def _sample_problems(sample: Sample) -> list[str]:
    problems: list[str] = []
    try:
        load_rgb(sample.image_path)
    except DatasetError as exc:
        problems.append(str(exc))
    decoded = _decoded_masks(sample, problems)
    if not decoded or len(decoded) < len(sample.mask_paths):
        return problems
    first_path, first = decoded[0]
    for path, mask in decoded[1:]:
        if mask.shape != first.shape:
            problems.append(
                f"{path}: {mask.shape[1]}x{mask.shape[0]}, but {first_path} (a mask of the same image "
                f"{sample.image_path}) is {first.shape[1]}x{first.shape[0]}; fix or remove the extra mask"
            )
            return problems
    lesion_pixels = int(np.logical_or.reduce([mask for _, mask in decoded]).sum())
    files = " + ".join(path for path, _ in decoded)
    if not sample.is_lesion and lesion_pixels:
        problems.append(
            f"{files}: the image {sample.image_path} is labelled normal but its mask marks "
            f"{lesion_pixels} lesion pixel(s); fix the label or blank the mask (kept out of pixel metrics)"
        )
    elif sample.is_lesion and not lesion_pixels:
        problems.append(
            f"{files}: the image {sample.image_path} is labelled {sample.label.value} but its mask is all "
            "black; fix the mask or remove it (kept out of pixel metrics)"
        )
    return problems


def deep_check(dataset: Dataset, progress: Callable[[], None] | None = None) -> list[str]:
    """Decode every image and mask of ``dataset``; one readable line per problem found, naming the file.

    Finds truncated or undecodable images and masks, non-binary masks, masks of one image
    that disagree in size, normal-labelled images whose mask marks lesion pixels, and lesion
    images whose mask is all black. Problems already found from headers (``dataset.problems``)
    are not repeated. ``progress`` is called once after each sample (to advance a progress bar).
    """
    problems: list[str] = []
    for sample in dataset.samples:
        problems.extend(_sample_problems(sample))
        if progress is not None:
            progress()
    return problems


def overlapping_images(source: Dataset, target: Dataset) -> list[tuple[str, str]]:
    """``(source id, target id)`` pairs of identical files between ``source``'s support pool and ``target``.

    Identity is the content key (:func:`bench.data.file_key`), so a copy under another
    name or in another folder is found. Only the support pool counts: a source image that
    can never be drawn (see :func:`bench.data.support_pool`) cannot leak into a method.
    Pairs follow the target's order, then the source's.
    """
    pool = support_pool(source)
    by_key: dict[str, list[str]] = {}
    for label in CLASSES:
        for sample in pool[label]:
            by_key.setdefault(file_key(sample.image_path), []).append(sample.id)
    return [
        (source_id, sample.id)
        for sample in target.samples
        for source_id in by_key.get(file_key(sample.image_path), [])
    ]


def check_no_overlap(source: Dataset, target: Dataset, limit: int = 5) -> None:
    """Raise :class:`DatasetError` when ``target`` shares images with ``source``'s support pool.

    The message lists up to ``limit`` pairs (source id = target id) and how many there are.
    """
    pairs = overlapping_images(source, target)
    if not pairs:
        return
    shown = ", ".join(f"{source_id} = {target_id}" for source_id, target_id in pairs[:limit])
    more = f", ... {len(pairs) - limit} more" if len(pairs) > limit else ""
    raise DatasetError(
        f"target {target.name!r} shares {len(pairs)} image(s) with the support pool of source "
        f"{source.name!r} (identical file content: {shown}{more}); scores on images a method may have "
        "been adapted on are not a cross-domain result. Remove them from the target or pick another target"
    )
