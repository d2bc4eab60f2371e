"""``bench figure maps|shots|roc``: publication figures from stored results.

Registered on the main app by ``app.add_typer(figure_app, name="figure")``. Start-up stays
fast: matplotlib, pandas and the figure modules are imported only inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bench import cli_support
from bench.cli_support import friendly_errors

if TYPE_CHECKING:
    from bench.figures.common import FigureResult

__all__ = ["figure_app"]

figure_app = typer.Typer(
    help="Publication figures from stored results: anomaly maps, a metric vs shots, ROC curves "
    "(PNG, PDF or SVG; see docs/figures.md).",
    no_args_is_help=True,
)

ResultsDir = Annotated[Path, typer.Argument(help="a results folder (any depth: runs and shards are merged)")]
Out = Annotated[
    Path | None,
    typer.Option(help="output file, .png, .pdf or .svg (default: RESULTS_DIR/figures/<name>.png)"),
]
Dpi = Annotated[int, typer.Option(help="dots per inch of raster output (PNG, and images inside PDF/SVG)")]
Backbone = Annotated[
    str | None, typer.Option(help="backbone model, when the results hold several (never pooled)")
]
Methods = Annotated[
    str | None, typer.Option(help="comma-separated methods, drawn in this order (default: all, table order)")
]
Target = Annotated[str | None, typer.Option(help="target dataset as stored (default: the only one)")]
Shots = Annotated[int | None, typer.Option(help="shots per class (default: the only value stored)")]
Seed = Annotated[int | None, typer.Option(help="support-sampling seed (default: the only one stored)")]


def _save(result: FigureResult, results_dir: Path, out: Path | None, dpi: int) -> None:
    from bench.figures.common import output_path, save_figure

    for note in result.notes:
        text = note if note.startswith("warning:") else f"note: {note}"
        cli_support.err_console.print(text, highlight=False, markup=False)
    path = save_figure(result.figure, output_path(out, results_dir, result.name), dpi)
    cli_support.console.print(f"wrote {path}", highlight=False, markup=False)


@figure_app.command("maps")
@friendly_errors
def maps_command(
    results_dir: ResultsDir,
    target: Target = None,
    shots: Shots = None,
    seed: Seed = None,
    methods: Methods = None,
    ids: Annotated[
        str | None, typer.Option(help="comma-separated test image ids, one row each, in this order")
    ] = None,
    per_class: Annotated[
        int | None,
        typer.Option(help="rows per class (normal, benign, malignant) picked reproducibly [default: 1]"),
    ] = None,
    pick_seed: Annotated[int, typer.Option(help="which images --per-class picks (any integer)")] = 0,
    scale: Annotated[
        str,
        typer.Option(
            help="per-method: each method's maps scaled to [0,1] over the target; shared: raw values"
        ),
    ] = "per-method",
    image_root: Annotated[
        list[str] | None,
        typer.Option(help="OLD=NEW: read images stored under OLD from NEW instead (repeatable)"),
    ] = None,
    cmap: Annotated[str, typer.Option(help="matplotlib colormap of the maps")] = "jet",
    alpha: Annotated[float, typer.Option(help="opacity of the maps over the images")] = 0.5,
    backbone: Backbone = None,
    out: Out = None,
    dpi: Dpi = 200,
) -> None:
    """The paper's qualitative figure: each test image, its ground-truth outline and every method's map."""
    from bench.figures.common import check_output, split_list
    from bench.figures.maps import draw_maps, parse_image_roots

    check_output(out, dpi)
    result = draw_maps(
        results_dir,
        target=target,
        shots=shots,
        seed=seed,
        methods=split_list(methods, "--methods"),
        ids=split_list(ids, "--ids"),
        per_class=per_class,
        pick_seed=pick_seed,
        scale=scale,
        image_roots=parse_image_roots(image_root or []),
        cmap=cmap,
        alpha=alpha,
        backbone=backbone,
    )
    _save(result, results_dir, out, dpi)


@figure_app.command("shots")
@friendly_errors
def shots_command(
    results_dir: ResultsDir,
    metric: Annotated[
        str, typer.Option(help="a stored metric: image_auroc, class_auroc, pixel_auroc, ...")
    ] = ("image_auroc"),
    targets: Annotated[
        str | None, typer.Option(help="comma-separated targets, one panel each (default: all)")
    ] = (None),
    methods: Methods = None,
    backbone: Backbone = None,
    out: Out = None,
    dpi: Dpi = 200,
) -> None:
    """A metric against shots per method: mean and sample std over seeds, one panel per target."""
    from bench.figures.common import check_output, split_list
    from bench.figures.shots import draw_shots

    check_output(out, dpi)
    result = draw_shots(
        results_dir,
        metric=metric,
        targets=split_list(targets, "--targets"),
        methods=split_list(methods, "--methods"),
        backbone=backbone,
    )
    _save(result, results_dir, out, dpi)


@figure_app.command("roc")
@friendly_errors
def roc_command(
    results_dir: ResultsDir,
    target: Target = None,
    shots: Shots = None,
    seed: Seed = None,
    methods: Methods = None,
    backbone: Backbone = None,
    out: Out = None,
    dpi: Dpi = 200,
) -> None:
    """Image-level ROC curves (normal vs lesion) per method, AUROC in the legend."""
    from bench.figures.common import check_output, split_list
    from bench.figures.roc import draw_roc

    check_output(out, dpi)
    result = draw_roc(
        results_dir,
        target=target,
        shots=shots,
        seed=seed,
        methods=split_list(methods, "--methods"),
        backbone=backbone,
    )
    _save(result, results_dir, out, dpi)
