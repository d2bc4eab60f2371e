"""Memory models over support features: Tip-Adapter's cache model and nearest-reference scores.

- :func:`cache_logits`: ``clip_scale * f W^T + alpha * (exp(-beta * (1 - f K^T)) L)`` for
  normalised queries ``f`` (B, D), text classifier ``W`` (C, D), keys ``K`` (n, D) and values
  ``L`` (n, C) (Tip-Adapter's logits; UltraAD's memory-boosted classifier).
- :func:`one_hot` and :func:`support_labels` (the support set's labels as a tensor, checked to
  hold every class when the method needs them all).
- :func:`nearest_distance`: ``min over the memory of (1 - cos) / 2`` per query token (WinCLIP+'s
  association score); :func:`nearest_cosine_distance`: ``min over the memory of (1 - cos)``
  per query token, with a memory of several reference images and an optional image to leave
  out (April-GAN's few-shot map).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import MethodError
from bench.method import SupportSet, class_names


def cache_logits(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    text_weights: torch.Tensor,
    alpha: float,
    beta: float,
    clip_scale: float = 100.0,
) -> torch.Tensor:
    """``clip_scale * f W^T + alpha * (exp(-beta * (1 - f K^T)) L)`` for normalised queries ``f``.

    ``keys`` (n, D), ``values`` (n, C) one-hot, ``text_weights`` (C, D) normalised -> (B, C).
    """
    affinity = queries @ keys.T
    cache = torch.exp(-beta * (1.0 - affinity)) @ values
    return clip_scale * queries @ text_weights.T + alpha * cache


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), n_classes).float()


def support_labels(
    support: SupportSet, device: torch.device, method: str, *, require_all: bool = True
) -> torch.Tensor:
    """The support labels (n,) long on ``device``; with ``require_all`` every class must be present."""
    labels = torch.as_tensor(np.asarray(support.labels), dtype=torch.long, device=device)
    present = sorted(set(labels.tolist()))
    if require_all and present != list(range(len(class_names()))):
        raise MethodError(f"method {method!r}: the support set must hold every class, got classes {present}")
    return labels


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``min over memory of (1 - cos) / 2`` (WinCLIP+'s association score, anomalib
    ``visual_association_score``). ``queries`` (B, n, C), ``memory`` (M, C), both L2-normalised
    -> (B, n), clamped to [0, 1]."""
    out = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for b in range(queries.shape[0]):
        for start in range(0, queries.shape[1], chunk):
            block = queries[b, start : start + chunk] @ memory.T
            out[b, start : start + chunk] = (1.0 - block.max(dim=-1).values) / 2.0
    return out.clamp_(0.0, 1.0)


def nearest_cosine_distance(
    queries: torch.Tensor, references: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``min over every reference token of (1 - cos(q, r))`` per query token (April-GAN's few-shot map).

    ``queries`` (B, N, C); ``references`` (R, M, C): the tokens of R reference images (any
    scale: both sides are L2-normalised here). ``exclude`` (B,) long: for query ``b`` the
    reference image ``exclude[b]`` is left out (-1: none), so a support image is never scored
    against its own tokens. Returns (B, N).
    """
    q = F.normalize(queries.float(), dim=-1)
    r = F.normalize(references.float(), dim=-1)
    per_reference = torch.stack(
        [(1.0 - q @ r[i].T).min(dim=-1).values for i in range(r.shape[0])], dim=1
    )  # (B, R, N)
    if exclude is not None:
        left_out = torch.arange(r.shape[0], device=q.device)[None, :] == exclude.to(q.device)[:, None]
        per_reference = per_reference.masked_fill(left_out[:, :, None], float("inf"))
    return per_reference.min(dim=1).values
