"""Fingerprints of the data a cell was made on, so that a resumed run never reuses a cell made
on other data (another source under the same ``--name``, another folder with the same name).

A fingerprint is the SHA-256 (first 32 hex digits) of one line per sample, sorted by id:
id, label, the image's content key and the content keys of its mask files. It changes when
an image is added, removed, relabelled, or its image or mask bytes change, and not when the
dataset folder moves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from bench.data import file_key
from bench.types import Sample

__all__ = ["samples_fingerprint"]


def samples_fingerprint(samples: Iterable[Sample]) -> str:
    """The fingerprint of ``samples`` (see the module docstring)."""
    lines = sorted(
        "\t".join([s.id, s.label.value, file_key(s.image_path), ",".join(file_key(m) for m in s.mask_paths)])
        for s in samples
    )
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()[:32]
