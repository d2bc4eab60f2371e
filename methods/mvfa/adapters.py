"""MVFA's residual adapters (``CLIP/adapter.py``): a segmentation and a detection adapter per used block.

``ClipAdapter``: ``fc1 = Linear(W, D, bias=False) -> LeakyReLU``, ``fc2 = Linear(D, W,
bias=False) -> LeakyReLU``; ``forward`` returns ``(med, out)``: the D-wide bottleneck (the
feature that is scored against the text and the memory) and its map back to the stream's
width. After each used block both adapters read the same stream ``x`` (all tokens, class
token included) and the stream becomes ``0.8 x + 0.1 seg_out + 0.1 det_out``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ClipAdapter(nn.Module):
    """The official bottleneck adapter (no biases, LeakyReLU after both layers)."""

    def __init__(self, width: int, bottleneck: int, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.LeakyReLU(negative_slope))
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, width, bias=False), nn.LeakyReLU(negative_slope))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        med = self.fc1(tokens)
        return med, self.fc2(med)


class ImplantedAdapters(nn.Module):
    """One segmentation and one detection :class:`ClipAdapter` per used block, and the residual update.

    Built as the official ``CLIP_Inplanted``: every segmentation adapter first, then every
    detection adapter (the order the default initialisation draws them in).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        width: int,
        bottleneck: int,
        *,
        negative_slope: float = 0.01,
        residual_weights: Sequence[float] = (0.8, 0.1, 0.1),
    ) -> None:
        super().__init__()
        self.blocks = tuple(int(b) for b in blocks)
        self.seg = nn.ModuleList(ClipAdapter(width, bottleneck, negative_slope) for _ in self.blocks)
        self.det = nn.ModuleList(ClipAdapter(width, bottleneck, negative_slope) for _ in self.blocks)
        self.residual_weights = tuple(float(w) for w in residual_weights)

    def residual(self, block: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stream after ``block`` -> (updated stream, seg bottleneck, det bottleneck), all tokens."""
        index = self.blocks.index(block)
        seg_med, seg_out = self.seg[index](tokens)
        det_med, det_out = self.det[index](tokens)
        keep, w_seg, w_det = self.residual_weights
        return keep * tokens + w_seg * seg_out + w_det * det_out, seg_med, det_med
