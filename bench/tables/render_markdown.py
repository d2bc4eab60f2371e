"""Markdown output: a heading per backbone block, a GitHub pipe table per table, the block's legend."""

from __future__ import annotations

from collections.abc import Sequence

from bench.tables.model import TableBlock, group_heading


def to_markdown(blocks: Sequence[TableBlock]) -> str:
    """GitHub-flavoured markdown: per block a heading (the identity), the random-init warning and
    duplicate warnings once, a pipe table per table (a bold heading row opens each row group),
    then the block's legend once."""
    out: list[str] = []
    for block in blocks:
        out.append(f"## {block.title}")
        out.append("")
        for line in block.banner:
            out.extend([f"> **{line}**", ""])
        for line in block.warnings:
            out.extend([f"> {line}", ""])
        for table in block.tables:
            out.append(f"### {table.spec.title}")
            out.append("")
            flat = table.flat_columns()
            texts = dict(zip(table.wide().index, table.wide().to_numpy().tolist(), strict=True))
            header = ["method", *[table.header(c, m) for c, m in flat]]
            out.append(_md_row(header))
            out.append("| :--- | " + " | ".join("---:" for _ in flat) + " |")
            for group, rows in table.row_groups():
                out.append(_md_row([f"**{group_heading(group)}**", *["" for _ in flat]]))
                for row in rows:
                    out.append(_md_row([row.label, *[str(v) for v in texts[row.label]]]))
            out.append("")
        out.append("Legend:")
        out.extend(f"- {line}" for line in block.legend)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_escape(cell) for cell in cells) + " |"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")
