"""MVFA (Huang et al., CVPR 2024; MediaBrain-SJTU/MVFA-AD): multi-level adapters inside the image tower.

Reimplemented from the official ``CLIP/adapter.py``, ``train_few.py``, ``utils.py`` and
``loss.py`` (see docs/mvfa.md for every detail and deviation):

- after each used block (official ``features_list`` 6/12/18/24 = blocks 5/11/17/23) a
  segmentation and a detection :class:`~methods.mvfa.adapters.ClipAdapter` read the stream
  (all tokens) and it becomes ``0.8 x + 0.1 seg_out + 0.1 det_out``; the scored features are
  the adapters' D-wide bottlenecks. The frozen stream entering the first trainable block is
  a cached feature (``bench.kit.TrainablePass``), the adapters run as in-forward hooks;
- text: the April-GAN prompt ensemble (7 normal / 5 abnormal states x 35 templates);
- zero-shot branch: per layer ``100 cos(bottleneck, T)``, upsampled (bilinear, align_corners)
  then softmax, abnormal channel SUMMED over layers (seg bottlenecks); few-shot branch: per
  layer ``min (1 - cos)`` to a memory of the augmented normal support images' bottlenecks
  (class token kept), upsampled and summed;
- map ``0.5 zero + 0.5 few``, each min-max normalised by SUPPORT statistics (the official code
  uses the test set's); image score = the map's maximum (official, datasets with masks);
- training on 11 augmented views per support image: per layer Focal + Dice on the seg map
  and ``BCEWithLogits(mean abnormal probability of the det bottlenecks, label)``, summed;
  Adam lr 1e-3, betas (0.5, 0.999), batch 1, 50 epochs (fixed; the official code keeps the
  best epoch on the TEST set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BackboneError, MethodError
from bench.kit import (
    FeatureRequest,
    Option,
    Schedule,
    TrainablePass,
    adam_options,
    dice_loss,
    feature_options,
    focal_loss,
    nearest_cosine_distance,
    seeded,
    segmentation_loss_options,
    text_similarity_maps,
    train,
    upsample_grid,
)
from bench.kit.ensembles import VAND_ABNORMAL_STATES as ABNORMAL_STATES
from bench.kit.ensembles import VAND_NORMAL_STATES as NORMAL_STATES
from bench.kit.ensembles import VAND_TEMPLATES as TEMPLATES
from bench.kit.ensembles import state_classifier
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task
from methods.mvfa.adapters import ImplantedAdapters
from methods.mvfa.views import ROTATIONS, TRANSLATIONS, ViewTransform, official_views, view_item, view_masks

#: How the image score is made: the official rule for datasets with masks, or for the others.
IMAGE_SCORES = ("map-max", "det")


def _pairs_problem(value: Any) -> str | None:
    for pair in value:
        if len(pair) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pair
        ):
            return "must hold [a, b] pairs of finite numbers"
    return None


def _fusion_problem(value: Any) -> str | None:
    return "must not be all zero" if not any(value) else None


class MVFA(Method):
    """MVFA: residual seg/det adapters after four blocks of the frozen tower, text + memory maps."""

    name = "mvfa"
    description = "MVFA (CVPR 2024): multi-level residual adapters inside the image tower, text + memory maps"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    table_group = "anomaly"
    table_rank = 4
    options: ClassVar[dict[str, Option]] = {
        **feature_options("features_list 6/12/18/24 = blocks 5/11/17/23"),
        "input_size": Option(
            None,
            int,
            "input size (null = the run's --input-size; official: 240 with ViT-L/14@336, a 17 x 17 grid "
            "whose conv drops the last 2 px; configs/paper.yaml: 238)",
            nullable=True,
            min=16,
        ),
        "object": Option(
            "breast ultrasound image",
            str,
            "object name in every sentence (official: REAL_NAME of the dataset)",
        ),
        "normal_states": Option(
            list(NORMAL_STATES), list, "official 7 normal states", items=str, nonempty=True
        ),
        "abnormal_states": Option(
            list(ABNORMAL_STATES), list, "official 5 abnormal states", items=str, nonempty=True
        ),
        "templates": Option(list(TEMPLATES), list, "official 35 templates", items=str, nonempty=True),
        "residual_weights": Option(
            [0.8, 0.1, 0.1],
            list,
            "stream, seg-adapter and det-adapter weights of the residual update (official: 0.8, 0.1, 0.1)",
            items=float,
            length=3,
        ),
        "negative_slope": Option(
            0.01, float, "LeakyReLU slope of both adapter layers (official: nn.LeakyReLU default 0.01)", min=0
        ),
        "logit_scale": Option(100.0, float, "scale of the cosine similarities (official: 100)", gt=0),
        "align_corners": Option(True, bool, "bilinear upsampling with align_corners (official: true)"),
        "fusion_weights": Option(
            [0.5, 0.5],
            list,
            "weights of the normalised zero-shot and few-shot branches (official: 0.5, 0.5)",
            items=float,
            length=2,
            min=0,
            check=_fusion_problem,
        ),
        "image_score": Option(
            "map-max",
            str,
            "image score: max of the fused seg map (official for datasets with masks) or the fused "
            "det-head score (official for classification-only datasets)",
            choices=IMAGE_SCORES,
        ),
        "rotations": Option(
            list(ROTATIONS),
            list,
            "augmentation rotations in radians (official: -pi/8, -pi/16, pi/16, pi/8)",
            items=float,
        ),
        "translations": Option(
            [list(t) for t in TRANSLATIONS],
            list,
            "augmentation translations [a, b] in normalised coordinates (official: (+-0.1, +-0.1))",
            items=list,
            check=_pairs_problem,
        ),
        "flips": Option(True, bool, "horizontal and vertical flip views (official: true)"),
        **adam_options(epochs=50, batch_size=1, lr=1e-3, betas=(0.5, 0.999), source="official train_few.py"),
        **segmentation_loss_options("official loss.py"),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.adapters: ImplantedAdapters | None = None
        #: Per normal support image, its views' bottlenecks at every used block, class token kept:
        #: (seg, det), each (K, L, V * (1 + N), D).
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None
        #: Support statistics replacing the official test-set min-max: name -> (low, high).
        self.ranges: dict[str, tuple[float, float]] = {}
        self.history: list[dict[str, float]] = []
        self._pass: TrainablePass | None = None
        self._blocks: tuple[int, ...] = ()
        self._text: torch.Tensor | None = None

    # -- frozen pieces ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    @property
    def tower_pass(self) -> TrainablePass:
        """Blocks after the first adapted one under autograd, on the cached stream entering them."""
        if self._pass is None:
            cfg = self.config
            backbone = self.ctx.backbone
            layers = None if cfg["layers"] is None else tuple(cfg["layers"])
            try:
                request = backbone.resolve(FeatureRequest.of(layers=layers, input_size=cfg["input_size"]))
                assert request.layers is not None
                blocks = request.layers
                # the stream after the first adapted block is frozen: cache it and adapt it here
                start = blocks[0] + 1 if blocks[0] + 1 < backbone.depth else blocks[0]
                self._pass = TrainablePass(
                    backbone, start, layers=[backbone.depth - 1], input_size=request.input_size
                )
            except BackboneError as exc:
                raise MethodError(f"method {self.name!r}: option 'layers' / 'input_size': {exc}") from exc
            self._blocks = blocks
        return self._pass

    @property
    def blocks(self) -> tuple[int, ...]:
        """The 0-based blocks followed by an adapter pair."""
        _ = self.tower_pass
        return self._blocks

    @property
    def grid(self) -> tuple[int, int]:
        return self.tower_pass.tower.grid

    @property
    def input_size(self) -> int:
        return self.tower_pass.tower.input_size

    def prefix(self, items: Sequence[ImageItem]) -> torch.Tensor:
        """The cached frozen stream entering the first trainable block (B, 1 + N, W)."""
        return self.tower_pass.prefix(items)

    def text(self) -> torch.Tensor:
        """(2, D) normalised [normal, abnormal] class embeddings (the official prompt ensemble)."""
        if self._text is None:
            cfg = self.config
            with self.reported(ValueError):
                self._text = state_classifier(
                    self.ctx.backbone,
                    cfg["normal_states"],
                    cfg["abnormal_states"],
                    cfg["templates"],
                    cfg["object"],
                )
        return self._text

    # -- the adapted tower ------------------------------------------------------------------
    def bottlenecks(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seg, det) bottlenecks after every used block, all tokens: each (B, L, 1 + N, D)."""
        adapters = self.adapters
        assert adapters is not None
        seg: dict[int, torch.Tensor] = {}
        det: dict[int, torch.Tensor] = {}

        def hook(block: int, tokens: torch.Tensor) -> torch.Tensor:
            stream, seg[block], det[block] = adapters.residual(block, tokens)
            return stream

        tower_pass = self.tower_pass
        stream = prefix
        if tower_pass.start > self.blocks[0]:  # the prefix IS the stream after the first block
            stream = hook(self.blocks[0], stream)
        tower_pass(stream, hooks={b: hook for b in self.blocks if b >= tower_pass.start})
        return (
            torch.stack([seg[b] for b in self.blocks], dim=1),
            torch.stack([det[b] for b in self.blocks], dim=1),
        )

    def bottlenecks_no_grad(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`bottlenecks` without gradients, in chunks of the backbone's batch size."""
        chunk = max(1, int(self.ctx.backbone.batch_size))
        segs, dets = [], []
        with torch.no_grad():
            for start in range(0, prefix.shape[0], chunk):
                seg, det = self.bottlenecks(prefix[start : start + chunk])
                segs.append(seg)
                dets.append(det)
        return torch.cat(segs), torch.cat(dets)

    # -- branches -----------------------------------------------------------------------------
    def text_maps(self, seg: torch.Tensor, size: int, index: int | None = 1) -> torch.Tensor:
        """Per layer softmax over [normal, abnormal] of the upsampled ``scale * cos`` logits of the
        patch bottlenecks: (B, L, S, S) (``index=None``: (B, L, 2, S, S))."""
        cfg = self.config
        return text_similarity_maps(
            seg[:, :, 1:],
            self.text(),
            self.grid,
            size,
            tau=1.0 / cfg["logit_scale"],
            upsample="logits",
            align_corners=cfg["align_corners"],
            index=index,
        )

    def det_probabilities(self, det: torch.Tensor) -> torch.Tensor:
        """(B, L): per layer the mean over patches of ``softmax(scale * cos(det, T))[abnormal]``."""
        probs = text_similarity_maps(
            det[:, :, 1:], self.text(), self.grid, None, tau=1.0 / self.config["logit_scale"]
        )
        return probs.flatten(2).mean(dim=-1)

    def memory_maps(
        self, tokens: torch.Tensor, memory: torch.Tensor, size: int, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, S, S): sum over layers of the upsampled ``min over the memory of (1 - cos)`` of the
        patch bottlenecks; ``exclude[b]`` leaves normal support image ``exclude[b]`` (all its views) out."""
        per_layer = [
            nearest_cosine_distance(tokens[:, i, 1:], memory[:, i], exclude) for i in range(tokens.shape[1])
        ]
        distances = torch.stack(per_layer, dim=1)  # (B, L, N)
        return upsample_grid(distances, self.grid, size, align_corners=self.config["align_corners"]).sum(
            dim=1
        )

    def branches(
        self, prefix: torch.Tensor, size: int, exclude: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Un-normalised branches: ``zero_map``, ``few_map`` (B, S, S), ``zero_det``, ``few_det`` (B,)."""
        assert self.memory is not None
        seg, det = self.bottlenecks_no_grad(prefix)
        out = {
            "zero_map": self.text_maps(seg, size).sum(dim=1),
            "few_map": self.memory_maps(seg, self.memory[0], size, exclude),
        }
        if self.config["image_score"] == "det":
            out["zero_det"] = self.det_probabilities(det).sum(dim=1)
            out["few_det"] = self.memory_maps(det, self.memory[1], size, exclude).flatten(1).mean(dim=1)
        return out

    def fuse(self, zero: torch.Tensor, few: torch.Tensor, kind: str) -> torch.Tensor:
        """``w0 (zero - lo) / (hi - lo) + w1 (few - lo') / (hi' - lo')`` with the support ranges."""
        (z_lo, z_hi), (f_lo, f_hi) = self.ranges[f"zero_{kind}"], self.ranges[f"few_{kind}"]
        w_zero, w_few = self.config["fusion_weights"]
        return w_zero * (zero - z_lo) / (z_hi - z_lo) + w_few * (few - f_lo) / (f_hi - f_lo)

    # -- training ---------------------------------------------------------------------------
    def views(self) -> list[ViewTransform]:
        cfg = self.config
        return official_views(cfg["rotations"], cfg["translations"], cfg["flips"])

    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        normal = np.flatnonzero(support.labels == 0)
        if normal.size == 0:
            raise MethodError(
                f"method {self.name!r}: the memory needs normal support images, the support set has none"
            )
        backbone = self.ctx.backbone
        size_in = self.input_size
        transforms = self.views()
        n_views = len(transforms)
        # image-major: row i * V + v is view v of support image i
        items = [view_item(item, t, size_in) for item in support.items for t in transforms]
        prefix = self.prefix(items)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32))
        masks = torch.stack([view_masks(masks, t) for t in transforms], dim=1).flatten(0, 1).to(self.device)
        lesion = torch.as_tensor(
            np.repeat(support.labels > 0, n_views), dtype=torch.float32, device=self.device
        )
        size = int(masks.shape[-1])
        with seeded(self.ctx.seed):
            self.adapters = ImplantedAdapters(
                self.blocks,
                backbone.width,
                backbone.embed_dim,
                negative_slope=cfg["negative_slope"],
                residual_weights=cfg["residual_weights"],
            ).to(self.device)
        self.text()
        # the official seg and det optimisers (same settings) as one Adam with two groups
        optimizer = torch.optim.Adam(
            [{"params": self.adapters.seg.parameters()}, {"params": self.adapters.det.parameters()}],
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
        )

        def step(batch: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
            batch = batch.to(self.device)
            seg, det = self.bottlenecks(prefix[batch])
            probs = self.text_maps(seg, size, index=None)  # (b, L, 2, S, S)
            target = masks[batch]
            seg_loss = sum(
                focal_loss(probs[:, i, 1], target, cfg["focal_gamma"], smooth=cfg["focal_smooth"])
                + dice_loss(probs[:, i, 1], target, cfg["dice_smooth"])
                for i in range(probs.shape[1])
            )
            scores = self.det_probabilities(det)  # (b, L)
            # the official BCEWithLogitsLoss on a probability
            det_loss = sum(
                F.binary_cross_entropy_with_logits(scores[:, i], lesion[batch])
                for i in range(scores.shape[1])
            )
            return {"seg": seg_loss, "det": det_loss, "total": seg_loss + det_loss}

        schedule = Schedule(cfg["epochs"], cfg["batch_size"], drop_last=False)
        self.history = train(
            optimizer,
            len(items),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="mvfa epochs",
        )
        self._build_memory(prefix, normal, n_views)
        self._support_ranges(prefix[::n_views], normal, len(support), size)

    def _build_memory(self, prefix: torch.Tensor, normal: np.ndarray, n_views: int) -> None:
        """Every view of every normal support image through the fitted adapters, class token kept."""
        rows = torch.as_tensor(normal[:, None] * n_views + np.arange(n_views)[None], device=prefix.device)
        seg, det = self.bottlenecks_no_grad(prefix[rows.flatten()])  # (K * V, L, 1 + N, D)

        def per_image(tokens: torch.Tensor) -> torch.Tensor:
            k, n_layers, dim = normal.size, tokens.shape[1], tokens.shape[-1]
            tokens = tokens.reshape(k, n_views, n_layers, -1, dim).transpose(1, 2)  # (K, L, V, 1 + N, D)
            return tokens.reshape(k, n_layers, -1, dim)

        self.memory = (per_image(seg), per_image(det))

    def _support_ranges(self, prefix: torch.Tensor, normal: np.ndarray, n: int, size: int) -> None:
        """Min and max of every branch over the support images (replaces the official test-set
        min-max); a normal image is scored with its own views left out of the memory."""
        exclude = torch.full((n,), -1, dtype=torch.long)
        exclude[torch.as_tensor(normal)] = torch.arange(normal.size)
        values = self.branches(prefix, size, exclude.to(prefix.device))
        self.ranges = {}
        for key, value in values.items():
            low, high = float(value.min()), float(value.max())
            self.ranges[key] = (low, high if high > low else low + 1.0)

    # -- prediction -------------------------------------------------------------------------
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if self.adapters is None or self.memory is None:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        values = self.branches(self.prefix(items), self.ctx.eval_size)
        with torch.no_grad():
            maps = self.fuse(values["zero_map"], values["few_map"], "map")
            if self.config["image_score"] == "map-max":
                scores = maps.flatten(1).max(dim=1).values
            else:
                scores = self.fuse(values["zero_det"], values["few_det"], "det")
        return Prediction(
            scores=scores.double().cpu().numpy().astype(np.float64),
            maps=maps.cpu().numpy().astype(np.float32),
        )


METHODS = [MVFA]
