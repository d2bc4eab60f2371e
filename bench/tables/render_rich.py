"""Rich output: renderables for the terminal (a header per block, a box table per table, a legend
per block).

Names are never cut: every column of a result table is ``no_wrap`` (method labels, and headers
that carry target names, e.g. ``phantom-device-b-n5-size96``); print the renderables with
:func:`bench.cli_support.print_table`, which prints a table wider than the console at its
natural width rather than cropping it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.tables.model import KIND_OURS, METRIC_LABEL, Table, TableBlock, group_heading

if TYPE_CHECKING:
    from rich.text import Text


def to_rich(blocks: Sequence[TableBlock]) -> list[Any]:
    """Rich renderables: per block a rule, the identity, the random-init warning and the duplicate
    warnings once; one :class:`rich.table.Table` per table (titled by the table alone, a heading
    row opening each row group); then the block's legend once."""
    from rich import box
    from rich.rule import Rule
    from rich.table import Table as RichTable
    from rich.text import Text

    renderables: list[Any] = []
    for block in blocks:
        style = "bold red" if block.random_init else "bold"
        renderables.append(Rule(style=style))
        # Text, not the rule's title: a rule cuts a title longer than the console with "…".
        renderables.append(Text(block.title, style=style))
        for line in block.banner:
            renderables.append(Text(line, style="bold red"))
        for line in block.warnings:
            renderables.append(Text(line, style="yellow"))
        for table in block.tables:
            # Text objects throughout: labels such as "[paper]" must not be read as rich markup.
            rich_table = RichTable(title=Text(table.spec.title, style="bold"), box=box.SIMPLE_HEAVY)
            rich_table.add_column(Text("method"), no_wrap=True)
            for header in _headers(table):
                rich_table.add_column(header, justify="right", no_wrap=True)
            wide = table.wide()
            texts = dict(zip(wide.index, wide.to_numpy().tolist(), strict=True))
            for index, (group, rows) in enumerate(table.row_groups()):
                if index:
                    rich_table.add_section()
                rich_table.add_row(Text(group_heading(group), style="bold underline"))
                for row in rows:
                    row_style = "italic dim" if row.kind != KIND_OURS else None
                    rich_table.add_row(
                        Text(row.label), *[Text(str(v)) for v in texts[row.label]], style=row_style
                    )
            renderables.append(rich_table)
        renderables.append(Text("Legend:\n" + "\n".join(f"- {line}" for line in block.legend)))
    return renderables


def _headers(table: Table) -> list[Text]:
    """Column headers that name each target, and each shots setting, once: over the first of its
    columns, as the paper's spanning headers do (a long target name widens one column, not all)."""
    from rich.text import Text

    headers: list[Text] = []
    previous: tuple[str, int] | None = None
    for column, metric in table.flat_columns():
        lines = [
            column.group if previous is None or previous[0] != column.group else "",
            column.shots_label if previous != (column.group, column.shots) else "",
        ]
        if len(table.metrics) > 1:
            lines.append(METRIC_LABEL.get(metric, metric))
        headers.append(Text("\n".join(lines)))
        previous = (column.group, column.shots)
    return headers
