"""The common base of the few-shot CLIP classifiers (Tip-Adapter, CoOp, CLIP-Adapter, LP++, ...).

:class:`FewShotClassifier` gives tasks detect + classify, the ``class_names`` / ``templates``
options, the frozen zero-shot text classifier, cached normalised image embeddings,
per-epoch training views, and turns logits into a :class:`~bench.method.Prediction` with
``score = 1 - p(normal)``. :data:`COOP_SCHEDULE` is CoOp's published optimisation schedule
as options (also CoCoOp's and CLIP-Adapter's, whose official code runs on CoOp's configs).
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
from bench.kit.views import augmented_embeds
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task

#: CoOp's published optimisation schedule (Dassl SGD, cosine after a constant warm-up), also
#: used by CoCoOp and CLIP-Adapter, whose official code runs on CoOp's configs.
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
    "train_views": Option(
        0, int, "0 = cached features of the whole image; N = N cached augmented views, one per epoch", min=0
    ),
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
            try:
                weights = text_classifier(self.ctx.backbone, class_prompts(self.names, self.templates))
            except ValueError as exc:
                raise MethodError(f"method {self.name!r}: {exc}") from exc
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

    def training_views(
        self, support: SupportSet, n_views: int, *, normalise: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Per-epoch training features: the plain cached embeds (``n_views=0``) or augmented views.

        Returns a tuple of (n, D) tensors; epoch ``e`` uses entry ``e % len(tuple)``.
        """
        if n_views <= 0:
            return (self.embeds(support.items, normalise=normalise),)
        views = augmented_embeds(self.ctx.backbone, support.items, n_views, self.ctx.seed).to(self.device)
        if normalise:
            views = F.normalize(views, dim=-1)
        return tuple(views.unbind(0))

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
