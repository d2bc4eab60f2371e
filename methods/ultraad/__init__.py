"""UltraAD (Zhou et al., 2025): few-shot CLIP adaptation for ultrasound anomaly localisation and
fine-grained classification, as fixed by ``docs/ultraad.md`` (no official code exists).

Every choice the paper leaves open is an option of :data:`DEFAULT_CONFIG` (see
``docs/ultraad-impl.md`` for the list with the ultraad.md reference of each):

1. frozen CLIP features from the harness cache: projected class token ``f`` (``embeds``) and
   raw patch tokens of the used layers (option ``layers``; default: the backbone's layers,
   evenly spaced quarters, e.g. 6/12/18/24 of ViT-L/14);
2. image-aware prompting: ``[v_1 + pi(x)] .. [v_M + pi(x)] normal|abnormal breast ultrasound
   image.`` with ``pi = MiniNet(g(f))`` through :class:`bench.prompt_learning.PromptLearner`;
3. one linear adapter per layer; ``M`` = mean over layers of
   ``softmax(cos(P_l, [t_n, t_a]) / tau)[abnormal]`` upsampled bilinearly to the eval size;
4. memory-boosted classification: ``100 norm(g(f)) W_text^T + alpha exp(-beta (1 - norm(g(f))
   F_mem^T)) L`` with frozen ``W_text`` from the class descriptions (``descriptions.yaml``) and
   trainable keys ``F_mem`` initialised from the support images' normalised embeds;
5. patch-wise image-language fusion: prototypes + 8-head cross-attention -> ``T'`` -> ``M'``;
6. multitask loss ``Dice(M) + Focal(M) + Dice(M') + Focal(M') + CE``, AdamW, fixed epochs;
7. outputs: map ``(M + M') / 2`` (Gaussian-smoothed, sigma 4 px at 336), probabilities
   ``softmax(logits)``, score ``0.5 (1 - p_normal) + 0.5 max(map)``.

Ablation variants (one switch each, all registered): ``ultraad-us-unaware``
(``descriptions: ultrasound-unaware``), ``ultraad-no-joint`` (``joint: false``: no classifier,
no CE, localisation only; its score is ``max(map)``), ``ultraad-no-pif`` (``pif: false``: map
``M`` only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench import fewshot
from bench.anomaly import UPSAMPLE_ORDERS, dice_loss, focal_loss, gaussian_smooth, sigma_at
from bench.errors import MethodError
from bench.method import Method, MethodContext, Prediction, SupportSet, class_names
from bench.types import ImageItem, Task
from methods.ultraad.descriptions import BUILTIN_SETS, load_descriptions
from methods.ultraad.model import PIF_TOKENS, Outputs, UltraADNet

ALL_TASKS = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
LR_SCHEDULES = ("constant", "cosine")

#: Every option with its default (ultraad.md section in brackets; "choice" = fixed there).
DEFAULT_CONFIG: dict[str, Any] = {
    # [1] frozen CLIP: 0-based blocks whose patch tokens are used (a subset of the backbone's
    # --layers); null = all of the backbone's layers (default: quarters, 5/11/17/23 = "6/12/18/24").
    "layers": None,
    # [2] IAP (CoCoOp): state phrases after the context; shared context init (choice: M = 4
    # from "a photo of a"); n_ctx / ctx_init_std apply only when ctx_init is empty.
    "normal_prompt": "normal breast ultrasound image",
    "abnormal_prompt": "abnormal breast ultrasound image",
    "ctx_init": "a photo of a",
    "n_ctx": 4,
    "ctx_init_std": 0.02,
    # MiniNet Linear(d, d / r) - ReLU - Linear(d / r, d_text)
    "mininet_reduction": 16,
    # [3] adapters (April-GAN Linear with bias) and maps: temperature tau = 0.07, softmax on
    # the patch grid then bilinear upsampling ("probabilities"; "logits" = April-GAN's order).
    "adapter_bias": True,
    "tau": 0.07,
    "upsample": "probabilities",
    "align_corners": False,
    # [4] memory-boosted classification: description set ("lesion-aware" = descriptions.yaml,
    # "ultrasound-unaware" = the ablation's "This is a {class} image.", a YAML path, or a
    # mapping); choice alpha = 1, beta = 5.5; CLIP logit scale 100.
    "descriptions": "lesion-aware",
    "alpha": 1.0,
    "beta": 5.5,
    "clip_logit_scale": 100.0,
    # g(f) = f + ratio * MLP(f), last layer zero-initialised (choice: ratio 0.2); MLP hidden
    # width d / g_reduction (CLIP-Adapter's 4); f L2-normalised before g (as CoCoOp's meta-net input).
    "residual_ratio": 0.2,
    "g_reduction": 4,
    "normalize_class_token": True,
    # [6] joint learning: the classifier branch and its CE term (false = ablation "no joint learning").
    "joint": True,
    # [5] PIF: on/off (false = ablation "no PIF"), heads (choice: 8), which adapted tokens are
    # keys/values ("per-layer": layer l's tokens give T'_l for layer l's map; "all-layers": one
    # T' from all layers' tokens), tokens L2-normalised before attention, zero-initialised
    # output projection (T' = prototypes at the start).
    "pif": True,
    "pif_heads": 8,
    "pif_tokens": "per-layer",
    "pif_normalize_tokens": True,
    "pif_zero_init": True,
    # [6] training (choice: AdamW lr 1e-3, weight decay 1e-4, 20 epochs, batch 8, fixed epoch
    # count); batches reshuffled every epoch, last incomplete batch kept.
    "epochs": 20,
    "batch_size": 8,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "lr_schedule": "constant",
    "drop_last": False,
    # loss = dice_weight * Dice + focal_weight * Focal on M and M' + ce_weight * CE (Focal gamma 2);
    # seg_loss_per_layer: Dice + Focal on every layer's map (April-GAN) instead of on the mean maps.
    "dice_weight": 1.0,
    "focal_weight": 1.0,
    "ce_weight": 1.0,
    "focal_gamma": 2.0,
    "dice_smooth": 1.0,
    "seg_loss_per_layer": False,
    # [7] outputs: map = map_weight * M + (1 - map_weight) * M' (choice: (M + M') / 2);
    # Gaussian sigma in px at smooth_reference_size, rescaled to the eval size (0 = off);
    # score = score_weight * (1 - p_normal) + (1 - score_weight) * max(map) (choice: 0.5).
    "map_weight": 0.5,
    "smooth_sigma": 4.0,
    "smooth_reference_size": 336,
    "score_weight": 0.5,
}


@dataclass(frozen=True)
class Options:
    """The validated options (see :data:`DEFAULT_CONFIG`)."""

    layers: tuple[int, ...] | None
    normal_prompt: str
    abnormal_prompt: str
    ctx_init: str
    n_ctx: int
    ctx_init_std: float
    mininet_reduction: int
    adapter_bias: bool
    tau: float
    upsample: str
    align_corners: bool
    descriptions: Any
    alpha: float
    beta: float
    clip_logit_scale: float
    residual_ratio: float
    g_reduction: int
    normalize_class_token: bool
    joint: bool
    pif: bool
    pif_heads: int
    pif_tokens: str
    pif_normalize_tokens: bool
    pif_zero_init: bool
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_schedule: str
    drop_last: bool
    dice_weight: float
    focal_weight: float
    ce_weight: float
    focal_gamma: float
    dice_smooth: float
    seg_loss_per_layer: bool
    map_weight: float
    smooth_sigma: float
    smooth_reference_size: int
    score_weight: float


def parse_options(config: Mapping[str, Any], method: str) -> Options:
    """Validate and convert the merged config; a clear :class:`MethodError` names a bad option."""

    def fail(key: str, why: str) -> MethodError:
        return MethodError(f"method {method!r}: option {key!r} {why}, got {config[key]!r}")

    def number(key: str, *, lo: float | None = None, positive: bool = False) -> float:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise fail(key, "must be a finite number")
        if positive and value <= 0:
            raise fail(key, "must be > 0")
        if lo is not None and value < lo:
            raise fail(key, f"must be >= {lo}")
        return float(value)

    def integer(key: str, lo: int) -> int:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise fail(key, f"must be an integer >= {lo}")
        return int(value)

    def flag(key: str) -> bool:
        if not isinstance(config[key], bool):
            raise fail(key, "must be true or false")
        return bool(config[key])

    def text(key: str, *, allow_empty: bool = False) -> str:
        value = config[key]
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise fail(key, "must be a non-empty string" if not allow_empty else "must be a string")
        return value.strip()

    def choice(key: str, allowed: Sequence[str]) -> str:
        if config[key] not in allowed:
            raise fail(key, f"must be one of {list(allowed)}")
        return str(config[key])

    def fraction(key: str) -> float:
        value = number(key)
        if not 0.0 <= value <= 1.0:
            raise fail(key, "must be in [0, 1]")
        return value

    layers = config["layers"]
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if (
            not isinstance(layers, list | tuple)
            or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise fail("layers", "must be null or a list of distinct 0-based block indices")
        layers = tuple(sorted(int(i) for i in layers))
    return Options(
        layers=layers,
        normal_prompt=text("normal_prompt"),
        abnormal_prompt=text("abnormal_prompt"),
        ctx_init=text("ctx_init", allow_empty=True),
        n_ctx=integer("n_ctx", 1),
        ctx_init_std=number("ctx_init_std", lo=0.0),
        mininet_reduction=integer("mininet_reduction", 1),
        adapter_bias=flag("adapter_bias"),
        tau=number("tau", positive=True),
        upsample=choice("upsample", UPSAMPLE_ORDERS),
        align_corners=flag("align_corners"),
        descriptions=config["descriptions"],
        alpha=number("alpha"),
        beta=number("beta"),
        clip_logit_scale=number("clip_logit_scale"),
        residual_ratio=number("residual_ratio"),
        g_reduction=integer("g_reduction", 1),
        normalize_class_token=flag("normalize_class_token"),
        joint=flag("joint"),
        pif=flag("pif"),
        pif_heads=integer("pif_heads", 1),
        pif_tokens=choice("pif_tokens", PIF_TOKENS),
        pif_normalize_tokens=flag("pif_normalize_tokens"),
        pif_zero_init=flag("pif_zero_init"),
        epochs=integer("epochs", 0),
        batch_size=integer("batch_size", 1),
        lr=number("lr", lo=0.0),
        weight_decay=number("weight_decay", lo=0.0),
        lr_schedule=choice("lr_schedule", LR_SCHEDULES),
        drop_last=flag("drop_last"),
        dice_weight=number("dice_weight", lo=0.0),
        focal_weight=number("focal_weight", lo=0.0),
        ce_weight=number("ce_weight", lo=0.0),
        focal_gamma=number("focal_gamma", lo=0.0),
        dice_smooth=number("dice_smooth", lo=0.0),
        seg_loss_per_layer=flag("seg_loss_per_layer"),
        map_weight=fraction("map_weight"),
        smooth_sigma=number("smooth_sigma", lo=0.0),
        smooth_reference_size=integer("smooth_reference_size", 1),
        score_weight=fraction("score_weight"),
    )


class UltraAD(Method):
    """UltraAD: IAP prompts + per-layer adapters + PIF maps, memory-boosted 3-class classifier."""

    name = "ultraad"
    table_group = "ours"
    table_rank = 0
    ablation_of = "ultraad"
    description = "UltraAD: image-aware prompts, patch adapters, PIF fusion, memory-boosted classifier"
    tasks = ALL_TASKS
    uses_support = True
    uses_backbone = True
    default_config: ClassVar[Mapping[str, Any]] = DEFAULT_CONFIG

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.options = parse_options(self.config, self.name)
        # the tasks follow the `joint` switch (no classifier: localisation only)
        self.tasks = ALL_TASKS if self.options.joint else frozenset({Task.LOCALIZE})
        self.descriptions = load_descriptions(self.options.descriptions, self.name)
        self.model: UltraADNet | None = None
        #: Mean loss components per epoch of the last fit (keys: see :meth:`loss_components`).
        self.history: list[dict[str, float]] = []
        self._class_text: torch.Tensor | None = None

    # -- frozen pieces --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    def layer_positions(self) -> list[int]:
        """Positions of the used layers within ``backbone.layers`` (the cached feature rows)."""
        available = list(self.ctx.backbone.layers)
        if self.options.layers is None:
            return list(range(len(available)))
        missing = [i for i in self.options.layers if i not in available]
        if missing:
            raise MethodError(
                f"method {self.name!r}: option 'layers' {list(self.options.layers)} names block(s) {missing} "
                f"the backbone does not provide; its layers are {available} (set --layers)"
            )
        return [available.index(i) for i in self.options.layers]

    def class_text(self) -> torch.Tensor:
        """``W_text`` (C, D): per class the normalised mean of its normalised description embeddings."""
        if self._class_text is None:
            backbone = self.ctx.backbone
            rows = []
            for name in class_names():
                sentences = self.descriptions[name]
                ids = backbone.tokenize(sentences)
                if bool((ids[:, -1] != 0).any()):
                    raise MethodError(
                        f"method {self.name!r}: a {name!r} description is longer than the text encoder's "
                        f"{ids.shape[1]} tokens: {sentences}"
                    )
                embeds = F.normalize(backbone.encode_text(sentences).float(), dim=-1)
                rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
            self._class_text = torch.stack(rows).to(self.device)
        return self._class_text

    def features(self, items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached frozen (embeds (B, D), raw patch tokens of the used layers (B, L, N, W))."""
        feats = self.ctx.backbone.image_features(items)
        positions = self.layer_positions()
        tokens = (
            feats.patch_tokens
            if positions == list(range(feats.patch_tokens.shape[1]))
            else (feats.patch_tokens[:, positions])
        )
        return feats.embeds.float().to(self.device), tokens.float().to(self.device)

    # -- model ----------------------------------------------------------------------------
    def init_model(self, support: SupportSet, embeds: torch.Tensor | None = None) -> UltraADNet:
        """Build the (untrained) network for ``support``: memory keys from its normalised embeds.

        ``embeds`` are the support images' cached class-token embeds when the caller already has them.
        """
        o = self.options
        backbone = self.ctx.backbone
        labels = self.support_labels(support)
        keys = values = None
        if o.joint:
            if embeds is None:
                embeds, _ = self.features(support.items)
            keys = F.normalize(embeds, dim=-1)
            values = fewshot.one_hot(labels, len(class_names()))
        try:
            model = UltraADNet(
                backbone,
                layer_positions=self.layer_positions(),
                class_text=self.class_text(),
                memory_keys=keys,
                memory_values=values,
                seed=self.ctx.seed,
                state_phrases=(o.normal_prompt, o.abnormal_prompt),
                ctx_init=o.ctx_init,
                n_ctx=o.n_ctx,
                ctx_init_std=o.ctx_init_std,
                mininet_reduction=o.mininet_reduction,
                g_reduction=o.g_reduction,
                residual_ratio=o.residual_ratio,
                normalize_class_token=o.normalize_class_token,
                adapter_bias=o.adapter_bias,
                pif=o.pif,
                pif_heads=o.pif_heads,
                pif_tokens=o.pif_tokens,
                pif_normalize_tokens=o.pif_normalize_tokens,
                pif_zero_init=o.pif_zero_init,
                tau=o.tau,
                upsample=o.upsample,
                align_corners=o.align_corners,
                alpha=o.alpha,
                beta=o.beta,
                clip_logit_scale=o.clip_logit_scale,
            )
        except ValueError as exc:
            raise MethodError(f"method {self.name!r}: {exc}") from exc
        if o.ctx_init and model.prompt.n_ctx != o.n_ctx:
            raise MethodError(
                f"method {self.name!r}: ctx_init {o.ctx_init!r} has {model.prompt.n_ctx} tokens but n_ctx is "
                f"{o.n_ctx}; set n_ctx to {model.prompt.n_ctx} (or ctx_init to '' for a random context)"
            )
        self.model = model
        return model

    def support_labels(self, support: SupportSet) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(support.labels), dtype=torch.long, device=self.device)
        present = sorted(set(labels.tolist()))
        if self.options.joint and present != list(range(len(class_names()))):
            raise MethodError(f"method {self.name!r}: the support set must hold every class, got {present}")
        return labels

    # -- training -------------------------------------------------------------------------
    def loss_components(
        self, out: Outputs, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch: ``dice_m``, ``focal_m`` (+ ``dice_fused``, ``focal_fused`` with
        PIF, + ``ce`` with joint learning) and their weighted sum ``total``."""
        o = self.options

        def seg(maps: torch.Tensor, layer_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if o.seg_loss_per_layer:
                dice = sum(
                    dice_loss(layer_maps[:, i], masks, o.dice_smooth) for i in range(layer_maps.shape[1])
                )
                focal = sum(
                    focal_loss(layer_maps[:, i], masks, o.focal_gamma) for i in range(layer_maps.shape[1])
                )
                return dice, focal  # type: ignore[return-value]
            return dice_loss(maps, masks, o.dice_smooth), focal_loss(maps, masks, o.focal_gamma)

        parts: dict[str, torch.Tensor] = {}
        parts["dice_m"], parts["focal_m"] = seg(out.map, out.layer_maps)
        total = o.dice_weight * parts["dice_m"] + o.focal_weight * parts["focal_m"]
        if out.fused_map is not None:
            assert out.fused_layer_maps is not None
            parts["dice_fused"], parts["focal_fused"] = seg(out.fused_map, out.fused_layer_maps)
            total = total + o.dice_weight * parts["dice_fused"] + o.focal_weight * parts["focal_fused"]
        if o.joint:
            assert out.logits is not None
            parts["ce"] = F.cross_entropy(out.logits, labels)
            total = total + o.ce_weight * parts["ce"]
        parts["total"] = total
        return parts

    def fit(self, support: SupportSet) -> None:
        o = self.options
        embeds, tokens = self.features(support.items)  # frozen support features, fetched once
        model = self.init_model(support, embeds)
        labels = self.support_labels(support)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32), device=self.device)
        if masks.shape[-1] != masks.shape[-2]:
            raise MethodError(f"method {self.name!r}: support masks must be square, got {tuple(masks.shape)}")
        size = int(masks.shape[-1])
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(parameters, lr=o.lr, weight_decay=o.weight_decay)
        generator = fewshot.make_generator(self.ctx.seed)
        n = len(support)
        steps_per_epoch = len(
            fewshot.epoch_batches(n, o.batch_size, generator, shuffle=False, drop_last=o.drop_last)
        )
        total_steps, step = o.epochs * steps_per_epoch, 0
        self.history = []
        model.train()
        for _ in self.ctx.track(range(o.epochs), f"{self.name} epochs", o.epochs):
            sums: dict[str, float] = {}
            seen = 0
            for batch in fewshot.epoch_batches(n, o.batch_size, generator, drop_last=o.drop_last):
                if o.lr_schedule == "cosine":
                    fewshot.set_lr(optimiser, fewshot.cosine_lr(step, total_steps, o.lr))
                batch = batch.to(self.device)
                out = model(embeds[batch], tokens[batch], size)
                parts = self.loss_components(out, masks[batch], labels[batch])
                optimiser.zero_grad(set_to_none=True)
                parts["total"].backward()
                optimiser.step()
                step += 1
                seen += len(batch)
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(batch)
            self.history.append({k: v / max(seen, 1) for k, v in sums.items()})
        model.eval()

    # -- prediction -----------------------------------------------------------------------
    def outputs(self, items: Sequence[ImageItem], size: int | None = None) -> Outputs:
        """Raw network outputs of a batch (no gradient), maps at ``size`` (default: eval size)."""
        if self.model is None:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        embeds, tokens = self.features(items)
        self.model.eval()
        with torch.no_grad():
            return self.model(embeds, tokens, size or self.ctx.eval_size)

    def final_map(self, out: Outputs) -> torch.Tensor:
        """``map_weight * M + (1 - map_weight) * M'`` (``M`` alone without PIF), then smoothed."""
        o = self.options
        maps = (
            out.map
            if out.fused_map is None
            else o.map_weight * out.map + (1.0 - o.map_weight) * out.fused_map
        )
        if o.smooth_sigma > 0:
            sigma = sigma_at(int(maps.shape[-1]), o.smooth_sigma, o.smooth_reference_size)
            maps = gaussian_smooth(maps, sigma)
        return maps.clamp(0.0, 1.0)

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        o = self.options
        out = self.outputs(items)
        maps = self.final_map(out)
        peak = maps.flatten(1).max(dim=1).values.double().cpu()
        probs = None
        if out.logits is not None:
            probs_t = torch.softmax(out.logits.double().cpu(), dim=1)
            probs = probs_t.numpy().astype(np.float64)
            scores = o.score_weight * (1.0 - probs_t[:, 0]) + (1.0 - o.score_weight) * peak
        else:
            scores = peak
        return Prediction(
            scores=scores.numpy().astype(np.float64),
            probs=probs,
            maps=maps.cpu().numpy().astype(np.float32),
        )


class UltraADUltrasoundUnaware(UltraAD):
    """Ablation: class descriptions without ultrasound / pathology wording ("This is a {class} image.")."""

    name = "ultraad-us-unaware"
    table_group = "ours"
    table_rank = 1
    ablation_of = "ultraad"
    description = "UltraAD ablation: ultrasound-unaware class descriptions ('This is a {class} image.')"
    default_config: ClassVar[Mapping[str, Any]] = {**DEFAULT_CONFIG, "descriptions": "ultrasound-unaware"}


class UltraADNoJoint(UltraAD):
    """Ablation: segmentation losses only, no classifier (localisation only; score = max of the map)."""

    name = "ultraad-no-joint"
    table_group = "ours"
    table_rank = 2
    ablation_of = "ultraad"
    description = "UltraAD ablation: no joint learning (segmentation losses only, no classifier)"
    tasks = frozenset({Task.LOCALIZE})
    default_config: ClassVar[Mapping[str, Any]] = {**DEFAULT_CONFIG, "joint": False}


class UltraADNoPIF(UltraAD):
    """Ablation: maps from the adapted patch tokens and the IAP prompts only (M, no fusion)."""

    name = "ultraad-no-pif"
    table_group = "ours"
    table_rank = 3
    ablation_of = "ultraad"
    description = "UltraAD ablation: no patch-wise image-language fusion (map M only)"
    default_config: ClassVar[Mapping[str, Any]] = {**DEFAULT_CONFIG, "pif": False}


METHODS = [UltraAD, UltraADUltrasoundUnaware, UltraADNoJoint, UltraADNoPIF]

__all__ = [
    "BUILTIN_SETS",
    "DEFAULT_CONFIG",
    "METHODS",
    "Options",
    "UltraAD",
    "UltraADNet",
    "UltraADNoJoint",
    "UltraADNoPIF",
    "UltraADUltrasoundUnaware",
    "parse_options",
]
