"""UltraAD (Zhou et al., 2025): few-shot CLIP adaptation for ultrasound anomaly localisation and
fine-grained classification, as fixed by ``docs/ultraad.md`` (no official code exists).

Every choice the paper leaves open is an option of :attr:`UltraAD.options` (see
``docs/ultraad-impl.md`` for the list with the ultraad.md reference of each):

1. frozen CLIP features from the harness cache: projected class token ``f`` (``embeds``) and
   raw patch tokens of the used layers (option ``layers``; default: the backbone's layers,
   evenly spaced quarters, e.g. 6/12/18/24 of ViT-L/14);
2. image-aware prompting: ``[v_1 + pi(x)] .. [v_M + pi(x)] normal|abnormal breast ultrasound
   image.`` with ``pi = MiniNet(g(f))`` through :class:`bench.kit.PromptLearner`;
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

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import MethodError
from bench.kit import (
    UPSAMPLE_ORDERS,
    Option,
    Schedule,
    cosine_per_step,
    dice_loss,
    focal_loss,
    gaussian_smooth,
    one_hot,
    sigma_at,
    support_labels,
    text_classifier,
    train,
)
from bench.method import Method, MethodContext, Prediction, SupportSet, class_names
from bench.types import ImageItem, Task
from methods.ultraad.descriptions import BUILTIN_SETS, load_descriptions
from methods.ultraad.model import PIF_TOKENS, Outputs, UltraADNet

ALL_TASKS = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
LR_SCHEDULES = ("constant", "cosine")


def _distinct(values: list[int]) -> str | None:
    return None if len(set(values)) == len(values) else "must hold distinct block indices"


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be blank"


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
    #: Every option (ultraad.md section in brackets; "choice" = fixed there).
    options: ClassVar[dict[str, Option]] = {
        # [1] frozen CLIP
        "layers": Option(
            None,
            list,
            "[1] 0-based blocks whose patch tokens are used (a subset of the backbone's --layers); "
            "null = all of the backbone's layers (default: quarters, 5/11/17/23 = '6/12/18/24')",
            items=int,
            nullable=True,
            nonempty=True,
            check=_distinct,
        ),
        # [2] IAP (CoCoOp)
        "normal_prompt": Option(
            "normal breast ultrasound image",
            str,
            "[2] IAP state phrase of the normal prompt",
            check=_not_blank,
        ),
        "abnormal_prompt": Option(
            "abnormal breast ultrasound image",
            str,
            "[2] IAP state phrase of the abnormal prompt",
            check=_not_blank,
        ),
        "ctx_init": Option(
            "a photo of a",
            str,
            "[2] shared context init (choice: M = 4 from 'a photo of a'); '' = random context",
        ),
        "n_ctx": Option(
            4,
            int,
            "[2] context length M; must match ctx_init's tokens, used alone when ctx_init is ''",
            min=1,
        ),
        "ctx_init_std": Option(0.02, float, "[2] std of a random context (only with ctx_init '')", min=0.0),
        "mininet_reduction": Option(
            16, int, "[2] MiniNet Linear(d, d / r) - ReLU - Linear(d / r, d_text)", min=1
        ),
        # [3] adapters and maps
        "adapter_bias": Option(True, bool, "[3] per-layer adapters are nn.Linear with bias (April-GAN)"),
        "tau": Option(0.07, float, "[3] temperature of the map softmax", gt=0.0),
        "upsample": Option(
            "probabilities",
            str,
            "[3] 'probabilities': softmax on the patch grid then bilinear upsampling; "
            "'logits': upsample then softmax (April-GAN's order)",
            choices=UPSAMPLE_ORDERS,
        ),
        "align_corners": Option(False, bool, "[3] align_corners of the bilinear upsampling"),
        # [4] memory-boosted classification
        "descriptions": Option(
            "lesion-aware",
            object,
            "[4] class descriptions of W_text: 'lesion-aware' (descriptions.yaml), 'ultrasound-unaware' "
            "(the ablation's 'This is a {class} image.'), a YAML path, or a mapping class -> sentences",
        ),
        "alpha": Option(1.0, float, "[4] cache-model weight alpha (choice: 1)"),
        "beta": Option(5.5, float, "[4] cache-model sharpness beta (choice: 5.5)"),
        "clip_logit_scale": Option(100.0, float, "[4] scale of the text logits (CLIP's 100)"),
        "residual_ratio": Option(
            0.2, float, "[4] g(f) = f + ratio * MLP(f), last layer zero-initialised (choice: 0.2)"
        ),
        "g_reduction": Option(4, int, "[4] MLP hidden width d / g_reduction (CLIP-Adapter's 4)", min=1),
        "normalize_class_token": Option(
            True, bool, "[4] f L2-normalised before g (as CoCoOp's meta-net input)"
        ),
        # [6] joint learning
        "joint": Option(
            True, bool, "[6] classifier branch and its CE term (false = ablation 'no joint learning')"
        ),
        # [5] PIF
        "pif": Option(True, bool, "[5] patch-wise image-language fusion (false = ablation 'no PIF')"),
        "pif_heads": Option(8, int, "[5] cross-attention heads (choice: 8)", min=1),
        "pif_tokens": Option(
            "per-layer",
            str,
            "[5] keys/values: 'per-layer' = layer l's adapted tokens give T'_l for layer l's map; "
            "'all-layers' = one T' from all layers' tokens",
            choices=PIF_TOKENS,
        ),
        "pif_normalize_tokens": Option(True, bool, "[5] adapted tokens L2-normalised before the attention"),
        "pif_zero_init": Option(
            True, bool, "[5] zero-initialised output projection (T' = prototypes at the start)"
        ),
        # [6] training
        "epochs": Option(20, int, "[6] training epochs, a fixed count (choice: 20)", min=0),
        "batch_size": Option(8, int, "[6] batch size (choice: 8); batches reshuffled every epoch", min=1),
        "lr": Option(1e-3, float, "[6] AdamW learning rate (choice: 1e-3)", min=0.0),
        "weight_decay": Option(1e-4, float, "[6] AdamW weight decay (choice: 1e-4)", min=0.0),
        "lr_schedule": Option(
            "constant",
            str,
            "[6] 'constant', or 'cosine' (annealed per step over all updates)",
            choices=LR_SCHEDULES,
        ),
        "drop_last": Option(False, bool, "[6] drop the last incomplete batch (false: kept)"),
        "dice_weight": Option(1.0, float, "[6] weight of the Dice terms on M and M'", min=0.0),
        "focal_weight": Option(1.0, float, "[6] weight of the Focal terms on M and M'", min=0.0),
        "ce_weight": Option(1.0, float, "[6] weight of the CE term", min=0.0),
        "focal_gamma": Option(2.0, float, "[6] Focal loss gamma", min=0.0),
        "dice_smooth": Option(1.0, float, "[6] Dice smoothing", min=0.0),
        "seg_loss_per_layer": Option(
            False, bool, "[6] Dice + Focal on every layer's map (April-GAN) instead of on the mean maps"
        ),
        # [7] outputs
        "map_weight": Option(
            0.5, float, "[7] map = w * M + (1 - w) * M' (choice: (M + M') / 2)", min=0.0, max=1.0
        ),
        "smooth_sigma": Option(
            4.0,
            float,
            "[7] Gaussian sigma in px at smooth_reference_size, rescaled to the eval size (0 = off)",
            min=0.0,
        ),
        "smooth_reference_size": Option(336, int, "[7] map size at which smooth_sigma is given", min=1),
        "score_weight": Option(
            0.5, float, "[7] score = w * (1 - p_normal) + (1 - w) * max(map) (choice: 0.5)", min=0.0, max=1.0
        ),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        # the tasks follow the `joint` switch (no classifier: localisation only)
        self.tasks = ALL_TASKS if self.config["joint"] else frozenset({Task.LOCALIZE})
        self.descriptions = load_descriptions(self.config["descriptions"], self.name)
        self.model: UltraADNet | None = None
        #: Mean loss components per epoch of the last fit (keys: see :meth:`loss_components`).
        self.history: list[dict[str, float]] = []
        self._class_text: torch.Tensor | None = None

    # -- frozen pieces --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    def layer_positions(self) -> list[int]:
        """Positions of the used layers (in block order) within ``backbone.layers`` (the cached rows)."""
        available = list(self.ctx.backbone.layers)
        if self.config["layers"] is None:
            return list(range(len(available)))
        layers = sorted(self.config["layers"])
        missing = [i for i in layers if i not in available]
        if missing:
            raise MethodError(
                f"method {self.name!r}: option 'layers' {layers} names block(s) {missing} "
                f"the backbone does not provide; its layers are {available} (set --layers)"
            )
        return [available.index(i) for i in layers]

    def class_text(self) -> torch.Tensor:
        """``W_text`` (C, D): per class the normalised mean of its normalised description embeddings."""
        if self._class_text is None:
            prompts = [self.descriptions[name] for name in class_names()]
            try:
                rows = text_classifier(self.ctx.backbone, prompts)
            except ValueError as exc:
                raise MethodError(f"method {self.name!r}: option 'descriptions': {exc}") from exc
            self._class_text = rows.to(self.device)
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
        o = self.config
        labels = self.support_labels(support)
        keys = values = None
        if o["joint"]:
            if embeds is None:
                embeds, _ = self.features(support.items)
            keys = F.normalize(embeds, dim=-1)
            values = one_hot(labels, len(class_names()))
        with self.reported(ValueError):
            model = UltraADNet.from_options(
                self.ctx.backbone,
                o,
                layer_positions=self.layer_positions(),
                class_text=self.class_text(),
                memory_keys=keys,
                memory_values=values,
                seed=self.ctx.seed,
            )
        if model.prompt.ctx_init and model.prompt.n_ctx != o["n_ctx"]:
            raise MethodError(
                f"method {self.name!r}: option 'ctx_init' {o['ctx_init']!r} has {model.prompt.n_ctx} tokens "
                f"but option 'n_ctx' is {o['n_ctx']}; set n_ctx to {model.prompt.n_ctx} (or ctx_init to '' "
                "for a random context)"
            )
        self.model = model
        return model

    def support_labels(self, support: SupportSet) -> torch.Tensor:
        """The support labels; with joint learning every class must be present."""
        return support_labels(support, self.device, self.name, require_all=self.config["joint"])

    # -- training -------------------------------------------------------------------------
    def loss_components(
        self, out: Outputs, masks: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch: ``dice_m``, ``focal_m`` (+ ``dice_fused``, ``focal_fused`` with
        PIF, + ``ce`` with joint learning) and their weighted sum ``total``."""
        o = self.config

        def seg(maps: torch.Tensor, layer_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if o["seg_loss_per_layer"]:
                dice = sum(
                    dice_loss(layer_maps[:, i], masks, o["dice_smooth"]) for i in range(layer_maps.shape[1])
                )
                focal = sum(
                    focal_loss(layer_maps[:, i], masks, o["focal_gamma"]) for i in range(layer_maps.shape[1])
                )
                return dice, focal  # type: ignore[return-value]
            return dice_loss(maps, masks, o["dice_smooth"]), focal_loss(maps, masks, o["focal_gamma"])

        parts: dict[str, torch.Tensor] = {}
        parts["dice_m"], parts["focal_m"] = seg(out.map, out.layer_maps)
        total = o["dice_weight"] * parts["dice_m"] + o["focal_weight"] * parts["focal_m"]
        if out.fused_map is not None:
            assert out.fused_layer_maps is not None
            parts["dice_fused"], parts["focal_fused"] = seg(out.fused_map, out.fused_layer_maps)
            total = total + o["dice_weight"] * parts["dice_fused"] + o["focal_weight"] * parts["focal_fused"]
        if o["joint"]:
            assert out.logits is not None
            parts["ce"] = F.cross_entropy(out.logits, labels)
            total = total + o["ce_weight"] * parts["ce"]
        parts["total"] = total
        return parts

    def fit(self, support: SupportSet) -> None:
        o = self.config
        embeds, tokens = self.features(support.items)  # frozen support features, fetched once
        model = self.init_model(support, embeds)
        labels = self.support_labels(support)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32), device=self.device)
        if masks.shape[-1] != masks.shape[-2]:
            raise MethodError(f"method {self.name!r}: support masks must be square, got {tuple(masks.shape)}")
        size = int(masks.shape[-1])
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(parameters, lr=o["lr"], weight_decay=o["weight_decay"])

        def step(batch: torch.Tensor, _epoch: int) -> dict[str, torch.Tensor]:
            batch = batch.to(self.device)
            out = model(embeds[batch], tokens[batch], size)
            return self.loss_components(out, masks[batch], labels[batch])

        schedule = Schedule(
            o["epochs"],
            o["batch_size"],
            drop_last=o["drop_last"],
            lr=cosine_per_step(o["lr"]) if o["lr_schedule"] == "cosine" else None,
            lr_per="step",
        )
        self.history = []
        model.train()
        self.history = train(
            optimiser,
            len(support),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label=f"{self.name} epochs",
        )
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
        o = self.config
        maps = (
            out.map
            if out.fused_map is None
            else o["map_weight"] * out.map + (1.0 - o["map_weight"]) * out.fused_map
        )
        if o["smooth_sigma"] > 0:
            sigma = sigma_at(int(maps.shape[-1]), o["smooth_sigma"], o["smooth_reference_size"])
            maps = gaussian_smooth(maps, sigma)
        return maps.clamp(0.0, 1.0)

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        weight = self.config["score_weight"]
        out = self.outputs(items)
        maps = self.final_map(out)
        peak = maps.flatten(1).max(dim=1).values.double().cpu()
        probs = None
        if out.logits is not None:
            probs_t = torch.softmax(out.logits.double().cpu(), dim=1)
            probs = probs_t.numpy().astype(np.float64)
            scores = weight * (1.0 - probs_t[:, 0]) + (1.0 - weight) * peak
        else:
            scores = peak
        return Prediction(
            scores=scores.numpy().astype(np.float64),
            probs=probs,
            maps=maps.cpu().numpy().astype(np.float32),
        )


def _variant_options(key: str, default: Any) -> dict[str, Option]:
    """UltraAD's options with one default changed (an ablation switch)."""
    return {**UltraAD.options, key: UltraAD.options[key].with_default(default)}


class UltraADUltrasoundUnaware(UltraAD):
    """Ablation: class descriptions without ultrasound / pathology wording ("This is a {class} image.")."""

    name = "ultraad-us-unaware"
    table_group = "ours"
    table_rank = 1
    ablation_of = "ultraad"
    description = "UltraAD ablation: ultrasound-unaware class descriptions ('This is a {class} image.')"
    options: ClassVar[dict[str, Option]] = _variant_options("descriptions", "ultrasound-unaware")


class UltraADNoJoint(UltraAD):
    """Ablation: segmentation losses only, no classifier (localisation only; score = max of the map)."""

    name = "ultraad-no-joint"
    table_group = "ours"
    table_rank = 2
    ablation_of = "ultraad"
    description = "UltraAD ablation: no joint learning (segmentation losses only, no classifier)"
    tasks = frozenset({Task.LOCALIZE})
    options: ClassVar[dict[str, Option]] = _variant_options("joint", False)


class UltraADNoPIF(UltraAD):
    """Ablation: maps from the adapted patch tokens and the IAP prompts only (M, no fusion)."""

    name = "ultraad-no-pif"
    table_group = "ours"
    table_rank = 3
    ablation_of = "ultraad"
    description = "UltraAD ablation: no patch-wise image-language fusion (map M only)"
    options: ClassVar[dict[str, Option]] = _variant_options("pif", False)


METHODS = [UltraAD, UltraADUltrasoundUnaware, UltraADNoJoint, UltraADNoPIF]

__all__ = [
    "BUILTIN_SETS",
    "METHODS",
    "UltraAD",
    "UltraADNet",
    "UltraADNoJoint",
    "UltraADNoPIF",
    "UltraADUltrasoundUnaware",
]
