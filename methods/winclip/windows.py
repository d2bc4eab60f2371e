"""WinCLIP's score aggregation over windows (the windows themselves are the toolkit's
``windows`` forward variant, :mod:`bench.kit.variants`).

- :class:`Coverage`: which windows cover each patch (padded index / mask).
- :func:`anomaly_probability`: ``softmax(cos(e, [t_normal, t_anomalous]) / T)[anomalous]``.
- :func:`harmonic_aggregation`: per patch, the harmonic mean of the scores of the windows
  covering it; :func:`harmonic_combine`: the element-wise harmonic mean of score maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Coverage:
    """Which windows cover each patch, padded: ``index`` (N, M) long, ``valid`` (N, M) bool."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, windows: torch.Tensor, n_patches: int) -> Coverage:
        members: list[list[int]] = [[] for _ in range(n_patches)]
        for window, patches in enumerate(windows.tolist()):
            for patch in patches:
                members[patch].append(window)
        width = max(1, max(len(m) for m in members))
        index = torch.zeros(n_patches, width, dtype=torch.long)
        valid = torch.zeros(n_patches, width, dtype=torch.bool)
        for patch, covering in enumerate(members):
            index[patch, : len(covering)] = torch.as_tensor(covering, dtype=torch.long)
            valid[patch, : len(covering)] = True
        return cls(index, valid)

    def to(self, device: torch.device) -> Coverage:
        return Coverage(self.index.to(device), self.valid.to(device))


def anomaly_probability(embeds: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(cos(embeds, [t_normal, t_anomalous]) / temperature)[anomalous]`` (anomalib
    ``class_scores``; WinCLIP Eq. 1). ``embeds`` (..., D), ``text`` (2, D), neither normalised."""
    cos = F.normalize(embeds.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    return torch.softmax(cos / temperature, dim=-1)[..., 1]


def harmonic_aggregation(window_scores: torch.Tensor, coverage: Coverage) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it: (B, n_w) -> (B, N).

    As anomalib ``harmonic_aggregation``: a zero window score makes the patches it covers 0,
    and a patch no window covers (possible with stride > 1) gets 0.
    """
    inverse = 1.0 / window_scores.float()  # inf where a score is 0
    gathered = inverse[:, coverage.index]  # (B, N, M)
    gathered = torch.where(coverage.valid, gathered, torch.zeros((), device=gathered.device))
    count = coverage.valid.sum(dim=-1).to(gathered.dtype)
    return torch.nan_to_num(count / gathered.sum(dim=-1), nan=0.0, posinf=0.0)


def harmonic_combine(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of same-shaped score maps (anomalib's cross-scale zero-shot step)."""
    stacked = torch.stack([m.float() for m in maps])
    return len(maps) / (1.0 / stacked).sum(dim=0)
