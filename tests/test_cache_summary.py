"""The run summary counts every cache the frozen backbone uses (features, windows, augmented views)."""

from __future__ import annotations

from pathlib import Path

from conftest import ConfigFactory

from bench.feature_cache import ENTRY_SUFFIX
from bench.runner import run_grid


def test_summary_counts_every_cache(make_config: ConfigFactory, isolated_env: Path) -> None:
    config = make_config(methods="winclip,tipadapter,zeroshot")
    first = run_grid(config, show_progress=False)
    entries = list(isolated_env.rglob(f"*{ENTRY_SUFFIX}"))
    # every entry on disk was a counted miss: window embeddings (winclip/) and Tip-Adapter's
    # augmented views (their own folder) included, not only the standard features
    assert {p.parent.parent.parent.name for p in entries} >= {"winclip"}
    assert first.cache_misses == len(entries) > first.images_encoded
    again = run_grid(make_config(methods="winclip,tipadapter,zeroshot", name="again"), show_progress=False)
    assert again.cache_misses == 0 and again.images_encoded == 0
    assert again.cache_hits == first.cache_hits + first.cache_misses
