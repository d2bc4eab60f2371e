"""WinCLIP's window machinery: window geometry, score aggregation and cached window embeddings.

Geometry (anomalib ``utils.make_masks``): a window of scale ``k`` is a ``k x k`` block of
patches; windows slide with ``stride`` patches over the ``grid_h x grid_w`` patch grid,
row-major over window positions; a window's patch indices are row-major inside the window
(patch index = row * grid_w + col, the backbone's token order).

Window embeddings (anomalib ``WinClipModel._get_window_embeddings``): the image goes through
the patch embedding (``conv1``), the class token is prepended and the positional embedding
added, then for each window only the class token and the window's patch tokens are kept
(``[0] + (indices + 1)``: the class token sits at position 0), and the short sequence runs
through ``ln_pre``, every transformer block, ``ln_post`` on the class token and ``proj``.
With all patches of the grid in one window this is exactly ``model.encode_image``.

The embeddings are frozen features of an image, so :class:`WindowEncoder` caches them on
disk with :class:`~bench.feature_cache.FeatureCache` (fp16, keyed by the image key), in
``<backbone cache root>/winclip/``, under a configuration holding the backbone identity,
preprocessing, grid, scales and stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.feature_cache import FeatureCache
from bench.types import ImageItem

if TYPE_CHECKING:
    from bench.backbone import Backbone

#: Sub-folder of the backbone's cache root that holds window embeddings.
CACHE_SUBDIR = "winclip"
#: Bumped when what the window cache stores changes.
WINDOW_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------
def window_indices(grid: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of every window: (n_windows, scale * scale), long.

    On a 4 x 4 grid, scale 2, stride 1 gives 9 windows, the first ``[0, 1, 4, 5]`` and the
    last ``[10, 11, 14, 15]``; scale 3 gives 4 windows.
    """
    grid_h, grid_w = int(grid[0]), int(grid[1])
    if scale < 1 or stride < 1:
        raise ValueError(f"window scale and stride must be >= 1, got scale {scale}, stride {stride}")
    if scale > grid_h or scale > grid_w:
        raise ValueError(f"window scale {scale} does not fit the {grid_h} x {grid_w} patch grid")
    offsets = torch.arange(scale)
    inner = (offsets[:, None] * grid_w + offsets[None, :]).reshape(-1)  # row-major inside a window
    rows = torch.arange(0, grid_h - scale + 1, stride)
    cols = torch.arange(0, grid_w - scale + 1, stride)
    origins = (rows[:, None] * grid_w + cols[None, :]).reshape(-1)  # row-major over positions
    return (origins[:, None] + inner[None, :]).long()


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


# ---------------------------------------------------------------------------------------
# scores and aggregation
# ---------------------------------------------------------------------------------------
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


def association_scores(queries: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """WinCLIP+ visual association: ``min over memory of (1 - cos) / 2`` (anomalib
    ``visual_association_score``; WinCLIP Eq. 4). ``queries`` (B, n, C), ``memory`` (M, C) with
    every reference position of every reference image pooled; both L2-normalised. -> (B, n)."""
    out = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    for b in range(queries.shape[0]):
        for start in range(0, queries.shape[1], chunk):
            block = queries[b, start : start + chunk] @ memory.T
            out[b, start : start + chunk] = (1.0 - block.max(dim=-1).values) / 2.0
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------
# window embeddings (cached)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowFeatures:
    """Window embeddings of B images.

    ``windows[s]`` (B, n_windows_s, D): projected class-token embedding of every window at
    scale ``s`` (not normalised). ``final_patches`` (B, N, W): raw patch tokens of the last
    transformer block, stored only when the backbone's layers do not include that block.
    """

    windows: tuple[torch.Tensor, ...]
    final_patches: torch.Tensor | None


class WindowEncoder:
    """Window embeddings of images through the frozen backbone, cached on disk per image."""

    def __init__(
        self,
        backbone: Backbone,
        scales: Sequence[int],
        stride: int = 1,
        batch_tokens: int = 16384,
    ) -> None:
        self.backbone = backbone
        self.scales = tuple(int(s) for s in scales)
        self.stride = int(stride)
        self.batch_tokens = max(1, int(batch_tokens))
        self.grid = backbone.grid
        self.windows = tuple(window_indices(self.grid, s, self.stride) for s in self.scales)
        self.coverages = tuple(Coverage.of(w, backbone.n_patches) for w in self.windows)
        self.n_windows = tuple(int(w.shape[0]) for w in self.windows)
        #: Whether the last block's patch tokens must be computed here (not in the backbone cache).
        self.store_final_patches = (backbone.depth - 1) not in backbone.layers
        d, n, width = backbone.embed_dim, backbone.n_patches, backbone.width
        length = sum(self.n_windows) * d + (n * width if self.store_final_patches else 0)
        config: dict[str, Any] = {
            key: value
            for key, value in backbone.cache.config.items()
            if key not in ("cache_format", "length", "layers", "layout", "hash")
        }
        config.update(
            {
                "kind": "winclip-window-embeddings",
                "winclip_cache_version": WINDOW_CACHE_VERSION,
                "scales": list(self.scales),
                "stride": self.stride,
                "n_windows": list(self.n_windows),
                "final_patch_tokens": self.store_final_patches,
                "layout": "flat: per scale windows (n_w, D) | last-block patch tokens (N, W) if stored",
            }
        )
        self.cache = FeatureCache(backbone.cache.root / CACHE_SUBDIR, config, length)
        #: Images pushed through the window encoder (cache misses) by this object.
        self.n_encoded = 0

    # -- uncached computation ------------------------------------------------------------
    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + N, W): class + patch tokens with positional embedding and ln_pre."""
        visual = self.backbone.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)  # identity in eval mode
        return visual.ln_pre(x)  # per token: commutes with the window gather

    def _class_embedding(self, sequences: torch.Tensor) -> torch.Tensor:
        """(n, L, W) token sequences (class token first) -> (n, D) projected class embeddings."""
        visual = self.backbone.visual
        x = visual.transformer(sequences)
        return visual.ln_post(x[:, 0]) @ visual.proj

    def encode_tensor(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Window embeddings of preprocessed images, no cache: ([(B, n_w, D) per scale], final patches).

        Float32 on the backbone device. ``final patches`` (B, N, W) are the raw last-block
        patch tokens, computed only when :attr:`store_final_patches`.
        """
        device = self.backbone.device
        with torch.inference_mode():
            tokens = self._tokens(images.to(device, dtype=torch.float32))
            batch = int(tokens.shape[0])
            outputs = []
            for windows in self.windows:
                n_windows = int(windows.shape[0])
                cls_index = torch.zeros(n_windows, 1, dtype=torch.long)
                seq_index = torch.cat([cls_index, windows + 1], dim=1).to(device)  # (n_w, L)
                step = max(1, self.batch_tokens // int(seq_index.shape[1]))
                chunks = []
                # (image, window) pairs in image-major order, gathered one chunk at a time
                for start in range(0, batch * n_windows, step):
                    pairs = torch.arange(start, min(start + step, batch * n_windows), device=device)
                    image, window = pairs // n_windows, pairs % n_windows
                    chunks.append(self._class_embedding(tokens[image[:, None], seq_index[window]]))
                outputs.append(torch.cat(chunks).reshape(batch, n_windows, -1).float())
            final = None
            if self.store_final_patches:
                final = self.backbone.visual.transformer(tokens)[:, 1:].float()
        return outputs, final

    # -- cached access -------------------------------------------------------------------
    def _compute(self, chunk: list[ImageItem]) -> np.ndarray:
        """Window embeddings (and final patch tokens when stored) of images not yet cached."""
        batch = torch.stack([self.backbone.preprocess(item.rgb()) for item in chunk])
        windows, final = self.encode_tensor(batch)
        parts = [w.flatten(1) for w in windows] + ([final.flatten(1)] if final is not None else [])
        self.n_encoded += len(chunk)
        return torch.cat(parts, dim=1).cpu().numpy()

    def encode(self, items: Sequence[ImageItem]) -> WindowFeatures:
        """Window features of ``items`` (cached on disk; only misses are computed, in batches)."""
        items = list(items)
        d, n, width = self.backbone.embed_dim, self.backbone.n_patches, self.backbone.width
        if not items:
            device = self.backbone.device
            empty = tuple(torch.empty(0, count, d, device=device) for count in self.n_windows)
            return WindowFeatures(
                empty, torch.empty(0, n, width, device=device) if self.store_final_patches else None
            )
        rows = self.cache.rows(items, self._compute, self.backbone.spec.batch_size, "window embeddings")
        stacked = np.stack([np.asarray(rows[item.key], dtype=np.float32) for item in items])
        tensor = torch.from_numpy(stacked).to(self.backbone.device)
        out, offset = [], 0
        for count in self.n_windows:
            out.append(tensor[:, offset : offset + count * d].reshape(len(items), count, d))
            offset += count * d
        final = None
        if self.store_final_patches:
            final = tensor[:, offset:].reshape(len(items), n, width)
        return WindowFeatures(windows=tuple(out), final_patches=final)
