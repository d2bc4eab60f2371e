"""Markdown output: a heading per backbone block, a GitHub pipe table per table, its legend."""

from __future__ import annotations

from collections.abc import Sequence

from bench.tables.model import TableBlock, table_caption


def to_markdown(blocks: Sequence[TableBlock]) -> str:
    """GitHub-flavoured markdown: a heading per block (the identity), a pipe table per table."""
    out: list[str] = []
    for block in blocks:
        out.append(f"## {block.title}")
        out.append("")
        for line in block.banner:
            out.extend([f"> **{line}**", ""])
        for line in block.warnings:
            out.extend([f"> {line}", ""])
        for table in block.tables:
            out.append(f"### {table_caption(block, table)}")
            out.append("")
            flat = table.flat_columns()
            wide = table.wide()
            header = ["method", *[table.header(c, m) for c, m in flat]]
            out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            out.append("| :--- | " + " | ".join("---:" for _ in flat) + " |")
            for label, values in zip(wide.index, wide.to_numpy().tolist(), strict=True):
                out.append("| " + " | ".join(_md_escape(str(v)) for v in [label, *values]) + " |")
            out.append("")
            out.append("Legend:")
            out.extend(f"- {line}" for line in table.legend)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")
