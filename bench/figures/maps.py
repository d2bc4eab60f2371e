"""The qualitative figure (the paper's Fig. 2): test images, ground truth, each method's map.

One row per shown test image; columns: the image, the image with the ground-truth lesion
outline, then each method's anomaly map overlaid on the image, all for one target, shots
and seed (zero-shot methods beside any shots and seed).

**What is shown is what was scored.** Maps and masks are the stored ones (``maps.npy``,
``masks.npz``, written by ``bench run --save-maps``) at the evaluation size S. The image is
read from the file the run read (``images.csv`` ``path``), checked against the content key
the run stored (:func:`bench.data.file_key`), decoded with :func:`bench.data.load_rgb` and
squashed whole to S x S with PIL bicubic resampling, as the backbone's preprocessing does and
in the frame the masks were resized to (:func:`bench.data.resize_mask`), so the outline and
the maps line up with the pixels. A moved dataset is found with ``--image-root OLD=NEW``.

**One colour scale.** With ``scale="per-method"`` (the default, as in the paper) each
method's maps are mapped to [0, 1] by that method's minimum and maximum over ALL the
target's images (not only the shown ones: a row then looks the same whichever other rows
are shown, and a normal image a method scores low stays dark); a constant map becomes 0.
With ``scale="shared"`` the raw values are shown on one scale from the smallest to the
largest value of any shown method over all the target's images (meaningful only when the
methods' maps share a unit). Either way every overlay uses the same colour limits and one
colour bar.

**Rows.** ``ids`` names them; otherwise ``per_class`` images per class (normal, benign,
malignant, in that order) are picked among the images with a usable mask (the ones pixel
metrics scored), by the rank ``sha256("figure:<pick_seed>:<class>:<id>")``, smallest first:
the same on every machine, and a larger ``per_class`` adds rows without changing the
earlier ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import BenchError, DatasetError, ResultsError
from bench.figures.common import (
    FigureResult,
    Point,
    choose_point,
    figure_style,
    file_stem,
    new_figure,
    setup_title,
    shots_label,
)
from bench.stored import StoredPredictions, load_predictions
from bench.types import CLASSES

__all__ = ["SCALES", "ImageRoot", "draw_maps", "parse_image_roots", "pick_per_class"]

#: Colour scale modes (see the module docstring).
SCALES = ("per-method", "shared")
#: Colour of the ground-truth outline.
OUTLINE_COLOUR = "lime"
#: Size of one image panel, inches.
PANEL_INCHES = 1.25


@dataclass(frozen=True)
class ImageRoot:
    """One ``--image-root OLD=NEW`` path remapping."""

    old: Path
    new: Path

    def apply(self, path: Path) -> Path | None:
        """``path`` moved from under ``old`` to under ``new``; None when not under ``old``."""
        try:
            return self.new / path.relative_to(self.old)
        except ValueError:
            return None


def parse_image_roots(values: Sequence[str]) -> list[ImageRoot]:
    """``["OLD=NEW", ...]`` -> remappings (tried in the order given, first match used)."""
    roots = []
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise BenchError(
                f"--image-root must look like OLD=NEW (the folder the run read the images from, "
                f"then where they are now), got {value!r}"
            )
        roots.append(ImageRoot(Path(old), Path(new)))
    return roots


def _pick_rank(pick_seed: int, label: str, image_id: str) -> str:
    return hashlib.sha256(f"figure:{pick_seed}:{label}:{image_id}".encode()).hexdigest()


def pick_per_class(
    ids: Sequence[str], labels: np.ndarray, usable: np.ndarray, per_class: int, pick_seed: int
) -> tuple[list[int], list[str]]:
    """Indices of ``per_class`` usable images per class (see the module docstring) and notes
    for classes the target does not have."""
    if per_class < 1:
        raise BenchError(f"--per-class must be at least 1, got {per_class}")
    rows: list[int] = []
    notes: list[str] = []
    for k, label in enumerate(CLASSES):
        of_class = [i for i in range(len(ids)) if labels[i] == k]
        if not of_class:
            notes.append(f"the target has no {label.value} image: no {label.value} row")
            continue
        candidates = [i for i in of_class if usable[i]]
        if len(candidates) < per_class:
            raise BenchError(
                f"--per-class {per_class}: the target has only {len(candidates)} {label.value} image(s) "
                f"with a usable mask ({len(of_class)} in all); ask for fewer or name images with --ids"
            )
        ranked = sorted(candidates, key=lambda i: _pick_rank(pick_seed, label.value, ids[i]))
        rows.extend(ranked[:per_class])
    return rows, notes


def _rows_by_id(ids: Sequence[str], wanted: Sequence[str], target: str) -> list[int]:
    index = {image_id: i for i, image_id in enumerate(ids)}
    unknown = [w for w in wanted if w not in index]
    if unknown:
        examples = ", ".join(repr(i) for i in list(ids)[:5])
        raise BenchError(
            f"--ids: {', '.join(map(repr, unknown))} not among the {len(ids)} test images of target "
            f"{target!r} (ids look like {examples})"
        )
    return [index[w] for w in wanted]


def _load_shown(point: Point) -> tuple[dict[str, StoredPredictions], list[str]]:
    """Predictions of the methods to draw: explicit methods must have maps (the store's own
    error names the flag), default ones without maps are left out with a note."""
    shown: dict[str, StoredPredictions] = {}
    without: list[str] = []
    for method, cell in point.cells.items():
        stored = load_predictions(cell)
        if point.explicit:
            stored.maps()
            stored.masks()
        elif not stored.has_maps:
            without.append(method)
            continue
        shown[method] = stored
    notes = [f"not shown (no stored maps): {', '.join(without)}"] if without else []
    if not shown:
        raise ResultsError(
            f"no cell for target {point.target!r} at {shots_label(point.shots, point.seed)} stored maps "
            f"({', '.join(point.cells)}); re-run them with `bench run --save-maps` (finished cells must "
            "be deleted first to be recomputed)"
        )
    return shown, notes


def _check_same_images(shown: dict[str, StoredPredictions], rows: Sequence[int]) -> None:
    """Every drawn cell must describe the same images: same ids, content keys and masks."""
    first, *others = shown.values()
    masks, valid = first.masks()
    for stored in others:
        same = stored.ids == first.ids
        if same and stored.images is not None and first.images is not None:
            same = all(stored.images["key"][i] == first.images["key"][i] for i in rows)
        if same:
            other_masks, other_valid = stored.masks()
            same = all(other_valid[i] == valid[i] and np.array_equal(other_masks[i], masks[i]) for i in rows)
        if not same:
            raise ResultsError(
                f"cells {first.describe()} ({first.directory}) and {stored.describe()} "
                f"({stored.directory}) do not hold the same test images, files or masks: they were "
                "made from different versions of the target dataset; re-run one of them"
            )


def _load_image(stored: StoredPredictions, row: int, size: int, roots: Sequence[ImageRoot]) -> np.ndarray:
    """The test image of ``row`` as the run saw it, squashed to ``size x size`` (uint8 RGB)."""
    from PIL import Image

    from bench.data import file_key, load_rgb

    image_id = stored.ids[row]
    recorded = Path(stored.column("path")[row])
    key = stored.column("key")[row]
    path = next((p for p in (r.apply(recorded) for r in roots) if p is not None), recorded)
    where = (
        f"test image {image_id!r} of target {stored.record.target!r} (stored path {recorded}"
        + (f", remapped to {path}" if path != recorded else "")
        + ")"
    )
    fix = (
        "the figure reads each image from where the run read it: put the dataset back there, or "
        "point to its new folder with --image-root OLD=NEW"
    )
    try:
        found = file_key(path)
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}; {fix}") from exc
    if found != key:
        raise DatasetError(
            f"{where}: the file has changed since the run (content key {found}, the run stored {key}); {fix}"
        )
    rgb = load_rgb(path)
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def _value_range(stored: StoredPredictions) -> tuple[float, float]:
    """(min, max) of a method's maps over all the target's images."""
    maps = stored.maps()
    low, high = float(np.min(maps)), float(np.max(maps))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ResultsError(
            f"{stored.directory / 'maps.npy'} holds non-finite values; delete the cell folder and re-run it"
        )
    return low, high


def draw_maps(
    results_dir: Path,
    *,
    target: str | None = None,
    shots: int | None = None,
    seed: int | None = None,
    methods: list[str] | None = None,
    ids: list[str] | None = None,
    per_class: int | None = None,
    pick_seed: int = 0,
    scale: str = "per-method",
    image_roots: Sequence[ImageRoot] = (),
    cmap: str = "jet",
    alpha: float = 0.5,
    backbone: str | None = None,
) -> FigureResult:
    """Draw the maps figure (see the module docstring); ``per_class`` defaults to 1 without ``ids``.

    ``data`` holds ``ids``, ``labels`` (class names), ``methods``, ``ranges`` (method ->
    (min, max) of its raw maps over the target) and ``clim`` (the colour limits of every overlay).
    """
    if scale not in SCALES:
        raise BenchError(f"unknown --scale {scale!r}; use {' or '.join(SCALES)}")
    if ids is not None and per_class is not None:
        raise BenchError("--ids and --per-class both choose the rows; give one of them")
    if not 0.0 < alpha <= 1.0:
        raise BenchError(f"--alpha must be in (0, 1], got {alpha}")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise BenchError(f"unknown --cmap {cmap!r}; use a matplotlib colormap such as jet, turbo, viridis")

    point = choose_point(
        results_dir, target=target, shots=shots, seed=seed, methods=methods, backbone=backbone
    )
    shown, notes = _load_shown(point)
    reference = next(iter(shown.values()))
    masks, valid = reference.masks()
    if ids is not None:
        rows = _rows_by_id(reference.ids, ids, point.target)
    else:
        rows, class_notes = pick_per_class(
            reference.ids, reference.labels, valid, 1 if per_class is None else per_class, pick_seed
        )
        notes.extend(class_notes)
    _check_same_images(shown, rows)
    size = int(reference.maps().shape[-1])
    images = [_load_image(reference, row, size, image_roots) for row in rows]

    ranges = {method: _value_range(stored) for method, stored in shown.items()}
    if scale == "per-method":
        clim = (0.0, 1.0)
        colour_label = "anomaly score (normalised per method)"
    else:
        clim = (min(low for low, _ in ranges.values()), max(high for _, high in ranges.values()))
        colour_label = "anomaly score (raw)"

    def displayed(method: str, row: int) -> np.ndarray:
        values = np.asarray(shown[method].maps()[row], dtype=np.float64)
        if scale == "shared":
            return values
        low, high = ranges[method]
        return (values - low) / (high - low) if high > low else np.zeros_like(values)

    method_names = list(shown)
    n_rows, n_cols = len(rows), 2 + len(method_names)
    width = PANEL_INCHES * n_cols + 0.9
    scale_text = (
        f"each method's maps scaled to [0, 1] by its min/max over all {reference.n} target images"
        if scale == "per-method"
        else "raw maps on one scale shared by all methods"
    )
    headline = f"Anomaly maps on {point.target}, {shots_label(point.shots, point.seed)}: {scale_text}"
    with figure_style():
        figure = new_figure(width, PANEL_INCHES * n_rows + 0.8)
        axes = figure.subplots(n_rows, n_cols, squeeze=False)
        overlay = None
        for r, row in enumerate(rows):
            label = CLASSES[int(reference.labels[row])].value
            panels = axes[r]
            for c, ax in enumerate(panels):
                # hidden axes cost nothing in the layout; the first keeps its y axis for the row label
                ax.xaxis.set_visible(False)
                ax.yaxis.set_visible(c == 0)
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
            panels[0].imshow(images[r], interpolation="nearest")
            panels[0].set_ylabel(f"{label}\n{reference.ids[row]}", fontsize=6)
            panels[1].imshow(images[r], interpolation="nearest")
            if valid[row] and masks[row].any():
                panels[1].contour(
                    masks[row].astype(float), levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.0
                )
            elif not valid[row]:
                panels[1].text(
                    0.5, 0.5, "no usable mask", transform=panels[1].transAxes, ha="center", va="center",
                    color="white", fontsize=6,
                )  # fmt: skip
            for c, method in enumerate(method_names):
                ax = panels[2 + c]
                ax.imshow(images[r], interpolation="nearest")
                overlay = ax.imshow(
                    displayed(method, row), cmap=cmap, vmin=clim[0], vmax=clim[1], alpha=alpha,
                    interpolation="nearest",
                )  # fmt: skip
        titles = ["image", "ground truth"] + [
            f"{m} (zero-shot)" if not shown[m].record.uses_support else m for m in method_names
        ]
        for ax, title in zip(axes[0], titles, strict=True):
            ax.set_title(title)
        assert overlay is not None
        bar = figure.colorbar(overlay, ax=axes, shrink=0.8, fraction=0.03, aspect=30)
        if bar.solids is not None:  # the bar shows the colormap itself, not blended with an image
            bar.solids.set_alpha(1.0)
        bar.set_label(colour_label)
        figure.suptitle(setup_title(headline, point.selection, width))

    return FigureResult(
        figure,
        file_stem("maps", point.target, f"{point.shots}shot", f"seed{point.seed}"),
        [*point.notes, *notes],
        {
            "ids": [reference.ids[row] for row in rows],
            "labels": [CLASSES[int(reference.labels[row])].value for row in rows],
            "methods": method_names,
            "ranges": ranges,
            "clim": clim,
        },
    )
