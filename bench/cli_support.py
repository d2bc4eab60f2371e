"""What every ``bench`` sub-command shares: the consoles, uncut tables and the friendly-error wrapper."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from bench.errors import BenchError

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "FOLD_FLOOR",
    "console",
    "err_console",
    "fit_no_wrap_columns",
    "friendly_errors",
    "natural_width",
    "print_table",
    "progress_bar",
]

#: Standard output (tables, listings); errors, warnings and progress go to ``err_console``.
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Free-text (``overflow="fold"``) columns may be narrowed to this many cells, a longer word split
#: across lines, before a table is printed wider than the console.
FOLD_FLOOR = 10

#: Measuring at this width shows a table's own minimum, not one capped by the console.
_UNBOUNDED = 1_000_000


def natural_width(target: Console, table: Table) -> int:
    """The narrowest width ``table`` can take without cutting a cell of a ``no_wrap`` column or a
    header, whatever the console's width: its ``no_wrap`` columns whole, its folding free-text
    columns down to :data:`FOLD_FLOOR` cells (or their header's longest word), plus borders and
    padding.

    Call :func:`fit_no_wrap_columns` first: rich measures a column's minimum by its longest word.
    """
    options = target.options.update_width(_UNBOUNDED)
    width = Measurement.get(target, options, table).minimum
    for column in table.columns:
        if column.no_wrap or column.width is not None or column.overflow != "fold":
            continue
        words = max(Measurement.get(target, options, cell).minimum for cell in [column.header, *column.cells])
        header = Measurement.get(target, options, column.header).minimum
        width -= max(0, words - max(FOLD_FLOOR, header, column.min_width or 0))
    return width


def fit_no_wrap_columns(target: Console, table: Table) -> None:
    """Raise the ``min_width`` of every ``no_wrap`` column to its widest cell or header.

    Rich counts a column's minimum as its longest word, so a label such as
    ``"ultraad (zero-shot)"`` would count as 11 cells and be cut with "…" to make room.
    """
    options = target.options.update_width(_UNBOUNDED)
    for column in table.columns:
        if column.no_wrap:
            cells = [column.header, *column.cells]
            widest = max(Measurement.get(target, options, cell).maximum for cell in cells)
            column.min_width = max(column.min_width or 0, widest)


def print_table(target: Console, table: RenderableType) -> None:
    """Print ``table`` so that no name in it is ever cut.

    Build tables with every name column (and every short column: numbers, flags) ``no_wrap`` and
    every free-text column (descriptions, paths, problems) ``overflow="fold"``: the ``no_wrap``
    columns are widened to their widest cell (:func:`fit_no_wrap_columns`) and rich lays the table
    out within the console width, wrapping only the free text, when that is possible. When even
    the narrowest layout is wider than the console (a narrow terminal, or a pipe, which rich
    treats as 80 columns), the table is printed at that width, uncropped: the terminal wraps the
    long lines, and ``grep NAME`` still finds every name whole on one line. Anything that is not
    a table is printed as it is.
    """
    if not isinstance(table, Table):
        target.print(table)
        return
    fit_no_wrap_columns(target, table)
    needed = natural_width(target, table)
    if needed <= target.width:
        target.print(table)
        return
    saved = table.width
    table.width = needed  # rich never lays a table out wider than the console unless told its width
    try:
        target.print(table, crop=False)
    finally:
        table.width = saved


def friendly_errors(func: F) -> F:
    """Print a user-fixable error as one clear message (no traceback) and exit with status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BenchError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=2) from exc

    return wrapper  # type: ignore[return-value]


def progress_bar() -> Progress:
    """A transient progress bar with count and ETA on stderr, for a command's long step."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "ETA",
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
