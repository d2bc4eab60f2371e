"""The ``bench`` command line: run grids, print tables, list methods and inspect datasets."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bench.cli_support import console, err_console, friendly_errors, print_table, progress_bar
from bench.errors import BenchError
from bench.figures.cli import figure_app

app = typer.Typer(
    help="ultraad-bench: few-shot CLIP anomaly detection benchmarks for breast ultrasound.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@friendly_errors
def run(
    methods: Annotated[
        str | None, typer.Option(help="'all' or a comma-separated list of method names")
    ] = None,
    shots: Annotated[str | None, typer.Option(help="shots per class, e.g. 4,8,16")] = None,
    seeds: Annotated[str | None, typer.Option(help="support-sampling seeds, e.g. 0,1,2")] = None,
    source: Annotated[str | None, typer.Option(help="dataset the support set is drawn from")] = None,
    targets: Annotated[
        str | None, typer.Option(help="comma-separated target datasets (names or paths)")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="open_clip model name, e.g. ViT-L-14-336-quickgelu")
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(help="weights: open_clip tag (openai, ...), checkpoint path, hf-hub:ID, or none"),
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="backbone input size (default: the model's)")] = None,
    layers: Annotated[
        str | None, typer.Option(help="0-based blocks for patch tokens (default: quarters)")
    ] = None,
    eval_size: Annotated[
        int | None, typer.Option(help="square evaluation resolution for maps and masks")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="folder holding the named datasets [env BENCH_DATA_ROOT]")
    ] = None,
    out: Annotated[str | None, typer.Option(help="results root; the run goes to OUT/<run name>/")] = None,
    name: Annotated[
        str | None, typer.Option(help="run name (default: derived from source, backbone, weights)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per predict/encode batch")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="feature cache folder [env BENCH_CACHE_DIR]")] = None,
    save_maps: Annotated[
        bool | None, typer.Option("--save-maps/--no-save-maps", help="store pixel maps")
    ] = None,
    maps_dtype: Annotated[
        str | None, typer.Option(help="dtype of saved maps: float32 (exact) or float16 (half the disk)")
    ] = None,
    shard: Annotated[
        str | None, typer.Option(help="run only slice I/N of the grid (e.g. for a SLURM array)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML run configuration; flags override it")] = None,
    table: Annotated[bool, typer.Option("--table/--no-table", help="print the tables when done")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")] = True,
) -> None:
    """Run (or resume) the grid methods x shots x seeds x targets and store every result."""
    from bench.config import load_config
    from bench.runner import run_grid

    cfg = load_config(
        config,
        methods=methods,
        shots=shots,
        seeds=seeds,
        source=source,
        targets=targets,
        backbone=backbone,
        pretrained=pretrained,
        input_size=input_size,
        layers=layers,
        eval_size=eval_size,
        data_root=data_root,
        out=out,
        name=name,
        device=device,
        batch_size=batch_size,
        cache_dir=cache_dir,
        save_maps=save_maps,
        maps_dtype=maps_dtype,
        shard=shard,
    )
    summary = run_grid(cfg, console=err_console, show_progress=progress)
    err_console.print(
        f"done: {len(summary.cells_done)} cells computed, {len(summary.cells_skipped)} already finished; "
        f"backbone encoded {summary.images_encoded} images, feature cache {summary.cache_hits} hits / "
        f"{summary.cache_misses} misses; results in {summary.run_dir}"
    )
    if table and (summary.cells_done or summary.cells_skipped):
        _print_tables(summary.run_dir, "rich", None, [], False, None)


@app.command("table")
@friendly_errors
def table_command(
    results_dir: Annotated[
        Path, typer.Argument(help="a results folder (any depth: runs and shards are merged)")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="rich, markdown, csv or latex")] = "rich",
    compare: Annotated[str | None, typer.Option(help="'paper': show the paper's numbers beside ours")] = None,
    paper_target: Annotated[
        list[str] | None,
        typer.Option(help="pair one of our targets with a paper dataset, e.g. udiat=BUSZS (repeatable)"),
    ] = None,
    ablation: Annotated[bool, typer.Option(help="print the paper's ablation table layout instead")] = False,
    paper_yaml: Annotated[
        Path | None, typer.Option(help="paper numbers file (default results/paper.yaml)")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(help="break every metric down by an images.csv column (device, birads, dataset, ...)"),
    ] = None,
    ci: Annotated[
        bool, typer.Option("--ci", help="add 95% stratified-bootstrap confidence intervals over test images")
    ] = False,
    ci_resamples: Annotated[int, typer.Option(help="bootstrap resamples for --ci", min=10)] = 1000,
    ci_seed: Annotated[int, typer.Option(help="seed of the bootstrap draws for --ci", min=0)] = 0,
    ci_level: Annotated[float, typer.Option(help="confidence level for --ci", min=0.5, max=0.999)] = 0.95,
) -> None:
    """Print the paper's three tables (detection, classification, localization) from stored results."""
    _print_tables(
        results_dir,
        format,
        compare,
        paper_target or [],
        ablation,
        paper_yaml,
        by=by,
        ci=CiOptions(ci_resamples, ci_seed, ci_level) if ci else None,
    )


@dataclass(frozen=True)
class CiOptions:
    """How ``bench table --ci`` draws its bootstrap."""

    n_resamples: int
    seed: int
    level: float


def _print_tables(
    results_dir: Path,
    fmt: str,
    compare: str | None,
    pairs: list[str],
    ablation: bool,
    paper_yaml: Path | None,
    *,
    by: str | None = None,
    ci: CiOptions | None = None,
) -> None:
    from bench.results import load_cells
    from bench.tables import render_tables

    if fmt not in {"rich", "markdown", "csv", "latex"}:
        raise BenchError(f"unknown --format {fmt!r}; use rich, markdown, csv or latex")
    if compare not in (None, "paper"):
        raise BenchError(f"unknown --compare {compare!r}; the only reference is 'paper'")
    mapping: dict[str, str] = {}
    for pair in pairs:
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours or not theirs:
            raise BenchError(
                f"--paper-target must look like TARGET=PAPERDATASET (e.g. udiat=BUSZS), got {pair!r}"
            )
        mapping[ours] = theirs
    cells = load_cells(Path(results_dir))
    if not cells:
        raise BenchError(f"no finished cells under {results_dir}; run `bench run --out {results_dir}` first")
    intervals = None
    if by is not None or ci is not None:
        from bench.breakdown import subgroup_evaluations, whole_evaluations

        notes: list[str] = []
        if by is not None:
            evaluations, notes = subgroup_evaluations(cells, by)
        else:
            evaluations = whole_evaluations(cells)
        cells = [e.record for e in evaluations]
        if ci is not None:
            intervals, ci_notes = _intervals(evaluations, ci)
            notes += ci_notes
        for note in notes:
            err_console.print(f"note: {escape(note)}", highlight=False)
    text = render_tables(
        cells,
        fmt=fmt,
        compare=compare,
        ablation=ablation,
        paper_targets=mapping or None,
        paper_yaml=paper_yaml,
        console=console if fmt == "rich" else None,
        intervals=intervals,
    )
    if fmt != "rich" and text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _intervals(evaluations: list[Any], ci: CiOptions) -> tuple[Any, list[str]]:
    """Bootstrap intervals of every table cell, with a progress bar on stderr."""
    from bench.intervals import table_intervals
    from bench.tables import IntervalSpec

    with progress_bar() as progress:

        def track(items: Any, description: str, total: int) -> Any:
            return progress.track(items, total=total, description=f"bootstrap {description}")

        result = table_intervals(evaluations, ci.n_resamples, ci.seed, ci.level, progress=track)
    values = {key: (iv.low, iv.high) for key, iv in result.intervals.items()}
    return IntervalSpec(values, ci.level, ci.n_resamples, ci.seed), result.notes


@app.command("compare")
@friendly_errors
def compare_command(
    results_dir: Annotated[Path, typer.Argument(help="a results folder (one run, or its shards)")],
    method_a: Annotated[str, typer.Argument(help="first method (differences are A minus B)")],
    method_b: Annotated[str, typer.Argument(help="second method")],
    target: Annotated[
        list[str] | None, typer.Option(help="only this target (repeatable; default: every shared one)")
    ] = None,
    shots: Annotated[str | None, typer.Option(help="only these shots, e.g. 4,16")] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(help="image_auroc, class_auroc, pixel_auroc, pixel_ap (repeatable; default: all)"),
    ] = None,
    resamples: Annotated[int, typer.Option(help="bootstrap resamples", min=10)] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap draws", min=0)] = 0,
    level: Annotated[
        float, typer.Option(help="confidence level of the intervals", min=0.5, max=0.999)
    ] = 0.95,
    format: Annotated[str, typer.Option("--format", "-f", help="rich or csv")] = "rich",
) -> None:
    """Paired comparison of two methods on the same test images: DeLong's test for I-AUROC,
    paired stratified bootstrap for the other metrics and for the mean over seeds."""
    from bench.compare import compare_methods
    from bench.intervals import CI_METRICS
    from bench.results import load_cells

    if format not in ("rich", "csv"):
        raise BenchError(f"unknown --format {format!r}; use rich or csv")
    for name in metric or []:
        if name not in CI_METRICS:
            raise BenchError(f"unknown --metric {name!r}; choose from {', '.join(CI_METRICS)}")
    shot_list = None
    if shots is not None:
        try:
            shot_list = [int(x) for x in shots.split(",") if x.strip()]
        except ValueError as exc:
            raise BenchError(f"--shots must be integers separated by commas, got {shots!r}") from exc
    cells = load_cells(results_dir)
    lines = compare_methods(
        cells,
        method_a,
        method_b,
        targets=target or None,
        shots=shot_list,
        metrics=tuple(metric) if metric else CI_METRICS,
        n_resamples=resamples,
        seed=seed,
        level=level,
    )
    weights = {c.backbone for c in cells if c.method in (method_a, method_b)}
    random_init = any(w.random_init for w in weights)
    header = [
        "target",
        "shots",
        "seed",
        "metric",
        method_a,
        method_b,
        "A - B",
        f"{100 * level:g}% CI",
        "p",
        "test",
    ]
    rows = [
        [
            line.target,
            "zero-shot" if line.shots == 0 else str(line.shots),
            "mean" if line.seed is None else str(line.seed),
            line.metric,
            f"{100 * line.value_a:.1f}",
            f"{100 * line.value_b:.1f}",
            f"{100 * line.difference:+.1f}",
            f"[{100 * line.low:+.1f}, {100 * line.high:+.1f}]",
            _p_text(line.p_value, line.test, resamples),
            line.test,
        ]
        for line in lines
    ]
    if format == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(
            [
                *header[:4],
                "value_a",
                "value_b",
                "difference",
                "low",
                "high",
                "p_value",
                "test",
                "n_images",
                "random_init",
            ]
        )
        for line in lines:
            writer.writerow(
                [
                    line.target,
                    line.shots,
                    "" if line.seed is None else line.seed,
                    line.metric,
                    repr(line.value_a),
                    repr(line.value_b),
                    repr(line.difference),
                    repr(line.low),
                    repr(line.high),
                    repr(line.p_value),
                    line.test,
                    line.n_images,
                    random_init,
                ]
            )
        return
    title = f"{method_a} vs {method_b} (values in %, differences A - B; {resamples} bootstrap resamples)"
    table = Table(
        title=Text(title),
        caption=Text(
            "seed 'mean' = the tables' mean over seeds, compared by a paired bootstrap in which each "
            "resample "
            "scores every seed of both methods on the same images; per-seed I-AUROC uses DeLong's test "
            "(normal-approximation interval)."
        ),
        caption_justify="left",
    )
    for name in header:
        table.add_column(
            Text(name), no_wrap=True, justify="right" if name not in ("target", "metric", "test") else "left"
        )
    for row in rows:
        table.add_row(*[Text(v) for v in row])
    if random_init:
        console.print(
            Text(
                "WARNING: random-init weights: the backbone is NOT pretrained; these numbers are meaningless "
                "for CLIP methods (a smoke test of the pipeline only).",
                style="bold red",
            )
        )
    print_table(console, table)


def _p_text(p_value: float, test: str, resamples: int) -> str:
    """A p-value as printed: a bootstrap p of 0 only means p < 2/resamples (its resolution)."""
    if p_value == 0.0:
        return f"<{2.0 / resamples:.2g}" if test != "DeLong" else "<1e-16"
    return f"{p_value:.3g}"


@app.command("methods")
@friendly_errors
def methods_command(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also list each method's options")] = False,
) -> None:
    """List the registered methods (built-in and plugins), the tasks they do, and a description."""
    from bench.kit.options import describe as describe_options
    from bench.registry import available_methods
    from bench.types import Task

    table = Table(title="methods")
    table.add_column("name", style="bold", no_wrap=True)
    for task in Task:
        table.add_column(str(task), justify="center", no_wrap=True)
    table.add_column("support", no_wrap=True)
    table.add_column("description", overflow="fold")
    methods = sorted(available_methods().items())
    for name, cls in methods:
        row = [name, *("yes" if t in cls.tasks else "-" for t in Task)]
        row += ["few-shot" if cls.uses_support else "zero-shot", cls.description]
        table.add_row(*(Text(cell) for cell in row))
    print_table(console, table)
    if verbose:
        for name, cls in methods:
            console.print(f"\n[bold]{escape(name)}[/] options (method_config: {{{escape(name)}: {{...}}}}):")
            for line in describe_options(cls.options) or ["(none)"]:
                console.print(f"  {escape(line)}", highlight=False)


@app.command("datasets")
@friendly_errors
def datasets_command(
    dataset: Annotated[
        str | None, typer.Argument(help="a named set or a path; omit to list the named sets")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="folder holding the named datasets [env BENCH_DATA_ROOT]")
    ] = None,
    deep: Annotated[
        bool, typer.Option("--deep", help="decode every image and mask (truncated files, lesions on normals)")
    ] = False,
    by: Annotated[
        str | None, typer.Option(help="also count images per class for each value of a metadata column")
    ] = None,
) -> None:
    """Describe a dataset: counts per class (and per device), masks present, size range, problems."""
    from bench.data import NAMED_DATASETS, dataset_names, default_data_root, describe_dataset, resolve_dataset

    root = Path(data_root) if data_root else default_data_root()
    if dataset is None:
        table = Table(title=escape(f"named datasets under {root}"))
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("expected path", overflow="fold")
        table.add_column("present", no_wrap=True)
        for key, rel in NAMED_DATASETS.items():
            table.add_row(Text(key), Text(str(root / rel)), "yes" if (root / rel).exists() else "no")
        for key in dataset_names():
            if key not in NAMED_DATASETS:
                table.add_row(Text(f"{key}[:<device>]"), "(generated, no files needed)", "yes")
        print_table(console, table)
        console.print("Describe one with `bench datasets NAME` (or a path to a manifest or folder).")
        return
    data = resolve_dataset(dataset, root)
    summary = describe_dataset(data)
    table = Table(title=escape(f"{summary.name} ({summary.root})"))
    table.add_column("quantity", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in summary.rows():
        table.add_row(Text(str(key)), Text(str(value)))
    print_table(console, table)
    if by is not None:
        from bench.data.summary import metadata_count_header, metadata_count_rows, metadata_counts

        counts = Table(title=escape(f"{summary.name}: images per class and {by}"))
        for i, heading in enumerate(metadata_count_header(by)):
            counts.add_column(Text(heading), justify="left" if i == 0 else "right", no_wrap=True)
        for row in metadata_count_rows(metadata_counts(data, by)):
            counts.add_row(*(Text(cell) for cell in row))
        print_table(console, counts)
    problems = list(summary.problems)
    if deep:
        from bench.data.checks import deep_check

        with progress_bar() as progress:
            task = progress.add_task("decoding every image and mask", total=len(data.samples))
            problems += deep_check(data, progress=lambda: progress.advance(task))
    if problems:
        console.print("[bold yellow]problems found:[/]")
        for problem in problems:
            console.print(f"  - {escape(problem)}", highlight=False, soft_wrap=True)
    else:
        console.print("no problems found" + (" (every image and mask decoded)" if deep else ""))


app.add_typer(figure_app, name="figure")

phantom_app = typer.Typer(
    help="The built-in B-mode breast-ultrasound phantom (default dataset).", no_args_is_help=True
)
app.add_typer(phantom_app, name="phantom")


@phantom_app.command("devices")
@friendly_errors
def phantom_devices() -> None:
    """List the simulated ultrasound devices and their acquisition settings."""
    from bench.phantom import DEVICES

    table = Table(title="simulated devices (use as phantom:<name>)")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("geometry", no_wrap=True)
    table.add_column("image (W x H)", no_wrap=True)
    table.add_column("centre frequency", no_wrap=True)
    table.add_column("description", overflow="fold")
    for name, device in DEVICES.items():
        width, height = device.image_size
        table.add_row(
            Text(name),
            Text(device.geometry),
            f"{width} x {height}",
            f"{device.frequency_mhz:g} MHz",
            Text(device.description),
        )
    print_table(console, table)


@phantom_app.command("export")
@friendly_errors
def phantom_export(
    out_dir: Annotated[
        Path, typer.Argument(help="new (or empty) folder to write the BUSI-layout dataset into")
    ],
    device: Annotated[str, typer.Option(help="simulated device (see `bench phantom devices`)")] = "device-a",
    n: Annotated[int, typer.Option(help="images per class")] = 40,
    seed: Annotated[int, typer.Option(help="which breasts: the same seed images the same anatomy")] = 0,
    size: Annotated[
        str | None, typer.Option(help="image size WxH or S (default: the device's own size)")
    ] = None,
) -> None:
    """Write phantom images and masks in the BUSI layout, to look at or to feed to other tools."""
    from bench.phantom import export_busi_layout

    parsed: int | tuple[int, int] | None = None
    if size is not None:
        try:
            parts = [int(p) for p in size.lower().split("x")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or min(parts, default=0) < 16:
            raise BenchError(f"--size must look like 256 or 400x300 (at least 16 px), got {size!r}")
        parsed = parts[0] if len(parts) == 1 else (parts[0], parts[1])
    root = export_busi_layout(out_dir, device=device, n_per_class=n, seed=seed, size=parsed)
    console.print(
        f"wrote {3 * n} {escape(device)} phantom images (BUSI layout) to {escape(str(root))}; "
        f"check them with `bench datasets {escape(str(root))}`"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
