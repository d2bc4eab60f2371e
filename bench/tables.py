"""Result tables in the UltraAD paper's layout, built from finished cells (``cell.json`` records).

Pure functions over a list of :class:`~bench.results.CellRecord`; the CLI calls
:func:`render_tables` (or :func:`build_tables` for the plain data) and prints the result.

Layout decisions
----------------
* **Three tables, like the paper**: Detection (``image_auroc``), Classification
  (``class_auroc``, 3-class), Localization (``pixel_auroc`` and ``pixel_ap`` as two
  sub-columns: the paper prints "(P-AUROC, x)" pairs and never names x; our reading is pixel AP).
  Rows are methods, columns are target x shots (x metric for localization).
* **Cells** are mean ± std over support seeds, in percent (metric x 100, one decimal, as the
  paper prints). The std is the *sample* std (``ddof=1``, :data:`STD_DDOF`); a cell with one
  seed shows the mean only. When the number of seeds differs between cells of one table
  (zero-shot rows aside), every cell of that table also shows ``(n=k)``; otherwise the legend
  states the common n.
* **Markers**: ``-`` the method does not do the table's task (its ``tasks`` lacks it);
  ``·`` not run yet (no finished cell); ``n/a`` run, but the metric was not recorded (e.g. a
  target without pixel masks); an empty cell is structurally empty (a paper-only column in one
  of our rows, or a column the paper does not report in a ``[paper]`` row). Every table
  carries a legend saying so.
* **Zero-shot methods** (``uses_support == False``, stored with shots 0) have one value per
  target, repeated in every shots column; the row reads ``<method> (zero-shot)``.
* **Never pool backbones**: records are grouped by (:class:`BackboneIdentity`, source,
  eval_size) and each group is its own :class:`TableBlock`, titled with ``identity.label``
  (which states random-init loudly), the layers, the source dataset and the eval size. Every
  format carries that identity: the rich and markdown block headers and table titles, the LaTeX
  caption, and the CSV's ``backbone`` / ``random_init`` columns; random-init blocks also get a
  WARNING banner in the text formats.
* **Duplicates** (same group, method, target, shots, seed, e.g. the same cell in two run
  folders) are counted once: the newest by ``created`` is kept and a warning line names both
  paths (ties: the larger path wins, so the choice is deterministic).
* **compare="paper"** adds, below each of our rows that the paper also reports, a row
  ``<method> [paper]`` with the paper's numbers (``results/paper.yaml``) in the columns of
  our targets that correspond to a paper dataset (``busi`` <-> BUSI by default; pass
  ``paper_targets`` for stand-ins, e.g. ``{"udiat": "BUSZS"}``, which the legend labels as a
  stand-in on different data). Paper datasets with no corresponding target become extra
  columns ``<DATASET> [paper]`` after ours, and the paper's shots are added to the columns, so
  nothing of the paper's table is hidden. Paper methods we did not run get a
  ``<method> [paper only]`` row.
* **ablation=True** renders the paper's ablation layout *instead of* the three tables: rows
  are the four UltraAD variants (all four always shown), columns target x shots x
  {I-AUROC, P-AUROC}; blocks without any variant result are left out.
* **CSV is long/tidy**: one row per block x table x row x column x metric with ``mean``,
  ``std``, ``n`` (numbers in percent) plus ``status`` and the displayed ``text``; structurally
  empty cells are left out, and zero-shot rows appear once with ``shots = 0`` (not once per
  shots column) so that a consumer never counts them twice. CSV output carries no warning
  lines (they would break parsers): :func:`render_tables` passes them to ``on_warning``, or
  to :func:`warnings.warn` when none is given.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bench.errors import ConfigError
from bench.results import BackboneIdentity, CellRecord

#: Repository root (``bench/..``); the paper's numbers live in ``results/paper.yaml`` under it.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAPER_YAML = REPO_ROOT / "results" / "paper.yaml"

#: Output formats of :func:`render_tables`.
FORMATS = ("rich", "markdown", "csv", "latex")
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

#: The task a metric belongs to (a method whose ``tasks`` lacks it shows "-").
METRIC_TASK: dict[str, str] = {
    "image_auroc": "detect",
    "class_auroc": "classify",
    "class_accuracy": "classify",
    "class_balanced_accuracy": "classify",
    "pixel_auroc": "localize",
    "pixel_ap": "localize",
    "pixel_aupro": "localize",
    "pixel_dice": "localize",
}

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

#: Rows of the ablation table, in the paper's order.
ABLATION_VARIANTS: tuple[str, ...] = ("ultraad", "ultraad-us-unaware", "ultraad-no-joint", "ultraad-no-pif")

#: Row order (the paper's); methods not listed go just before ``ultraad``, alphabetically.
METHOD_ORDER: tuple[str, ...] = (
    "winclip",
    "adaclip",
    "anomalyclip",
    "vcpclip",
    "mvfa",
    "lpp",
    "clipadapter",
    "tipadapter",
    "coop",
    "ultraad",
    "ultraad-us-unaware",
    "ultraad-no-joint",
    "ultraad-no-pif",
)

#: Our target -> paper dataset, unless ``paper_targets`` says otherwise.
DEFAULT_PAPER_TARGETS: dict[str, str] = {"busi": "BUSI"}

#: Columns of the CSV output, in order.
CSV_COLUMNS: tuple[str, ...] = (
    "backbone",
    "model",
    "weights",
    "random_init",
    "input_size",
    "layers",
    "source",
    "eval_size",
    "table",
    "metric",
    "row",
    "method",
    "kind",
    "zero_shot",
    "column",
    "target",
    "paper_dataset",
    "shots",
    "status",
    "mean",
    "std",
    "n",
    "seeds",
    "text",
)

# --------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperMethod:
    """One method row of a paper table; ``values[(dataset, shots, metric)]`` in percent.

    Zero-shot methods are keyed with shots 0. ``None`` = the paper prints "-".
    """

    method: str
    paper_name: str
    zero_shot: bool
    values: Mapping[tuple[str, int, str], float | None]

    def lookup(self, dataset: str, shots: int, metric: str) -> tuple[bool, float | None]:
        """``(reported, value)`` for a cell; zero-shot rows answer for every ``shots``."""
        key = (dataset, 0 if self.zero_shot else shots, metric)
        if key in self.values:
            return True, self.values[key]
        return False, None

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for d, _, _ in self.values))

    @property
    def shots(self) -> list[int]:
        return sorted({s for _, s, _ in self.values})


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper (detection, classification, localization or ablation)."""

    key: str
    title: str
    metrics: tuple[str, ...]
    methods: Mapping[str, PaperMethod]

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for m in self.methods.values() for d in m.datasets))

    @property
    def shots(self) -> list[int]:
        """Few-shot settings the table reports (0, zero-shot, left out)."""
        return sorted({s for m in self.methods.values() for s in m.shots if s > 0})


@dataclass(frozen=True)
class PaperNumbers:
    """The content of ``results/paper.yaml``."""

    path: Path
    source: str
    backbone: str
    support_source: str
    seeds: int
    shots: tuple[int, ...]
    datasets: Mapping[str, str]
    public: Mapping[str, bool]
    tables: Mapping[str, PaperTable]


def load_paper(path: Path | str | None = None) -> PaperNumbers:
    """Read the paper's numbers (default: ``<repo>/results/paper.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_PAPER_YAML
    if not path.is_file():
        raise ConfigError(
            f"paper numbers file {path} not found; restore results/paper.yaml "
            "or pass its path (paper_yaml=...)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        datasets = {str(k): str(v["description"]).strip() for k, v in raw["datasets"].items()}
        public = {str(k): bool(v.get("public", False)) for k, v in raw["datasets"].items()}
        tables: dict[str, PaperTable] = {}
        table_items = [*raw["tables"].items(), ("ablation", raw["ablation"])]
        for key, table in table_items:
            metrics = tuple(str(m) for m in table["metrics"])
            methods: dict[str, PaperMethod] = {}
            for method, entry in table["methods"].items():
                values: dict[tuple[str, int, str], float | None] = {}
                for dataset, by_shots in entry["values"].items():
                    if dataset not in datasets:
                        raise ConfigError(
                            f"{path}: table {key!r}, method {method!r} names dataset {dataset!r}, "
                            f"which is not under `datasets` ({', '.join(datasets)})"
                        )
                    for shots, by_metric in by_shots.items():
                        for metric, value in by_metric.items():
                            if metric not in metrics:
                                raise ConfigError(
                                    f"{path}: table {key!r}, method {method!r}: metric {metric!r} "
                                    f"is not one of the table's metrics {list(metrics)}"
                                )
                            values[(str(dataset), int(shots), str(metric))] = (
                                None if value is None else float(value)
                            )
                methods[str(method)] = PaperMethod(
                    method=str(method),
                    paper_name=str(entry.get("paper_name", method)),
                    zero_shot=bool(entry.get("zero_shot", False)),
                    values=values,
                )
            tables[str(key)] = PaperTable(str(key), str(table.get("title", key)), metrics, methods)
        return PaperNumbers(
            path=path,
            source=str(raw.get("source", "")).strip(),
            backbone=str(raw.get("backbone", "")).strip(),
            support_source=str(raw.get("support_source", "")).strip(),
            seeds=int(raw.get("seeds", 0)),
            shots=tuple(int(s) for s in raw["shots"]),
            datasets=datasets,
            public=public,
            tables=tables,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{path} does not have the expected layout ({exc!r}); see its header comment"
        ) from exc


# --------------------------------------------------------------------------------------------
# Plain-data tables
# --------------------------------------------------------------------------------------------

GroupKey = tuple[BackboneIdentity, str, int]


def group_key(cell: CellRecord) -> GroupKey:
    """Results with different keys are never pooled: (backbone identity, source, eval size)."""
    return (cell.backbone, cell.source, cell.eval_size)


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
    """One displayed row: our method, or the paper's numbers for it."""

    method: str
    kind: str
    zero_shot: bool

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
    ``method``, ``kind``, ``zero_shot``, ``column`` (group label), ``target``,
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


def _created_key(cell: CellRecord) -> tuple[float, str, str]:
    try:
        stamp = datetime.fromisoformat(cell.created)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        ts = stamp.timestamp()
    except ValueError:
        ts = -math.inf
    return (ts, cell.created, str(cell.path))


def _path(cell: CellRecord) -> str:
    return str(cell.path) if cell.path is not None else "<path unknown>"


def dedupe_cells(cells: Iterable[CellRecord]) -> tuple[list[CellRecord], list[str]]:
    """Keep one record per (group, method, target, shots, seed): the newest by ``created``.

    Returns the kept records (in first-seen order) and one warning line per dropped record,
    naming both paths.
    """
    by_key: dict[tuple[Any, ...], list[CellRecord]] = {}
    for cell in cells:
        by_key.setdefault((group_key(cell), cell.method, cell.target, cell.shots, cell.seed), []).append(cell)
    kept: list[CellRecord] = []
    messages: list[str] = []
    for records in by_key.values():
        ordered = sorted(records, key=_created_key)
        newest = ordered[-1]
        kept.append(newest)
        for old in ordered[:-1]:
            messages.append(
                f"warning: duplicate cell {newest.method} {newest.source}->{newest.target} "
                f"{newest.shots}-shot seed {newest.seed} "
                f"({newest.backbone.model}, {newest.backbone.weights}): "
                f"kept {_path(newest)} (created {newest.created}), "
                f"ignored {_path(old)} (created {old.created})"
            )
    return kept, messages


def _method_rank(method: str) -> tuple[float, str]:
    if method in METHOD_ORDER:
        return (float(METHOD_ORDER.index(method)), method)
    return (METHOD_ORDER.index("ultraad") - 0.5, method)


def _resolve_paper_targets(paper_targets: Mapping[str, str] | None) -> dict[str, str]:
    mapping = dict(paper_targets or {})
    for target, dataset in DEFAULT_PAPER_TARGETS.items():
        mapping.setdefault(target, dataset)
    return mapping


def _blank_cell() -> dict[str, Any]:
    """A table cell with nothing in it (status blank, no statistics)."""
    return {"status": STATUS_BLANK, "mean": math.nan, "std": math.nan, "n": math.nan, "seeds": ""}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float) * 100.0
    mean = float(arr.mean())
    std = float(arr.std(ddof=STD_DDOF)) if len(arr) > STD_DDOF else math.nan
    return mean, std


def _fmt_value(mean: float, std: float, n: int | None, show_n: bool) -> str:
    text = f"{mean:.1f}"
    if not math.isnan(std):
        text += f" ± {std:.1f}"
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


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _same_backbone_as_paper(identity: BackboneIdentity) -> bool:
    return _norm(identity.model).startswith("vitl14336") and identity.weights.lower().startswith("openai")


class _BlockBuilder:
    """Builds the tables of one group from its (deduplicated) records."""

    def __init__(
        self,
        cells: list[CellRecord],
        paper: PaperNumbers | None,
        paper_targets: Mapping[str, str],
    ) -> None:
        self.cells = cells
        self.paper = paper
        self.paper_targets = paper_targets
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
        return [Row(method, KIND_OURS, zs) for zs in flags]

    def _rows(self, paper_table: PaperTable | None, fixed: Sequence[str] | None) -> list[Row]:
        if fixed is not None:
            methods = list(fixed)
        else:
            names = {m for (m, _, _, _) in self.index}
            if paper_table is not None:
                names |= set(paper_table.methods)
            methods = sorted(names, key=_method_rank)
        rows: list[Row] = []
        for method in methods:
            ours = self._ours_rows(method)
            if not ours and fixed is not None:
                ours = [Row(method, KIND_OURS, False)]
            rows.extend(ours)
            if paper_table is not None and method in paper_table.methods:
                kind = KIND_PAPER if ours else KIND_PAPER_ONLY
                rows.append(Row(method, kind, paper_table.methods[method].zero_shot))
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
        paper_table = self.paper.tables.get(spec.key) if self.paper is not None else None
        columns = self._columns(fixed_rows, paper_table)
        rows = self._rows(paper_table, fixed_rows)
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
                "column",
                "target",
                "paper_dataset",
                "shots",
                "metric",
                "status",
                "mean",
                "std",
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
                texts.append(_fmt_value(r.mean, r.std, int(r.n), show_n and not r.zero_shot))
            else:
                texts.append(f"{r.mean:.1f}")
        data["text"] = texts
        legend = self._legend(spec, rows, columns, seed_counts, show_n, paper_table)
        return Table(spec=spec, rows=rows, columns=columns, data=data, show_n=show_n, legend=legend)

    def _legend(
        self,
        spec: TableSpec,
        rows: list[Row],
        columns: list[Column],
        seed_counts: list[int],
        show_n: bool,
        paper_table: PaperTable | None,
    ) -> list[str]:
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
        if self.paper is None:
            return legend
        paper = self.paper
        legend.append(
            f"'[paper]' rows: numbers printed in the UltraAD paper ({paper.backbone}; support from "
            f"{paper.support_source}; mean of {paper.seeds} seeds, no std); '[paper only]' = reported by "
            "the paper, not run here; an empty cell = the paper does not report it."
        )
        if paper_table is None:
            legend.append("The paper has no such table.")
            return legend
        mapped = list(
            dict.fromkeys((c.target, c.paper_dataset) for c in columns if c.target and c.paper_dataset)
        )
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
        backbone, source = self.cells[0].backbone, self.cells[0].source
        if not _same_backbone_as_paper(backbone):
            legend.append(
                f"Not like-for-like: backbone here {backbone.model} ({backbone.weights}), "
                "the paper's ViT-L/14@336px (openai)."
            )
        if paper.support_source and _norm(source) != _norm(paper.support_source):
            legend.append(
                f"Not like-for-like: support source here {source}, the paper's {paper.support_source}."
            )
        if spec.key == ABLATION.key:
            legend.extend(_ablation_notes(paper))
        return legend


def _ablation_notes(paper: PaperNumbers) -> list[str]:
    """Where the paper's ablation was made, and whether its full-model row matches the main tables."""
    ablation = paper.tables.get(ABLATION.key)
    if ablation is None:
        return []
    settings = sorted({(d, s) for m in ablation.methods.values() for d, s, _ in m.values})
    notes = ["The paper's ablation: " + ", ".join(f"{s}-shot {d}" for d, s in settings) + "."]
    full = ablation.methods.get("ultraad")
    if full is None:
        return notes
    for (dataset, shots, metric), value in full.values.items():
        for table in paper.tables.values():
            if table.key == ABLATION.key or metric not in table.metrics or "ultraad" not in table.methods:
                continue
            reported, main = table.methods["ultraad"].lookup(dataset, shots, metric)
            if reported and main != value:
                notes.append(
                    "As printed, the paper's ablation full model "
                    f"({METRIC_LABEL.get(metric, metric)} {value}) "
                    f"differs from its {table.key} table's UltraAD {dataset} {shots}-shot ({main})."
                )
    return notes


def build_tables(
    cells: Iterable[CellRecord],
    *,
    compare: str | None = None,
    ablation: bool = False,
    paper_yaml: Path | str | None = None,
    paper_targets: Mapping[str, str] | None = None,
) -> list[TableBlock]:
    """Group, deduplicate and tabulate ``cells``: one :class:`TableBlock` per backbone group.

    ``compare="paper"`` adds the paper's rows and columns (numbers from ``paper_yaml``,
    default ``<repo>/results/paper.yaml``). ``paper_targets`` maps our targets to paper
    datasets (merged over the default ``{"busi": "BUSI"}``). ``ablation=True`` builds the
    ablation table instead of the three main tables and leaves out blocks without variants.
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
        builder = _BlockBuilder(kept, paper, mapping)
        if ablation:
            if not any(c.method in ABLATION_VARIANTS for c in kept):
                continue
            tables = [builder.build(ABLATION, fixed_rows=ABLATION_VARIANTS)]
        else:
            tables = [builder.build(spec) for spec in MAIN_TABLES]
        blocks.append(TableBlock(identity, source, eval_size, tables, messages))
    return blocks


# --------------------------------------------------------------------------------------------
# Renderers
# --------------------------------------------------------------------------------------------


def _table_caption(block: TableBlock, table: Table) -> str:
    return f"{table.spec.title} | {block.title}"


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
            out.append(f"### {_table_caption(block, table)}")
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

    Headers span: target (or ``<DATASET> [paper]``) over shots, shots over metrics.
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
            out.append(r"\midrule")
            for label, values in zip(wide.index, wide.to_numpy().tolist(), strict=True):
                out.append(" & ".join(latex_escape(str(v)) for v in [label, *values]) + r" \\")
            out.append(r"\bottomrule")
            out.append(r"\end{tabular}")
            out.append("")
            out.append(r"\smallskip")
            out.append(r"\footnotesize")
            out.append(r" \\ ".join(latex_escape(line) for line in table.legend))
            out.append(r"\end{table}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def to_csv_frame(blocks: Sequence[TableBlock]) -> pd.DataFrame:
    """The long/tidy frame behind the CSV output (see :data:`CSV_COLUMNS`)."""
    frames = []
    for block in blocks:
        ident = block.identity
        for table in block.tables:
            d = table.data[table.data["status"] != STATUS_BLANK].copy()
            # Zero-shot rows: one observation per target, not one per shots column.
            zs = d["zero_shot"].astype(bool)
            d.loc[zs, "shots"] = 0
            d = d.drop_duplicates(subset=["row", "column", "shots", "metric"])
            d.insert(0, "table", table.spec.key)
            d.insert(0, "eval_size", block.eval_size)
            d.insert(0, "source", block.source)
            d.insert(0, "layers", " ".join(str(x) for x in ident.layers))
            d.insert(0, "input_size", ident.input_size)
            d.insert(0, "random_init", ident.random_init)
            d.insert(0, "weights", ident.weights)
            d.insert(0, "model", ident.model)
            d.insert(0, "backbone", ident.label)
            frames.append(d)
    if not frames:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    frame["n"] = frame["n"].astype("Int64")
    return frame[list(CSV_COLUMNS)]


def to_csv(blocks: Sequence[TableBlock]) -> str:
    """Long/tidy CSV text: one row per block x table x row x column x metric."""
    return to_csv_frame(blocks).to_csv(index=False)


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
                title=Text(_table_caption(block, table), style=style),
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
) -> str:
    """Render the result tables of ``cells`` as ``fmt`` (rich, markdown, csv or latex).

    Returns the text. For ``rich``, the tables are also printed to ``console`` when one is
    given, and the returned text is a plain (uncoloured) export at ``width`` columns.
    Duplicate-cell warnings are part of the rich/markdown/latex text; for every format they are
    also passed to ``on_warning`` (for csv without ``on_warning``: :func:`warnings.warn`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    blocks = build_tables(
        cells, compare=compare, ablation=ablation, paper_yaml=paper_yaml, paper_targets=paper_targets
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
            f"results for the ablation variants ({', '.join(ABLATION_VARIANTS)})"
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

    recorder = Console(file=io.StringIO(), record=True, width=width, color_system=None, force_terminal=False)
    for renderable in to_rich(blocks):
        recorder.print(renderable)
        if console is not None:
            console.print(renderable)
    return recorder.export_text()
