"""VCP-CLIP's learnable parts: Pre-VCP class tokens, VPT-style text prompts, Post-VCP attention.

Reimplemented from the official ``models/pre_vcp.py``, ``models/post_vcp.py``,
``models/prompt_ensemble.py`` and ``models/model_CLIP.py`` (xiaozhen228/VCP-CLIP; see
docs/vcpclip.md). Shapes: B images, W_t the text width, D the joint embedding width, W the
image tower width, N patches, r class tokens, n prompt tokens per text block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import MethodError
from bench.kit import Backbone, make_generator

#: Marks the class slot in a template (the official ``<|class|>`` token).
SLOT = "{}"
#: A one-token stand-in for the class slot while tokenising (its embedding is replaced).
_PLACEHOLDER = "x"


def _tokens(backbone: Backbone, text: str) -> list[int]:
    """BPE ids of ``text`` without start / end tokens ([] for an empty text)."""
    text = text.strip()
    if not text:
        return []
    ids = backbone.tokenize([text])[0]
    end = int(ids.argmax())
    return [int(i) for i in ids[1:end]]


def match_width(features: torch.Tensor, width: int) -> torch.Tensor:
    """(B, C) -> (B, width): unchanged when C == width (every CLIP: the official code asserts it);
    otherwise resampled linearly along the channels (only for test models whose joint width
    differs from the text width)."""
    if features.shape[-1] == width:
        return features
    return F.interpolate(features.unsqueeze(1), size=width, mode="linear", align_corners=True).squeeze(1)


class ContextPrompting(nn.Module):
    """Pre-VCP (``Context_Prompting``): r class tokens per image from its global embedding.

    ``class = query + Conv1d(1 -> r, kernel 3, padding same)(g)`` with ``g`` the (not
    normalised) global image embedding seen as a 1-channel signal of length W_t; ``query``
    (1, r, W_t) ~ truncated N(0, 1) on [-2, 2]; ``use_global=False``: the query alone.
    """

    def __init__(self, width: int, length: int, use_global: bool) -> None:
        super().__init__()
        self.width = int(width)
        self.use_global = bool(use_global)
        self.query = nn.Parameter(torch.empty(1, length, width))
        nn.init.trunc_normal_(self.query)  # official: std 1, cut at +-2
        self.conv = nn.Conv1d(1, length, 3, stride=1, padding="same")  # PyTorch's default init

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, D) global embeddings -> (B, r, W_t) class tokens."""
        query = self.query.expand(image.shape[0], -1, -1)
        if not self.use_global:
            return query
        return query + self.conv(match_width(image, self.width).unsqueeze(1))


class PostVCP(nn.Module):
    """Post-VCP (``Zero_Parameter``): text embeddings attend to one layer's patch tokens.

    ``q = T W_q + b``, ``k = P W_k + b``, ``v = P W_v + b`` split into ``heads``; per head
    ``softmax_n(q . k_n)`` (NO ``1/sqrt(d)`` scaling: the official ``scale`` is never used)
    weights the values; heads concatenated, ``W_o``, L2-normalised. No residual, norm or
    dropout. The official 1x1 ``Conv1d`` layers are these ``Linear`` layers (same weights and
    the same default initialisation).
    """

    def __init__(self, text_dim: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = int(heads)
        self.q = nn.Linear(text_dim, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``text`` (B, K, D), ``patches`` (B, N, W) (normalised) -> (B, K, W), normalised."""
        batch, k_text = text.shape[:2]
        n_patches, width = patches.shape[1:]
        head = width // self.heads
        q = self.q(text).reshape(batch, k_text, self.heads, head)
        k = self.k(patches).reshape(batch, n_patches, self.heads, head)
        v = self.v(patches).reshape(batch, n_patches, self.heads, head)
        attention = torch.einsum("bkhc,bnhc->bhkn", q, k).softmax(dim=-1)
        mixed = torch.einsum("bhkn,bnhc->bkhc", attention, v).reshape(batch, k_text, width)
        return F.normalize(self.out(mixed), dim=-1)


class TemplateSlots:
    """Frozen token ids and embeddings of the templates with the class slot opened to r tokens.

    Per template: ``[SOS] prefix [c_1 .. c_r] suffix [EOT] pad`` cut to the context length
    (the last r - 1 padding tokens dropped, as the official ``encode_text``); the ids hold 0
    at the class positions, so pooling finds the moved EOT token.
    """

    def __init__(self, backbone: Backbone, templates: Sequence[str], length: int, extra: int = 0) -> None:
        self.length = int(length)
        self.prefixes: list[torch.Tensor] = []
        self.suffixes: list[torch.Tensor] = []
        ids_rows = []
        placeholder = _tokens(backbone, _PLACEHOLDER)
        for template in templates:
            before, after = template.split(SLOT)
            ids = backbone.tokenize([template.replace(SLOT, _PLACEHOLDER)])
            ctx = int(ids.shape[1])
            slot = 1 + len(_tokens(backbone, before))
            expected = [*_tokens(backbone, before), *placeholder, *_tokens(backbone, after)]
            end = int(ids[0].argmax())
            if _tokens(backbone, template.replace(SLOT, _PLACEHOLDER)) != expected:
                raise MethodError(
                    f"method 'vcpclip': template {template!r}: the class slot '{{}}' must stand apart "
                    "from the words around it"
                )
            if end + self.length + extra > ctx or int(ids[0, -1]) != 0:
                raise MethodError(
                    f"method 'vcpclip': template {template!r} with {self.length} class tokens and {extra} "
                    f"prompt tokens is longer than the text encoder's {ctx} tokens"
                )
            embedding = backbone.token_embeddings(ids)[0]
            keep = ctx - self.length + 1  # the official slice [slot + 1 : ctx - r + 1]
            self.prefixes.append(embedding[:slot].clone())
            self.suffixes.append(embedding[slot + 1 : keep].clone())
            row = torch.cat([ids[0, :slot], ids.new_zeros(self.length), ids[0, slot + 1 : keep]])
            ids_rows.append(row)
        self.ids = torch.stack(ids_rows)  # (T, ctx)

    def embeddings(self, class_tokens: torch.Tensor) -> torch.Tensor:
        """(B, r, W_t) class tokens -> (B, T, ctx, W_t) prompt embeddings, template-major per image."""
        batch = class_tokens.shape[0]
        rows = [
            torch.cat(
                [prefix.expand(batch, -1, -1), class_tokens.to(prefix.dtype), suffix.expand(batch, -1, -1)],
                dim=1,
            )
            for prefix, suffix in zip(self.prefixes, self.suffixes, strict=True)
        ]
        return torch.stack(rows, dim=1)


class TextPrompts(nn.Module):
    """The official VPT-style text prompts (``model_CLIP.py``: ``_init_prompt``, ``encode_text``,
    ``forward_deep_prompt``).

    ``shallow`` (n, W_t) and ``deep`` (blocks - 1, n, W_t), uniform(-1, 1), all through one
    ``proj = Linear(W_t, W_t)`` (kaiming normal, fan out) and dropout: the shallow tokens are
    inserted right after SOS AFTER the positional embedding (they carry none), the deep ones
    replace them entering text blocks 1..; after the last block ``norm = LayerNorm(W_t, eps 1e-6)``
    and then CLIP's ``ln_final``. ``deep=False``: no prompts and no extra norm (official
    ``total_d_layer_len 0``).
    """

    def __init__(self, width: int, n_blocks: int, length: int, dropout: float, deep: bool) -> None:
        super().__init__()
        self.deep_enabled = bool(deep)
        self.dropout = float(dropout)
        self.generator: torch.Generator | None = None
        if self.deep_enabled:
            self.shallow = nn.Parameter(torch.empty(1, length, width).uniform_(-1.0, 1.0))
            self.deep = nn.Parameter(torch.empty(n_blocks - 1, length, width).uniform_(-1.0, 1.0))
            self.proj = nn.Linear(width, width)
            nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
            self.norm = nn.LayerNorm(width, eps=1e-6)

    def seed(self, seed: int) -> None:
        """Seed the dropout masks (a private generator: the global RNG is never touched)."""
        self.generator = make_generator(seed)

    def dropout_masks(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Inverted-dropout masks (``nn.Dropout``'s rule): 0 with probability p, else 1 / (1 - p)."""
        if self.generator is None:
            raise RuntimeError("TextPrompts.seed() must be called before training")
        keep = torch.rand(shape, generator=self.generator) >= self.dropout
        return (keep.float() / (1.0 - self.dropout)).to(device)

    def tokens(self, batch: int, states: int) -> torch.Tensor:
        """Projected prompt tokens (B, states, blocks, n, W_t): index 0 enters block 0 (inserted),
        index l >= 1 replaces it entering block l; an independent dropout mask per image and
        state in training (the official code encodes each image and state in its own call)."""
        tokens = self.proj(torch.cat([self.shallow, self.deep], dim=0))
        tokens = tokens.expand(batch, states, *tokens.shape)
        if self.training and self.dropout > 0:
            tokens = tokens * self.dropout_masks(tuple(tokens.shape), tokens.device)
        return tokens

    def encode(
        self,
        backbone: Backbone,
        embeddings: torch.Tensor,
        ids: torch.Tensor,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        """(n, ctx, W_t) embeddings, (n, ctx) ids, prompts (n, blocks, n_tok, W_t) -> (n, D)."""
        if prompts is None:
            return backbone.encode_embeddings(embeddings, ids)
        deep: Mapping[int, torch.Tensor] = {b: prompts[:, b] for b in range(1, prompts.shape[1])}
        return backbone.encode_embeddings(
            embeddings,
            ids,
            shallow_prompts=prompts[:, 0],
            deep_prompts=deep,
            deep_start=1,
            final_norm=self.norm,
        )


class VCPModel(nn.Module):
    """Every learnable part of VCP-CLIP (see the module docstring)."""

    def __init__(self, backbone: Backbone, config: Mapping[str, Any], n_layers: int, width: int) -> None:
        super().__init__()
        self.backbone = backbone  # a plain reference: never a submodule
        text_width, embed_dim = backbone.text_width, backbone.embed_dim
        self.normal_templates = len(config["normal_templates"])
        templates = [*config["normal_templates"], *config["abnormal_templates"]]
        extra = config["deep_length"] if config["deep_prompts"] else 0
        self.slots = TemplateSlots(backbone, templates, config["class_length"], extra)
        self.linears = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(n_layers))
        self.context = ContextPrompting(text_width, config["class_length"], config["use_global"])
        self.text = TextPrompts(
            text_width,
            backbone.text_depth,
            config["deep_length"],
            config["prompt_dropout"],
            config["deep_prompts"],
        )
        self.post = PostVCP(embed_dim, width, config["heads"])
        scale = math.log(1.0 / config["temperature"])
        learn = bool(config["learn_temperature"])
        self.pre_temperature = nn.Parameter(torch.tensor(scale), requires_grad=learn)  # official tau_1
        self.post_temperature = nn.Parameter(torch.tensor(scale), requires_grad=learn)  # official tau_2
        self.to(backbone.device)

    def temperatures(self) -> list[nn.Parameter]:
        return [self.pre_temperature, self.post_temperature]

    def text_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, D) global embeddings -> (B, 2, D) [normal, abnormal], each the normalised mean of
        its templates' normalised embeddings (``encode_text`` + ``forward_ensemble``)."""
        batch = image.shape[0]
        embeddings = self.slots.embeddings(self.context(image))  # (B, T, ctx, W_t)
        n_templates, ctx = embeddings.shape[1:3]
        states = torch.tensor(
            [0] * self.normal_templates + [1] * (n_templates - self.normal_templates), device=image.device
        )
        prompts = None
        if self.text.deep_enabled:
            prompts = self.text.tokens(batch, 2)[:, states]  # (B, T, blocks, n, W_t)
            prompts = prompts.reshape(batch * n_templates, *prompts.shape[2:])
        ids = self.slots.ids.unsqueeze(0).expand(batch, -1, -1).reshape(batch * n_templates, ctx)
        encoded = self.text.encode(
            self.backbone, embeddings.reshape(batch * n_templates, ctx, -1), ids, prompts
        )
        encoded = F.normalize(encoded, dim=-1).reshape(batch, n_templates, -1)
        normal = F.normalize(encoded[:, : self.normal_templates].mean(dim=1), dim=-1)
        abnormal = F.normalize(encoded[:, self.normal_templates :].mean(dim=1), dim=-1)
        return torch.stack([normal, abnormal], dim=1)

    def logits(
        self, image: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text (B, 2, D), Pre-VCP logits (B, L, 2, N), Post-VCP logits (B, L, 2, N)) from the global
        embeddings (B, D) and raw patch tokens (B, L, N, W)."""
        text = self.text_features(image)
        batch, n_layers, n_patches, width = tokens.shape
        projected = torch.stack([linear(tokens[:, i]) for i, linear in enumerate(self.linears)], dim=1)
        pre = self.pre_temperature.exp() * torch.einsum(
            "blnd,bkd->blkn", F.normalize(projected, dim=-1), text
        )
        patches = F.normalize(tokens, dim=-1)
        per_layer_text = text.unsqueeze(1).expand(-1, n_layers, -1, -1).reshape(batch * n_layers, 2, -1)
        attended = self.post(per_layer_text, patches.reshape(batch * n_layers, n_patches, width))
        attended = attended.reshape(batch, n_layers, 2, width)
        post = self.post_temperature.exp() * torch.einsum("blnw,blkw->blkn", patches, attended)
        return text, pre, post
