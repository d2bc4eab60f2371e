"""The ``bench`` command line: run grids, print tables, list methods and inspect datasets."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.errors import BenchError

app = typer.Typer(
    help="ultraad-bench: few-shot CLIP anomaly detection benchmarks for breast ultrasound.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(func: F) -> F:
    """Print a user-fixable error as one clear message (no traceback) and exit with status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BenchError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=2) from exc

    return wrapper  # type: ignore[return-value]


@app.command()
@_friendly_errors
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
@_friendly_errors
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
) -> None:
    """Print the paper's three tables (detection, classification, localization) from stored results."""
    _print_tables(results_dir, format, compare, paper_target or [], ablation, paper_yaml)


def _print_tables(
    results_dir: Path,
    fmt: str,
    compare: str | None,
    pairs: list[str],
    ablation: bool,
    paper_yaml: Path | None,
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
    text = render_tables(
        cells,
        fmt=fmt,
        compare=compare,
        ablation=ablation,
        paper_targets=mapping or None,
        paper_yaml=paper_yaml,
        console=console if fmt == "rich" else None,
    )
    if fmt != "rich" and text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command("methods")
@_friendly_errors
def methods_command(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also list each method's options")] = False,
) -> None:
    """List the registered methods (built-in and plugins), the tasks they do, and a description."""
    from bench.kit.options import describe as describe_options
    from bench.registry import available_methods
    from bench.types import Task

    table = Table(title="methods")
    table.add_column("name", style="bold")
    for task in Task:
        table.add_column(str(task), justify="center")
    table.add_column("support")
    table.add_column("description")
    methods = sorted(available_methods().items())
    for name, cls in methods:
        row = [name, *("yes" if t in cls.tasks else "-" for t in Task)]
        row += ["few-shot" if cls.uses_support else "zero-shot", cls.description]
        table.add_row(*row)
    console.print(table)
    if verbose:
        for name, cls in methods:
            console.print(f"\n[bold]{escape(name)}[/] options (method_config: {{{escape(name)}: {{...}}}}):")
            for line in describe_options(cls.options) or ["(none)"]:
                console.print(f"  {escape(line)}", highlight=False)


@app.command("datasets")
@_friendly_errors
def datasets_command(
    dataset: Annotated[
        str | None, typer.Argument(help="a named set or a path; omit to list the named sets")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="folder holding the named datasets [env BENCH_DATA_ROOT]")
    ] = None,
) -> None:
    """Describe a dataset: counts per class, masks present, size range and problems found."""
    from bench.data import NAMED_DATASETS, dataset_names, default_data_root, describe_dataset, resolve_dataset

    root = Path(data_root) if data_root else default_data_root()
    if dataset is None:
        table = Table(title=escape(f"named datasets under {root}"))
        table.add_column("name", style="bold")
        table.add_column("expected path")
        table.add_column("present")
        for key, rel in NAMED_DATASETS.items():
            table.add_row(key, escape(str(root / rel)), "yes" if (root / rel).exists() else "no")
        for key in dataset_names():
            if key not in NAMED_DATASETS:
                table.add_row(f"{key}[:<device>]", "(generated, no files needed)", "yes")
        console.print(table)
        console.print("Describe one with `bench datasets NAME` (or a path to a manifest or folder).")
        return
    summary = describe_dataset(resolve_dataset(dataset, root))
    table = Table(title=escape(f"{summary.name} ({summary.root})"))
    table.add_column("quantity", style="bold")
    table.add_column("value")
    for key, value in summary.rows():
        table.add_row(escape(str(key)), escape(str(value)))
    console.print(table)
    if summary.problems:
        console.print("[bold yellow]problems found:[/]")
        for problem in summary.problems:
            console.print(f"  - {escape(problem)}", highlight=False)
    else:
        console.print("no problems found")


phantom_app = typer.Typer(
    help="The built-in B-mode breast-ultrasound phantom (default dataset).", no_args_is_help=True
)
app.add_typer(phantom_app, name="phantom")


@phantom_app.command("devices")
@_friendly_errors
def phantom_devices() -> None:
    """List the simulated ultrasound devices and their acquisition settings."""
    from bench.phantom import DEVICES

    table = Table(title="simulated devices (use as phantom:<name>)")
    table.add_column("name", style="bold")
    table.add_column("geometry")
    table.add_column("image (W x H)")
    table.add_column("centre frequency")
    table.add_column("description")
    for name, device in DEVICES.items():
        width, height = device.image_size
        table.add_row(
            name,
            device.geometry,
            f"{width} x {height}",
            f"{device.frequency_mhz:g} MHz",
            escape(device.description),
        )
    console.print(table)


@phantom_app.command("export")
@_friendly_errors
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
