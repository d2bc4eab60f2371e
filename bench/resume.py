"""Whether a stored cell can be reused by a run (resuming), or must never be.

A stored cell is reused only when it was made exactly as this run would make it: the same
backbone identity and evaluation size, the same method options, and the same data (the
source's support pool for methods that use it, and the target set; see
:mod:`bench.fingerprints`). Anything else is a :class:`~bench.errors.ResultsError` telling
the user to pick another ``--name`` or ``--out``: results made differently never mix, and
nothing is silently recomputed over them either.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import ResultsError
from bench.results import CELL_FILE, PREDICTIONS_FILE, BackboneIdentity

__all__ = ["CellExpectation", "finished_cell"]


@dataclass(frozen=True)
class CellExpectation:
    """How this run would make a cell: what a stored cell must match to be reused.

    ``options`` are the method's options in JSON form (:func:`bench.results.json_options`);
    ``source_fingerprint`` is None for methods that ignore the support set; ``source`` (the
    run's source spec) and ``target_ids`` are checked against cells stored before fingerprints
    were kept.
    """

    identity: BackboneIdentity
    eval_size: int
    method: str
    options: Mapping[str, Any]
    source: str
    source_fingerprint: str | None
    target_fingerprint: str
    target_ids: Sequence[str]


def _advice() -> str:
    return "use another --name or --out so results never mix, or delete those cells to recompute them"


def finished_cell(directory: Path, expected: CellExpectation) -> bool:
    """True when ``directory`` holds a finished cell made as ``expected``; False when it holds
    none; :class:`ResultsError` when it holds one made differently."""
    path = directory / CELL_FILE
    if not path.exists():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        identity = BackboneIdentity.from_dict(stored["backbone"])
        eval_size = int(stored["eval_size"])
        options = stored.get("method_options", expected.options)
        source_fp, target_fp = stored.get("source_fingerprint"), stored.get("target_fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(
            f"{path} is unreadable ({exc}); delete that cell directory to recompute it"
        ) from exc
    if identity != expected.identity or eval_size != expected.eval_size:
        raise ResultsError(
            f"{path} was made with another backbone or evaluation size ({stored['backbone']}, eval "
            f"{eval_size}) than this run ({expected.identity}, eval {expected.eval_size}); {_advice()}"
        )
    if options != expected.options:
        changed = sorted(
            k for k in set(options) | set(expected.options) if options.get(k) != expected.options.get(k)
        )
        raise ResultsError(
            f"{path} was made with other options of method {expected.method!r} (changed: "
            f"{', '.join(changed)}); {_advice()}"
        )
    if target_fp is None:
        _check_legacy_targets(directory, expected.target_ids)
    elif target_fp != expected.target_fingerprint:
        raise ResultsError(
            f"{path} was made on another target set (its images, labels or masks differ from "
            f"{stored.get('target')!r} as this run reads it); {_advice()}"
        )
    if expected.source_fingerprint is not None and source_fp not in (None, expected.source_fingerprint):
        raise ResultsError(
            f"{path} was made with support drawn from other source data ({stored.get('source')!r} "
            f"then); {_advice()}"
        )
    if (
        expected.source_fingerprint is not None
        and source_fp is None
        and stored.get("source") != expected.source
    ):
        # a cell stored before fingerprints: at least the source it names must be this run's
        raise ResultsError(
            f"{path} was made with support from {stored.get('source')!r}, this run draws it from "
            f"{expected.source!r}; {_advice()}"
        )
    return True


def _check_legacy_targets(directory: Path, target_ids: Sequence[str]) -> None:
    """A cell stored before fingerprints: its images must at least be this target's images."""
    path = directory / PREDICTIONS_FILE
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            ids = [row["id"] for row in csv.DictReader(handle)]
    except (OSError, KeyError, csv.Error) as exc:
        raise ResultsError(
            f"{path} is unreadable ({exc}); delete that cell directory to recompute it"
        ) from exc
    if ids != list(target_ids):
        raise ResultsError(f"{path} lists other images than this run's target; {_advice()}")
