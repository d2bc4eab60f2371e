"""Time and measure the pooled pixel metrics on a BUSI-sized synthetic test set.

780 anomaly maps of 256x256 float32 (~17% normal images with all-zero masks; lesion images
with 1-3 elliptical blobs, ~10% lesion pixels overall), streamed through
:class:`bench.metrics.PixelMetricAccumulator` in batches of 32. Reports the wall time of the
pixel suite (``add`` calls + ``result``), the peak of numpy allocations (tracemalloc) and the
growth of the process's peak resident set (``ru_maxrss``). With ``--compare-sklearn`` it also
times scikit-learn's ``roc_auc_score`` / ``average_precision_score`` on the same pixels and
prints the differences.

    python scripts/benchmark_metrics.py [--images 780] [--size 256] [--batch 32] [--repeats 3]
                                        [--no-hint] [--compare-sklearn]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.metrics import MetricResult, PixelMetricAccumulator


def synthetic_batches(
    n_images: int, size: int, batch: int, seed: int = 0, normal_fraction: float = 0.17
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic (maps, masks) batches: blob lesions, maps = noisy lesion signal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for start in range(0, n_images, batch):
        b = min(batch, n_images - start)
        masks = np.zeros((b, size, size), dtype=bool)
        for i in range(b):
            if rng.random() < normal_fraction:
                continue
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0.15, 0.85, size=2)
                ry, rx = rng.uniform(0.08, 0.2, size=2)
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        maps = rng.standard_normal((b, size, size), dtype=np.float32) * np.float32(0.25)
        maps += masks * np.float32(0.6)
        maps += (yy * np.float32(0.2))[None]  # a smooth bias, as CLIP maps have
        yield maps, masks


def run_suite(args: argparse.Namespace) -> tuple[MetricResult, dict[str, float], PixelMetricAccumulator]:
    """Stream the synthetic set; returns (result, timings, accumulator).

    Timings (seconds): wall and CPU (this process) of the ``add`` calls and of ``result``;
    generating the synthetic maps is not counted.
    """
    acc = PixelMetricAccumulator(expected_images=None if args.no_hint else args.images)
    t = {"add_wall": 0.0, "add_cpu": 0.0}
    for maps, masks in synthetic_batches(args.images, args.size, args.batch, seed=args.seed):
        w0, c0 = time.perf_counter(), time.process_time()
        acc.add(maps, masks)
        t["add_wall"] += time.perf_counter() - w0
        t["add_cpu"] += time.process_time() - c0
    w0, c0 = time.perf_counter(), time.process_time()
    result = acc.result()
    t["result_wall"] = time.perf_counter() - w0
    t["result_cpu"] = time.process_time() - c0
    t["wall"] = t["add_wall"] + t["result_wall"]
    t["cpu"] = t["add_cpu"] + t["result_cpu"]
    return result, t, acc


def describe(t: dict[str, float]) -> str:
    return (
        f"{t['wall']:.2f} s wall (add {t['add_wall']:.2f} + result {t['result_wall']:.2f}), "
        f"{t['cpu']:.2f} s CPU"
    )


def maxrss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=780)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the best is reported)")
    parser.add_argument("--compare-sklearn", action="store_true", help="also time scikit-learn")
    parser.add_argument(
        "--no-hint", action="store_true", help="do not pass expected_images to the accumulator"
    )
    args = parser.parse_args(argv)

    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
        f"capacity hint: {'none' if args.no_hint else f'expected_images={args.images}'}"
    )
    # 1) Peak RSS growth of one untraced run (ru_maxrss is a high-water mark, so measure first).
    gc.collect()
    rss0 = maxrss_mb()
    result, first, acc = run_suite(args)
    rss_delta = maxrss_mb() - rss0
    n_pix = acc.n_positive + acc.n_negative
    print(
        f"test set: {acc.n_images} images at {args.size}x{args.size} = {n_pix / 1e6:.1f}M pixels, "
        f"{acc.n_positive / n_pix:.1%} lesion in {acc.n_regions} regions, batches of {args.batch}"
    )
    del acc
    gc.collect()

    # 2) Wall and CPU time: the first run (fresh memory) and the best of --repeats.
    runs = [first]
    for _ in range(args.repeats - 1):
        _, t, acc = run_suite(args)
        del acc
        gc.collect()
        runs.append(t)
    best = min(runs, key=lambda t: t["wall"])
    print(f"pixel suite, first run: {describe(first)}")
    print(f"pixel suite, best of {len(runs)}: {describe(best)}")
    walls = ", ".join(f"{t['wall']:.2f}" for t in runs)
    print(f"  all runs (wall s): {walls}")

    # 3) Peak of numpy allocations under tracemalloc (separate run: tracing slows Python code).
    tracemalloc.start()
    _, _, acc = run_suite(args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del acc
    gc.collect()
    print(f"peak memory: tracemalloc {peak / 1e6:.0f} MB, ru_maxrss growth {rss_delta:.0f} MB")
    for key, value in result.values.items():
        print(f"  {key:12s} {value:.10f}")
    for note in result.notes:
        print(f"  note: {note}")

    if args.compare_sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        maps_all, masks_all = zip(
            *synthetic_batches(args.images, args.size, args.batch, seed=args.seed), strict=True
        )
        scores = np.concatenate([m.ravel() for m in maps_all]).astype(np.float32)
        targets = np.concatenate([m.ravel() for m in masks_all])
        del maps_all, masks_all
        gc.collect()
        rss0 = maxrss_mb()
        for key, fn in (("pixel_auroc", roc_auc_score), ("pixel_ap", average_precision_score)):
            t0 = time.perf_counter()
            value = float(fn(targets, scores))
            elapsed = time.perf_counter() - t0
            diff = abs(value - result.values[key])
            print(f"sklearn {key}: {value:.10f} in {elapsed:.1f} s (|difference| = {diff:.2e})")
        print(f"sklearn ru_maxrss growth: {maxrss_mb() - rss0:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
