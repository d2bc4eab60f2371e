"""Image-level ROC curves of every method on one target, shots and seed.

Normal images are the negatives, benign and malignant the positives, ranked by the stored
image score (``predictions.csv``), exactly the ``image_auroc`` of the tables: the curve is
scikit-learn's ``roc_curve`` (ties as one step, collinear points dropped) and the area in
the legend is the trapezoid under the drawn curve, which equals ``roc_auc_score``. That
area is checked against the stored metric; a mismatch means the cell's files disagree and
is an error, never a silently different number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.errors import BenchError, ResultsError
from bench.figures.common import (
    FigureResult,
    choose_point,
    figure_style,
    file_stem,
    new_figure,
    setup_title,
    shots_label,
)
from bench.stored import load_predictions

__all__ = ["AUROC_TOLERANCE", "draw_roc"]

#: How far the recomputed area may be from the stored ``image_auroc`` (rounding only).
AUROC_TOLERANCE = 1e-9
FIGURE_INCHES = 4.6


def draw_roc(
    results_dir: Path,
    *,
    target: str | None = None,
    shots: int | None = None,
    seed: int | None = None,
    methods: list[str] | None = None,
    backbone: str | None = None,
) -> FigureResult:
    """Draw the ROC curves (see the module docstring). ``data["curves"]`` maps each method to
    ``(fpr, tpr, auroc)``."""
    from sklearn.metrics import auc, roc_curve

    point = choose_point(
        results_dir, target=target, shots=shots, seed=seed, methods=methods, backbone=backbone
    )
    where = f"target {point.target!r} at {shots_label(point.shots, point.seed)}"
    lacking = [m for m, c in point.cells.items() if "image_auroc" not in c.metrics]
    if lacking and point.explicit:
        raise BenchError(
            f"{', '.join(lacking)} stored no image_auroc for {where}: the method does not detect, or "
            "the target lacks normal or lesion images (normal-vs-lesion AUROC is undefined)"
        )
    notes = list(point.notes)
    if lacking:
        notes.append(f"not shown (no image_auroc stored): {', '.join(lacking)}")
    drawn = [m for m in point.cells if m not in lacking]
    if not drawn:
        raise BenchError(
            f"no method stored image_auroc for {where} ({', '.join(point.cells)}): the methods do not "
            "detect, or the target lacks normal or lesion images"
        )
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for method in drawn:
        cell = point.cells[method]
        stored = load_predictions(cell)
        fpr, tpr, _ = roc_curve(stored.labels > 0, stored.scores)
        area = float(auc(fpr, tpr))
        if abs(area - cell.metrics["image_auroc"]) > AUROC_TOLERANCE:
            raise ResultsError(
                f"{stored.directory}: the scores in predictions.csv give AUROC {area!r} but cell.json "
                f"stores image_auroc {cell.metrics['image_auroc']!r}; the cell is damaged, delete its "
                "folder and re-run it"
            )
        curves[method] = (fpr, tpr, area)

    headline = f"Image-level ROC, normal vs lesion, on {point.target}, {shots_label(point.shots, point.seed)}"
    with figure_style():
        import matplotlib

        figure = new_figure(FIGURE_INCHES, FIGURE_INCHES + 0.6)
        ax = figure.subplots()
        palette = matplotlib.colormaps["tab10" if len(drawn) <= 10 else "tab20"]
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8, label="_chance")
        for i, (method, (fpr, tpr, area)) in enumerate(curves.items()):
            zero_shot = "" if point.cells[method].uses_support else " (zero-shot)"
            ax.plot(
                fpr,
                tpr,
                color=palette(i % palette.N),
                linewidth=1.2,
                label=f"{method}{zero_shot}, AUROC {area:.3f}",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate (normal images flagged)")
        ax.set_ylabel("true positive rate (lesion images found)")
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.legend(loc="lower right")
        figure.suptitle(setup_title(headline, point.selection, FIGURE_INCHES))
    return FigureResult(
        figure,
        file_stem("roc", point.target, f"{point.shots}shot", f"seed{point.seed}"),
        notes,
        {"curves": curves, "methods": drawn},
    )
