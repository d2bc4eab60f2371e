"""Segmentation losses of the CLIP anomaly-localisation methods (April-GAN, AnomalyCLIP, UltraAD, ...)."""

from __future__ import annotations

import torch


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, per image then averaged over the batch (April-GAN's ``BinaryDiceLoss``).

    ``1 - mean_b (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth)`` with every map flattened;
    ``probs`` and ``target`` (B, ...) in [0, 1]. An all-zero target (a normal image) gives
    ``1 - smooth / (sum(p) + smooth)``, which pushes the whole map towards 0.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    p = probs.reshape(probs.shape[0], -1)
    y = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return 1.0 - dice.mean()


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    eps: float = 1e-6,
    smooth: float | None = None,
) -> torch.Tensor:
    """Binary focal loss on probabilities, mean over every pixel (Lin et al. 2017).

    ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0;
    ``loss = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t = alpha`` / ``1 - alpha``
    (``alpha=None``: 1, as April-GAN / AnomalyCLIP). ``p_t`` is clamped to ``[eps, 1]`` for
    the logarithm.

    ``smooth`` reproduces April-GAN's / AnomalyCLIP's two-channel ``FocalLoss`` on the softmax
    map ``[1 - p, p]`` exactly: the one-hot target is clamped to ``[smooth, 1 - smooth]`` and
    ``p_t = onehot . [1 - p, p] + smooth`` (their ``smooth=1e-5``); ``eps`` is then unused.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ")
    y = target.to(probs.dtype)
    if smooth is None:
        p_t = probs * y + (1.0 - probs) * (1.0 - y)
        log_p_t = torch.log(p_t.clamp(min=eps))
    else:
        on, off = 1.0 - smooth, smooth  # the clamped one-hot of a binary target
        p_t = probs * (y * on + (1.0 - y) * off) + (1.0 - probs) * (y * off + (1.0 - y) * on) + smooth
        log_p_t = torch.log(p_t)
    loss = -((1.0 - p_t) ** gamma) * log_p_t
    if alpha is not None:
        loss = loss * (alpha * y + (1.0 - alpha) * (1.0 - y))
    return loss.mean()
