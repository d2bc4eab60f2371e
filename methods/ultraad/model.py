"""The UltraAD network on frozen CLIP features (ultraad.md, parts 2-6).

:class:`UltraADNet` holds every trainable part and the frozen class-text memory:

- ``g`` (:class:`ResidualProjection`): ``g(f) = f + ratio * MLP(f)``, last layer zero-initialised;
  the one shared projected class token feeding the classifier and the MiniNet;
- ``prompt`` (:class:`bench.kit.PromptLearner`): shared context ``v_1..v_M`` and the
  two state phrases (``normal ...`` / ``abnormal ...``); ``mininet`` (CoCoOp's meta-net shape,
  ``Linear(D, D/16) - ReLU - Linear(D/16, text_width)``) gives the instance token
  ``pi(x) = MiniNet(g(f))``, passed to the prompt learner as its per-image offset;
- ``adapters`` (:class:`bench.kit.LayerAdapters`): one ``Linear(W -> D)`` per used layer on
  raw patch tokens;
- ``pif`` (:class:`bench.kit.PrototypeCrossAttention`, optional): the prototypes
  ``t̂_n = norm(mean(t_n(x), W_text[normal]))`` and ``t̂_a = norm(mean(t_a(x), W_text[benign],
  W_text[malignant]))`` attend to the adapted patch tokens; residual + L2 norm gives ``T'``;
- ``memory_keys`` (trainable, optional) with the buffers ``memory_values`` (one-hot) and
  ``class_text`` (``W_text``, frozen: a buffer, never a parameter).

:meth:`UltraADNet.forward` returns :class:`Outputs` (per-layer maps of both branches, their
layer means ``M`` and ``M'``, and the class logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.kit import (
    LayerAdapters,
    MetaNet,
    PromptLearner,
    PrototypeCrossAttention,
    cache_logits,
    seeded,
    text_similarity_maps,
)

if TYPE_CHECKING:
    from bench.kit import Backbone

#: PIF key/value sources: each layer's own adapted tokens, or all layers' tokens at once.
PIF_TOKENS = ("per-layer", "all-layers")


class ResidualProjection(nn.Module):
    """``g(f) = f + ratio * MLP(f)``, MLP = ``Linear(D, D/r) - ReLU - Linear(D/r, D)`` (no biases).

    The last layer starts at zero, so ``g`` is the identity at initialisation (CLIP-Adapter's
    bottleneck shape with a residual ratio).
    """

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2) -> None:
        super().__init__()
        hidden = max(1, dim // int(reduction))
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False)
        )
        nn.init.zeros_(self.mlp[2].weight)
        self.ratio = float(ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.ratio * self.mlp(features)


@dataclass
class Outputs:
    """What one forward pass gives for B images (maps at the requested size H x W)."""

    layer_maps: torch.Tensor  # (B, L, H, W): per-layer maps of the IAP prompts
    map: torch.Tensor  # (B, H, W): M, their mean over layers
    fused_layer_maps: torch.Tensor | None  # (B, L, H, W): per-layer maps against T' (PIF)
    fused_map: torch.Tensor | None  # (B, H, W): M', their mean over layers
    logits: torch.Tensor | None  # (B, C): memory-boosted class logits
    prompts: torch.Tensor  # (B, 2, D): normalised [t_n(x), t_a(x)]


class UltraADNet(nn.Module):
    """Trainable parts of UltraAD plus the frozen ``W_text`` (see the module docstring)."""

    #: The method options that are constructor arguments of the same name.
    OPTION_ARGS: ClassVar[tuple[str, ...]] = (
        "ctx_init",
        "n_ctx",
        "ctx_init_std",
        "mininet_reduction",
        "g_reduction",
        "residual_ratio",
        "normalize_class_token",
        "adapter_bias",
        "pif",
        "pif_heads",
        "pif_tokens",
        "pif_normalize_tokens",
        "pif_zero_init",
        "tau",
        "upsample",
        "align_corners",
        "alpha",
        "beta",
        "clip_logit_scale",
    )

    @classmethod
    def from_options(
        cls,
        backbone: Backbone,
        options: Mapping[str, Any],
        *,
        layer_positions: list[int],
        class_text: torch.Tensor,
        memory_keys: torch.Tensor | None,
        memory_values: torch.Tensor | None,
        seed: int,
    ) -> UltraADNet:
        """The network UltraAD's ``options`` (its method config) describe."""
        return cls(
            backbone,
            layer_positions=layer_positions,
            class_text=class_text,
            memory_keys=memory_keys,
            memory_values=memory_values,
            seed=seed,
            state_phrases=(options["normal_prompt"], options["abnormal_prompt"]),
            **{name: options[name] for name in cls.OPTION_ARGS},
        )

    def __init__(
        self,
        backbone: Backbone,
        *,
        layer_positions: list[int],
        class_text: torch.Tensor,
        memory_keys: torch.Tensor | None,
        memory_values: torch.Tensor | None,
        seed: int,
        state_phrases: tuple[str, str],
        ctx_init: str,
        n_ctx: int,
        ctx_init_std: float,
        mininet_reduction: int,
        g_reduction: int,
        residual_ratio: float,
        normalize_class_token: bool,
        adapter_bias: bool,
        pif: bool,
        pif_heads: int,
        pif_tokens: str,
        pif_normalize_tokens: bool,
        pif_zero_init: bool,
        tau: float,
        upsample: str,
        align_corners: bool,
        alpha: float,
        beta: float,
        clip_logit_scale: float,
    ) -> None:
        super().__init__()
        if pif_tokens not in PIF_TOKENS:
            raise ValueError(f"pif_tokens must be one of {PIF_TOKENS}, got {pif_tokens!r}")
        self.backbone = backbone  # plain reference: never a submodule
        self.grid = backbone.grid
        dim, width, text_width = backbone.embed_dim, backbone.width, backbone.text_width
        self.layer_positions = list(layer_positions)
        self.tau, self.upsample, self.align_corners = float(tau), upsample, bool(align_corners)
        self.alpha, self.beta, self.clip_logit_scale = float(alpha), float(beta), float(clip_logit_scale)
        self.normalize_class_token = bool(normalize_class_token)
        self.pif_tokens = pif_tokens

        self.prompt = PromptLearner(
            backbone,
            list(state_phrases),
            n_ctx=n_ctx,
            ctx_init=ctx_init or None,
            init_std=ctx_init_std,
            seed=seed,
            suffix=".",
        )
        # every randomly initialised module is built under the method seed, in a fixed order
        with seeded(seed):
            self.g = ResidualProjection(dim, g_reduction, residual_ratio)
            self.mininet = MetaNet(dim, max(1, dim // int(mininet_reduction)), text_width)
            self.adapters = LayerAdapters(len(self.layer_positions), width, dim, bias=adapter_bias)
            self.pif: PrototypeCrossAttention | None = (
                PrototypeCrossAttention(
                    dim, pif_heads, normalize_tokens=pif_normalize_tokens, zero_init=pif_zero_init
                )
                if pif
                else None
            )
        self.register_buffer("class_text", F.normalize(class_text.detach().float(), dim=-1).clone())
        if memory_keys is not None:
            if memory_values is None:
                raise ValueError("memory keys need memory values")
            self.memory_keys: nn.Parameter | None = nn.Parameter(memory_keys.detach().float().clone())
            self.register_buffer("memory_values", memory_values.detach().float().clone())
        else:
            self.memory_keys = None
            self.memory_values = None
        self.to(backbone.device)

    # -- pieces ---------------------------------------------------------------------------
    @property
    def classifies(self) -> bool:
        return self.memory_keys is not None

    def project_class_token(self, embeds: torch.Tensor) -> torch.Tensor:
        """``g(f)`` of the (normalised, when so configured) projected class tokens (B, D)."""
        f = F.normalize(embeds, dim=-1) if self.normalize_class_token else embeds
        return self.g(f)

    def prototypes(self, prompts: torch.Tensor) -> torch.Tensor:
        """(B, 2, D) normalised [t̂_n, t̂_a] from normalised prompts (B, 2, D) and ``W_text``."""
        text = self.class_text
        normal = (prompts[:, 0] + text[0]) / 2.0
        abnormal = (prompts[:, 1] + text[1] + text[2]) / 3.0
        return F.normalize(torch.stack([normal, abnormal], dim=1), dim=-1)

    def fused_text(self, prompts: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        """``T'``: (B, L, 2, D) with per-layer PIF, (B, 2, D) with all layers' tokens at once."""
        assert self.pif is not None
        protos = self.prototypes(prompts)
        batch, n_layers, n_tokens, dim = adapted.shape
        if self.pif_tokens == "per-layer":
            queries = protos[:, None].expand(-1, n_layers, -1, -1).reshape(batch * n_layers, 2, dim)
            fused = self.pif(queries, adapted.reshape(batch * n_layers, n_tokens, dim))
            return fused.reshape(batch, n_layers, 2, dim)
        return self.pif(protos, adapted.reshape(batch, n_layers * n_tokens, dim))

    def maps(self, adapted: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
        return text_similarity_maps(
            adapted,
            text,
            self.grid,
            size,
            tau=self.tau,
            upsample=self.upsample,
            align_corners=self.align_corners,
        )

    # -- forward --------------------------------------------------------------------------
    def forward(
        self, embeds: torch.Tensor, patch_tokens: torch.Tensor, size: int, *, fuse: bool = True
    ) -> Outputs:
        """``embeds`` (B, D) projected class tokens; ``patch_tokens`` (B, L_used, N, W) raw tokens."""
        gf = self.project_class_token(embeds)
        prompts = F.normalize(self.prompt(offset=self.mininet(gf)), dim=-1)  # (B, 2, D)
        adapted = self.adapters(patch_tokens)  # (B, L, N, D)
        layer_maps = self.maps(adapted, prompts, size)
        fused_layer_maps = fused_map = None
        if self.pif is not None and fuse:
            fused_layer_maps = self.maps(adapted, self.fused_text(prompts, adapted), size)
            fused_map = fused_layer_maps.mean(dim=1)
        logits = None
        if self.memory_keys is not None:
            assert self.memory_values is not None
            logits = cache_logits(
                F.normalize(gf, dim=-1),
                self.memory_keys,
                self.memory_values,
                self.class_text,
                self.alpha,
                self.beta,
                self.clip_logit_scale,
            )
        return Outputs(
            layer_maps=layer_maps,
            map=layer_maps.mean(dim=1),
            fused_layer_maps=fused_layer_maps,
            fused_map=fused_map,
            logits=logits,
            prompts=prompts,
        )
