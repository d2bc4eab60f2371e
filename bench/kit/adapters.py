"""Small trainable modules shared by methods: per-layer adapters, the CoCoOp meta-net, and
text prototypes attending to patch tokens.

- :class:`LayerAdapters`: one ``Linear(W -> D)`` per chosen layer, applied to RAW patch
  tokens (no ``ln_post``, no ``proj``), as April-GAN's ``LinearLayer``.
- :class:`MetaNet`: CoCoOp's ``Linear(d, hidden) - ReLU - Linear(hidden, out)``.
- :class:`PrototypeCrossAttention`: text prototypes attend to patch tokens (multi-head
  cross-attention), residual add, L2-normalise (UltraAD's PIF, VCP-CLIP's Post-VCP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerAdapters(nn.Module):
    """One ``Linear(in_dim -> out_dim)`` per layer, applied to that layer's tokens.

    ``forward(tokens)`` takes (B, L, N, in_dim) and returns (B, L, N, out_dim).
    """

    def __init__(self, n_layers: int, in_dim: int, out_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"LayerAdapters needs at least one layer, got {n_layers}")
        self.linears = nn.ModuleList(nn.Linear(in_dim, out_dim, bias=bias) for _ in range(n_layers))

    @property
    def n_layers(self) -> int:
        return len(self.linears)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 4 or tokens.shape[1] != self.n_layers:
            raise ValueError(f"expected (B, {self.n_layers}, N, W) tokens, got {tuple(tokens.shape)}")
        return torch.stack([linear(tokens[:, i]) for i, linear in enumerate(self.linears)], dim=1)


class MetaNet(nn.Sequential):
    """CoCoOp's meta-net: ``Linear(d, hidden) - ReLU - Linear(hidden, out)`` (with biases)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class PrototypeCrossAttention(nn.Module):
    """Text prototypes attend to patch tokens; ``T' = norm(T + MHA(q=T, k=v=P))``.

    ``forward(prototypes (B, K, D), tokens (B, N, D))`` -> (B, K, D) L2-normalised.
    ``normalize_tokens`` L2-normalises the patch tokens before they become keys and values
    (so the residual is on the scale of the unit-norm prototypes); ``zero_init`` zeroes the
    output projection so that ``T' = norm(T)`` at initialisation (the fusion starts as the
    identity and is learned from there; ``W_q``, ``W_k``, ``W_v`` receive gradients once the
    output projection has moved).
    """

    def __init__(
        self, dim: int, heads: int = 8, *, normalize_tokens: bool = True, zero_init: bool = True
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not divisible by {heads} heads")
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.normalize_tokens = bool(normalize_tokens)
        if zero_init:
            nn.init.zeros_(self.attention.out_proj.weight)
            nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, prototypes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.normalize_tokens:
            tokens = F.normalize(tokens, dim=-1)
        fused, _ = self.attention(prototypes, tokens, tokens, need_weights=False)
        return F.normalize(prototypes + fused, dim=-1)
