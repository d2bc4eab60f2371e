"""Finished cells as the tables use them: grouped by backbone identity, deduplicated.

**Duplicates** (same group, method, target, shots, seed, e.g. the same cell in two run
folders) are counted once: the newest by ``created`` is kept and a warning line names both
paths (ties: the larger path wins, so the choice is deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from bench.results import BackboneIdentity, CellRecord

GroupKey = tuple[BackboneIdentity, str, int]


def group_key(cell: CellRecord) -> GroupKey:
    """Results with different keys are never pooled: (backbone identity, source, eval size)."""
    return (cell.backbone, cell.source, cell.eval_size)


def created_key(cell: CellRecord) -> tuple[float, str, str]:
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
        ordered = sorted(records, key=created_key)
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
