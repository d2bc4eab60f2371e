"""The table model: what a table is (specs, columns, rows, cells as long data), no rendering.

:mod:`bench.tables.builder` fills these from finished cells; the ``render_*`` modules print them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bench.results import BackboneIdentity

#: Delta degrees of freedom of the std over seeds (sample std).
STD_DDOF = 1

MARK_NOT_APPLICABLE = "-"
MARK_MISSING = "·"
MARK_NO_METRIC = "n/a"
MARK_BLANK = ""

#: Cell statuses in :attr:`Table.data` and the CSV.
STATUS_OK = "ok"
STATUS_NOT_APPLICABLE = "not_applicable"
STATUS_MISSING = "missing"
STATUS_NO_METRIC = "no_metric"
STATUS_BLANK = "blank"

KIND_OURS = "ours"
KIND_PAPER = "paper"
KIND_PAPER_ONLY = "paper-only"

METRIC_LABEL: dict[str, str] = {
    "image_auroc": "I-AUROC",
    "class_auroc": "AUROC",
    "class_accuracy": "accuracy",
    "class_balanced_accuracy": "balanced accuracy",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "pixel AP",
    "pixel_aupro": "AUPRO",
    "pixel_dice": "Dice",
}


#: The heading of each row group (:data:`~bench.method.TABLE_GROUPS`), in the paper's words where
#: it has them (Sec. 3: "CLIP-based AD approaches", "few-shot CLIP adaptation approaches").
GROUP_HEADINGS: dict[str, str] = {
    "reference": "training-free references",
    "anomaly": "CLIP-based anomaly detection",
    "classifier": "few-shot CLIP adaptation",
    "other": "other methods",
    "ours": "UltraAD and its ablations",
}


def group_heading(group: str) -> str:
    """The printed heading of row group ``group``."""
    return GROUP_HEADINGS.get(group, group)


@dataclass(frozen=True)
class TableSpec:
    """One table of the layout: its key (as in ``paper.yaml``), title and metric sub-columns."""

    key: str
    title: str
    metrics: tuple[str, ...]


DETECTION = TableSpec("detection", "Detection: I-AUROC (%)", ("image_auroc",))
CLASSIFICATION = TableSpec(
    "classification", "Classification: 3-class AUROC (%, macro one-vs-rest)", ("class_auroc",)
)
LOCALIZATION = TableSpec(
    "localization", "Localization: P-AUROC and pixel AP (%)", ("pixel_auroc", "pixel_ap")
)
ABLATION = TableSpec(
    "ablation", "Ablation (UltraAD variants): I-AUROC / P-AUROC (%)", ("image_auroc", "pixel_auroc")
)
MAIN_TABLES: tuple[TableSpec, ...] = (DETECTION, CLASSIFICATION, LOCALIZATION)


@dataclass(frozen=True)
class Column:
    """One displayed column (before the metric split): ours (``target``) or paper-only."""

    target: str | None
    shots: int
    paper_dataset: str | None = None

    @property
    def group(self) -> str:
        """Top-level header: the target, or ``"<DATASET> [paper]"`` for a paper-only column."""
        return self.target if self.target is not None else f"{self.paper_dataset} [paper]"

    @property
    def shots_label(self) -> str:
        return "zero-shot" if self.shots == 0 else f"{self.shots}-shot"

    @property
    def label(self) -> str:
        return f"{self.group} {self.shots_label}"


@dataclass(frozen=True)
class Row:
    """One displayed row: our method, or the paper's numbers for it, in row group ``group``
    (one of :data:`~bench.method.TABLE_GROUPS`)."""

    method: str
    kind: str
    zero_shot: bool
    group: str = "other"

    @property
    def label(self) -> str:
        text = self.method + (" (zero-shot)" if self.zero_shot else "")
        if self.kind == KIND_PAPER:
            text += " [paper]"
        elif self.kind == KIND_PAPER_ONLY:
            text += " [paper only]"
        return text


@dataclass
class Table:
    """One rendered table as plain data.

    ``data`` is long: one row per (row, column, metric) with columns ``row`` (label),
    ``method``, ``kind``, ``zero_shot``, ``group`` (row group), ``column`` (column group label), ``target``,
    ``paper_dataset``, ``shots``, ``metric``, ``status``, ``mean``, ``std``, ``n`` (numbers in
    percent; ``n`` and ``std`` are NaN for paper values), ``seeds`` and the displayed ``text``.
    """

    spec: TableSpec
    rows: list[Row]
    columns: list[Column]
    data: pd.DataFrame
    show_n: bool
    legend: list[str]

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.spec.metrics

    def cell(self, row: str, group: str, shots: int, metric: str | None = None) -> dict[str, Any]:
        """The data of one cell, by row label, column group (target or ``"BUSZS [paper]"``), shots."""
        metric = metric or self.spec.metrics[0]
        d = self.data
        hit = d[(d["row"] == row) & (d["column"] == group) & (d["shots"] == shots) & (d["metric"] == metric)]
        if len(hit) != 1:
            raise KeyError(f"no cell ({row!r}, {group!r}, {shots}, {metric!r}) in table {self.spec.key!r}")
        return hit.iloc[0].to_dict()

    def text(self, row: str, group: str, shots: int, metric: str | None = None) -> str:
        """The displayed text of one cell."""
        return str(self.cell(row, group, shots, metric)["text"])

    def header(self, column: Column, metric: str, sep: str = " ") -> str:
        """Flat header of one displayed column (metric named only when the table has several)."""
        parts = [column.group, column.shots_label]
        if len(self.spec.metrics) > 1:
            parts.append(METRIC_LABEL.get(metric, metric))
        return sep.join(parts)

    def row_groups(self) -> list[tuple[str, list[Row]]]:
        """The rows in runs of one row group each, in order: ``(group, rows)``."""
        runs: list[tuple[str, list[Row]]] = []
        for row in self.rows:
            if runs and runs[-1][0] == row.group:
                runs[-1][1].append(row)
            else:
                runs.append((row.group, [row]))
        return runs

    @property
    def short_title(self) -> str:
        """The table's name without its metric description (``"Detection"``)."""
        return self.spec.title.split(":")[0]

    def flat_columns(self) -> list[tuple[Column, str]]:
        return [(c, m) for c in self.columns for m in self.spec.metrics]

    def wide(self) -> pd.DataFrame:
        """Displayed texts: index = row labels, columns = (group, shots label, metric)."""
        lookup = {(r.row, r.column, r.shots, r.metric): r.text for r in self.data.itertuples(index=False)}
        cols = self.flat_columns()
        index = pd.MultiIndex.from_tuples(
            [(c.group, c.shots_label, m) for c, m in cols], names=["column", "shots", "metric"]
        )
        values = [[lookup[(row.label, c.group, c.shots, m)] for c, m in cols] for row in self.rows]
        return pd.DataFrame(values, index=[r.label for r in self.rows], columns=index)


@dataclass
class TableBlock:
    """All tables of one (backbone identity, source, eval size) group."""

    identity: BackboneIdentity
    source: str
    eval_size: int
    tables: list[Table]
    warnings: list[str] = field(default_factory=list)

    @property
    def random_init(self) -> bool:
        return self.identity.random_init

    @property
    def title(self) -> str:
        """States the backbone and weights (random-init loudly), layers, source and eval size."""
        layers = ",".join(str(x) for x in self.identity.layers)
        return (
            f"{self.identity.label}; layers {layers}; support source: {self.source}; "
            f"eval size {self.eval_size}px"
        )

    @property
    def legend(self) -> list[str]:
        """The legend of all the block's tables, printed once after them: every table's lines in
        order, each once; a line that not every table has names the tables it is about."""
        owners: dict[str, list[str]] = {}
        for table in self.tables:
            for line in table.legend:
                owners.setdefault(line, [])
                if table.short_title not in owners[line]:
                    owners[line].append(table.short_title)
        every = len({t.short_title for t in self.tables})
        return [
            line if len(names) == every else f"({', '.join(names)}) {line}" for line, names in owners.items()
        ]

    @property
    def banner(self) -> list[str]:
        """Loud lines every text format prints at the top of the block."""
        if not self.random_init:
            return []
        return [
            f"WARNING: random-init weights ({self.identity.weights}): the backbone is NOT pretrained; "
            "these numbers are meaningless for CLIP methods (a smoke test of the pipeline only)."
        ]

    def table(self, key: str) -> Table:
        for table in self.tables:
            if table.spec.key == key:
                return table
        raise KeyError(f"no table {key!r} in block {self.title!r}")
