"""Paired comparison of two methods on the same test images (``bench compare RESULTS A B``).

For every target and shots where both methods have finished cells, and every table metric
both recorded:

* per support seed (a zero-shot method, stored once, is paired with every seed of the other):
  I-AUROC by DeLong's test (:func:`bench.stats.delong_test`), the other metrics by a paired
  stratified bootstrap over images;
* the seed mean (the number the tables show): a paired stratified bootstrap in which each
  resample evaluates every seed of both methods on the same images.

Bootstrap draws depend on the target's labels and ``seed`` only; metrics on resamples are
computed as in :mod:`bench.intervals`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.breakdown import Evaluation, whole_evaluations
from bench.errors import ResultsError
from bench.intervals import CI_METRICS, resampled_values
from bench.resampled_metrics import resample_counts
from bench.results import CellRecord
from bench.stats import PairedResult, delong_test, paired_from_resamples, stratified_bootstrap_indices
from bench.tables.cells import group_key

__all__ = ["Comparison", "compare_methods"]


@dataclass(frozen=True)
class Comparison:
    """One line of the comparison: ``a`` minus ``b`` on one metric of one target and shots.

    ``seed`` is None for the seed mean; ``test`` names how ``p_value`` was made. ``low`` and
    ``high`` bound the difference (percentile bootstrap; for DeLong, the normal interval).
    """

    target: str
    shots: int
    seed: int | None
    metric: str
    value_a: float
    value_b: float
    difference: float
    low: float
    high: float
    p_value: float
    test: str
    n_images: int


def _by_cell(evaluations: Sequence[Evaluation], method: str) -> dict[tuple[str, int], list[Evaluation]]:
    out: dict[tuple[str, int], list[Evaluation]] = {}
    for e in evaluations:
        if e.record.method == method:
            out.setdefault((e.record.target, e.record.shots), []).append(e)
    for group in out.values():
        group.sort(key=lambda e: e.record.seed)
    return out


def _pairs(
    a: dict[tuple[str, int], list[Evaluation]], b: dict[tuple[str, int], list[Evaluation]]
) -> list[tuple[str, int, list[Evaluation], list[Evaluation]]]:
    """(target, shots, cells of a, cells of b): zero-shot cells (shots 0) pair with any shots."""
    out = []
    targets = sorted({t for t, _ in a} & {t for t, _ in b})
    for target in targets:
        shots_a = {s for t, s in a if t == target}
        shots_b = {s for t, s in b if t == target}
        for shots in sorted((shots_a | shots_b) - {0}) or [0]:
            cells_a = a.get((target, shots)) or a.get((target, 0))
            cells_b = b.get((target, shots)) or b.get((target, 0))
            if cells_a and cells_b:
                out.append((target, shots, cells_a, cells_b))
    return out


def _same_images(first: Evaluation, second: Evaluation) -> None:
    if first.stored.ids != second.stored.ids:
        raise ResultsError(
            f"{first.stored.directory} and {second.stored.directory} hold different test images; a "
            "paired comparison needs both methods evaluated on the same target files"
        )


def _seed_pairs(cells_a: list[Evaluation], cells_b: list[Evaluation]) -> list[tuple[Evaluation, Evaluation]]:
    if len(cells_a) == 1 and not cells_a[0].record.uses_support:
        return [(cells_a[0], e) for e in cells_b]
    if len(cells_b) == 1 and not cells_b[0].record.uses_support:
        return [(e, cells_b[0]) for e in cells_a]
    seeds_b = {e.record.seed: e for e in cells_b}
    return [(e, seeds_b[e.record.seed]) for e in cells_a if e.record.seed in seeds_b]


def _line(
    target: str, shots: int, seed: int | None, metric: str, result: PairedResult, test: str, n: int
) -> Comparison:
    return Comparison(
        target,
        shots,
        seed,
        metric,
        result.estimate_a,
        result.estimate_b,
        result.difference,
        result.low,
        result.high,
        result.p_value,
        test,
        n,
    )


def compare_methods(
    cells: Sequence[CellRecord],
    method_a: str,
    method_b: str,
    *,
    targets: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    metrics: Sequence[str] = CI_METRICS,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[Comparison]:
    """Paired comparisons of ``method_a`` minus ``method_b`` (see the module docstring)."""
    known = sorted({c.method for c in cells})
    for method in (method_a, method_b):
        if method not in known:
            raise ResultsError(f"no finished cell of method {method!r}; methods here: {', '.join(known)}")
    if method_a == method_b:
        raise ResultsError("compare two different methods")
    identities = {group_key(c) for c in cells if c.method in (method_a, method_b)}
    if len(identities) > 1:
        raise ResultsError(
            "the two methods' cells come from several backbones, sources or eval sizes; point "
            "`bench compare` at one run's folder so that results made differently are never paired"
        )
    wanted = [c for c in cells if c.method in (method_a, method_b)]
    evaluations = whole_evaluations(wanted)
    pairs = _pairs(_by_cell(evaluations, method_a), _by_cell(evaluations, method_b))
    if targets is not None:
        pairs = [p for p in pairs if p[0] in targets]
    if shots is not None:
        pairs = [p for p in pairs if p[1] in shots]
    if not pairs:
        raise ResultsError(
            f"{method_a} and {method_b} share no (target, shots) with finished cells"
            + (" among the chosen targets/shots" if targets or shots else "")
        )
    lines: list[Comparison] = []
    for target, k, cells_a, cells_b in pairs:
        seed_pairs = _seed_pairs(cells_a, cells_b)
        if not seed_pairs:
            continue
        for ea, eb in seed_pairs:
            _same_images(ea, eb)
        labels = seed_pairs[0][0].stored.labels
        counts = resample_counts(stratified_bootstrap_indices(labels, n_resamples, seed), len(labels))
        evaluated = list({id(e): e for pair in seed_pairs for e in pair}.values())
        shared = [
            m
            for m in metrics
            if all(m in e.record.metrics for e in evaluated)
            and (not m.startswith("pixel_") or all(e.stored.has_maps for e in evaluated))
        ]
        resampled = {id(e): resampled_values(e, shared, counts) for e in evaluated}
        for metric in shared:
            values: list[tuple[np.ndarray, np.ndarray]] = []
            for ea, eb in seed_pairs:
                va, vb = resampled[id(ea)][metric], resampled[id(eb)][metric]
                values.append((va, vb))
                pair_seed = eb.record.seed if ea.record.uses_support is False else ea.record.seed
                if metric == "image_auroc":
                    test = delong_test(labels > 0, ea.stored.scores, eb.stored.scores)
                    z = _normal_quantile(level)
                    half = z * math.sqrt(max(test.variance_of_difference, 0.0))
                    lines.append(
                        Comparison(
                            target,
                            k,
                            pair_seed,
                            metric,
                            test.auc_a,
                            test.auc_b,
                            test.difference,
                            test.difference - half,
                            test.difference + half,
                            test.p_value,
                            "DeLong",
                            len(labels),
                        )
                    )
                else:
                    result = paired_from_resamples(
                        ea.record.metrics[metric], eb.record.metrics[metric], va, vb, level
                    )
                    lines.append(_line(target, k, pair_seed, metric, result, "paired bootstrap", len(labels)))
            if len(seed_pairs) > 1:
                mean_a = np.mean([va for va, _ in values], axis=0)
                mean_b = np.mean([vb for _, vb in values], axis=0)
                estimate_a = float(np.mean([ea.record.metrics[metric] for ea, _ in seed_pairs]))
                estimate_b = float(np.mean([eb.record.metrics[metric] for _, eb in seed_pairs]))
                result = paired_from_resamples(estimate_a, estimate_b, mean_a, mean_b, level)
                lines.append(_line(target, k, None, metric, result, "paired bootstrap", len(labels)))
    return lines


def _normal_quantile(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2.0))
