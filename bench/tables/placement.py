"""Where each method's rows go: row order and ablation membership from METHOD METADATA.

A method's placement (:class:`~bench.results.MethodMeta`: ``table_group``, ``table_rank``,
``ablation_of``) is taken, first found first used, from:

1. its stored records (``cell.json`` ``method_meta``, written by the runner; newest record wins);
2. the registered method class (records written before the metadata was stored);
3. for a method with results here that is neither: group ``other``, rank 100;
4. for a method the paper reports that we did not run and that is not registered (a
   ``[paper only]`` row): group ``anomaly`` (``classifier`` when the paper reports it only in
   classification tables), ranked by its position among that group's methods in
   ``results/paper.yaml`` (the paper's row order, which is also what the registered methods'
   ranks follow, so paper-only rows interleave with ours as the paper prints them); a method
   only in the paper's ablation section belongs to that section's full method.

So the placement of a row never depends on whether the paper's numbers are shown.

Rows are ordered by group (:data:`~bench.method.TABLE_GROUPS` order), rank, then name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bench.errors import MethodError
from bench.method import TABLE_GROUPS
from bench.results import METRIC_TASK, CellRecord, MethodMeta
from bench.tables.cells import created_key
from bench.tables.paper import PAPER_ABLATION_KEY, PaperNumbers
from bench.types import Task

#: Placement of a method nobody describes (an unregistered method of an older store).
DEFAULT_META = MethodMeta()
#: Ranks of paper methods that belong only to the ablation section start here (after the full method).
ABLATION_ONLY_RANK = 1000


def registered_meta() -> dict[str, MethodMeta]:
    """The placement of every registered method (none when the registry cannot load)."""
    from bench import registry  # looked up at call time: tests register extra methods

    try:
        methods = registry.available_methods()
    except MethodError:  # a broken plugin must not stop the tables of stored results
        return {}
    return {name: MethodMeta.of(cls) for name, cls in methods.items()}


def paper_ablation_root(paper: PaperNumbers, known: Mapping[str, MethodMeta]) -> str | None:
    """The full method of the paper's ablation: the one of its rows that names itself in
    ``ablation_of``, else its first row (the paper lists the full model first)."""
    ablation = paper.tables.get(PAPER_ABLATION_KEY)
    if ablation is None or not ablation.methods:
        return None
    roots = [m for m in ablation.methods if m in known and known[m].ablation_of == m]
    return roots[0] if roots else next(iter(ablation.methods))


def paper_meta(paper: PaperNumbers, known: Mapping[str, MethodMeta]) -> dict[str, MethodMeta]:
    """Placement of the paper's methods that ``known`` does not describe (see the module doc)."""
    order = list(dict.fromkeys(m for table in paper.tables.values() for m in table.methods))
    ablation = paper.tables.get(PAPER_ABLATION_KEY)
    root = paper_ablation_root(paper, known)
    out: dict[str, MethodMeta] = {}
    position: dict[str, int] = {}  # paper methods seen so far per group
    for index, name in enumerate(order):
        if name in known:  # counts towards the paper's row order of its own group
            position[known[name].table_group] = position.get(known[name].table_group, 0) + 1
            continue
        tasks = {
            METRIC_TASK[metric]
            for key, table in paper.tables.items()
            if key != PAPER_ABLATION_KEY and name in table.methods
            for metric in table.metrics
            if metric in METRIC_TASK
        }
        in_ablation = ablation is not None and name in ablation.methods
        if tasks:
            group = "classifier" if tasks <= {Task.CLASSIFY} else "anomaly"
            rank = position.get(group, 0)
            position[group] = rank + 1
        else:
            group = known[root].table_group if root in known else DEFAULT_META.table_group
            rank = ABLATION_ONLY_RANK + index
        out[name] = MethodMeta(group, rank, root if in_ablation else None)
    return out


class Placement:
    """Placement of every method of one block: its records, the registry, the paper."""

    def __init__(self, cells: Iterable[CellRecord], paper: PaperNumbers | None = None) -> None:
        ran: dict[str, MethodMeta] = {}
        stored: dict[str, MethodMeta] = {}
        for cell in sorted(cells, key=created_key):
            ran[cell.method] = DEFAULT_META
            if cell.method_meta is not None:
                stored[cell.method] = cell.method_meta
        self._stored = stored
        # The registry imports every method (torch, open_clip: seconds); records that carry
        # their own metadata need it only for the paper's rows and for ablation tables.
        self._registered: dict[str, MethodMeta] | None = None
        registered = self.registered if paper is not None or len(stored) < len(ran) else {}
        known = {**ran, **registered, **stored}
        self.meta_by_method = {**(paper_meta(paper, known) if paper is not None else {}), **known}
        #: The full method of the paper's ablation (None without the paper's numbers).
        self.paper_ablation_root = paper_ablation_root(paper, known) if paper is not None else None

    @property
    def registered(self) -> dict[str, MethodMeta]:
        """The registered methods' metadata, loaded on first use (and merged into the metadata
        of methods that no record describes)."""
        if self._registered is None:
            self._registered = registered_meta()
            if hasattr(self, "meta_by_method"):
                for method, meta in self._registered.items():
                    if method not in self._stored:
                        self.meta_by_method[method] = meta
        return self._registered

    def meta(self, method: str) -> MethodMeta:
        return self.meta_by_method.get(method, DEFAULT_META)

    def group(self, method: str) -> str:
        """The row group of ``method``, one of :data:`~bench.method.TABLE_GROUPS` (an unknown
        group, e.g. of a record written by a newer version, is ``other``)."""
        group = self.meta(method).table_group
        return group if group in TABLE_GROUPS else DEFAULT_META.table_group

    def sort_key(self, method: str) -> tuple[int, int, str]:
        return (TABLE_GROUPS.index(self.group(method)), self.meta(method).table_rank, method)

    def order(self, methods: Iterable[str]) -> list[str]:
        """``methods`` (deduplicated) in table row order."""
        return sorted(set(methods), key=self.sort_key)

    def ablation_roots(self, methods: Iterable[str]) -> list[str]:
        """The ablated methods (values of ``ablation_of``) of ``methods``, in row order."""
        roots = {self.meta(m).ablation_of for m in methods}
        return self.order(r for r in roots if r is not None)

    def ablation_rows(self, root: str) -> list[str]:
        """The rows of ``root``'s ablation table: every method known here whose ``ablation_of``
        names it (so the table shows all variants, run or not), in row order."""
        _ = self.registered
        return self.order(m for m, meta in self.meta_by_method.items() if meta.ablation_of == root)


def ablation_variants() -> list[str]:
    """Every registered method that some ablation table lists, in row order (for messages)."""
    placement = Placement(())
    return placement.order(m for m, meta in placement.registered.items() if meta.ablation_of is not None)
