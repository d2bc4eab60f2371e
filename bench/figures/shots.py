"""A metric against the number of shots: one panel per target, one line per method.

Each few-shot method's point at K shots is the mean over the seeds stored there, with the
sample standard deviation (ddof=1, as in the tables) as its error bar; a point with one
seed has no error bar. Values are in percent, like the tables. Zero-shot methods do not
depend on K and are drawn as dashed horizontal lines at their value. The x axis is log2
(the protocol's shots double: 4, 8, 16), ticked at the shots stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.figures.common import (
    FigureResult,
    figure_style,
    file_stem,
    load_store,
    method_order,
    new_figure,
    one_setup,
    setup_title,
)
from bench.results import METRIC_KEYS, CellRecord

__all__ = ["draw_shots", "seed_statistics"]

PANEL_WIDTH, PANEL_HEIGHT = 2.6, 2.2
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def seed_statistics(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of per-seed values; the std is NaN for one value."""
    from bench.tables.model import STD_DDOF

    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=STD_DDOF)) if arr.size > STD_DDOF else math.nan


def _series(cells: Sequence[CellRecord], metric: str) -> dict[str, Any]:
    """The points of one (target, method): zero-shot value, or per-shots statistics (in %)."""
    if not any(c.uses_support for c in cells):
        values = [100.0 * c.metrics[metric] for c in cells]
        mean, std = seed_statistics(values)
        return {"zero_shot": True, "mean": mean, "std": std, "n": len(values)}
    by_shots: dict[int, list[float]] = {}
    for cell in sorted(cells, key=lambda c: (c.shots, c.seed)):
        by_shots.setdefault(cell.shots, []).append(100.0 * cell.metrics[metric])
    stats = [seed_statistics(v) for v in by_shots.values()]
    return {
        "zero_shot": False,
        "shots": list(by_shots),
        "mean": [m for m, _ in stats],
        "std": [s for _, s in stats],
        "n": [len(v) for v in by_shots.values()],
    }


def draw_shots(
    results_dir: Path,
    *,
    metric: str = "image_auroc",
    targets: list[str] | None = None,
    methods: list[str] | None = None,
    backbone: str | None = None,
) -> FigureResult:
    """Draw ``metric`` against shots (see the module docstring).

    ``data["series"]`` maps (target, method) to the plotted numbers: ``zero_shot``, ``mean``,
    ``std``, ``n`` (and ``shots`` for few-shot methods, one entry per shots value).
    """
    from bench.tables.model import METRIC_LABEL

    if metric not in METRIC_KEYS:
        raise BenchError(f"unknown --metric {metric!r}; use one of {', '.join(METRIC_KEYS)}")
    root = Path(results_dir)
    cells = load_store(root, backbone)
    stored_targets = sorted({c.target for c in cells})
    if targets is not None:
        unknown = [t for t in targets if t not in stored_targets]
        if unknown:
            raise BenchError(
                f"unknown target {', '.join(map(repr, unknown))} in {root}; "
                f"stored: {', '.join(stored_targets)}"
            )
    chosen_targets = targets if targets is not None else stored_targets
    selection = one_setup(
        [c for c in cells if c.target in chosen_targets], root, f"target(s) {', '.join(chosen_targets)}"
    )
    stored_methods = method_order(selection.cells, {c.method for c in selection.cells})
    having = {c.method for c in selection.cells if metric in c.metrics}
    if not having:
        stored_metrics = sorted({m for c in selection.cells for m in c.metrics})
        raise BenchError(
            f"no cell under {root} stores {metric} for {', '.join(chosen_targets)} "
            f"(metrics stored: {', '.join(stored_metrics) or 'none'})"
        )
    notes = list(selection.notes)
    if methods is not None:
        unknown = [m for m in methods if m not in stored_methods]
        if unknown:
            raise BenchError(
                f"unknown method {', '.join(map(repr, unknown))} in {root}; "
                f"stored: {', '.join(stored_methods)}"
            )
        lacking = [m for m in methods if m not in having]
        if lacking:
            raise BenchError(
                f"method {', '.join(lacking)} stores no {metric} (methods that do: "
                f"{', '.join(m for m in stored_methods if m in having)}); choose another --metric or method"
            )
        shown = methods
    else:
        shown = [m for m in stored_methods if m in having]
        left = [m for m in stored_methods if m not in having]
        if left:
            notes.append(f"not shown (no {metric} stored): {', '.join(left)}")

    series: dict[tuple[str, str], dict[str, Any]] = {}
    for target in chosen_targets:
        for method in shown:
            mine = [c for c in selection.cells if c.target == target and c.method == method]
            scored = [c for c in mine if metric in c.metrics]
            if len(scored) < len(mine):
                notes.append(
                    f"{method} on {target}: {len(mine) - len(scored)} cell(s) without {metric} "
                    "(undefined there, see their notes) are left out"
                )
            if scored:
                series[(target, method)] = _series(scored, metric)
    counts = [n for s in series.values() if not s["zero_shot"] for n in s["n"]]
    if counts and min(counts) < max(counts):
        fewer = [
            f"{method} on {target} at {k} shots (n={n})"
            for (target, method), s in series.items()
            if not s["zero_shot"]
            for k, n in zip(s["shots"], s["n"], strict=True)
            if n < max(counts)
        ]
        notes.append(f"fewer seeds than the other points ({max(counts)}): {'; '.join(fewer)}")

    all_shots = sorted({k for s in series.values() if not s["zero_shot"] for k in s["shots"]})
    label = METRIC_LABEL.get(metric, metric)
    n_cols = min(len(chosen_targets), 3)
    n_rows = math.ceil(len(chosen_targets) / n_cols)
    width = PANEL_WIDTH * n_cols + 0.6
    headline = f"{label} vs shots: mean ± sample std (ddof=1) over seeds; zero-shot methods dashed"
    with figure_style():
        import matplotlib

        figure = new_figure(width, PANEL_HEIGHT * n_rows + 1.4)
        axes = figure.subplots(n_rows, n_cols, squeeze=False, sharey=True).ravel()
        for ax in axes[len(chosen_targets) :]:
            figure.delaxes(ax)
        palette = matplotlib.colormaps["tab10" if len(shown) <= 10 else "tab20"]
        style = {m: (palette(i % palette.N), MARKERS[i % len(MARKERS)]) for i, m in enumerate(shown)}
        handles: dict[str, Any] = {}
        for ax, target in zip(axes, chosen_targets, strict=False):
            ax.set_title(target)
            if all_shots:
                ax.set_xscale("log", base=2)
                ax.set_xticks(all_shots, [str(k) for k in all_shots])
                ax.minorticks_off()
                ax.set_xlim(all_shots[0] / 1.3, all_shots[-1] * 1.3)
            ax.set_xlabel("shots per class")
            ax.grid(True, linewidth=0.3, alpha=0.5)
            for method in shown:
                s = series.get((target, method))
                if s is None:
                    continue
                colour, marker = style[method]
                if s["zero_shot"]:
                    name = f"{method} (zero-shot)"
                    handles[name] = ax.axhline(
                        s["mean"], color=colour, linestyle="--", linewidth=1, label=name
                    )
                else:
                    handles[method] = ax.errorbar(
                        np.asarray(s["shots"], dtype=float), s["mean"], yerr=s["std"], color=colour,
                        marker=marker, markersize=3.5, linewidth=1, capsize=2, label=method,
                    )  # fmt: skip
        axes[0].set_ylabel(f"{label} (%)")
        figure.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4)
        )
        figure.suptitle(setup_title(headline, selection, width))
    return FigureResult(
        figure,
        file_stem("shots", metric),
        notes,
        {"series": series, "targets": list(chosen_targets), "methods": list(shown)},
    )
