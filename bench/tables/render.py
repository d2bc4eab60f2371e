"""One entry point for every output format: :func:`render_tables`."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.errors import ConfigError
from bench.results import CellRecord
from bench.tables.builder import IntervalSpec, build_tables
from bench.tables.placement import ablation_variants
from bench.tables.render_csv import to_csv
from bench.tables.render_latex import to_latex
from bench.tables.render_markdown import to_markdown
from bench.tables.render_rich import to_rich

#: Output formats of :func:`render_tables`.
FORMATS = ("rich", "markdown", "csv", "latex")


def render_tables(
    cells: Iterable[CellRecord],
    fmt: str = "rich",
    compare: str | None = None,
    ablation: bool = False,
    console: Any = None,
    *,
    paper_yaml: Path | str | None = None,
    paper_targets: Mapping[str, str] | None = None,
    width: int = 250,
    on_warning: Callable[[str], None] | None = None,
    intervals: IntervalSpec | None = None,
) -> str:
    """Render the result tables of ``cells`` as ``fmt`` (rich, markdown, csv or latex).

    Returns the text. For ``rich``, the tables are also printed to ``console`` when one is
    given, and the returned text is a plain (uncoloured) export at ``width`` columns; on either,
    a table wider than that is printed at its natural width, never cut
    (:func:`bench.cli_support.print_table`).
    Duplicate-cell warnings are part of the rich/markdown/latex text; for every format they are
    also passed to ``on_warning`` (for csv without ``on_warning``: :func:`warnings.warn`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    blocks = build_tables(
        cells,
        compare=compare,
        ablation=ablation,
        paper_yaml=paper_yaml,
        paper_targets=paper_targets,
        intervals=intervals,
    )
    for block in blocks:
        for line in block.warnings:
            if on_warning is not None:
                on_warning(line)
            elif fmt == "csv":
                warnings.warn(line, UserWarning, stacklevel=2)
    if fmt == "csv":
        return to_csv(blocks)
    if not blocks:
        what = (
            f"results for the ablation variants ({', '.join(ablation_variants())})"
            if ablation
            else "finished cells"
        )
        message = f"No {what} to tabulate."
        if fmt == "rich" and console is not None:
            console.print(message)
        return ("% " if fmt == "latex" else "") + message + "\n"
    if fmt == "markdown":
        return to_markdown(blocks)
    if fmt == "latex":
        return to_latex(blocks)
    from rich.console import Console

    from bench.cli_support import print_table

    recorder = Console(file=io.StringIO(), record=True, width=width, color_system=None, force_terminal=False)
    for renderable in to_rich(blocks):
        print_table(recorder, renderable)
        if console is not None:
            print_table(console, renderable)
    return recorder.export_text()
