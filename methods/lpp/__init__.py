"""LP++ (Huang, Shakeri, Dolz, Boudiaf, Bahig, Ben Ayed; CVPR 2024), linear probe blended with text.

Reimplemented from FereshteShakeri/FewShot-CLIP-Strong-Baseline ``methods/linear_probe_p2.py``
(``LinearProbe_P2``), ``methods/utils.py`` and ``configs/base.yaml``:

- features ``f`` L2-normalised (N support images), text weights ``t_c`` the normalised
  zero-shot classifier (``class_names`` x ``templates``);
- ``logits = W f + b + alpha_c (f . t_c)`` (no x100);
- ``W`` initialised with the per-class feature SUMS (``compute_centroids``: the division by
  the class count is commented out in the official code); ``b`` keeps ``nn.Linear``'s
  default uniform(+-1/sqrt(D)) init (under the fit seed);
- ``alpha`` initialised to ONE value for all classes: ``250 * mean over (c, k) of
  mean_{i in class c} (f_i . t_k)`` (``calculate_init_alpha``: class means of the text
  logits, times shots, times 250 / shots, then the mean of the C x C matrix);
- step sizes from the data (``calculate_lr_w``, ``calculate_lr_alpha``):
  ``lr_W = 4 N / lambda_max(F^T F)`` (largest eigenvalue, ``scipy.linalg.eigh``) and
  ``lr_alpha = N / (4 max_k sum_i (f_i . t_k)^2)``;
- full-batch training, 300 epochs (``train_epoch: 300`` for the linear probes): every
  epoch one SGD step (momentum 0.9, no weight decay) on ``W, b`` with ``lr_W``; every 10th
  epoch ``alpha -= lr_alpha * alpha.grad``. The official code never zeroes ``alpha.grad``, so
  that gradient is the SUM of the gradients of all epochs so far; we do the same
  (``reset_alpha_grad: true`` uses only the last 10 epochs' sum instead).

**Training augmentation** (``augment_views``, ``crop_scale``, ``crop_ratio``, ``flip``): the
official training loader applies ``train_tranform`` = RandomResizedCrop(224, scale (0.5, 1),
bicubic) + RandomHorizontalFlip(0.5) (``main.py:69-74``, loader ``:96-101``), and
``LinearProbe_P2.forward`` extracts the training features ONCE, one pass over that loader
(``methods/linear_probe_p2.py:69-79``), then trains all 300 epochs on them: one augmented
view per image, fixed for the whole fit. ``augment_views: 1`` (the default) is exactly
that, with the view encoded once and cached (it is view 0 of the Tip-Adapter view cache
for the same seed, so the two methods share it); ``0`` trains on the plain image. More
than one view is not LP++'s procedure and is refused. Test images are never augmented.

Other differences: a fixed epoch count (the official loop reports the test accuracy at the
epoch with the best accuracy on a labelled validation split, which we do not have); fp32
(the official classifier runs in CLIP's fp16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import scipy.linalg
import torch
import torch.nn.functional as F

from bench.kit import FewShotClassifier, Option, Schedule, common_options, make_generator, one_hot, train
from bench.kit.views import DEFAULT_CROP_SCALE, augmentation_options
from bench.method import MethodContext, SupportSet
from bench.types import ImageItem


def class_sums(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, D) per-class sums of ``features`` (official ``compute_centroids``)."""
    return one_hot(labels, n_classes).T @ features


def init_alpha(
    features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float = 250.0
) -> float:
    """``scale`` x mean over (c, k) of the class-c mean of ``f . t_k`` (official ``calculate_init_alpha``)."""
    logits = features.double() @ text.double().T  # (N, C)
    onehot = one_hot(labels, text.shape[0]).double()
    class_means = (onehot.T @ logits) / onehot.sum(0)[:, None]  # (C, C)
    return float(scale * class_means.mean())


def lr_weights(features: torch.Tensor) -> float:
    """``4 N / lambda_max(F^T F)`` (official ``calculate_lr_w``)."""
    f = features.detach().double().cpu().numpy()
    eigenvalues = scipy.linalg.eigh(f.T @ f, eigvals_only=True)
    return float(4 * f.shape[0] / eigenvalues.max())


def lr_alpha(features: torch.Tensor, text: torch.Tensor) -> float:
    """``N / (4 max_k sum_i (f_i . t_k)^2)`` (official ``calculate_lr_alpha``)."""
    logits = features.double() @ text.double().T
    return float(features.shape[0] / (4.0 * (logits**2).sum(0).max()))


def lpp_logits(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """``W f + b + alpha_c (f . t_c)`` for normalised ``features`` (N, D)."""
    return features @ weight.T + bias + alpha * (features @ text.T)


class LPPlusPlus(FewShotClassifier):
    name = "lpp"
    table_group = "classifier"
    table_rank = 1
    description = (
        "LP++: linear probe blended with text weights, data-driven step sizes (300 full-batch epochs)"
    )
    options: ClassVar[dict[str, Option]] = {
        **common_options(),
        "epochs": Option(
            300, int, "full-batch epochs, fixed (official configs/base.yaml: train_epoch 300)", min=1
        ),
        "momentum": Option(0.9, float, "SGD momentum of W and b (official: 0.9)", min=0),
        "alpha_every": Option(
            10, int, "epochs between two steps on alpha (official: every 10th epoch)", min=1
        ),
        "alpha_init_scale": Option(
            250.0, float, "alpha init = scale x mean class text logit (official: 250)"
        ),
        "reset_alpha_grad": Option(
            False, bool, "sum alpha's gradient over the last alpha_every epochs only (official: never reset)"
        ),
        **augmentation_options(
            views=1,
            views_help=(
                "1 = one cached augmented view per image for every epoch (official: features "
                "extracted once from the augmenting loader); 0 = the plain image"
            ),
            scale=DEFAULT_CROP_SCALE,
            source="LP++ main.py:69-74",
            max_views=1,
        ),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.epochs: int = self.config["epochs"]
        self.alpha_every: int = self.config["alpha_every"]
        self.state: dict[str, float] = {}

    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        labels = self.support_labels(support)
        features = self.training_pool(support, self.epochs).epoch(0)  # LP++ extracts them once
        text = self.text_weights()
        n_classes, dim = text.shape

        weight = torch.nn.Parameter(class_sums(features, labels, n_classes))
        bound = 1.0 / math.sqrt(dim)
        generator = make_generator(self.ctx.seed)  # the bias init; train() never draws (full batch, in order)
        bias = torch.nn.Parameter(
            (torch.rand(n_classes, generator=generator) * 2 * bound - bound).to(self.device)
        )
        alpha0 = init_alpha(features, labels, text, cfg["alpha_init_scale"])
        alpha = torch.full((n_classes,), alpha0, device=self.device, requires_grad=True)
        step_w = lr_weights(features)
        step_alpha = lr_alpha(features, text)
        self.state = {"alpha_init": alpha0, "lr_w": step_w, "lr_alpha": step_alpha}

        # W and b only: alpha's gradient is never zeroed by the optimiser and accumulates, as official
        optimiser = torch.optim.SGD([weight, bias], lr=step_w, momentum=cfg["momentum"])

        def step(batch: torch.Tensor, epoch: int) -> torch.Tensor:
            batch = batch.to(features.device)  # always every sample, in order
            return F.cross_entropy(lpp_logits(features[batch], weight, bias, alpha, text), labels[batch])

        def after_epoch(epoch: int) -> None:
            if (epoch + 1) % self.alpha_every == 0:
                with torch.no_grad():
                    alpha.sub_(step_alpha * alpha.grad)
                if cfg["reset_alpha_grad"]:
                    alpha.grad = None

        n = len(labels)
        train(
            optimiser,
            n,
            step,
            Schedule(self.epochs, n, drop_last=False, shuffle=False),
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="lp++ epochs",
            after_epoch=after_epoch,
        )
        self.weight, self.bias, self.alpha = weight.detach(), bias.detach(), alpha.detach()
        self._fitted = True

    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        return lpp_logits(self.embeds(items), self.weight, self.bias, self.alpha, self.text_weights())


METHODS = [LPPlusPlus]
