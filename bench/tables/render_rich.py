"""Rich output: renderables for the terminal (a rule per block, a box table per table)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.tables.model import KIND_OURS, TableBlock, table_caption


def to_rich(blocks: Sequence[TableBlock]) -> list[Any]:
    """Rich renderables: per block a rule (the identity), banner and warnings, then one
    :class:`rich.table.Table` per table (title = table + identity, caption = legend)."""
    from rich import box
    from rich.rule import Rule
    from rich.table import Table as RichTable
    from rich.text import Text

    renderables: list[Any] = []
    for block in blocks:
        style = "bold red" if block.random_init else "bold"
        renderables.append(Rule(Text(block.title, style=style)))
        for line in block.banner:
            renderables.append(Text(line, style="bold red"))
        for line in block.warnings:
            renderables.append(Text(line, style="yellow"))
        for table in block.tables:
            # Text objects throughout: labels such as "[paper]" must not be read as rich markup.
            rich_table = RichTable(
                title=Text(table_caption(block, table), style=style),
                caption=Text("\n".join(table.legend)),
                caption_justify="left",
                box=box.SIMPLE_HEAVY,
            )
            rich_table.add_column(Text("method"), no_wrap=True)
            for column, metric in table.flat_columns():
                rich_table.add_column(Text(table.header(column, metric, sep="\n")), justify="right")
            wide = table.wide()
            for row, values in zip(table.rows, wide.to_numpy().tolist(), strict=True):
                row_style = "italic dim" if row.kind != KIND_OURS else None
                rich_table.add_row(Text(row.label), *[Text(str(v)) for v in values], style=row_style)
            renderables.append(rich_table)
    return renderables
