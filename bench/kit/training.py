"""The one training loop every learning method uses, with its seeded helpers and schedules.

:func:`train` runs a fixed number of epochs (never chosen on test data) over ``n`` support
samples: per epoch, seeded index batches (:func:`epoch_batches`), a learning rate from the
schedule, and per batch ``zero_grad``, the method's ``step`` (returns the loss, or a dict of
loss terms with ``"total"``), ``backward`` and ``optimizer.step()``. It shows a progress bar
through the method's context and returns the mean of every loss term per epoch.

Helpers: :func:`seeded` (deterministic module init without touching the global RNG),
:func:`make_generator`, :func:`epoch_batches` (Dassl's sampler and drop-last rule),
:func:`warmup_cosine_lr` (Dassl's cosine after a constant warm-up, per epoch: CoOp, CoCoOp,
CLIP-Adapter), :func:`cosine_lr` (``CosineAnnealingLR`` stepped per batch: Tip-Adapter-F),
:func:`coop_epochs` (CoOp's epochs per shot count).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: ``lr(epoch, step, total_steps)`` -> learning rate of the next update.
LRSchedule = Callable[[int, int, int], float]
#: ``step(batch indices, epoch)`` -> loss, or loss terms with the key ``"total"``.
StepFn = Callable[[torch.Tensor, int], "torch.Tensor | Mapping[str, torch.Tensor]"]
#: ``track(iterable, description, total)``: the method context's progress bar.
Tracker = Callable[[Iterable[Any], str, int | None], Iterator[Any]]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and restore the global CPU RNG afterwards.

    Used around module construction (``nn.Linear`` default init) so a method's initial
    weights depend on its seed only, not on what ran before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (shuffling, random init)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def epoch_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    shuffle: bool = True,
    drop_last: bool | None = None,
) -> list[torch.Tensor]:
    """Index batches of one epoch.

    ``drop_last=None`` is Dassl's training rule (CoOp / CoCoOp / CLIP-Adapter): drop the last
    incomplete batch when there are at least ``batch_size`` samples, so 48 samples with batch
    32 give ONE batch of 32 random samples per epoch and 6 samples give one batch of 6.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if drop_last is None:
        drop_last = n >= batch_size
    batches = list(torch.split(order, batch_size))
    if drop_last and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def warmup_cosine_lr(
    epoch: int, max_epochs: int, base_lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5
) -> float:
    """Learning rate of ``epoch`` (0-based) under Dassl's ``cosine`` + constant warm-up.

    Dassl (``WARMUP_RECOUNT=True``, the default) runs the first ``warmup_epochs`` epochs at
    ``warmup_lr``, then restarts ``CosineAnnealingLR(T_max=max_epochs)`` from step 0, stepped
    once per epoch: ``base_lr * (1 + cos(pi * (epoch - warmup_epochs) / max_epochs)) / 2``.
    """
    if epoch < warmup_epochs:
        return float(warmup_lr)
    t = epoch - warmup_epochs
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * t / max_epochs))


def cosine_lr(step: int, total_steps: int, base_lr: float, eta_min: float = 0.0) -> float:
    """``CosineAnnealingLR(T_max=total_steps)`` learning rate before ``step`` (0-based)."""
    return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def coop_epochs(shots: int) -> int:
    """CoOp's epochs per shot count (COOP.md: *_ep50 for 1 shot, *_ep100 for 2-4, 200 for 8-16)."""
    if shots <= 1:
        return 50
    if shots <= 4:
        return 100
    return 200


@dataclass(frozen=True)
class Schedule:
    """How :func:`train` iterates: fixed epochs, batch size, batch rule and learning rate.

    ``drop_last=None`` is Dassl's rule (see :func:`epoch_batches`). ``lr`` maps (epoch, step,
    total steps) to the learning rate of the next update and is applied once per epoch
    (``lr_per="epoch"``, before its first batch) or before every update (``"step"``); None
    keeps the optimiser's own learning rate.
    """

    epochs: int
    batch_size: int
    drop_last: bool | None = None
    shuffle: bool = True
    lr: LRSchedule | None = None
    lr_per: str = "epoch"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr_per not in ("epoch", "step"):
            raise ValueError(f"lr_per must be 'epoch' or 'step', got {self.lr_per!r}")

    def steps_per_epoch(self, n: int) -> int:
        return len(
            epoch_batches(n, self.batch_size, make_generator(0), shuffle=False, drop_last=self.drop_last)
        )


def warmup_cosine(epochs: int, base_lr: float, warmup_epochs: int, warmup_lr: float) -> LRSchedule:
    """Dassl's per-epoch schedule as an :data:`LRSchedule` (use with ``lr_per="epoch"``)."""
    return lambda epoch, _step, _total: warmup_cosine_lr(epoch, epochs, base_lr, warmup_epochs, warmup_lr)


def cosine_per_step(base_lr: float) -> LRSchedule:
    """``CosineAnnealingLR`` over all updates as an :data:`LRSchedule` (use with ``lr_per="step"``)."""
    return lambda _epoch, step, total: cosine_lr(step, total, base_lr)


def train(
    optimizer: torch.optim.Optimizer,
    n: int,
    step: StepFn,
    schedule: Schedule,
    *,
    seed: int,
    track: Tracker | None = None,
    label: str = "epochs",
    after_epoch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Train for ``schedule.epochs`` epochs over ``n`` samples; returns mean loss terms per epoch.

    Batches are drawn from a generator seeded with ``seed`` (one permutation per epoch), so
    a fit is reproducible whatever ran before. ``after_epoch(epoch)`` runs after each epoch's
    updates (e.g. LP++'s every-10-epochs step on its blending weights).
    """
    generator = make_generator(seed)
    total = schedule.epochs * schedule.steps_per_epoch(n)
    epochs: Iterable[int] = range(schedule.epochs)
    if track is not None:
        epochs = track(epochs, label, schedule.epochs)
    history: list[dict[str, float]] = []
    updates = 0
    for epoch in epochs:
        if schedule.lr is not None and schedule.lr_per == "epoch":
            set_lr(optimizer, schedule.lr(epoch, updates, total))
        sums: dict[str, float] = {}
        seen = 0
        batches = epoch_batches(
            n, schedule.batch_size, generator, shuffle=schedule.shuffle, drop_last=schedule.drop_last
        )
        for batch in batches:
            if schedule.lr is not None and schedule.lr_per == "step":
                set_lr(optimizer, schedule.lr(epoch, updates, total))
            out = step(batch, epoch)
            terms = dict(out) if isinstance(out, Mapping) else {"total": out}
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            updates += 1
            seen += len(batch)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(batch)
        if after_epoch is not None:
            after_epoch(epoch)
        history.append({key: value / max(seen, 1) for key, value in sums.items()})
    return history
