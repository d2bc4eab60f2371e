r"""Result tables in the UltraAD paper's layout, built from finished cells (``cell.json`` records).

Pure functions over a list of :class:`~bench.results.CellRecord`; the CLI calls
:func:`render_tables` (or :func:`build_tables` for the plain data) and prints the result.

Modules, by role:

* loading: :mod:`~bench.tables.cells` (grouping by backbone identity, duplicates),
  :mod:`~bench.tables.paper` (the paper's numbers, ``results/paper.yaml``),
  :mod:`~bench.tables.placement` (row order and ablation rows from method metadata);
* the table model: :mod:`~bench.tables.model` (specs, columns, rows, tables, blocks),
  :mod:`~bench.tables.builder` (fills it: :func:`build_tables`), :mod:`~bench.tables.legend`;
* renderers: :mod:`~bench.tables.render` (:func:`render_tables`, the entry for every format),
  ``render_rich``, ``render_markdown``, ``render_csv``, ``render_latex``.

Layout decisions
----------------
* **Three tables, like the paper**: Detection (``image_auroc``), Classification
  (``class_auroc``, 3-class), Localization (``pixel_auroc`` and ``pixel_ap`` as two
  sub-columns: the paper prints "(P-AUROC, x)" pairs and never names x; our reading is pixel AP).
  Rows are methods, columns are target x shots (x metric for localization).
* **A table lists only the methods that do its task** (``METRIC_TASK`` of its first metric in
  the method's ``tasks``), plus every method the paper reports in it (``--compare paper``);
  its columns are the targets and shots of those methods. A table with no row is left out.
  The ablation table keeps its fixed rows (every variant, so ``ultraad-no-joint`` shows ``-``
  for I-AUROC, as the paper prints).
* **Row groups, as the paper groups them**: each row's ``group`` is its method's
  ``table_group`` (:data:`~bench.method.TABLE_GROUPS`), headed by
  :data:`~bench.tables.model.GROUP_HEADINGS` in every format: a heading row opening a section
  (rich), a bold heading row (markdown), ``\midrule`` and an italic ``\multicolumn`` row
  (LaTeX), a ``group`` column (CSV).
* **Cells** are mean ± std over support seeds, in percent (metric x 100, one decimal, as the
  paper prints). The std is the *sample* std (``ddof=1``, :data:`STD_DDOF`); a cell with one
  seed shows the mean only. When the number of seeds differs between cells of one table
  (zero-shot rows aside), every cell of that table also shows ``(n=k)``; otherwise the legend
  states the common n.
* **Once per block**: the text formats (rich, markdown) print the block header (identity,
  random-init WARNING, duplicate warnings) once, title each table by its own title only, and
  print the legend once after the block's tables (:attr:`TableBlock.legend`: every table's
  lines in order, each once, a line not every table has naming its tables). LaTeX floats must
  stand alone in a paper: each caption keeps the identity and the warning, each float its
  legend. The CSV carries no legend.
* **Markers**: ``-`` the method does not do the table's task (its ``tasks`` lacks it);
  ``·`` not run yet (no finished cell); ``n/a`` run, but the metric was not recorded (e.g. a
  target without pixel masks); an empty cell is structurally empty (a paper-only column in one
  of our rows, or a column the paper does not report in a ``[paper]`` row). The legend says so.
* **Zero-shot methods** (``uses_support == False``, stored with shots 0) have one value per
  target, repeated in every shots column; the row reads ``<method> (zero-shot)``.
* **Never pool backbones**: records are grouped by (:class:`BackboneIdentity`, source,
  eval_size) and each group is its own :class:`TableBlock`, titled with ``identity.label``
  (which states random-init loudly), the layers, the source dataset and the eval size. Every
  format carries that identity: the rich and markdown block headers, the LaTeX captions, and
  the CSV's ``backbone`` / ``random_init`` columns; random-init blocks also get a WARNING
  banner in the text formats.
* **Duplicates** (the same cell in two run folders) are counted once, the newest kept, with a
  warning line naming both paths (see :func:`~bench.tables.cells.dedupe_cells`).
* **Row order** comes from method metadata (``table_group``, ``table_rank``; see
  :mod:`~bench.tables.placement`): groups in :data:`~bench.method.TABLE_GROUPS` order, then
  rank, then name. Paper-only rows are placed by their registered class, else at the end of
  group ``anomaly`` in ``results/paper.yaml`` order.
* **compare="paper"** adds, below each of our rows that the paper also reports, a row
  ``<method> [paper]`` with the paper's numbers (``results/paper.yaml``) in the columns of
  our targets that correspond to a paper dataset (``busi`` <-> BUSI by default; pass
  ``paper_targets`` for stand-ins, e.g. ``{"udiat": "BUSZS"}``, which the legend labels as a
  stand-in on different data). Paper datasets with no corresponding target become extra
  columns ``<DATASET> [paper]`` after ours, and the paper's shots are added to the columns, so
  nothing of the paper's table is hidden. Paper methods we did not run get a
  ``<method> [paper only]`` row.
* **ablation=True** renders the paper's ablation layout *instead of* the three tables: rows
  are the methods whose ``ablation_of`` names the ablated method (UltraAD's four variants,
  all always shown, ordered by rank), columns target x shots x {I-AUROC, P-AUROC}; blocks
  without any variant result are left out.
* **CSV is long/tidy** (one row per block x table x row x column x metric) and carries no
  warning lines; see :mod:`~bench.tables.render_csv`.
"""

from bench.tables.builder import DEFAULT_PAPER_TARGETS, IntervalSpec, build_tables
from bench.tables.cells import GroupKey, dedupe_cells, group_key
from bench.tables.model import (
    ABLATION,
    CLASSIFICATION,
    DETECTION,
    GROUP_HEADINGS,
    KIND_OURS,
    KIND_PAPER,
    KIND_PAPER_ONLY,
    LOCALIZATION,
    MAIN_TABLES,
    MARK_BLANK,
    MARK_MISSING,
    MARK_NO_METRIC,
    MARK_NOT_APPLICABLE,
    METRIC_LABEL,
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
from bench.tables.paper import DEFAULT_PAPER_YAML, PaperMethod, PaperNumbers, PaperTable, load_paper
from bench.tables.placement import Placement
from bench.tables.render import FORMATS, render_tables
from bench.tables.render_csv import CSV_COLUMNS, to_csv, to_csv_frame
from bench.tables.render_latex import latex_escape, to_latex
from bench.tables.render_markdown import to_markdown
from bench.tables.render_rich import to_rich

__all__ = [
    "ABLATION",
    "CLASSIFICATION",
    "CSV_COLUMNS",
    "DEFAULT_PAPER_TARGETS",
    "DEFAULT_PAPER_YAML",
    "DETECTION",
    "FORMATS",
    "GROUP_HEADINGS",
    "KIND_OURS",
    "KIND_PAPER",
    "KIND_PAPER_ONLY",
    "LOCALIZATION",
    "MAIN_TABLES",
    "MARK_BLANK",
    "MARK_MISSING",
    "MARK_NOT_APPLICABLE",
    "MARK_NO_METRIC",
    "METRIC_LABEL",
    "STATUS_BLANK",
    "STATUS_MISSING",
    "STATUS_NOT_APPLICABLE",
    "STATUS_NO_METRIC",
    "STATUS_OK",
    "STD_DDOF",
    "Column",
    "GroupKey",
    "IntervalSpec",
    "PaperMethod",
    "PaperNumbers",
    "PaperTable",
    "Placement",
    "Row",
    "Table",
    "TableBlock",
    "TableSpec",
    "build_tables",
    "dedupe_cells",
    "group_key",
    "latex_escape",
    "load_paper",
    "render_tables",
    "to_csv",
    "to_csv_frame",
    "to_latex",
    "to_markdown",
    "to_rich",
]
