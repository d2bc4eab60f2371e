"""Each table's legend lines: value format, markers, and how the paper's numbers compare.

The text formats print the lines of all a block's tables once, after them
(:attr:`~bench.tables.model.TableBlock.legend`); each LaTeX float carries its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bench.results import BackboneIdentity, CellRecord
from bench.tables.model import (
    ABLATION,
    KIND_OURS,
    LOCALIZATION,
    MARK_MISSING,
    MARK_NO_METRIC,
    MARK_NOT_APPLICABLE,
    METRIC_LABEL,
    STD_DDOF,
    Column,
    Row,
    TableSpec,
)
from bench.tables.paper import PAPER_ABLATION_KEY, PaperNumbers, PaperTable


def table_legend(
    spec: TableSpec,
    rows: Sequence[Row],
    columns: Sequence[Column],
    seed_counts: Sequence[int],
    show_n: bool,
    *,
    cells: Sequence[CellRecord],
    paper: PaperNumbers | None,
    paper_table: PaperTable | None,
    ablation_root: str | None = None,
) -> list[str]:
    """The legend lines of one table: value format, markers, and what the paper rows are.

    ``ablation_root`` is the paper ablation's full method (for the notes of the ablation table).
    """
    values = (
        f"Values: mean ± sample std (ddof={STD_DDOF}) over support seeds, in % (metric x 100); "
        "one seed: mean only."
    )
    if show_n:
        values += " (n=k) = seeds in that cell, shown because it differs between cells of this table."
    elif seed_counts:
        values += f" n={seed_counts[0]} seed(s) in every cell."
    legend = [
        values,
        f"'{MARK_NOT_APPLICABLE}' = the method does not do this task; '{MARK_MISSING}' = not run yet "
        f"(no finished cell); '{MARK_NO_METRIC}' = run, but this metric was not recorded "
        "(e.g. no pixel masks on the target).",
    ]
    if any(r.zero_shot and r.kind == KIND_OURS for r in rows):
        legend.append(
            "'(zero-shot)' rows use no support set: one value per target, repeated in every shots column."
        )
    if spec.key == LOCALIZATION.key:
        legend.append("pixel AP is our reading of the paper's unnamed second pixel figure.")
    if paper is None:
        return legend
    legend.append(
        f"'[paper]' rows: numbers printed in the UltraAD paper ({paper.backbone}; support from "
        f"{paper.support_source}; mean of {paper.seeds} seeds, no std); '[paper only]' = reported by "
        "the paper, not run here; an empty cell = the paper does not report it."
    )
    if paper_table is None:
        legend.append("The paper has no such table.")
        return legend
    mapped = list(dict.fromkeys((c.target, c.paper_dataset) for c in columns if c.target and c.paper_dataset))
    for target, dataset in mapped:
        assert target is not None and dataset is not None
        if _norm(target) == _norm(dataset):
            legend.append(f"{target} vs paper {dataset} (same dataset).")
        else:
            legend.append(f"{target} vs paper {dataset} (stand-in, different data).")
    for dataset in dict.fromkeys(c.paper_dataset for c in columns if c.target is None):
        assert dataset is not None
        public = "" if paper.public.get(dataset, False) else ", not public"
        legend.append(
            f"'{dataset} [paper]' columns: paper dataset with no corresponding target here "
            f"({paper.datasets.get(dataset, '').split('(')[0].strip()}{public})."
        )
    backbone, source = cells[0].backbone, cells[0].source
    if not _same_backbone_as_paper(backbone):
        legend.append(
            f"Not like-for-like: backbone here {backbone.model} ({backbone.weights}), "
            "the paper's ViT-L/14@336px (openai)."
        )
    if paper.support_source and _norm(source) != _norm(paper.support_source):
        legend.append(f"Not like-for-like: support source here {source}, the paper's {paper.support_source}.")
    if spec.key == ABLATION.key:
        legend.extend(_ablation_notes(paper, ablation_root))
    return legend


def _ablation_notes(paper: PaperNumbers, root: str | None) -> list[str]:
    """Where the paper's ablation was made, and whether its full-model row (``root``) matches the
    main tables."""
    ablation = paper.tables.get(PAPER_ABLATION_KEY)
    if ablation is None:
        return []
    settings = sorted({(d, s) for m in ablation.methods.values() for d, s, _ in m.values})
    notes = ["The paper's ablation: " + ", ".join(f"{s}-shot {d}" for d, s in settings) + "."]
    full = ablation.methods.get(root) if root is not None else None
    if root is None or full is None:
        return notes
    for (dataset, shots, metric), value in full.values.items():
        for table in paper.tables.values():
            if table.key == PAPER_ABLATION_KEY or metric not in table.metrics or root not in table.methods:
                continue
            reported, main = table.methods[root].lookup(dataset, shots, metric)
            if reported and main != value:
                notes.append(
                    "As printed, the paper's ablation full model "
                    f"({METRIC_LABEL.get(metric, metric)} {value}) "
                    f"differs from its {table.key} table's {table.methods[root].paper_name} "
                    f"{dataset} {shots}-shot ({main})."
                )
    return notes


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _same_backbone_as_paper(identity: BackboneIdentity) -> bool:
    return _norm(identity.model).startswith("vitl14336") and identity.weights.lower().startswith("openai")
