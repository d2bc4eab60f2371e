"""The frozen CLIP image tower, read-only, at one input size: the toolkit's only ViT forward.

:class:`VisionTower` wraps an open_clip ``VisionTransformer`` without changing it. Forward
variants and trainable passes compose its pieces:

- :meth:`VisionTower.embed`: patch embedding (``conv1``), class token, positional embedding
  (resized on a copy for another input size: ``"bicubic"`` antialiased as open_clip resizes
  it when loading, or ``"bilinear"`` as AnomalyCLIP's official code), ``ln_pre``: (B, 1 + N, W);
- :meth:`VisionTower.run_blocks`: blocks ``start..stop - 1`` with optional residual hooks
  after chosen blocks and learnable tokens inserted before chosen blocks (visual prompts),
  collecting the token stream after chosen blocks; runs under autograd when the caller
  does (weights never receive gradients: they are frozen);
- :meth:`VisionTower.pool` (``ln_post`` of the class token, ``@ proj``) and
  :meth:`VisionTower.project` (any tokens through ``ln_post`` and ``proj``);
- :meth:`VisionTower.attention` (the frozen q/k/v/out weights of one block, for variants
  such as AnomalyCLIP's V-V attention) and :meth:`VisionTower.forward_intermediates`
  (open_clip's own forward at the model's native size).

Nothing here registers the tower's modules on a caller's ``nn.Module``, so a method's
``parameters()`` never include CLIP weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

#: How a positional embedding may be resized: open_clip's rule, or AnomalyCLIP's.
RESIZE_MODES = ("bicubic", "bilinear")

#: ``hook(block, tokens) -> tokens``: applied to the stream after ``block`` (in-forward adapters).
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionWeights:
    """The frozen attention parameters of one block (``nn.MultiheadAttention`` layout)."""

    in_weight: torch.Tensor  # (3W, W): q, k, v stacked
    in_bias: torch.Tensor | None  # (3W,)
    out_weight: torch.Tensor  # (W, W)
    out_bias: torch.Tensor | None  # (W,)
    heads: int


@dataclass
class BlockRun:
    """What :meth:`VisionTower.run_blocks` returns: the final stream and the collected ones.

    ``tokens`` (B, 1 + N [+ P], W) after the last block run (with inserted prompt tokens, if
    any, at the end); ``collected[block]`` (B, 1 + N, W) the stream after that block, WITHOUT
    prompt tokens.
    """

    tokens: torch.Tensor
    collected: dict[int, torch.Tensor]
    n_prompts: int = 0


class VisionTower:
    """A frozen open_clip ViT image tower at ``input_size`` (see the module docstring)."""

    def __init__(self, visual: VisionTransformer, input_size: int, resize: str = "bicubic") -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"positional embedding resize must be one of {RESIZE_MODES}, got {resize!r}")
        self._visual = visual
        self.resize = resize
        patch = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
        if input_size % patch[0] or input_size % patch[1]:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch}")
        self.input_size = int(input_size)
        self.patch_size = (int(patch[0]), int(patch[1]))
        self.grid = (self.input_size // self.patch_size[0], self.input_size // self.patch_size[1])
        self.n_patches = self.grid[0] * self.grid[1]
        self.width = int(visual.conv1.out_channels)
        self.embed_dim = int(visual.output_dim)
        self.depth = len(visual.transformer.resblocks)
        self.native = tuple(int(v) for v in visual.grid_size) == self.grid
        self._positional = visual.positional_embedding if self.native else self._resized_positional()

    def _resized_positional(self) -> torch.Tensor:
        visual = self._visual
        pos = visual.positional_embedding.detach()
        token, grid = pos[:1], pos[1:]
        old = tuple(int(v) for v in visual.grid_size)
        grid = grid.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
        if self.resize == "bicubic":  # open_clip's resize_pos_embed
            grid = F.interpolate(
                grid.float(), size=self.grid, mode="bicubic", antialias=True, align_corners=False
            )
        else:  # AnomalyCLIP's VisionTransformer.forward
            grid = F.interpolate(grid.float(), size=self.grid, mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(self.n_patches, -1).to(pos.dtype)
        return torch.cat([token, grid], dim=0)

    @property
    def device(self) -> torch.device:
        return self._visual.conv1.weight.device

    # -- pieces -----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, 1 + N, W): the stream entering block 0."""
        visual = self._visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional.to(x.dtype)
        x = visual.patch_dropout(x)  # identity in eval mode
        return visual.ln_pre(x)

    def run_blocks(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
        *,
        collect: Sequence[int] = (),
        hooks: Mapping[int, BlockHook] | None = None,
        prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> BlockRun:
        """Run blocks ``start .. stop - 1`` on ``tokens`` (the stream entering block ``start``).

        ``prompts[b]`` (B, P, W) or (P, W): learnable tokens appended to the stream before
        block ``b``, replacing any inserted before an earlier block (AdaCLIP's deep visual
        prompts); ``hooks[b]`` maps the stream after block ``b`` (prompt tokens stripped before
        the hook sees it and put back after) to a new one (MVFA's residual adapters).
        ``collect`` names blocks whose output stream is returned.
        """
        stop = self.depth if stop is None else int(stop)
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"blocks {start}..{stop - 1} are outside 0..{self.depth - 1}")
        wanted = set(int(b) for b in collect)
        outside = sorted(b for b in wanted | set(hooks or {}) | set(prompts or {}) if not start <= b < stop)
        if outside:
            raise ValueError(f"blocks {outside} are outside the blocks run ({start}..{stop - 1})")
        blocks = self._visual.transformer.resblocks
        n_tokens = int(tokens.shape[1])  # 1 + N, or fewer (WinCLIP's window sequences)
        x, n_prompts = tokens, 0
        collected: dict[int, torch.Tensor] = {}
        for index in range(start, stop):
            if prompts and index in prompts:
                extra = prompts[index]
                if extra.dim() == 2:
                    extra = extra.unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :n_tokens], extra.to(x.dtype)], dim=1)
                n_prompts = int(extra.shape[1])
            x = blocks[index](x)
            if hooks and index in hooks:
                stream = hooks[index](index, x[:, :n_tokens])
                x = torch.cat([stream, x[:, n_tokens:]], dim=1) if n_prompts else stream
            if index in wanted:
                collected[index] = x[:, :n_tokens]
        return BlockRun(x, collected, n_prompts)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, W) stream -> (B, D): ``ln_post`` of the class token, then ``@ proj``."""
        visual = self._visual
        return visual.ln_post(tokens[:, 0]) @ visual.proj

    def ln_post(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final layer norm on tokens of any leading shape (no projection)."""
        return self._visual.ln_post(tokens)

    def proj(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens @ proj`` WITHOUT ``ln_post`` (AnomalyCLIP's official global feature)."""
        return tokens @ self._visual.proj

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw width-W tokens (any leading shape) -> joint space D: ``ln_post(tokens) @ proj``."""
        if tokens.shape[-1] != self.width:
            raise ValueError(f"project expects last dim {self.width}, got {tuple(tokens.shape)}")
        return self._visual.ln_post(tokens) @ self._visual.proj

    def attention(self, block: int) -> AttentionWeights:
        """The frozen attention weights of ``block`` (read them; never modify them)."""
        blk = self._visual.transformer.resblocks[block]
        attn = blk.attn
        if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise ValueError(f"block {block} has no standard packed multi-head attention")
        return AttentionWeights(
            attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, attn.num_heads
        )

    def ln_1(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        """The pre-attention layer norm of ``block``."""
        return self._visual.transformer.resblocks[block].ln_1(tokens)

    def forward_intermediates(self, images: torch.Tensor, layers: Sequence[int]) -> dict[str, object]:
        """open_clip's own ``forward_intermediates`` (native input size only)."""
        if not self.native:
            raise ValueError("open_clip's forward runs at the model's native input size only")
        return self._visual.forward_intermediates(
            images, indices=list(layers), output_fmt="NLC", output_extra_tokens=True
        )
