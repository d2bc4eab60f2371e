"""LaTeX output: one booktabs ``table`` float per table, captioned with the backbone identity."""

from __future__ import annotations

from collections.abc import Sequence

from bench.tables.model import METRIC_LABEL, TableBlock, group_heading

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "·": r"$\cdot$",
    "≈": r"$\approx$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (and typeset ± and · as math)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(blocks: Sequence[TableBlock]) -> str:
    """One ``table`` float per table: booktabs ``tabular``, caption with the backbone identity.

    Headers span: target (or ``<DATASET> [paper]``) over shots, shots over metrics. Each row
    group opens with a ``\\midrule`` and an italic ``\\multicolumn`` heading row. Unlike the
    text formats, every float carries the block identity, the random-init warning and its own
    legend in its caption and footnote: a float must stand alone once pasted into a paper.
    Needs ``\\usepackage{booktabs}``.
    """
    out: list[str] = []
    for block in blocks:
        out.append(f"% ultraad-bench results: {block.title}")
        out.extend(f"% {line}" for line in block.banner)
        out.extend(f"% {line}" for line in block.warnings)
        for table in block.tables:
            metrics = table.spec.metrics
            nm = len(metrics)
            flat = table.flat_columns()
            wide = table.wide()
            texts = dict(zip(wide.index, wide.to_numpy().tolist(), strict=True))
            out.append(r"\begin{table}[htbp]")
            out.append(r"\centering")
            caption = f"{table.spec.title}. Backbone: {block.title}."
            if block.banner:
                caption += " " + block.banner[0]
            out.append(r"\caption{" + latex_escape(caption) + "}")
            out.append(r"\begin{tabular}{l" + "r" * len(flat) + "}")
            out.append(r"\toprule")
            # header row 1: groups
            groups: list[tuple[str, int]] = []
            for column in table.columns:
                if groups and groups[-1][0] == column.group:
                    groups[-1] = (column.group, groups[-1][1] + nm)
                else:
                    groups.append((column.group, nm))
            cells = [" "]
            rules = []
            start = 2
            for name, span in groups:
                cells.append(r"\multicolumn{" + str(span) + "}{c}{" + latex_escape(name) + "}")
                rules.append(r"\cmidrule(lr){" + f"{start}-{start + span - 1}" + "}")
                start += span
            out.append(" & ".join(cells) + r" \\")
            out.append(" ".join(rules))
            # header row 2: shots (spanning metrics)
            shot_cells = ["method" if nm == 1 else " "]
            shot_rules = []
            start = 2
            for column in table.columns:
                if nm == 1:
                    shot_cells.append(latex_escape(column.shots_label))
                else:
                    shot_cells.append(
                        r"\multicolumn{" + str(nm) + "}{c}{" + latex_escape(column.shots_label) + "}"
                    )
                    shot_rules.append(r"\cmidrule(lr){" + f"{start}-{start + nm - 1}" + "}")
                start += nm
            out.append(" & ".join(shot_cells) + r" \\")
            if nm > 1:
                out.append(" ".join(shot_rules))
                metric_cells = ["method"] + [latex_escape(METRIC_LABEL.get(m, m)) for _, m in flat]
                out.append(" & ".join(metric_cells) + r" \\")
            for group, rows in table.row_groups():
                out.append(r"\midrule")
                heading = r"\textit{" + latex_escape(group_heading(group)) + "}"
                out.append(r"\multicolumn{" + str(1 + len(flat)) + "}{l}{" + heading + r"} \\")
                for row in rows:
                    cells = [row.label, *texts[row.label]]
                    out.append(" & ".join(latex_escape(str(v)) for v in cells) + r" \\")
            out.append(r"\bottomrule")
            out.append(r"\end{tabular}")
            out.append("")
            out.append(r"\smallskip")
            out.append(r"\footnotesize")
            out.append(r" \\ ".join(latex_escape(line) for line in table.legend))
            out.append(r"\end{table}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
