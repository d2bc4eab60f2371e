"""AdaCLIP (Cao et al., ECCV 2024; caoyunkang/AdaCLIP): hybrid learnable prompts, trained on the support.

Reimplemented from the official ``method/adaclip.py``, ``method/trainer.py``, ``train.py`` and
``loss.py`` (see docs/adaclip.md for every detail and deviation):

- a first, frozen, unprompted pass gives the image embedding (``encode_image``: the cached
  ``standard`` ``embeds``); ``length`` linear heads map it to dynamic visual and text prompts;
- visual prompts (dynamic + static of the block) enter the image tower through
  :class:`bench.kit.TrainablePass` on the cached stream entering block 0: appended after
  [CLS, patches] before block 0, replacing those tokens before blocks 1..depth-1, then carried
  to the last block; text prompts (dynamic + static) overwrite positions 1..length entering
  text blocks 1..depth-1 of the 7 normal / 5 abnormal states x 4 templates (per state the
  normalised mean of the normalised sentences);
- per used block a ``Linear(W -> D)`` on the prompted raw patch tokens, a ``Linear(D -> D)``
  on the prompted pooled feature, all L2-normalised; logits ``100 * cos`` with the text;
- map: upsampled (bilinear, align_corners) logits averaged over layers, softmax,
  ``(p1 + 1 - p0) / 2``, Gaussian sigma 4 px at the input size; image score
  ``softmax(100 * cos(f, T))[1]`` with ``f = normalise(0.2 HSF + 0.8 cls)``, HSF the mean of the
  k-means centres of the 100 most anomalous tokens;
- loss: Focal(image probabilities) + sum over layers of [Focal + Dice(p1, mask) + Dice(p0, 1 - mask)]
  on per-layer softmax maps; AdamW lr 0.01, betas (0.5, 0.999), weight decay 0.01, batch 1,
  5 epochs (fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BackboneError, MethodError
from bench.kit import (
    FeatureRequest,
    Option,
    Schedule,
    TrainablePass,
    dice_loss,
    feature_options,
    focal_loss,
    gaussian_smooth,
    seeded,
    segmentation_loss_options,
    sigma_at,
    train,
    truncation_is_exact,
    upsample_grid,
)
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task
from methods.adaclip.model import HybridPrompts, hybrid_semantic_fusion
from methods.adaclip.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, sentences

#: Images whose text prompts are encoded in one call at prediction (bounds memory).
TEXT_IMAGES_PER_CALL = 8


class AdaCLIP(Method):
    """AdaCLIP: static + dynamic visual and text prompts, per-layer projections, HSF image score."""

    name = "adaclip"
    description = "AdaCLIP (ECCV 2024): hybrid static + dynamic visual and text prompts, HSF image score"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    table_group = "anomaly"
    table_rank = 1
    options: ClassVar[dict[str, Option]] = {
        **feature_options("6/12/18/24 = blocks 5/11/17/23"),
        "object": Option(
            "breast ultrasound image",
            str,
            "object name in every sentence (official: the class name, '-' read as a space)",
            nonempty=True,
        ),
        "normal_states": Option(
            list(NORMAL_STATES), list, "official 7 normal states", items=str, nonempty=True
        ),
        "abnormal_states": Option(
            list(ABNORMAL_STATES), list, "official 5 abnormal states", items=str, nonempty=True
        ),
        "templates": Option(list(TEMPLATES), list, "official 4 templates", items=str, nonempty=True),
        "prompt_length": Option(
            5, int, "learnable tokens per prompted block (official prompting_length: 5)", min=1
        ),
        "prompt_depth": Option(
            4,
            int,
            "visual prompts enter image blocks 0..depth-1, text prompts text blocks 1..depth-1 "
            "(official prompting_depth: 4)",
            min=1,
        ),
        "prompting_type": Option(
            "SD",
            str,
            "static (S), dynamic (D) or both (official prompting_type: SD)",
            choices=("SD", "S", "D"),
        ),
        "prompting_branch": Option(
            "VL",
            str,
            "prompts in the visual (V), language (L) or both towers (official prompting_branch: VL)",
            choices=("VL", "V", "L"),
        ),
        "init_std": Option(0.02, float, "std of the static prompts' initialisation (official: 0.02)", min=0),
        "use_hsf": Option(
            True, bool, "image feature fused with the hybrid semantic fusion (official use_hsf: true)"
        ),
        "k_clusters": Option(20, int, "k-means clusters of the HSF (official k_clusters: 20)", min=1),
        "hsf_tokens_per_cluster": Option(
            5, int, "the HSF clusters the k_clusters * this most anomalous tokens (official: 5)", min=1
        ),
        "hsf_alpha": Option(
            0.2,
            float,
            "weight of the HSF feature against the class feature (official alpha: 0.2)",
            min=0,
            max=1,
        ),
        "logit_scale": Option(100.0, float, "scale of the cosine similarities (official: 100)", gt=0),
        "align_corners": Option(
            True, bool, "bilinear upsampling of the logits with align_corners (official: true)"
        ),
        "sigma": Option(
            4.0, float, "Gaussian sigma of the map in px at the input resolution (official: 4)", min=0
        ),
        "epochs": Option(5, int, "training epochs, a fixed count (official --epoch: 5)", min=0),
        "batch_size": Option(1, int, "training batch size (official: 1, the only size it supports)", min=1),
        "lr": Option(0.01, float, "AdamW learning rate (official: 0.01)", gt=0),
        "betas": Option(
            [0.5, 0.999], list, "AdamW betas (official: 0.5, 0.999)", items=float, length=2, min=0, max=1
        ),
        "weight_decay": Option(0.01, float, "AdamW weight decay (official: torch's default 0.01)", min=0),
        "image_loss_weight": Option(
            1.0, float, "weight of the image focal loss against the pixel losses (official: 1)", min=0
        ),
        **segmentation_loss_options("official loss.py"),
        "dice_per_row": Option(
            True,
            bool,
            "Dice averaged over mask rows (official: gt.squeeze() at batch 1 makes BinaryDiceLoss "
            "treat each of the 518 rows as a sample); false = per image",
        ),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        layers = None if cfg["layers"] is None else tuple(cfg["layers"])
        self._layers = layers
        self.request = FeatureRequest.of("standard", layers=layers, input_size=cfg["input_size"])
        self._pass: TrainablePass | None = None
        self.prompts: HybridPrompts | None = None
        self.history: list[dict[str, float]] = []
        self._text_ids: torch.Tensor | None = None
        self._text_embeddings: torch.Tensor | None = None
        self._n_normal = 0

    # -- frozen pieces ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    @property
    def tower_pass(self) -> TrainablePass:
        """Blocks 0.. under autograd on the cached stream entering block 0 (the frozen prefix)."""
        if self._pass is None:
            with self.reported(BackboneError, ValueError):
                self._pass = TrainablePass(
                    self.ctx.backbone, 0, layers=self._layers, input_size=self.config["input_size"]
                )
        return self._pass

    @property
    def grid(self) -> tuple[int, int]:
        return self.tower_pass.tower.grid

    @property
    def input_size(self) -> int:
        return self.tower_pass.tower.input_size

    def frozen(self, items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (stream entering block 0 (B, 1 + N, W), unprompted ``encode_image`` (B, D))."""
        tower_pass = self.tower_pass
        with self.reported(BackboneError):
            embeds = self.ctx.backbone.features(items, self.request).embeds
        return tower_pass.prefix(items), embeds

    # -- text -------------------------------------------------------------------------------
    def _sentences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (n, ctx) and frozen token embeddings (n, ctx, text width) of every sentence."""
        if self._text_ids is None:
            cfg = self.config
            normal = sentences(cfg["normal_states"], cfg["templates"], cfg["object"])
            abnormal = sentences(cfg["abnormal_states"], cfg["templates"], cfg["object"])
            backbone = self.ctx.backbone
            ids = backbone.tokenize(normal + abnormal)
            if bool((ids[:, -1] != 0).any()):
                raise MethodError(
                    f"method {self.name!r}: a sentence is longer than the text encoder's "
                    f"{ids.shape[1]} tokens"
                )
            eot = ids.argmax(dim=-1)
            if (
                self.prompts is not None
                and self.prompts.text_branch
                and int(eot.min()) <= cfg["prompt_length"]
            ):
                raise MethodError(
                    f"method {self.name!r}: option 'prompt_length' {cfg['prompt_length']} would overwrite "
                    f"the end token of a {int(eot.min()) - 1}-token sentence"
                )
            if truncation_is_exact(backbone):  # padding after the last end token cannot change the result
                ids = ids[:, : int(eot.max()) + 1]
            self._text_ids = ids
            self._text_embeddings = backbone.token_embeddings(ids)
            self._n_normal = len(normal)
        assert self._text_embeddings is not None
        return self._text_ids, self._text_embeddings

    def text_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 2, D) normalised [normal, abnormal] text features for B images (their embeds (B, D))."""
        assert self.prompts is not None
        ids, embeddings = self._sentences()
        n = int(ids.shape[0])
        deep = self.prompts.text_prompts(image)
        if deep is None or all(tokens.dim() == 2 for tokens in deep.values()):  # the same for every image
            raw = self.ctx.backbone.encode_embeddings(embeddings, ids, deep_prompts=deep, deep_start=1)
            return self._classes(raw[None]).expand(image.shape[0], -1, -1)
        out = []
        for start in range(0, image.shape[0], TEXT_IMAGES_PER_CALL):
            chunk = {block: tokens[start : start + TEXT_IMAGES_PER_CALL] for block, tokens in deep.items()}
            b = next(iter(chunk.values())).shape[0]
            per_sentence = {block: tokens.repeat_interleave(n, dim=0) for block, tokens in chunk.items()}
            raw = self.ctx.backbone.encode_embeddings(
                embeddings.repeat(b, 1, 1), ids.repeat(b, 1), deep_prompts=per_sentence, deep_start=1
            )
            out.append(self._classes(raw.reshape(b, n, -1)))
        return torch.cat(out)

    def _classes(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, n, D) sentence embeddings -> (B, 2, D): per state the normalised mean of the normalised."""
        raw = F.normalize(raw, dim=-1)
        normal = raw[:, : self._n_normal].mean(dim=1)
        abnormal = raw[:, self._n_normal :].mean(dim=1)
        return F.normalize(torch.stack([normal, abnormal], dim=1), dim=-1)

    # -- the forward ------------------------------------------------------------------------
    def forward(
        self, prefix: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class feature (B, D), patch features (B, L, N, D), text (B, 2, D)), all normalised."""
        assert self.prompts is not None
        out = self.tower_pass(prefix, prompts=self.prompts.visual_prompts(image))
        cls, patches = self.prompts.project(out.patch_tokens, out.embeds)
        return cls, patches, self.text_features(image)

    def logits(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, L, N, 2): ``logit_scale * patch . text`` per layer."""
        return self.config["logit_scale"] * torch.einsum("blnd,bkd->blnk", patches, text)

    def image_probabilities(
        self, cls: torch.Tensor, patches: torch.Tensor, logits: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """(B, 2): softmax of ``logit_scale * cos(f, T)``, f = normalise(alpha HSF + (1 - alpha) cls)."""
        cfg = self.config
        feature = cls
        if cfg["use_hsf"]:
            fused = hybrid_semantic_fusion(
                patches, logits, cfg["k_clusters"], cfg["hsf_tokens_per_cluster"], self.ctx.seed
            )
            feature = F.normalize(cfg["hsf_alpha"] * fused + (1.0 - cfg["hsf_alpha"]) * cls, dim=-1)
        return torch.softmax(cfg["logit_scale"] * torch.einsum("bd,bkd->bk", feature, text), dim=-1)

    def upsampled_logits(self, logits: torch.Tensor, size: int) -> torch.Tensor:
        """(B, L, N, 2) -> (B, L, 2, S, S), bilinear (align_corners as the option)."""
        return upsample_grid(
            logits.transpose(-1, -2), self.grid, size, align_corners=self.config["align_corners"]
        )

    def anomaly_map(self, logits: torch.Tensor, size: int) -> torch.Tensor:
        """Test-time map (B, S, S): softmax of the layer-mean upsampled logits, ``(p1 + 1 - p0) / 2``,
        then the Gaussian (sigma in px at the input size, rescaled to ``size``)."""
        probs = torch.softmax(self.upsampled_logits(logits, size).mean(dim=1), dim=1)
        maps = (probs[:, 1] + 1.0 - probs[:, 0]) / 2.0
        sigma = self.config["sigma"]
        if sigma > 0:
            maps = gaussian_smooth(maps, sigma_at(size, sigma, self.input_size))
        return maps

    # -- training ---------------------------------------------------------------------------
    def _build(self) -> HybridPrompts:
        cfg = self.config
        backbone = self.ctx.backbone
        tower = self.tower_pass.tower
        depth, text = cfg["prompt_depth"], "L" in cfg["prompting_branch"]
        if text and depth - 1 > backbone.text_depth - 1:
            raise MethodError(
                f"method {self.name!r}: option 'prompt_depth' {depth} needs text blocks 1..{depth - 1}, "
                f"the text encoder has blocks 0..{backbone.text_depth - 1}"
            )
        if "V" in cfg["prompting_branch"] and depth > tower.depth:
            raise MethodError(
                f"method {self.name!r}: option 'prompt_depth' {depth} exceeds the image tower's "
                f"{tower.depth} blocks"
            )
        if cfg["use_hsf"] and cfg["k_clusters"] > tower.n_patches:
            raise MethodError(
                f"method {self.name!r}: option 'k_clusters' {cfg['k_clusters']} exceeds the "
                f"{tower.n_patches} patch tokens of the {tower.grid[0]} x {tower.grid[1]} grid"
            )
        with seeded(self.ctx.seed):
            prompts = HybridPrompts(
                width=tower.width,
                text_width=backbone.text_width,
                embed_dim=tower.embed_dim,
                n_layers=len(self.tower_pass.layers),
                length=cfg["prompt_length"],
                depth=depth,
                static="S" in cfg["prompting_type"],
                dynamic="D" in cfg["prompting_type"],
                visual="V" in cfg["prompting_branch"],
                text=text,
                init_std=cfg["init_std"],
            )
        return prompts.to(self.device)

    def pixel_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Sum over layers of Focal(p1) + Dice(p1, mask) + Dice(p0, 1 - mask) on per-layer softmax maps."""
        cfg = self.config
        probs = torch.softmax(self.upsampled_logits(logits, int(masks.shape[-1])), dim=2)  # (B, L, 2, S, S)

        def dice(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if cfg["dice_per_row"]:
                p, y = p.reshape(-1, p.shape[-1]), y.reshape(-1, y.shape[-1])
            return dice_loss(p, y, cfg["dice_smooth"])

        return sum(
            (
                focal_loss(probs[:, i, 1], masks, cfg["focal_gamma"], smooth=cfg["focal_smooth"])
                + dice(probs[:, i, 1], masks)
                + dice(probs[:, i, 0], 1.0 - masks)
                for i in range(probs.shape[1])
            ),
            torch.zeros((), device=logits.device),
        )

    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        self.prompts = self._build()
        self._text_ids = None
        self._sentences()
        prefix, embeds = self.frozen(support.items)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32), device=self.device)
        lesion = torch.as_tensor(np.asarray(support.labels) > 0, dtype=torch.float32, device=self.device)
        optimizer = torch.optim.AdamW(
            self.prompts.parameters(),
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            weight_decay=cfg["weight_decay"],
        )

        def step(batch: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
            batch = batch.to(self.device)
            cls, patches, text = self.forward(prefix[batch], embeds[batch])
            logits = self.logits(patches, text)
            probs = self.image_probabilities(cls, patches, logits, text)
            image = focal_loss(probs[:, 1], lesion[batch], cfg["focal_gamma"], smooth=cfg["focal_smooth"])
            pixel = self.pixel_loss(logits, masks[batch])
            return {"pixel": pixel, "image": image, "total": cfg["image_loss_weight"] * image + pixel}

        self.prompts.train()
        schedule = Schedule(cfg["epochs"], cfg["batch_size"], drop_last=False)
        self.history = train(
            optimizer,
            len(support),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="adaclip epochs",
        )
        self.prompts.eval()

    # -- prediction -------------------------------------------------------------------------
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if self.prompts is None:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        prefix, embeds = self.frozen(items)
        with torch.no_grad():
            cls, patches, text = self.forward(prefix, embeds)
            logits = self.logits(patches, text)
            scores = self.image_probabilities(cls, patches, logits, text)[:, 1]
            maps = self.anomaly_map(logits, self.ctx.eval_size)
        return Prediction(
            scores=scores.double().cpu().numpy().astype(np.float64),
            maps=maps.cpu().numpy().astype(np.float32),
        )


METHODS = [AdaCLIP]
