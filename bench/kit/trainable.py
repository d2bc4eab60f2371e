"""Trainable passes through the frozen image tower: visual prompts and in-forward adapters.

A method that trains THROUGH the image tower (AdaCLIP's visual prompts, MVFA's residual
adapters, a plugin's own) runs blocks ``start..`` under autograd with its learnable parts
inserted, while the stream entering block ``start`` is a frozen feature like any other: it
is requested (variant ``stream``), computed once per image and cached, so every image still
passes the frozen prefix once per grid. Weights stay frozen: gradients reach only the
method's prompts and hook parameters (and whatever they are computed from).

    tower_pass = TrainablePass(ctx.backbone, start=5)
    prefix = tower_pass.prefix(items)                        # cached (B, 1 + N, W)
    out = tower_pass(prefix, prompts={6: my_tokens}, hooks={11: my_adapter})
    out.patch_tokens, out.cls_tokens, out.embeds             # (B, L, N, W), (B, L, W), (B, D)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from bench.kit.clip import Backbone
from bench.kit.requests import FeatureRequest
from bench.kit.tower import BlockHook
from bench.types import ImageItem


@dataclass
class PassOutput:
    """What a trainable pass gives for B images (with gradients where learnable parts fed in)."""

    embeds: torch.Tensor  # (B, D): ln_post(class token after the last block) @ proj
    cls_tokens: torch.Tensor  # (B, L, W): raw class token after each requested block
    patch_tokens: torch.Tensor  # (B, L, N, W): raw patch tokens after each requested block
    final_tokens: torch.Tensor  # (B, 1 + N, W): the stream after the last block, prompts removed


class TrainablePass:
    """Blocks ``start ..`` of the frozen tower on a cached prefix (see the module docstring).

    ``layers`` (default: the run's) are the blocks whose outputs are returned; all must be
    ``>= start``. ``input_size`` defaults to the run's; ``resize`` as in
    :class:`~bench.kit.requests.FeatureRequest`.
    """

    def __init__(
        self,
        backbone: Backbone,
        start: int,
        *,
        layers: Sequence[int] | None = None,
        input_size: int | None = None,
        resize: str = "bicubic",
    ) -> None:
        self.backbone = backbone
        # the prefix is cached once per (image, block, size), whichever blocks a pass returns
        self.request = backbone.resolve(
            FeatureRequest.of("stream", input_size=input_size, resize=resize, block=int(start))
        )
        self.start = int(start)
        self.layers: tuple[int, ...] = backbone.resolve(FeatureRequest.of(layers=layers)).layers or ()
        if self.layers[0] < self.start:
            raise ValueError(f"requested blocks {list(self.layers)} start before the trainable block {start}")
        self.tower = backbone.tower(self.request.input_size, self.request.resize)

    def prefix(self, items: Sequence[ImageItem]) -> torch.Tensor:
        """The cached frozen stream entering block ``start``: (B, 1 + N, W)."""
        return self.backbone.features(items, self.request)["tokens"]

    def __call__(
        self,
        prefix: torch.Tensor,
        *,
        prompts: Mapping[int, torch.Tensor] | None = None,
        hooks: Mapping[int, BlockHook] | None = None,
    ) -> PassOutput:
        run = self.tower.run_blocks(prefix, self.start, collect=self.layers, prompts=prompts, hooks=hooks)
        stream = torch.stack([run.collected[i] for i in self.layers], dim=1)
        final = run.tokens[:, : prefix.shape[1]]
        return PassOutput(
            embeds=self.tower.pool(final),
            cls_tokens=stream[:, :, 0],
            patch_tokens=stream[:, :, 1:],
            final_tokens=final,
        )
