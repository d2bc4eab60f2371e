"""Text prompts through the frozen text encoder: hand-written classifiers and learnable contexts.

**Hand-written prompts.** :func:`text_classifier` turns prompt lists (one per class) into a
zero-shot classifier: each row the L2-normalised mean of the L2-normalised prompt
embeddings (``clip_classifier`` in Tip-Adapter / LP++); :func:`class_prompts` fills
templates with class phrases. :data:`DEFAULT_CLASS_NAMES` and :data:`DEFAULT_TEMPLATES` are
the breast-ultrasound defaults (CLIP's ``"a photo of a {}."`` is :data:`CLIP_TEMPLATE`);
:func:`class_names_option` and :func:`templates_option` are the matching option schemas.

**Learnable contexts** (CoOp / CoCoOp / UltraAD). :class:`PromptLearner` is one
``nn.Module`` that turns M learnable context vectors and a fixed phrase per class into text
features, always through :meth:`bench.kit.clip.Backbone.encode_embeddings` (gradients reach
the context vectors and the meta-net, never the backbone)::

    [SOS] [v_1] ... [v_M] phrase_c . [EOS]          (class token at the "end", CoOp's default)

- **Context**: ``n_ctx`` vectors of the text width, unified (shared by all classes) or
  ``class_specific`` (CoOp's CSC); initialised from the token embeddings of a phrase
  (``ctx_init="a photo of a"``: M = its number of BPE tokens) or from N(0, ``init_std``²)
  (CoOp: 0.02) with a seeded generator.
- **Class token position**: ``"end"`` (default), ``"middle"`` or ``"front"`` (CoOp's options).
- **Instance conditioning** (CoCoOp): with ``meta_net=True`` a meta-net
  ``Linear(d, d // meta_reduction) - ReLU - Linear(d // meta_reduction, text_width)`` maps an
  image feature (d = ``image_dim``) to an offset added to every context vector
  (``v_m(x) = v_m + pi(x)``). A caller may also pass its own ``offset`` (B, text_width), e.g.
  UltraAD's MiniNet applied to a projected class token.
- **Output**: :meth:`PromptLearner.forward` returns NOT normalised text features, (C, D)
  without image conditioning or (B, C, D) with it.

Sequences are cut after the last end-of-text token when that is exact (a causal text
transformer pooled at the EOT token, as CLIP): a position never attends to later ones, so
the padding after EOT cannot change the pooled feature, and dropping it makes prompt
learning several times cheaper (``truncate=False`` keeps the full context length).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.kit.adapters import MetaNet
from bench.kit.options import Option
from bench.kit.training import make_generator, seeded
from bench.method import class_names

if TYPE_CHECKING:
    from bench.kit.clip import Backbone

#: Default class phrases (breast ultrasound), in :data:`~bench.types.CLASSES` order.
DEFAULT_CLASS_NAMES: dict[str, str] = {
    "normal": "normal breast tissue",
    "benign": "benign breast lesion",
    "malignant": "malignant breast lesion",
}


#: Default prompt template(s) around a class phrase.
DEFAULT_TEMPLATES: list[str] = ["a breast ultrasound image of {}."]


#: CLIP's generic template (pass ``templates: ["a photo of a {}."]`` to use it).
CLIP_TEMPLATE = "a photo of a {}."


def _class_names_problem(value: Any) -> str | None:
    wanted = list(class_names())
    if not isinstance(value, Mapping) or set(value) != set(wanted):
        return f"must map exactly {wanted} to phrases"
    if not all(isinstance(value[c], str) and value[c].strip() for c in wanted):
        return "must map every class to a non-empty string"
    return None


def _templates_problem(value: Any) -> str | None:
    if not all(isinstance(t, str) and t.count("{}") == 1 for t in value):
        return f"must hold strings with one '{{}}' each (e.g. {DEFAULT_TEMPLATES} or [{CLIP_TEMPLATE!r}])"
    return None


def class_names_option(default: Mapping[str, str] | None = None) -> Option:
    """The ``class_names`` option: a mapping normal/benign/malignant -> class phrase."""
    return Option(
        dict(default or DEFAULT_CLASS_NAMES), dict, "phrase of each class", check=_class_names_problem
    )


def templates_option(default: Sequence[str] | None = None) -> Option:
    """The ``templates`` option: non-empty list of prompt templates, each with one ``{}``."""
    return Option(
        list(default or DEFAULT_TEMPLATES),
        list,
        "prompt templates around a class phrase (one '{}' each)",
        items=str,
        nonempty=True,
        check=_templates_problem,
    )


def names_in_class_order(mapping: Mapping[str, str]) -> list[str]:
    """The phrases of a validated ``class_names`` option as a list in class order."""
    return [mapping[c].strip() for c in class_names()]


def class_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``prompts[c]`` = every template filled with class ``c``'s phrase."""
    return [[t.format(name) for t in templates] for name in names]


def text_classifier(
    backbone: Backbone,
    prompts: Sequence[Sequence[str]],
    *,
    normalize_each: bool = True,
    normalize_rows: bool = True,
) -> torch.Tensor:
    """One row per class from its prompts: (C, D) on the backbone device.

    Row ``c`` = normalise(mean over prompts of normalise(encode_text(prompt))) by default
    (Tip-Adapter / LP++ ``clip_classifier``); ``normalize_each=False`` averages the raw
    embeddings (anomalib's WinCLIP) and ``normalize_rows=False`` leaves the mean as it is.
    A prompt longer than the text encoder's context is an error, never silently cut.
    """
    rows = []
    for sentences in prompts:
        sentences = list(sentences)
        ids = backbone.tokenize(sentences)
        if bool((ids[:, -1] != 0).any()):
            raise ValueError(f"a prompt is longer than the text encoder's {ids.shape[1]} tokens: {sentences}")
        embeds = backbone.encode_text(sentences).float()
        if normalize_each:
            embeds = F.normalize(embeds, dim=-1)
        row = embeds.mean(dim=0)
        rows.append(F.normalize(row, dim=-1) if normalize_rows else row)
    return torch.stack(rows)


#: Class token positions CoOp supports.
POSITIONS = ("end", "middle", "front")


#: Prompts per text-encoder call (bounds memory when B x C is large).
ENCODE_CHUNK = 512


def _eot_index(ids: torch.Tensor) -> torch.Tensor:
    """Position of the end-of-text token (the largest id in CLIP's vocabulary) per row."""
    return ids.argmax(dim=-1)


def truncation_is_exact(backbone: Backbone) -> bool:
    """True when the text tower is causal and pools the EOT (argmax) token, as CLIP."""
    model = backbone.model
    text = getattr(model, "text", None)
    owner = text if text is not None and hasattr(text, "transformer") else model
    attn_mask = getattr(owner, "attn_mask", None)
    pool = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", None)
    if attn_mask is None or pool != "argmax":
        return False
    n = attn_mask.shape[0]
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=attn_mask.device), diagonal=1)
    return bool(torch.isinf(attn_mask[causal]).all()) and bool((attn_mask[~causal] == 0).all())


class PromptLearner(nn.Module):
    """Learnable context + fixed class phrases -> text features via ``backbone.encode_embeddings``.

    Args:
        backbone: the shared frozen :class:`~bench.kit.clip.Backbone` (kept as a plain
            reference, never registered as a submodule: ``parameters()`` and ``state_dict()``
            hold only the learnable parts).
        names: one phrase per class, e.g. ``["normal breast tissue", ...]``.
        n_ctx: number of context vectors M when ``ctx_init`` is empty.
        ctx_init: phrase whose token embeddings initialise the context (sets M).
        class_specific: one context per class (CoOp's CSC) instead of a shared one.
        position: where the class phrase goes: ``"end"``, ``"middle"`` or ``"front"``.
        meta_net: add CoCoOp's meta-net (needs ``image_dim``).
        image_dim: input width of the meta-net (the image feature dimension).
        meta_reduction: hidden width of the meta-net is ``image_dim // meta_reduction``.
        init_std: std of the random context initialisation.
        seed: seeds the random context and the meta-net's initial weights.
        suffix: text after the class phrase (CoOp: ``"."``).
        truncate: drop the padding after the last EOT token when exact (see module doc).
    """

    def __init__(
        self,
        backbone: Backbone,
        names: Sequence[str],
        *,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        position: str = "end",
        meta_net: bool = False,
        image_dim: int | None = None,
        meta_reduction: int = 16,
        init_std: float = 0.02,
        seed: int = 0,
        suffix: str = ".",
        truncate: bool = True,
    ) -> None:
        super().__init__()
        names = [str(n).strip() for n in names]
        if not names or not all(names):
            raise ValueError("PromptLearner needs at least one non-empty class phrase")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.backbone = backbone  # a plain object (not an nn.Module): never a submodule
        self.names = names
        self.position = position
        self.class_specific = bool(class_specific)
        n_cls = len(names)
        width = int(backbone.text_width)
        device = backbone.device

        ctx_init = (ctx_init or "").strip().replace("_", " ")
        if ctx_init:
            init_ids = backbone.tokenize([ctx_init])
            n_ctx = int(_eot_index(init_ids)[0]) - 1
            if n_ctx < 1:
                raise ValueError(f"ctx_init {ctx_init!r} has no tokens")
            vectors = backbone.token_embeddings(init_ids)[0, 1 : 1 + n_ctx].detach().cpu().clone()
            if self.class_specific:
                vectors = vectors.unsqueeze(0).repeat(n_cls, 1, 1)
            prefix_text = ctx_init
        else:
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            shape = (n_cls, n_ctx, width) if self.class_specific else (n_ctx, width)
            vectors = torch.randn(shape, generator=make_generator(seed)) * float(init_std)
            prefix_text = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.ctx = nn.Parameter(vectors.float())

        # token ids and frozen embeddings of "<prefix> <name><suffix>"
        prompts = [f"{prefix_text} {name}{suffix}" for name in names]
        ids = backbone.tokenize(prompts)
        prefix_ids = backbone.tokenize([prefix_text])[0, 1 : 1 + n_ctx]
        if not bool((ids[:, 1 : 1 + n_ctx] == prefix_ids.unsqueeze(0)).all()):
            raise ValueError(f"context phrase {prefix_text!r} does not tokenize apart from the class phrases")
        eot = _eot_index(ids)
        if int(eot.max()) >= ids.shape[1] - 1:
            raise ValueError(f"a prompt is longer than the context length {ids.shape[1]}: {prompts}")
        self.truncated = bool(truncate) and truncation_is_exact(backbone)
        length = int(eot.max()) + 1 if self.truncated else ids.shape[1]
        ids = ids[:, :length]
        embedding = backbone.token_embeddings(ids).detach()
        self.name_lens = [int(_eot_index(backbone.tokenize([n]))[0]) - 1 for n in names]
        self.register_buffer("token_ids", ids.clone(), persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer(
            "token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False
        )  # name . EOS

        self.meta_net: MetaNet | None = None
        if meta_net:
            if not image_dim:
                raise ValueError("meta_net=True needs image_dim (the image feature width)")
            hidden = max(1, int(image_dim) // int(meta_reduction))
            with seeded(seed):
                self.meta_net = MetaNet(int(image_dim), hidden, width)
        self.to(device)

    # -- shapes ---------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.names)

    @property
    def length(self) -> int:
        """Tokens per prompt sequence (after truncation)."""
        return int(self.token_ids.shape[1])

    # -- prompt assembly ------------------------------------------------------------------
    def context(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Context vectors per class: (C, M, W), or (B, C, M, W) shifted by ``offset`` (B, W)."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_classes, -1, -1)
        if offset is None:
            return ctx
        if offset.dim() != 2 or offset.shape[1] != ctx.shape[-1]:
            raise ValueError(f"offset must be (B, {ctx.shape[-1]}), got {tuple(offset.shape)}")
        return ctx.unsqueeze(0) + offset.to(ctx.dtype)[:, None, None, :]

    def prompt_embeddings(self, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of every prompt: (C, L, W), or (B, C, L, W) with an ``offset``."""
        ctx = self.context(offset)
        lead = ctx.shape[:-3]
        prefix = self.token_prefix.expand(*lead, -1, -1, -1)
        suffix = self.token_suffix.expand(*lead, -1, -1, -1)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=-2)
        half = self.n_ctx // 2
        rows = []
        for c, name_len in enumerate(self.name_lens):
            pre, ctx_c, suf = prefix[..., c, :, :], ctx[..., c, :, :], suffix[..., c, :, :]
            name, rest = suf[..., :name_len, :], suf[..., name_len:, :]
            if self.position == "middle":
                parts = [pre, ctx_c[..., :half, :], name, ctx_c[..., half:, :], rest]
            else:  # front
                parts = [pre, name, ctx_c, rest]
            rows.append(torch.cat(parts, dim=-2))
        return torch.stack(rows, dim=-3)

    # -- text features --------------------------------------------------------------------
    def forward(
        self,
        image_features: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        *,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text features (not normalised): (C, D), or (B, C, D) when image-conditioned.

        With a meta-net, ``image_features`` (B, image_dim) give the offset ``meta_net(f)``; an
        explicit ``offset`` (B, text_width) is used as is (and added to the meta-net's, if both).
        ``deep_prompts[l]`` (P, W) replace the P positions after the start token entering text
        block ``l`` (see :meth:`~bench.kit.clip.Backbone.encode_embeddings`).
        """
        if image_features is not None:
            if self.meta_net is None:
                raise ValueError("image_features given but this PromptLearner has no meta-net")
            meta = self.meta_net(image_features.to(self.ctx.dtype))
            offset = meta if offset is None else meta + offset
        elif self.meta_net is not None and offset is None:
            raise ValueError("this PromptLearner has a meta-net: pass image_features (or an offset)")
        embeddings = self.prompt_embeddings(offset)
        if embeddings.dim() == 3:
            return self._encode(embeddings, self.token_ids, deep_prompts)
        batch, n_cls, length, width = embeddings.shape
        flat_ids = self.token_ids.unsqueeze(0).expand(batch, -1, -1).reshape(batch * n_cls, length)
        features = self._encode(embeddings.reshape(batch * n_cls, length, width), flat_ids, deep_prompts)
        return features.reshape(batch, n_cls, -1)

    def _encode(
        self, embeddings: torch.Tensor, ids: torch.Tensor, deep: Mapping[int, torch.Tensor] | None
    ) -> torch.Tensor:
        chunks = [
            self.backbone.encode_embeddings(
                embeddings[s : s + ENCODE_CHUNK], ids[s : s + ENCODE_CHUNK], deep_prompts=deep
            )
            for s in range(0, embeddings.shape[0], ENCODE_CHUNK)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def extra_repr(self) -> str:
        kind = "class-specific" if self.class_specific else "unified"
        init = f"init={self.ctx_init!r}" if self.ctx_init else "init=random"
        return (
            f"n_ctx={self.n_ctx}, {kind}, position={self.position}, {init}, classes={self.names}, "
            f"length={self.length}{' (truncated)' if self.truncated else ''}"
        )
