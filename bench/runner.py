"""The grid runner: methods x shots x seeds x targets, support drawn from the source.

A *fit unit* is (method, shots, seed): the method is fitted once on that support set and
then predicts every target. A *cell* is a fit unit on one target; it is what the result
store keeps (see :mod:`bench.results`). Methods that ignore the support set have a single
fit unit (shots 0, seed 0).

Resuming: a cell whose ``cell.json`` exists is finished and skipped (when it was made
exactly as this run would make it, on the same data; see :mod:`bench.resume`); a fit unit
whose cells are all finished is not even fitted. Sharding (``--shard I/N``) assigns whole
fit units round-robin in a fixed order; independently, every process claims a unit before
fitting it (:mod:`bench.claims`), so several processes running the same command into one
results folder share the grid and never fit the same unit twice.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import bench.registry as registry
from bench.claims import ClaimBook
from bench.config import RunConfig, shard_index, slug
from bench.data import Dataset, eval_mask, image_item, resolve_dataset, sample_support, support_pool
from bench.data.checks import check_no_overlap
from bench.data.support import check_support_sizes
from bench.errors import ConfigError, DatasetError, ResultsError
from bench.fingerprints import samples_fingerprint
from bench.kit.clip import Backbone
from bench.method import Method, MethodContext, SupportSet
from bench.metrics import PixelMetricAccumulator, image_metrics
from bench.registry import get_method, resolve_method_names
from bench.results import (
    BackboneIdentity,
    CellOutput,
    CellRecord,
    MethodMeta,
    image_row,
    json_options,
    task_metrics,
    write_cell,
)
from bench.resume import CellExpectation, finished_cell
from bench.types import CLASSES, ImageItem, Task, label_index
from bench.validation import check_storable, validate_prediction
from bench.weights import BackboneSpec, load_backbone, resolve_device

#: Seconds between looks at units that other processes hold.
CLAIM_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class FitUnit:
    """One fit of one method: (method, shots, seed). Zero-shot methods use (0, 0)."""

    method: str
    shots: int
    seed: int


@dataclass(frozen=True)
class Cell:
    """One fit unit evaluated on one target dataset."""

    unit: FitUnit
    target: str

    def directory(self, run_dir: Path) -> Path:
        return (
            run_dir
            / slug(self.unit.method)
            / slug(self.target)
            / f"shots{self.unit.shots}_seed{self.unit.seed}"
        )

    def __str__(self) -> str:
        u = self.unit
        return f"{u.method} / {self.target} / {u.shots}-shot / seed {u.seed}"


def unit_claim_name(unit: FitUnit) -> str:
    """The file-system-safe name a process claims ``unit`` under (:mod:`bench.claims`)."""
    return f"{slug(unit.method)}__shots{unit.shots}_seed{unit.seed}"


def check_method_config(method_config: Mapping[str, Any]) -> None:
    """Every method named in ``method_config`` must exist (a typo would silently run defaults)."""
    known = registry.available_methods()  # looked up at call time: plugins and test doubles count
    unknown = sorted(set(method_config) - set(known))
    if unknown:
        raise ConfigError(
            f"method_config names unknown method(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(known))} (see `bench methods`)"
        )


def check_writable(run_dir: Path, out: Path) -> None:
    """Fail before any work when the run folder cannot be created or written (``--out`` is a
    file, read-only, or on a full disk), naming the folder and the fix."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(
            f"cannot create the run folder {run_dir}: {exc.filename or out} is a file, not a folder; "
            "choose another --out (or --name)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot write into the run folder {run_dir} ({exc.strerror or exc}); choose a writable --out "
            "with free space"
        ) from None


@dataclass
class TestSet:
    """A target dataset prepared for evaluation: items, labels and (lazily) evaluation masks."""

    name: str
    dataset: Dataset
    items: list[ImageItem]
    labels: np.ndarray
    eval_size: int
    _masks: list[np.ndarray | None] | None = field(default=None, init=False, repr=False)
    _excluded: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def masks(self) -> list[np.ndarray | None]:
        """Binary masks at the evaluation size; None for images kept out of pixel metrics."""
        if self._masks is None:
            masks: list[np.ndarray | None] = []
            for sample in self.dataset.samples:
                result = eval_mask(sample, self.eval_size)
                masks.append(result.mask)
                if result.mask is None:
                    self._excluded[sample.id] = result.reason or "no usable mask"
            self._masks = masks
        return self._masks

    @property
    def excluded(self) -> dict[str, str]:
        """Image id -> why it is kept out of pixel metrics."""
        _ = self.masks
        return self._excluded

    @property
    def n_pixel_images(self) -> int:
        return sum(m is not None for m in self.masks)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What a stored cell of this target must have been made on (:mod:`bench.fingerprints`)."""
        return samples_fingerprint(self.dataset.samples)

    def image_rows(self) -> list[dict[str, str]]:
        """Per-image facts the store keeps (``images.csv``): id, dataset, content key, file path
        and the sample's metadata."""
        return [
            image_row(
                item.id, sample.dataset, item.key, str(Path(sample.image_path).resolve()), sample.metadata
            )
            for sample, item in zip(self.dataset.samples, self.items, strict=True)
        ]


@dataclass
class RunSummary:
    """What a run did: cells computed and skipped, cache use, where results went."""

    run_dir: Path
    cells_done: list[Cell] = field(default_factory=list)
    cells_skipped: list[Cell] = field(default_factory=list)
    images_encoded: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    backbone: BackboneIdentity | None = None


def plan_grid(config: RunConfig) -> list[FitUnit]:
    """All fit units of the grid in a fixed order (method, shots, seed)."""
    units: list[FitUnit] = []
    for name in resolve_method_names(config.methods):
        cls = get_method(name)
        if cls.uses_support:
            units.extend(FitUnit(name, k, s) for k in config.shots for s in config.seeds)
        else:
            units.append(FitUnit(name, 0, 0))
    return units


def shard_units(units: Sequence[FitUnit], shard: str) -> list[FitUnit]:
    """The fit units of shard ``I/N``: every N-th unit starting at I-1 (deterministic)."""
    index, count = shard_index(shard)
    return [u for i, u in enumerate(units) if i % count == index - 1]


def seed_everything(seed: int) -> None:
    """Seed every RNG a method may draw from, so a fit is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _ProgressBridge:
    """Gives methods a nested progress bar (``ctx.track``) under the grid bar."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def track(self, iterable: Iterable[Any], description: str, total: int | None) -> Iterator[Any]:
        if self.progress is None:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = self.progress.add_task(f"  {description}", total=total)
        try:
            for item in iterable:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)


class Runner:
    """Runs one grid described by a :class:`RunConfig`, writing cells under ``config.run_dir``."""

    def __init__(self, config: RunConfig, console: Console | None = None, show_progress: bool = True) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self.device = resolve_device(config.device)
        self._backbone: Backbone | None = None
        self._support_cache: dict[tuple[int, int], tuple[SupportSet, dict[str, list[str]]]] = {}
        self._source: Dataset | None = None
        self._tests: dict[str, TestSet] = {}
        self._target_by_name: dict[str, TestSet] = {}

    # -- shared resources -------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            c = self.config
            spec = BackboneSpec(
                model=c.backbone,
                pretrained=c.pretrained,
                input_size=c.input_size,
                layers=tuple(c.layers) if c.layers else None,
                cache_dir=Path(c.cache_dir) if c.cache_dir else None,
                device=str(self.device),
                batch_size=c.batch_size,
            )
            self._backbone = load_backbone(spec)
        return self._backbone

    @property
    def source(self) -> Dataset:
        if self._source is None:
            self._source = resolve_dataset(self.config.source, Path(self.config.data_root))
        return self._source

    def test_set(self, target: str) -> TestSet:
        if target not in self._tests:
            dataset = resolve_dataset(target, Path(self.config.data_root))
            self._tests[target] = TestSet(
                name=slug(dataset.name),
                dataset=dataset,
                items=[image_item(s) for s in dataset.samples],
                labels=np.array([label_index(s.label) for s in dataset.samples], dtype=np.int64),
                eval_size=self.config.eval_size,
            )
        return self._tests[target]

    def support(self, shots: int, seed: int) -> tuple[SupportSet, dict[str, list[str]]]:
        key = (shots, seed)
        if key not in self._support_cache:
            selection = sample_support(self.source, shots, seed)
            samples = selection.samples
            masks = []
            for sample in samples:
                result = eval_mask(sample, self.config.eval_size)
                if result.mask is None:  # e.g. a mask file that decodes to no lesion pixel
                    raise DatasetError(
                        f"support sample {sample.id} ({sample.image_path}) has no usable mask: "
                        f"{result.reason}; fix or remove it (`bench datasets {self.config.source} --deep` "
                        "lists every such file)"
                    )
                masks.append(result.mask.astype(np.float32))
            support = SupportSet(
                items=tuple(image_item(s) for s in samples),
                labels=np.array([label_index(s.label) for s in samples], dtype=np.int64),
                masks=np.stack(masks),
            )
            self._support_cache[key] = (support, selection.to_json())
        return self._support_cache[key]

    # -- the grid ---------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Run (or resume) this shard of the grid; returns what was done."""
        c = self.config
        check_method_config(c.method_config)
        units = shard_units(plan_grid(c), c.shard)
        identity = self.backbone.identity  # fail fast on missing weights, before any work
        run_dir = self.run_dir
        check_writable(run_dir, Path(c.out))
        targets = {t: self.test_set(t) for t in c.targets}
        by_name: dict[str, str] = {}
        for spec, test in targets.items():
            if test.name in by_name:
                raise ConfigError(
                    f"targets {by_name[test.name]!r} and {spec!r} are both named {test.name!r}, so their "
                    "results would share a folder; rename one of the manifests or folders"
                )
            by_name[test.name] = spec
        few_shot = sorted({u.shots for u in units if get_method(u.method).uses_support})
        if few_shot:
            # Before any cell runs: every shot count can be drawn, and no target image is a
            # support candidate (scores on it would not be a cross-domain result).
            check_support_sizes(self.source, few_shot)
            for test in targets.values():
                check_no_overlap(self.source, test.dataset)
        self._target_by_name = {ts.name: ts for ts in targets.values()}
        summary = RunSummary(run_dir=run_dir, backbone=identity)
        pending: list[tuple[FitUnit, list[Cell]]] = []
        for unit in units:
            cells = [Cell(unit, targets[t].name) for t in c.targets]
            todo = self._unfinished(unit, cells, identity)
            summary.cells_skipped.extend(cell for cell in cells if cell not in todo)
            if todo:
                pending.append((unit, todo))
        if self.backbone.weights_warning:
            self.console.print(Panel(self.backbone.weights_warning, title="WARNING", border_style="bold red"))
        if identity.random_init:
            self.console.print(
                "[bold red]WARNING:[/] backbone weights are RANDOM-INIT: CLIP-based results are meaningless "
                "(pipeline check only). Every result and table records this."
            )
        n_todo = sum(len(todo) for _, todo in pending)
        self.console.print(
            f"run [bold]{escape(str(run_dir))}[/]: {n_todo} cells to compute, "
            f"{len(summary.cells_skipped)} already finished "
            f"(shard {c.shard}, backbone {escape(identity.label)})"
        )
        claims = ClaimBook(run_dir)
        try:
            with self._progress() as progress:
                self._run_pending(pending, claims, identity, summary, progress)
        finally:
            claims.close()
        if self._backbone is not None:
            stats = self._backbone.cache_stats()
            summary.images_encoded = self._backbone.n_encoded
            summary.cache_hits, summary.cache_misses = stats.hits, stats.misses
        return summary

    def _run_pending(
        self,
        pending: list[tuple[FitUnit, list[Cell]]],
        claims: ClaimBook,
        identity: BackboneIdentity,
        summary: RunSummary,
        progress: Progress | None,
    ) -> None:
        """Fit and evaluate every pending unit this process can claim; units claimed by another
        live process are retried after the rest, and their cells skipped once it finishes them."""
        bridge = _ProgressBridge(progress)
        grid_task = progress.add_task("grid", total=sum(len(t) for _, t in pending)) if progress else None

        def advance(n: int) -> None:
            if progress is not None and grid_task is not None:
                progress.advance(grid_task, n)

        queue = deque(pending)
        deferred_in_a_row = 0
        while queue:
            unit, todo = queue.popleft()
            still = self._unfinished(unit, todo, identity)
            if len(still) < len(todo):  # finished meanwhile by another process
                summary.cells_skipped.extend(cell for cell in todo if cell not in still)
                advance(len(todo) - len(still))
            if not still:
                continue
            claim = claims.try_claim(unit_claim_name(unit))
            if claim is None:
                queue.append((unit, still))
                deferred_in_a_row += 1
                if deferred_in_a_row >= len(queue):  # everything left is held by other processes
                    if progress is not None and grid_task is not None:
                        progress.update(grid_task, description="grid: waiting for units other processes hold")
                    time.sleep(CLAIM_POLL_SECONDS)
                    deferred_in_a_row = 0
                continue
            deferred_in_a_row = 0
            try:
                self._compute_unit(unit, still, identity, summary, bridge, progress, grid_task, advance)
            finally:
                claims.release(claim)

    def _compute_unit(
        self,
        unit: FitUnit,
        todo: list[Cell],
        identity: BackboneIdentity,
        summary: RunSummary,
        bridge: _ProgressBridge,
        progress: Progress | None,
        grid_task: TaskID | None,
        advance: Callable[[int], None],
    ) -> None:
        """Fit ``unit`` and evaluate its unfinished cells (the caller holds its claim)."""
        still = self._unfinished(unit, todo, identity)  # another process may have finished it
        if len(still) < len(todo):
            summary.cells_skipped.extend(cell for cell in todo if cell not in still)
            advance(len(todo) - len(still))
        if not still:
            return
        method = self._fit(unit, bridge, progress, grid_task)
        for cell in still:
            self._evaluate(method, cell, self._target_by_name[cell.target], identity, bridge)
            summary.cells_done.append(cell)
            advance(1)

    def _unfinished(self, unit: FitUnit, cells: Sequence[Cell], identity: BackboneIdentity) -> list[Cell]:
        """The cells of ``unit`` with no reusable finished cell on disk (see :mod:`bench.resume`)."""
        return [
            cell
            for cell in cells
            if not finished_cell(cell.directory(self.run_dir), self._expectation(unit, cell, identity))
        ]

    def _expectation(self, unit: FitUnit, cell: Cell, identity: BackboneIdentity) -> CellExpectation:
        test = self._target_by_name[cell.target]
        return CellExpectation(
            identity=identity,
            eval_size=self.config.eval_size,
            method=unit.method,
            options=self._method_options(unit.method),
            source=self.config.source,
            source_fingerprint=self.source_fingerprint if get_method(unit.method).uses_support else None,
            target_fingerprint=test.fingerprint,
            target_ids=[item.id for item in test.items],
        )

    @functools.cached_property
    def source_fingerprint(self) -> str:
        """The fingerprint of the source's support pool (what few-shot cells were drawn from)."""
        pool = support_pool(self.source)
        return samples_fingerprint(sample for samples in pool.values() for sample in samples)

    @property
    def run_dir(self) -> Path:
        """``out/<name>``; the default name comes from the source and the RESOLVED weights, so
        results of different weights (e.g. ``auto`` resolving differently) never share a folder."""
        c = self.config
        if c.name:
            return Path(c.out) / c.name
        identity = self.backbone.identity
        return Path(c.out) / slug(f"{c.source}__{identity.model}__{identity.weights}")

    def _method_options(self, method: str) -> dict[str, Any]:
        """The method's options as this run resolves them, in their JSON form."""
        cls = get_method(method)
        return json_options({**cls.default_config, **self.config.method_config.get(method, {})})

    @contextmanager
    def _progress(self) -> Iterator[Progress | None]:
        if not self.show_progress:
            yield None
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with progress:
            yield progress

    def _context(self, unit: FitUnit, bridge: _ProgressBridge) -> MethodContext:
        cls = get_method(unit.method)
        scratch = self.run_dir / ".scratch" / slug(unit.method) / f"shots{unit.shots}_seed{unit.seed}"
        scratch.mkdir(parents=True, exist_ok=True)
        return MethodContext(
            device=self.device,
            seed=unit.seed,
            shots=unit.shots,
            scratch_dir=scratch,
            config=dict(self.config.method_config.get(unit.method, {})),
            eval_size=self.config.eval_size,
            backbone_factory=(lambda: self.backbone) if cls.uses_backbone else None,
            progress=bridge.track,
        )

    def _fit(
        self, unit: FitUnit, bridge: _ProgressBridge, progress: Progress | None, grid_task: TaskID | None
    ) -> _FittedMethod:
        cls = get_method(unit.method)
        if progress is not None and grid_task is not None:
            progress.update(
                grid_task, description=f"grid: fitting {unit.method} ({unit.shots}-shot, seed {unit.seed})"
            )
        seed_everything(unit.seed)
        method = cls(self._context(unit, bridge))
        support_ids: dict[str, list[str]] | None = None
        start = time.perf_counter()
        if cls.uses_support:
            support, support_ids = self.support(unit.shots, unit.seed)
            try:
                method.fit(support)
            except Exception as exc:
                exc.add_note(f"while fitting {unit.method} ({unit.shots}-shot, seed {unit.seed})")
                raise
        return _FittedMethod(method, support_ids, time.perf_counter() - start)

    def _evaluate(
        self,
        fitted: _FittedMethod,
        cell: Cell,
        test: TestSet,
        identity: BackboneIdentity,
        bridge: _ProgressBridge,
    ) -> None:
        method = fitted.method
        tasks = method.tasks
        size = self.config.eval_size
        n = len(test.items)
        scores = np.empty(n, dtype=np.float64)
        probs = np.empty((n, len(CLASSES)), dtype=np.float64) if Task.CLASSIFY in tasks else None
        maps_out = (
            np.empty((n, size, size), dtype=np.dtype(self.config.maps_dtype))
            if (self.config.save_maps and Task.LOCALIZE in tasks)
            else None
        )
        pixels = (
            PixelMetricAccumulator(expected_images=test.n_pixel_images) if Task.LOCALIZE in tasks else None
        )
        batch = max(1, min(method.predict_batch_size, self.config.batch_size))
        starts = range(0, n, batch)
        start_time = time.perf_counter()
        for start in bridge.track(starts, f"predict {cell}", len(starts)):
            items = test.items[start : start + batch]
            try:
                prediction = method.predict(items)
            except Exception as exc:
                exc.add_note(f"while predicting cell {cell}")
                raise
            validate_prediction(prediction, items, tasks, size, cell)
            stop = start + len(items)
            scores[start:stop] = prediction.scores
            if probs is not None:
                probs[start:stop] = prediction.probs
            if pixels is not None:
                assert prediction.maps is not None
                keep = [i for i in range(len(items)) if test.masks[start + i] is not None]
                if keep:
                    pixels.add(prediction.maps[keep], np.stack([test.masks[start + i] for i in keep]))
                if maps_out is not None:
                    check_storable(prediction.maps, maps_out.dtype, items, cell)
                    maps_out[start:stop] = prediction.maps
        predict_seconds = time.perf_counter() - start_time

        metrics: dict[str, float] = {}
        notes: list[str] = []
        image_result = image_metrics(test.labels, scores, probs)
        wanted = task_metrics(tasks)
        metrics.update({k: v for k, v in image_result.values.items() if k in wanted})
        notes.extend(image_result.notes)
        if pixels is not None:
            pixel_result = pixels.result()
            metrics.update(pixel_result.values)
            notes.extend(pixel_result.notes)
        self._write_cell(
            cell, test, fitted, identity, scores, probs, maps_out, metrics, notes, predict_seconds
        )

    def _write_cell(
        self,
        cell: Cell,
        test: TestSet,
        fitted: _FittedMethod,
        identity: BackboneIdentity,
        scores: np.ndarray,
        probs: np.ndarray | None,
        maps: np.ndarray | None,
        metrics: dict[str, float],
        notes: list[str],
        predict_seconds: float,
    ) -> None:
        method = fitted.method
        record = CellRecord(
            method=cell.unit.method,
            tasks=tuple(sorted(str(t) for t in method.tasks)),
            source=self.config.source,
            target=cell.target,
            shots=cell.unit.shots,
            seed=cell.unit.seed,
            uses_support=type(method).uses_support,
            backbone=identity,
            metrics=metrics,
            n_images=len(test.items),
            n_pixel_images=test.n_pixel_images,
            eval_size=self.config.eval_size,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            method_meta=MethodMeta.of(type(method)),
            source_fingerprint=self.source_fingerprint if type(method).uses_support else None,
            target_fingerprint=test.fingerprint,
        )
        output = CellOutput(
            record=record,
            run_config=self.config.to_dict() | {"method_config": {cell.unit.method: method.config}},
            image_ids=[item.id for item in test.items],
            labels=[str(CLASSES[int(label)]) for label in test.labels],
            scores=scores,
            probs=probs,
            maps=maps,
            support_ids=fitted.support_ids,
            fit_seconds=fitted.fit_seconds,
            predict_seconds=predict_seconds,
            device=str(self.device),
            notes=notes,
            excluded_from_pixel_metrics=test.excluded,
            method_options=method.config,
            images=test.image_rows(),
            masks=test.masks if maps is not None else None,
        )
        directory = cell.directory(self.run_dir)
        try:
            write_cell(directory, output)
        except OSError as exc:
            raise ResultsError(
                f"cannot write cell {cell} into {directory} ({exc.strerror or exc}); nothing was left under "
                "its name: free disk space (or fix the folder's permissions) and run the same command again "
                "to resume"
            ) from None


@dataclass
class _FittedMethod:
    method: Method
    support_ids: dict[str, list[str]] | None
    fit_seconds: float


def run_grid(config: RunConfig, console: Console | None = None, show_progress: bool = True) -> RunSummary:
    """Convenience wrapper: build a :class:`Runner` and run it."""
    return Runner(config, console=console, show_progress=show_progress).run()


__all__ = [
    "Cell",
    "FitUnit",
    "RunSummary",
    "Runner",
    "plan_grid",
    "run_grid",
    "shard_units",
    "validate_prediction",
]
