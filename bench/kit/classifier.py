"""The common base of the few-shot CLIP classifiers (Tip-Adapter, CoOp, CLIP-Adapter, LP++, ...).

:class:`FewShotClassifier` gives tasks detect + classify, the ``class_names`` / ``templates``
options, the frozen zero-shot text classifier, cached normalised image embeddings,
per-epoch training features from a pool of cached augmented views (:meth:`training_pool`,
:class:`~bench.kit.views.ViewPool`), and turns logits into a
:class:`~bench.method.Prediction` with ``score = 1 - p(normal)``. :data:`COOP_SCHEDULE` is
CoOp's published training set-up as options: optimisation schedule and Dassl's training
augmentation (also CoCoOp's and CLIP-Adapter's, whose official code runs on CoOp's configs).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import MethodError
from bench.kit.memory import support_labels
from bench.kit.options import Option
from bench.kit.prompts import (
    class_names_option,
    class_prompts,
    names_in_class_order,
    templates_option,
    text_classifier,
)
from bench.kit.views import (
    DASSL_CROP_SCALE,
    DEFAULT_POOL_VIEWS,
    Augmentation,
    ViewPool,
    augmentation_from_config,
    augmentation_options,
    augmented_embeds,
    view_schedule,
)
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task

#: Dassl's training augmentation as CoOp's configs set it (``configs/trainers/CoOp/vit_b16.yaml:10,13``
#: and the CoCoOp config: ``random_resized_crop``, ``random_flip``, bicubic; the scale is Dassl's
#: ``INPUT.RRCROP_SCALE`` default (0.08, 1), ``dassl/config/defaults.py:40``, applied in
#: ``dassl/data/transforms/transforms.py:231-239``), as a pool of cached views.
DASSL_AUGMENTATION: dict[str, Option] = augmentation_options(
    views=DEFAULT_POOL_VIEWS,
    views_help=(
        "cached augmented views per support image, one per epoch in a seeded order "
        "(official: a fresh view every epoch); 0 = the plain image"
    ),
    scale=DASSL_CROP_SCALE,
    source="Dassl transforms.py:231-239",
)

#: CoOp's published training set-up (Dassl SGD, cosine after a constant warm-up, Dassl's
#: augmentation), also used by CoCoOp and CLIP-Adapter, whose official code runs on CoOp's configs.
COOP_SCHEDULE: dict[str, Option] = {
    "epochs": Option(
        None,
        int,
        "training epochs, fixed; null = CoOp's per-shot rule (50 / 100 / 200 for 1 / 2-4 / 8-16 shots)",
        nullable=True,
        min=1,
    ),
    "batch_size": Option(32, int, "batch size, Dassl sampler and drop-last rule (CoOp configs: 32)", min=1),
    "lr": Option(0.002, float, "SGD learning rate", min=0),
    "momentum": Option(0.9, float, "SGD momentum", min=0),
    "weight_decay": Option(5e-4, float, "SGD weight decay", min=0),
    "warmup_epochs": Option(1, int, "epochs at the constant warm-up rate", min=0),
    "warmup_lr": Option(1e-5, float, "warm-up learning rate", min=0),
    **DASSL_AUGMENTATION,
    "logit_scale": Option(None, float, "null = CLIP's own logit_scale.exp() (100 for OpenAI)", nullable=True),
}


def common_options(*, templates: bool = True) -> dict[str, Option]:
    """The options every few-shot classifier has."""
    options = {"class_names": class_names_option()}
    if templates:
        options["templates"] = templates_option()
    return options


class FewShotClassifier(Method):
    """Base of the few-shot CLIP classifiers: 3-class probabilities, score = 1 - p(normal).

    Subclasses implement :meth:`fit` and :meth:`logits`. ``class_names`` (and, when
    ``uses_templates``, ``templates``) are options of every subclass.
    """

    tasks = frozenset({Task.DETECT, Task.CLASSIFY})
    uses_support = True
    uses_backbone = True
    table_group = "classifier"
    #: Whether the method builds a hand-crafted text classifier from ``templates``.
    uses_templates: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.names = names_in_class_order(self.config["class_names"])
        self.templates = list(self.config["templates"]) if self.uses_templates else []
        self._text_weights: torch.Tensor | None = None
        self._fitted = False

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    # -- shared pieces -----------------------------------------------------------------
    def text_weights(self) -> torch.Tensor:
        """(3, D) frozen zero-shot classifier from ``class_names`` x ``templates`` (computed once)."""
        if self._text_weights is None:
            with self.reported(ValueError):
                weights = text_classifier(self.ctx.backbone, class_prompts(self.names, self.templates))
            self._text_weights = weights.to(self.device)
        return self._text_weights

    def embeds(self, items: Sequence[ImageItem], *, normalise: bool = True) -> torch.Tensor:
        """Frozen cached image embeddings (n, D) float32 on the method device."""
        feats = self.ctx.backbone.image_features(items).embeds.float().to(self.device)
        return F.normalize(feats, dim=-1) if normalise else feats

    def support_labels(self, support: SupportSet) -> torch.Tensor:
        return support_labels(support, self.device, self.name)

    def logit_scale(self) -> float:
        """The ``logit_scale`` option, or CLIP's own ``logit_scale.exp()`` when it is null."""
        value = self.config.get("logit_scale")
        return float(value) if value is not None else self.ctx.backbone.logit_scale

    def training_pool(self, support: SupportSet, epochs: int, *, normalise: bool = True) -> ViewPool:
        """Training features for ``epochs`` epochs from the method's augmentation options.

        ``augment_views: 0``: the plain cached embedding of every image in every epoch;
        ``K > 0``: K cached augmented views per image (``crop_scale``, ``crop_ratio``,
        ``flip``; views and their order seeded by the fit seed), one per epoch.
        """
        if "augment_views" not in self.config:
            raise MethodError(
                f"method {self.name!r} declares no augmentation options: add "
                "bench.kit.views.augmentation_options(...) (or COOP_SCHEDULE) to its options"
            )
        n_views = self.config["augment_views"]
        if n_views == 0:
            return ViewPool.fixed(self.embeds(support.items, normalise=normalise), epochs)
        augmentation = augmentation_from_config(self.config)
        return self.view_pool(support, n_views, epochs, augmentation, seed=self.ctx.seed, normalise=normalise)

    def view_pool(
        self,
        support: SupportSet,
        n_views: int,
        epochs: int,
        augmentation: Augmentation,
        *,
        seed: int,
        first_view: int = 0,
        normalise: bool = True,
    ) -> ViewPool:
        """Views ``first_view .. first_view + n_views - 1`` of every support image (frozen
        ``encode_image``, computed once and cached) and their seeded per-epoch order."""
        views = augmented_embeds(
            self.ctx.backbone, support.items, n_views, seed, augmentation, first_view=first_view
        ).to(self.device)
        if normalise:
            views = F.normalize(views, dim=-1)
        return ViewPool(views, view_schedule(len(support.items), n_views, epochs, seed))

    # -- prediction ----------------------------------------------------------------------
    @abstractmethod
    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        """(B, 3) class logits of a batch (called under ``torch.no_grad``)."""

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if not self._fitted:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        with torch.no_grad():
            logits = self.logits(items)
        return prediction_from_logits(logits)


def prediction_from_logits(logits: torch.Tensor) -> Prediction:
    """Softmax probabilities (float64) and the anomaly score ``1 - p(normal)``.

    The score is computed as ``p(benign) + p(malignant)`` in log space, which equals
    ``1 - p(normal)`` but keeps its resolution when ``p(normal)`` is within 1e-16 of 1.
    """
    logits = logits.detach().double().cpu()
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    scores = torch.logsumexp(log_probs[:, 1:], dim=1).exp()
    return Prediction(scores=scores.numpy().astype(np.float64), probs=probs.numpy().astype(np.float64))
