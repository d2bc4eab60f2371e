"""Anomaly maps from patch features: text-similarity maps, grid upsampling, Gaussian smoothing.

Shapes use B images, L layers, N = grid_h * grid_w patches, D the joint embedding width.

- :func:`text_similarity_maps`: per-layer ``softmax(cos(P_l, [t_n, t_a]) / tau)[abnormal]`` on
  the patch grid, bilinearly upsampled to the map size (``upsample="probabilities"``: softmax
  on the grid then upsample, the order of ultraad.md; ``"logits"``: upsample the scaled
  similarities then softmax, April-GAN's order). Text may be shared (2, D), per image
  (B, 2, D) or per image and layer (B, L, 2, D).
- :func:`upsample_grid`: (..., N) patch values -> (..., S, S) bilinear.
- :func:`gaussian_smooth`: separable Gaussian blur of maps in torch, equal to
  ``scipy.ndimage.gaussian_filter(mode="reflect", truncate=4)`` on every map;
  :func:`sigma_at` rescales a sigma given at one resolution (e.g. 4 px at 336) to another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Ways of combining the softmax and the upsampling in :func:`text_similarity_maps`.
UPSAMPLE_ORDERS = ("probabilities", "logits")


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
    index: int | None = 1,
) -> torch.Tensor:
    """Per-layer anomaly maps ``softmax(cos(P_l, T) / tau)[index]``, (B, L, H, W) (``index=None``:
    every class, (B, L, K, H, W)).

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
    pick = slice(None) if index is None else index
    if size is None:
        probs = torch.softmax(logits, dim=2)[:, :, pick]
        return probs.reshape(*probs.shape[:-1], *grid)
    if upsample == "probabilities":
        probs = torch.softmax(logits, dim=2)[:, :, pick]
        return upsample_grid(probs, grid, size, align_corners=align_corners)
    up = upsample_grid(logits, grid, size, align_corners=align_corners)  # (B, L, K, H, W)
    return torch.softmax(up, dim=2)[:, :, pick]


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


def sigma_at(size: int, sigma: float, reference_size: int) -> float:
    """A Gaussian sigma given in pixels at ``reference_size``, rescaled to a map of ``size`` pixels."""
    if reference_size <= 0:
        raise ValueError(f"reference_size must be > 0, got {reference_size}")
    return float(sigma) * float(size) / float(reference_size)
