"""Forward variants: named ways of running the frozen image tower, registered by name.

A :class:`ForwardVariant` says which fields it returns per image (:meth:`~ForwardVariant.fields`,
shapes without the batch dimension) and computes them for a batch of preprocessed images
on a :class:`~bench.kit.tower.VisionTower` (:meth:`~ForwardVariant.compute`). The toolkit
caches every field as fp16 per image under a key made of the backbone identity, the
variant's name and version, and the request (:meth:`~ForwardVariant.cache_config`).

Built in:

- ``standard``: open_clip's forward; ``embeds`` (D), ``cls_tokens`` (L, W), ``patch_tokens``
  (L, N, W) after the requested blocks.
- ``windows`` (WinCLIP): options ``scales`` (window sizes in patches) and ``stride``. For each
  scale ``s``, ``windows_s`` (n_windows, D): the class token and ONLY the window's patch
  tokens (taken after ``ln_pre``, a per-token op) run through every block, then ``ln_post``
  and ``proj`` on the class token (anomalib's ``_get_window_embeddings``); with the whole grid
  as one window this is ``encode_image``. When the last block is not among the requested
  layers, ``final_patches`` (N, W) holds its raw patch tokens.
- ``vv-attention`` (AnomalyCLIP's DPAM): option ``start`` (first block with the parallel
  path). The original path is the standard forward; from block ``start`` on a second stream
  ``x_vv`` accumulates ``x_vv <- x_vv + out_proj(softmax(v v^T / sqrt(d_head)) v)`` with ``v``
  the value projection of ``ln_1`` of the ORIGINAL stream entering that block (the official
  dual-path block: its attention always reads the original path, and the new path skips the
  FFN); ``x_vv`` starts as the stream entering block ``start``. Fields: ``embeds`` (D, from
  the original path), ``cls_token`` (W: the original path's raw class token after the last
  block, no ``ln_post``), ``vv_tokens`` (L, N, W) after the requested blocks (requested
  blocks before ``start`` give the original path's tokens, as the official code). One pass
  through the tower gives both paths.
- ``stream``: option ``block`` (k): the token stream entering block k, ``tokens`` (1 + N, W):
  the frozen prefix of a trainable pass through blocks k.. (visual prompts, adapters).

:func:`register_variant` adds a plugin's variant; names are unique.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from bench.kit.requests import FeatureRequest
from bench.kit.tower import VisionTower

_VARIANTS: dict[str, ForwardVariant] = {}


class ForwardVariant(ABC):
    """A named way of running the frozen tower (see the module docstring)."""

    #: Registry name, used in :class:`~bench.kit.requests.FeatureRequest`.
    name: ClassVar[str]
    #: Bumped when what the variant computes changes (part of the cache key).
    version: ClassVar[int] = 1
    #: Sub-folder of the cache root holding this variant's entries.
    cache_subdir: ClassVar[str] = ""

    @abstractmethod
    def fields(
        self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, tuple[int, ...]]:
        """Field name -> per-image shape, in storage order."""

    @abstractmethod
    def compute(
        self, tower: VisionTower, images: torch.Tensor, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, torch.Tensor]:
        """Every field for a batch of preprocessed images: name -> (B, *shape), under no grad."""

    def cache_config(
        self, base: Mapping[str, Any], tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, Any]:
        """What the cache folder holds: the backbone's description plus the variant's settings."""
        return {
            **base,
            "variant": self.name,
            "variant_version": self.version,
            "layers": list(layers),
            "options": [list(pair) for pair in request.options],
            "fields": {name: list(shape) for name, shape in self.fields(tower, layers, request).items()},
        }

    def check(self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest) -> None:  # noqa: B027
        """Raise ``ValueError`` for a request this variant cannot serve (default: accept)."""


def register_variant(variant: ForwardVariant) -> ForwardVariant:
    """Register ``variant`` under its name (a plugin registers its own at import time)."""
    name = getattr(variant, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"forward variant {variant!r} has no name")
    existing = _VARIANTS.get(name)
    if existing is not None and type(existing) is not type(variant):
        raise ValueError(f"forward variant {name!r} is already registered ({type(existing).__name__})")
    _VARIANTS[name] = variant
    return variant


def get_variant(name: str) -> ForwardVariant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown forward variant {name!r}; registered: {sorted(_VARIANTS)}") from None


def variant_names() -> list[str]:
    return sorted(_VARIANTS)


# ---------------------------------------------------------------------------------------
# standard
# ---------------------------------------------------------------------------------------
class Standard(ForwardVariant):
    name = "standard"

    def fields(
        self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, tuple[int, ...]]:
        n = len(layers)
        return {
            "embeds": (tower.embed_dim,),
            "cls_tokens": (n, tower.width),
            "patch_tokens": (n, tower.n_patches, tower.width),
        }

    def cache_config(
        self, base: Mapping[str, Any], tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, Any]:
        # The configuration the cache had before variants existed, so old cache folders stay valid.
        return {
            **base,
            "layers": list(layers),
            "layout": "flat: embeds (D) | cls_tokens (L, W) | patch_tokens (L, N, W)",
        }

    def compute(
        self, tower: VisionTower, images: torch.Tensor, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, torch.Tensor]:
        if tower.native:
            out = tower.forward_intermediates(images, layers)
            patches, prefix = out["image_intermediates"], out["image_intermediates_prefix"]
            if len(patches) != len(layers) or len(prefix) != len(layers):
                raise RuntimeError(f"open_clip returned {len(patches)} intermediates for layers {layers}")
            return {
                "embeds": out["image_features"].float(),
                "cls_tokens": torch.stack([p[:, 0] for p in prefix], dim=1).float(),
                "patch_tokens": torch.stack(patches, dim=1).float(),
            }
        run = tower.run_blocks(tower.embed(images), collect=layers)
        stream = torch.stack([run.collected[i] for i in layers], dim=1)
        return {
            "embeds": tower.pool(run.tokens).float(),
            "cls_tokens": stream[:, :, 0].float(),
            "patch_tokens": stream[:, :, 1:].float(),
        }


# ---------------------------------------------------------------------------------------
# windows (WinCLIP)
# ---------------------------------------------------------------------------------------
def window_indices(grid: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of every window: (n_windows, scale * scale), long.

    Windows of ``scale x scale`` patches slide by ``stride`` over the row-major patch grid,
    row-major over positions, row-major inside a window. On a 4 x 4 grid, scale 2, stride 1
    gives 9 windows, the first ``[0, 1, 4, 5]`` and the last ``[10, 11, 14, 15]``.
    """
    grid_h, grid_w = int(grid[0]), int(grid[1])
    if scale < 1 or stride < 1:
        raise ValueError(f"window scale and stride must be >= 1, got scale {scale}, stride {stride}")
    if scale > grid_h or scale > grid_w:
        raise ValueError(f"window scale {scale} does not fit the {grid_h} x {grid_w} patch grid")
    offsets = torch.arange(scale)
    inner = (offsets[:, None] * grid_w + offsets[None, :]).reshape(-1)
    rows = torch.arange(0, grid_h - scale + 1, stride)
    cols = torch.arange(0, grid_w - scale + 1, stride)
    origins = (rows[:, None] * grid_w + cols[None, :]).reshape(-1)
    return (origins[:, None] + inner[None, :]).long()


class Windows(ForwardVariant):
    name = "windows"
    # The folder and configuration WinCLIP's own cache used, so old cache folders stay valid.
    cache_subdir = "winclip"
    #: Tokens per transformer call (memory only, never part of the result).
    batch_tokens: ClassVar[int] = 16384

    @staticmethod
    def settings(request: FeatureRequest) -> tuple[tuple[int, ...], int]:
        scales = tuple(int(s) for s in request.option("scales", (2, 3)))
        return scales, int(request.option("stride", 1))

    def check(self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest) -> None:
        scales, stride = self.settings(request)
        for scale in scales:
            window_indices(tower.grid, scale, stride)

    def fields(
        self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, tuple[int, ...]]:
        scales, stride = self.settings(request)
        out: dict[str, tuple[int, ...]] = {
            f"windows_{s}": (int(window_indices(tower.grid, s, stride).shape[0]), tower.embed_dim)
            for s in scales
        }
        if tower.depth - 1 not in layers:
            out["final_patches"] = (tower.n_patches, tower.width)
        return out

    def cache_config(
        self, base: Mapping[str, Any], tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, Any]:
        scales, stride = self.settings(request)
        grid = tower.grid
        return {
            **base,
            "kind": "winclip-window-embeddings",
            "winclip_cache_version": 1,
            "scales": list(scales),
            "stride": stride,
            "n_windows": [int(window_indices(grid, s, stride).shape[0]) for s in scales],
            "final_patch_tokens": (tower.depth - 1) not in layers,
            "layout": "flat: per scale windows (n_w, D) | last-block patch tokens (N, W) if stored",
        }

    def compute(
        self, tower: VisionTower, images: torch.Tensor, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, torch.Tensor]:
        scales, stride = self.settings(request)
        device = images.device
        tokens = tower.embed(images)
        batch = int(tokens.shape[0])
        out: dict[str, torch.Tensor] = {}
        for scale in scales:
            windows = window_indices(tower.grid, scale, stride)
            n_windows = int(windows.shape[0])
            cls_index = torch.zeros(n_windows, 1, dtype=torch.long)
            sequence = torch.cat([cls_index, windows + 1], dim=1).to(device)  # class token first
            step = max(1, self.batch_tokens // int(sequence.shape[1]))
            chunks = []
            for start in range(0, batch * n_windows, step):  # (image, window) pairs, image-major
                pairs = torch.arange(start, min(start + step, batch * n_windows), device=device)
                image, window = pairs // n_windows, pairs % n_windows
                short = tokens[image[:, None], sequence[window]]
                chunks.append(tower.pool(tower.run_blocks(short).tokens))
            out[f"windows_{scale}"] = torch.cat(chunks).reshape(batch, n_windows, -1).float()
        if tower.depth - 1 not in layers:
            out["final_patches"] = tower.run_blocks(tokens).tokens[:, 1:].float()
        return out


# ---------------------------------------------------------------------------------------
# vv-attention (AnomalyCLIP's DPAM)
# ---------------------------------------------------------------------------------------
def vv_attention(tokens: torch.Tensor, weights: Any) -> torch.Tensor:
    """One block's V-V self-attention output ``out_proj(softmax(v_h v_h^T / sqrt(d)) v_h)``.

    ``tokens`` (B, L, W) are the block's ``ln_1`` output; ``v = tokens W_v^T + b_v`` split
    into heads of width d; the query and key are the value itself (AnomalyCLIP's ``q = k = v``).
    """
    width = tokens.shape[-1]
    heads = weights.heads
    head = width // heads
    w_v = weights.in_weight[2 * width :]
    b_v = weights.in_bias[2 * width :] if weights.in_bias is not None else None
    v = torch.nn.functional.linear(tokens, w_v, b_v)
    batch, length = v.shape[:2]
    v = v.reshape(batch, length, heads, head).transpose(1, 2)  # (B, h, L, d)
    attn = torch.softmax((v @ v.transpose(-2, -1)) * (head**-0.5), dim=-1)
    mixed = (attn @ v).transpose(1, 2).reshape(batch, length, width)
    return torch.nn.functional.linear(mixed, weights.out_weight, weights.out_bias)


class VVAttention(ForwardVariant):
    name = "vv-attention"

    @staticmethod
    def start(tower: VisionTower, request: FeatureRequest) -> int:
        start = request.option("start")
        if start is None:
            raise ValueError("the vv-attention variant needs the option start (first dual-path block)")
        start = int(start)
        if not 0 <= start < tower.depth:
            raise ValueError(f"vv-attention start {start} is outside 0..{tower.depth - 1}")
        return start

    def check(self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest) -> None:
        self.start(tower, request)

    def fields(
        self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, tuple[int, ...]]:
        return {
            "embeds": (tower.embed_dim,),
            "cls_token": (tower.width,),
            "vv_tokens": (len(layers), tower.n_patches, tower.width),
        }

    def compute(
        self, tower: VisionTower, images: torch.Tensor, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, torch.Tensor]:
        start = self.start(tower, request)
        wanted = set(layers)
        x = tower.embed(images)
        vv: torch.Tensor | None = None
        collected: dict[int, torch.Tensor] = {}
        for block in range(tower.depth):
            if block >= start:
                update = vv_attention(tower.ln_1(block, x), tower.attention(block))
                vv = (x if vv is None else vv) + update
            x = tower.run_blocks(x, block, block + 1).tokens
            if block in wanted:
                collected[block] = (vv if vv is not None else x)[:, 1:]
        return {
            "embeds": tower.pool(x).float(),
            "cls_token": x[:, 0].float(),
            "vv_tokens": torch.stack([collected[i] for i in layers], dim=1).float(),
        }


# ---------------------------------------------------------------------------------------
# stream (the frozen prefix of a trainable pass)
# ---------------------------------------------------------------------------------------
class Stream(ForwardVariant):
    name = "stream"

    @staticmethod
    def block(tower: VisionTower, request: FeatureRequest) -> int:
        block = int(request.option("block", 0))
        if not 0 <= block < tower.depth:
            raise ValueError(f"stream block {block} is outside 0..{tower.depth - 1}")
        return block

    def check(self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest) -> None:
        self.block(tower, request)

    def cache_config(
        self, base: Mapping[str, Any], tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, Any]:
        config = super().cache_config(base, tower, layers, request)
        del config["layers"]  # the prefix does not depend on which blocks a pass returns later
        return config

    def fields(
        self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, tuple[int, ...]]:
        return {"tokens": (1 + tower.n_patches, tower.width)}

    def compute(
        self, tower: VisionTower, images: torch.Tensor, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, torch.Tensor]:
        block = self.block(tower, request)
        return {"tokens": tower.run_blocks(tower.embed(images), 0, block).tokens.float()}


for _variant in (Standard(), Windows(), VVAttention(), Stream()):
    register_variant(_variant)
