"""Shared building blocks of the CLIP anomaly-localisation methods (UltraAD, April-GAN, AnomalyCLIP, ...).

Everything here is a plain function or a small ``nn.Module`` on tensors; nothing touches
files, datasets or metrics. Shapes use B images, L layers, N = grid_h * grid_w patches,
W the raw token width, D the joint embedding width.

- :class:`LayerAdapters`: one ``Linear(W -> D)`` per chosen layer, applied to RAW patch
  tokens (no ``ln_post``, no ``proj``), as April-GAN's ``LinearLayer``.
- :func:`text_similarity_maps`: per-layer ``softmax(cos(P_l, [t_n, t_a]) / tau)[abnormal]``
  on the patch grid, bilinearly upsampled to the map size (``upsample="probabilities"``:
  softmax on the grid then upsample, the order of ultraad.md; ``"logits"``: upsample the
  scaled similarities then softmax, April-GAN's order). Text may be shared (2, D), per image
  (B, 2, D) or per image and layer (B, L, 2, D).
- :func:`upsample_grid`: (..., N) patch values -> (..., S, S) bilinear.
- :func:`dice_loss` (V-Net / April-GAN ``BinaryDiceLoss``, smooth 1, per image, batch mean)
  and :func:`focal_loss` (Lin et al., gamma 2, on probabilities, mean over pixels).
- :func:`gaussian_smooth`: separable Gaussian blur of maps in torch, equal to
  ``scipy.ndimage.gaussian_filter(mode="reflect", truncate=4)`` on every map;
  :func:`sigma_at` rescales a sigma given at one resolution (e.g. 4 px at 336) to another.
- :func:`cache_logits` / :func:`memory_logits`: Tip-Adapter's cache model
  ``clip_scale * f W^T + alpha * exp(-beta * (1 - f K^T)) L``.
- :class:`PrototypeCrossAttention`: text prototypes attend to patch tokens
  (multi-head cross-attention), residual add, L2-normalise (UltraAD's PIF, VCP-CLIP's
  Post-VCP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerAdapters",
    "PrototypeCrossAttention",
    "cache_logits",
    "dice_loss",
    "focal_loss",
    "gaussian_kernel1d",
    "gaussian_smooth",
    "memory_logits",
    "sigma_at",
    "text_similarity_maps",
    "upsample_grid",
]

#: Ways of combining the softmax and the upsampling in :func:`text_similarity_maps`.
UPSAMPLE_ORDERS = ("probabilities", "logits")


# ---------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# similarity maps
# ---------------------------------------------------------------------------------------
def upsample_grid(
    values: torch.Tensor, grid: tuple[int, int], size: int | tuple[int, int], *, align_corners: bool = False
) -> torch.Tensor:
    """(..., N) values on a row-major ``grid`` -> (..., H, W) by bilinear interpolation."""
    gh, gw = grid
    if values.shape[-1] != gh * gw:
        raise ValueError(f"last dim {values.shape[-1]} does not match grid {grid}")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    lead = values.shape[:-1]
    flat = values.reshape(-1, 1, gh, gw)
    up = F.interpolate(flat, size=out_size, mode="bilinear", align_corners=align_corners)
    return up.reshape(*lead, *out_size)


def _expand_text(text: torch.Tensor, batch: int, n_layers: int) -> torch.Tensor:
    """Text (2, D) | (B, 2, D) | (B, L, 2, D) -> (B, L, 2, D)."""
    if text.dim() == 2:
        return text[None, None].expand(batch, n_layers, -1, -1)
    if text.dim() == 3:
        return text[:, None].expand(-1, n_layers, -1, -1)
    if text.dim() == 4:
        return text
    raise ValueError(f"text must be (2, D), (B, 2, D) or (B, L, 2, D), got {tuple(text.shape)}")


def text_similarity_maps(
    patch_features: torch.Tensor,
    text: torch.Tensor,
    grid: tuple[int, int],
    size: int | tuple[int, int] | None = None,
    *,
    tau: float = 0.07,
    upsample: str = "probabilities",
    align_corners: bool = False,
    index: int = 1,
) -> torch.Tensor:
    """Per-layer anomaly maps ``softmax(cos(P_l, T) / tau)[index]``, (B, L, H, W).

    ``patch_features`` (B, L, N, D) are the (adapted) patch features; both they and the text
    are L2-normalised here. ``text`` holds the class embeddings in order (normal, abnormal):
    (2, D) shared, (B, 2, D) per image, or (B, L, 2, D) per image and layer. ``size=None``
    returns the maps on the patch grid (B, L, gh, gw) without interpolation.
    """
    if upsample not in UPSAMPLE_ORDERS:
        raise ValueError(f"upsample must be one of {UPSAMPLE_ORDERS}, got {upsample!r}")
    if patch_features.dim() != 4:
        raise ValueError(f"patch_features must be (B, L, N, D), got {tuple(patch_features.shape)}")
    batch, n_layers = patch_features.shape[:2]
    text = _expand_text(text, batch, n_layers)
    patches = F.normalize(patch_features, dim=-1)
    text = F.normalize(text, dim=-1)
    logits = torch.einsum("blnd,blkd->blkn", patches, text) / float(tau)  # (B, L, K, N)
    if size is None:
        return torch.softmax(logits, dim=2)[:, :, index].reshape(batch, n_layers, *grid)
    if upsample == "probabilities":
        probs = torch.softmax(logits, dim=2)[:, :, index]
        return upsample_grid(probs, grid, size, align_corners=align_corners)
    up = upsample_grid(logits, grid, size, align_corners=align_corners)  # (B, L, K, H, W)
    return torch.softmax(up, dim=2)[:, :, index]


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------
def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, per image then averaged over the batch (April-GAN's ``BinaryDiceLoss``).

    ``1 - mean_b (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth)`` with every map flattened;
    ``probs`` and ``target`` (B, ...) in [0, 1]. An all-zero target (a normal image) gives
    ``1 - smooth / (sum(p) + smooth)``, which pushes the whole map towards 0.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    p = probs.reshape(probs.shape[0], -1)
    y = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return 1.0 - dice.mean()


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Binary focal loss on probabilities, mean over every pixel (Lin et al. 2017).

    ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0;
    ``loss = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t = alpha`` / ``1 - alpha``
    (``alpha=None``: 1, as April-GAN / AnomalyCLIP). ``p_t`` is clamped to ``[eps, 1]`` for
    the logarithm. This equals April-GAN's two-channel ``FocalLoss`` on the softmax map
    ``[1 - p, p]`` (without its label smoothing).
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    y = target.to(probs.dtype)
    p_t = probs * y + (1.0 - probs) * (1.0 - y)
    loss = -((1.0 - p_t) ** gamma) * torch.log(p_t.clamp(min=eps))
    if alpha is not None:
        loss = loss * (alpha * y + (1.0 - alpha) * (1.0 - y))
    return loss.mean()


# ---------------------------------------------------------------------------------------
# smoothing
# ---------------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy's rule), float64."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return kernel / kernel.sum()


def _reflect_indices(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's ``reflect`` (half-sample symmetric) extension by ``radius`` each side."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian blur over the last two dims of ``maps`` (..., H, W); ``sigma <= 0`` returns them as is.

    Separable, borders extended by symmetric reflection: equal (to float rounding) to
    ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=truncate)`` per map.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=maps.dtype)
    radius = (kernel.numel() - 1) // 2
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    x = x.index_select(2, _reflect_indices(h, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_indices(w, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.reshape(*lead, h, w)


# ---------------------------------------------------------------------------------------
# Tip-Adapter cache model
# ---------------------------------------------------------------------------------------
def cache_logits(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """``alpha * exp(-beta * (1 - f K^T)) L``: (B, D) queries, (n, D) keys, (n, C) values -> (B, C)."""
    return float(alpha) * torch.exp(-float(beta) * (1.0 - queries @ keys.T)) @ values


def memory_logits(
    queries: torch.Tensor,
    text_weights: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    alpha: float,
    beta: float,
    clip_scale: float = 100.0,
) -> torch.Tensor:
    """Tip-Adapter logits ``clip_scale * f W^T + alpha * exp(-beta * (1 - f K^T)) L`` (queries normalised)."""
    return float(clip_scale) * queries @ text_weights.T + cache_logits(queries, keys, values, alpha, beta)


# ---------------------------------------------------------------------------------------
# prototype / patch cross-attention
# ---------------------------------------------------------------------------------------
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


def sigma_at(size: int, sigma: float, reference_size: int) -> float:
    """A Gaussian sigma given in pixels at ``reference_size``, rescaled to a map of ``size`` pixels."""
    if reference_size <= 0:
        raise ValueError(f"reference_size must be > 0, got {reference_size}")
    return float(sigma) * float(size) / float(reference_size)
