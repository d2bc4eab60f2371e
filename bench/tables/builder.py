"""Builds the tables of each backbone group from its finished cells (the table model's filler)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import ConfigError
from bench.results import METRIC_TASK, CellRecord
from bench.tables.cells import GroupKey, dedupe_cells, group_key
from bench.tables.legend import table_legend
from bench.tables.model import (
    ABLATION,
    KIND_OURS,
    KIND_PAPER,
    KIND_PAPER_ONLY,
    MAIN_TABLES,
    MARK_BLANK,
    MARK_MISSING,
    MARK_NO_METRIC,
    MARK_NOT_APPLICABLE,
    STATUS_BLANK,
    STATUS_MISSING,
    STATUS_NO_METRIC,
    STATUS_NOT_APPLICABLE,
    STATUS_OK,
    STD_DDOF,
    Column,
    Row,
    Table,
    TableBlock,
    TableSpec,
)
from bench.tables.paper import PaperNumbers, PaperTable, load_paper
from bench.tables.placement import Placement

#: Our target -> paper dataset, unless ``paper_targets`` says otherwise.
DEFAULT_PAPER_TARGETS: dict[str, str] = {"busi": "BUSI"}


def _resolve_paper_targets(paper_targets: Mapping[str, str] | None) -> dict[str, str]:
    mapping = dict(paper_targets or {})
    for target, dataset in DEFAULT_PAPER_TARGETS.items():
        mapping.setdefault(target, dataset)
    return mapping


#: One table cell's confidence interval in metric units (low, high), keyed by (backbone group,
#: method, zero-shot, target, shots (0 for zero-shot), metric); see :mod:`bench.intervals`.
IntervalKey = tuple[GroupKey, str, bool, str, int, str]


@dataclass(frozen=True)
class IntervalSpec:
    """Confidence intervals to show beside mean ± std, and how they were made (for the legend)."""

    values: Mapping[IntervalKey, tuple[float, float]]
    level: float
    n_resamples: int
    seed: int


def _blank_cell() -> dict[str, Any]:
    """A table cell with nothing in it (status blank, no statistics)."""
    return {
        "status": STATUS_BLANK,
        "mean": math.nan,
        "std": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "n": math.nan,
        "seeds": "",
    }


def _stats(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float) * 100.0
    mean = float(arr.mean())
    std = float(arr.std(ddof=STD_DDOF)) if len(arr) > STD_DDOF else math.nan
    return mean, std


def _fmt_value(mean: float, std: float, n: int | None, show_n: bool, ci: tuple[float, float]) -> str:
    text = f"{mean:.1f}"
    if not math.isnan(std):
        text += f" ± {std:.1f}"
    if not math.isnan(ci[0]):
        text += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    if show_n and n is not None:
        text += f" (n={n})"
    return text


def _marker(status: str) -> str:
    return {
        STATUS_NOT_APPLICABLE: MARK_NOT_APPLICABLE,
        STATUS_MISSING: MARK_MISSING,
        STATUS_NO_METRIC: MARK_NO_METRIC,
        STATUS_BLANK: MARK_BLANK,
    }[status]


def _ablation_spec(root: str, n_roots: int) -> TableSpec:
    """The ablation table of ``root``; named after it only when a block has several ablations."""
    if n_roots == 1:
        return ABLATION
    return dataclasses.replace(ABLATION, title=f"Ablation ({root} variants): I-AUROC / P-AUROC (%)")


class _BlockBuilder:
    """Builds the tables of one group from its (deduplicated) records."""

    def __init__(
        self,
        cells: list[CellRecord],
        paper: PaperNumbers | None,
        paper_targets: Mapping[str, str],
        placement: Placement,
        group: GroupKey | None = None,
        intervals: IntervalSpec | None = None,
    ) -> None:
        self.group = group
        self.intervals = intervals
        self.cells = cells
        self.paper = paper
        self.paper_targets = paper_targets
        self.placement = placement
        self.tasks: dict[str, set[str]] = {}
        self.index: dict[tuple[str, bool, str, int], list[CellRecord]] = {}
        for cell in cells:
            self.tasks.setdefault(cell.method, set()).update(cell.tasks)
            zero_shot = not cell.uses_support
            key = (cell.method, zero_shot, cell.target, 0 if zero_shot else cell.shots)
            self.index.setdefault(key, []).append(cell)
        for records in self.index.values():
            records.sort(key=lambda c: c.seed)

    # -- columns -------------------------------------------------------------------------------
    def _columns(self, methods: Iterable[str] | None, paper_table: PaperTable | None) -> list[Column]:
        pool = [c for c in self.cells if methods is None or c.method in methods]
        shots = {c.shots for c in pool if c.uses_support}
        if paper_table is not None:
            shots |= set(paper_table.shots)
        shot_list = sorted(shots) or [0]
        columns: list[Column] = []
        mapped: set[str] = set()
        for target in sorted({c.target for c in pool}):
            dataset = self.paper_targets.get(target) if paper_table is not None else None
            if paper_table is not None and dataset not in paper_table.datasets:
                dataset = None  # e.g. busi in the ablation table, which is BUSZS-only
            if dataset is not None:
                mapped.add(dataset)
            columns.extend(Column(target, s, dataset) for s in shot_list)
        if paper_table is not None:
            for dataset in paper_table.datasets:
                if dataset not in mapped:
                    columns.extend(Column(None, s, dataset) for s in paper_table.shots)
        return columns

    # -- rows ----------------------------------------------------------------------------------
    def _ours_rows(self, method: str) -> list[Row]:
        flags = sorted({zs for (m, zs, _, _) in self.index if m == method}, reverse=True)
        group = self.placement.group(method)
        return [Row(method, KIND_OURS, zs, group) for zs in flags]

    def _methods(self, spec: TableSpec, paper_table: PaperTable | None) -> list[str]:
        """The methods of a main table, in row order: ours that do its task, and the paper's.

        A method the paper reports in this table keeps its rows even when ours does not do the
        task (its own row then reads "-"): what the paper prints is never hidden.
        """
        task = METRIC_TASK[spec.metrics[0]]
        names = {m for (m, _, _, _) in self.index if str(task) in self.tasks.get(m, ())}
        if paper_table is not None:
            names |= set(paper_table.methods)
        return self.placement.order(names)

    def _rows(self, methods: Sequence[str], paper_table: PaperTable | None, fixed: bool) -> list[Row]:
        rows: list[Row] = []
        for method in methods:
            ours = self._ours_rows(method)
            if not ours and fixed:
                ours = [Row(method, KIND_OURS, False, self.placement.group(method))]
            rows.extend(ours)
            if paper_table is not None and method in paper_table.methods:
                kind = KIND_PAPER if ours else KIND_PAPER_ONLY
                zero_shot = paper_table.methods[method].zero_shot
                rows.append(Row(method, kind, zero_shot, self.placement.group(method)))
        return rows

    # -- cells ---------------------------------------------------------------------------------
    def _our_cell(self, row: Row, column: Column, metric: str) -> dict[str, Any]:
        out = _blank_cell()
        if column.target is None:
            return out
        task = METRIC_TASK.get(metric)
        tasks = self.tasks.get(row.method)
        if tasks is not None and task is not None and task not in tasks:
            out["status"] = STATUS_NOT_APPLICABLE
            return out
        records = self.index.get(
            (row.method, row.zero_shot, column.target, 0 if row.zero_shot else column.shots)
        )
        if not records:
            out["status"] = STATUS_MISSING
            return out
        used = [c for c in records if metric in c.metrics and math.isfinite(c.metrics[metric])]
        if not used:
            out["status"] = STATUS_NO_METRIC
            return out
        mean, std = _stats([c.metrics[metric] for c in used])
        out.update(
            status=STATUS_OK, mean=mean, std=std, n=len(used), seeds=" ".join(str(c.seed) for c in used)
        )
        if self.intervals is not None and self.group is not None:
            shots = 0 if row.zero_shot else column.shots
            key = (self.group, row.method, row.zero_shot, column.target, shots, metric)
            if key in self.intervals.values:
                low, high = self.intervals.values[key]
                out.update(ci_low=100.0 * low, ci_high=100.0 * high)
        return out

    @staticmethod
    def _paper_cell(row: Row, column: Column, metric: str, paper_table: PaperTable) -> dict[str, Any]:
        out = _blank_cell()
        if column.paper_dataset is None:
            return out
        reported, value = paper_table.methods[row.method].lookup(column.paper_dataset, column.shots, metric)
        if not reported:
            return out
        if value is None:
            out["status"] = STATUS_NOT_APPLICABLE
        else:
            out.update(status=STATUS_OK, mean=value)
        return out

    # -- table ---------------------------------------------------------------------------------
    def build(self, spec: TableSpec, fixed_rows: Sequence[str] | None = None) -> Table:
        """The table ``spec``: its rows are ``fixed_rows`` (the ablation table, every variant
        shown, run or not), else the methods that do its task (see :meth:`_methods`)."""
        paper_table = self.paper.tables.get(spec.key) if self.paper is not None else None
        methods = list(fixed_rows) if fixed_rows is not None else self._methods(spec, paper_table)
        ran = [m for m in methods if m in self.tasks]
        # Columns from the table's own methods (a target only classifiers ran is no localization
        # column); a table of paper rows alone keeps every target of the block for them.
        columns = self._columns(ran or None, paper_table)
        rows = self._rows(methods, paper_table, fixed=fixed_rows is not None)
        records: list[dict[str, Any]] = []
        for row in rows:
            for column in columns:
                for metric in spec.metrics:
                    if row.kind == KIND_OURS:
                        values = self._our_cell(row, column, metric)
                    else:
                        assert paper_table is not None
                        values = self._paper_cell(row, column, metric, paper_table)
                    records.append(
                        {
                            "row": row.label,
                            "method": row.method,
                            "kind": row.kind,
                            "zero_shot": row.zero_shot,
                            "group": row.group,
                            "column": column.group,
                            "target": column.target,
                            "paper_dataset": column.paper_dataset,
                            "shots": column.shots,
                            "metric": metric,
                            **values,
                        }
                    )
        data = pd.DataFrame.from_records(
            records,
            columns=[
                "row",
                "method",
                "kind",
                "zero_shot",
                "group",
                "column",
                "target",
                "paper_dataset",
                "shots",
                "metric",
                "status",
                "mean",
                "std",
                "ci_low",
                "ci_high",
                "n",
                "seeds",
            ],
        )
        counted = data[(data["kind"] == KIND_OURS) & (~data["zero_shot"]) & (data["status"] == STATUS_OK)]
        seed_counts = sorted({int(n) for n in counted["n"]})
        show_n = len(seed_counts) > 1
        texts = []
        for r in data.itertuples(index=False):
            if r.status != STATUS_OK:
                texts.append(_marker(r.status))
            elif r.kind == KIND_OURS:
                texts.append(
                    _fmt_value(r.mean, r.std, int(r.n), show_n and not r.zero_shot, (r.ci_low, r.ci_high))
                )
            else:
                texts.append(f"{r.mean:.1f}")
        data["text"] = texts
        legend = table_legend(
            spec,
            rows,
            columns,
            seed_counts,
            show_n,
            cells=self.cells,
            paper=self.paper,
            paper_table=paper_table,
            ablation_root=self.placement.paper_ablation_root,
        )
        if self.intervals is not None:
            legend.insert(
                1,
                f"[low, high] = {100 * self.intervals.level:g}% confidence interval of the seed mean: "
                f"stratified bootstrap over test images ({self.intervals.n_resamples} resamples, seed "
                f"{self.intervals.seed}; the same resamples for every seed and method of a target).",
            )
        return Table(spec=spec, rows=rows, columns=columns, data=data, show_n=show_n, legend=legend)


def build_tables(
    cells: Iterable[CellRecord],
    *,
    compare: str | None = None,
    ablation: bool = False,
    paper_yaml: Path | str | None = None,
    paper_targets: Mapping[str, str] | None = None,
    intervals: IntervalSpec | None = None,
) -> list[TableBlock]:
    """Group, deduplicate and tabulate ``cells``: one :class:`TableBlock` per backbone group.

    ``compare="paper"`` adds the paper's rows and columns (numbers from ``paper_yaml``,
    default ``<repo>/results/paper.yaml``). ``paper_targets`` maps our targets to paper
    datasets (merged over the default ``{"busi": "BUSI"}``). ``ablation=True`` builds the
    ablation table instead of the three main tables (rows: the methods whose ``ablation_of``
    names the ablated method, see :mod:`bench.tables.placement`) and leaves out blocks
    without any of them.
    """
    if compare not in (None, "paper"):
        raise ConfigError(f"unknown comparison {compare!r}; the only reference available is 'paper'")
    paper = load_paper(paper_yaml) if compare == "paper" else None
    mapping = _resolve_paper_targets(paper_targets)
    if paper is not None:
        for target, dataset in mapping.items():
            if dataset not in paper.datasets:
                raise ConfigError(
                    f"paper_targets maps {target!r} to {dataset!r}, which is not a paper dataset "
                    f"(known: {', '.join(paper.datasets)})"
                )
    groups: dict[GroupKey, list[CellRecord]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    blocks: list[TableBlock] = []
    for key in sorted(
        groups, key=lambda k: (k[0].model, k[0].weights, k[0].input_size, k[0].layers, k[1], k[2])
    ):
        identity, source, eval_size = key
        kept, messages = dedupe_cells(groups[key])
        placement = Placement(kept, paper)
        builder = _BlockBuilder(kept, paper, mapping, placement, key, intervals)
        if ablation:
            roots = placement.ablation_roots(c.method for c in kept)
            if not roots:
                continue
            tables = [
                builder.build(_ablation_spec(root, len(roots)), fixed_rows=placement.ablation_rows(root))
                for root in roots
            ]
        else:
            tables = [table for table in (builder.build(spec) for spec in MAIN_TABLES) if table.rows]
        blocks.append(TableBlock(identity, source, eval_size, tables, messages))
    return blocks
