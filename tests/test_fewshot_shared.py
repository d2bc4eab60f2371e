"""Shared few-shot building blocks of bench/kit (training loop and schedules, text classifier, scores,
augmented views, prompt learner) as the few-shot classifiers use them (tiny random-init model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_items

from bench.kit import (
    DEFAULT_CLASS_NAMES,
    Augmentation,
    PromptLearner,
    Schedule,
    augmented_embeds,
    class_prompts,
    coop_epochs,
    cosine_per_step,
    epoch_batches,
    make_generator,
    prediction_from_logits,
    seeded,
    text_classifier,
    train,
    view_stats,
    warmup_cosine,
)
from bench.kit.training import cosine_lr, set_lr, warmup_cosine_lr
from bench.kit.views import view_cache, view_rng
from bench.types import ImageItem
from bench.weights import BackboneSpec, load_backbone

NAMES = list(DEFAULT_CLASS_NAMES.values())


def make_items(n: int, seed: int = 0, shape: tuple[int, int] = (40, 56)) -> list[ImageItem]:
    return random_items(n, seed, shape, prefix="fs", key_prefix="fs")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    spec = BackboneSpec("bench-tiny-vit", "none", cache_dir=tmp_path_factory.mktemp("fs-cache"), device="cpu")
    return load_backbone(spec)


# --------------------------------------------------------------------------- schedules and batches


def test_warmup_cosine_matches_dassl() -> None:
    lr = warmup_cosine_lr
    assert lr(0, 10, 0.002) == pytest.approx(1e-5)  # constant warm-up epoch
    assert lr(1, 10, 0.002) == pytest.approx(0.002)  # the cosine restarts after the warm-up
    assert lr(6, 10, 0.002) == pytest.approx(0.001)  # half way through the cosine
    assert lr(9, 10, 0.002) == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 8 / 10)))
    # the same sequence torch's CosineAnnealingLR gives after the warm-up epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    for epoch in range(1, 10):
        assert lr(epoch, 10, 0.002) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_cosine_lr_per_step_and_coop_epochs() -> None:
    assert cosine_lr(0, 20, 1e-3) == pytest.approx(1e-3)
    assert cosine_lr(10, 20, 1e-3) == pytest.approx(5e-4)
    assert cosine_lr(20, 20, 1e-3) == pytest.approx(0.0)
    assert [coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


def test_epoch_batches_dassl_drop_last_rule() -> None:
    g = make_generator(0)
    batches = epoch_batches(48, 32, g)
    assert [len(b) for b in batches] == [32]  # 48 >= 32: the incomplete batch is dropped
    assert len(set(batches[0].tolist())) == 32
    assert [len(b) for b in epoch_batches(6, 32, g)] == [6]  # fewer than a batch: kept
    assert [len(b) for b in epoch_batches(10, 4, g, drop_last=False)] == [4, 4, 2]
    a = epoch_batches(20, 5, make_generator(3))
    b = epoch_batches(20, 5, make_generator(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat(a).tolist()) == list(range(20))


def _hand_loop(params, n, batch_size, epochs, lr_of, seed, *, drop_last=None, per_step=False):
    """The loop every method wrote by hand before :func:`train` (the reference of the no-regression rule)."""
    optimiser = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    generator = make_generator(seed)
    steps = len(epoch_batches(n, batch_size, generator, shuffle=False, drop_last=drop_last))
    total, step = epochs * steps, 0
    for epoch in range(epochs):
        if not per_step:
            set_lr(optimiser, lr_of(epoch, step, total))
        for batch in epoch_batches(n, batch_size, generator, drop_last=drop_last):
            if per_step:
                set_lr(optimiser, lr_of(epoch, step, total))
            loss = _toy_loss(params[0], batch, epoch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1


_X = torch.randn(13, 5, generator=torch.Generator().manual_seed(1))
_Y = torch.arange(13) % 3


def _toy_loss(weight: torch.Tensor, batch: torch.Tensor, epoch: int) -> torch.Tensor:
    return F.cross_entropy((_X[batch] + 0.1 * epoch) @ weight.T, _Y[batch])


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "per_step"),
    [(4, None, False), (32, None, False), (4, False, True), (13, False, True)],
)
def test_train_equals_the_hand_written_loop_bit_for_bit(batch_size, drop_last, per_step) -> None:
    if per_step:
        lr_of, lr = (lambda _e, s, t: cosine_lr(s, t, 0.05)), cosine_per_step(0.05)
    else:
        lr_of, lr = (lambda e, _s, _t: warmup_cosine_lr(e, 7, 0.05, 1, 1e-5)), warmup_cosine(7, 0.05, 1, 1e-5)
    expected = torch.nn.Parameter(torch.zeros(3, 5))
    _hand_loop([expected], 13, batch_size, 7, lr_of, seed=4, drop_last=drop_last, per_step=per_step)
    weight = torch.nn.Parameter(torch.zeros(3, 5))
    optimiser = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    schedule = Schedule(7, batch_size, drop_last=drop_last, lr=lr, lr_per="step" if per_step else "epoch")
    history = train(optimiser, 13, lambda b, e: _toy_loss(weight, b, e), schedule, seed=4)
    assert torch.equal(weight, expected)
    assert len(history) == 7 and all(set(h) == {"total"} for h in history)


def test_full_batch_train_keeps_the_order_and_runs_after_epoch() -> None:
    seen: list[list[int]] = []
    after: list[int] = []
    weight = torch.nn.Parameter(torch.zeros(3, 5))

    def step(batch: torch.Tensor, epoch: int) -> torch.Tensor:
        seen.append(batch.tolist())
        return _toy_loss(weight, batch, epoch)

    schedule = Schedule(3, 13, drop_last=False, shuffle=False)
    train(torch.optim.SGD([weight], lr=0.1), 13, step, schedule, seed=0, after_epoch=after.append)
    assert seen == [list(range(13))] * 3 and after == [0, 1, 2]


def test_seeded_is_reproducible_and_restores_the_global_rng() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(0):
        first = torch.nn.Linear(4, 3).weight.detach().clone()
    after = torch.rand(3)
    with seeded(0):
        second = torch.nn.Linear(4, 3).weight.detach().clone()
    assert torch.equal(first, second)
    assert torch.equal(after, expected)  # the block did not consume the caller's random stream


# --------------------------------------------------------------------------- text side and outputs


def test_text_classifier_is_the_normalised_mean_of_normalised_prompts(backbone) -> None:
    templates = ["a photo of a {}.", "a breast ultrasound image of {}."]
    weights = text_classifier(backbone, class_prompts(NAMES, templates))
    assert weights.shape == (3, backbone.embed_dim)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(3))
    prompts = [t.format(NAMES[1]) for t in templates]
    manual = F.normalize(F.normalize(backbone.encode_text(prompts), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(weights[1], manual)
    assert class_prompts(["x"], templates) == [["a photo of a x.", "a breast ultrasound image of x."]]


def test_prediction_from_logits_score_is_one_minus_p_normal() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [60.0, -20.0, -25.0]])
    pred = prediction_from_logits(logits)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    np.testing.assert_allclose(pred.probs, probs, rtol=1e-12)
    np.testing.assert_allclose(pred.scores, 1.0 - probs[:, 0], atol=1e-15)
    assert pred.scores[2] > 0  # 1 - p(normal) keeps its resolution where p(normal) rounds to 1
    assert pred.maps is None


# --------------------------------------------------------------------------- augmented views


def test_crop_box_follows_random_resized_crop() -> None:
    aug = Augmentation()
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = aug.crop_box(60, 80, rng)
        assert top >= 0 and top + h <= 60 and left >= 0 and left + w <= 80
        assert 0.5 * 0.95 <= h * w / (60 * 80) <= 1.0 + 1e-9
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    flipped = Augmentation(scale=(1.0, 1.0), ratio=(1.5, 1.5), flip_p=1.0)(image, rng)
    np.testing.assert_array_equal(flipped, image[:, ::-1])


def test_augmented_views_are_seeded_cached_and_not_counted_as_backbone_encodings(backbone) -> None:
    items = make_items(3, seed=11)
    before = backbone.n_encoded
    stats0 = view_stats(backbone)
    views = augmented_embeds(backbone, items, 4, seed=0)
    assert views.shape == (4, 3, backbone.embed_dim) and views.dtype == torch.float32
    assert view_stats(backbone).encoded == stats0.encoded + 12
    assert not torch.equal(views[0], views[1])  # different views differ
    # a second call, with the items in another order and one more item, reads the cache
    more = [items[2], *make_items(1, seed=12), items[0]]
    again = augmented_embeds(backbone, more, 4, seed=0)
    assert torch.equal(again[:, 0], views[:, 2]) and torch.equal(again[:, 2], views[:, 0])
    stats = view_stats(backbone)
    assert stats.encoded == stats0.encoded + 16 and stats.hits == stats0.hits + 8
    assert backbone.n_encoded == before  # augmented views are not counted as backbone encodings
    other_seed = augmented_embeds(backbone, items[:1], 1, seed=1)
    assert not torch.equal(other_seed[0, 0], views[0, 0])
    # the view equals the frozen encode_image of the cropped image, through the fp16 cache
    aug = Augmentation()
    crop = aug(items[1].rgb(), view_rng(items[1].key, 2, 0))
    with torch.no_grad():
        direct = backbone.model.encode_image(backbone.preprocess(crop)[None])[0]
    torch.testing.assert_close(views[2, 1], direct.half().float())
    # views live in their own cache folder, apart from the per-image features
    assert view_cache(backbone, aug).folder != backbone.cache.folder


# --------------------------------------------------------------------------- prompt learner


def test_prompt_learner_from_a_phrase_equals_the_hand_written_prompt(backbone) -> None:
    learner = PromptLearner(backbone, NAMES, ctx_init="a photo of a")
    assert learner.n_ctx == 4 and learner.truncated and learner.length < backbone.context_length
    expected = backbone.encode_text([f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(learner(), expected, atol=1e-5, rtol=1e-5)
    full = PromptLearner(backbone, NAMES, ctx_init="a photo of a", truncate=False)
    assert full.length == backbone.context_length
    torch.testing.assert_close(full(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "ctx_shape"),
    [
        ({}, (16, 64)),
        ({"class_specific": True, "n_ctx": 8}, (3, 8, 64)),
        ({"position": "middle", "n_ctx": 6}, (6, 64)),
        ({"position": "front", "class_specific": True, "n_ctx": 2}, (3, 2, 64)),
    ],
)
def test_prompt_learner_shapes_and_positions(backbone, kwargs, ctx_shape) -> None:
    learner = PromptLearner(backbone, NAMES, seed=3, **kwargs)
    assert tuple(learner.ctx.shape) == ctx_shape
    assert float(learner.ctx.detach().std()) == pytest.approx(0.02, rel=0.25)  # N(0, 0.02) init
    emb = learner.prompt_embeddings()
    assert emb.shape == (3, learner.length, backbone.text_width)
    ctx = learner.context()
    n = learner.n_ctx
    position = kwargs.get("position", "end")
    for c, name_len in enumerate(learner.name_lens):
        if position == "end":
            torch.testing.assert_close(emb[c, 1 : 1 + n], ctx[c])
        elif position == "front":
            torch.testing.assert_close(emb[c, 1 + name_len : 1 + name_len + n], ctx[c])
        else:
            half = n // 2
            torch.testing.assert_close(emb[c, 1 : 1 + half], ctx[c, :half])
            torch.testing.assert_close(emb[c, 1 + half + name_len : 1 + n + name_len], ctx[c, half:])
    features = learner()
    assert features.shape == (3, backbone.embed_dim) and torch.isfinite(features).all()
    again = PromptLearner(backbone, NAMES, seed=3, **kwargs)
    assert torch.equal(again.ctx, learner.ctx)
    assert not torch.equal(PromptLearner(backbone, NAMES, seed=4, **kwargs).ctx, learner.ctx)


def test_prompt_learner_gradients_reach_only_its_own_parameters(backbone) -> None:
    learner = PromptLearner(backbone, NAMES, n_ctx=4, meta_net=True, image_dim=backbone.embed_dim)
    assert {n for n, _ in learner.named_parameters()} == {
        "ctx",
        "meta_net.0.weight",
        "meta_net.0.bias",
        "meta_net.2.weight",
        "meta_net.2.bias",
    }
    assert set(learner.state_dict()) == {n for n, _ in learner.named_parameters()}  # no backbone inside
    hidden = learner.meta_net[0].out_features
    assert hidden == backbone.embed_dim // 16 and learner.meta_net[2].out_features == backbone.text_width
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    feats = F.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
    text = learner(feats)
    assert text.shape == (5, 3, backbone.embed_dim)
    # the meta-net's offset is added to every context vector of every class
    offset = learner.meta_net(feats)
    torch.testing.assert_close(learner(offset=offset), text)
    ctx = learner.context(offset)
    torch.testing.assert_close(ctx[2, 1] - learner.ctx, offset[2].expand(4, -1))
    loss = torch.einsum("bd,bcd->bc", feats, F.normalize(text, dim=-1)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="meta-net"):
        learner()
    with pytest.raises(ValueError, match="no meta-net"):
        PromptLearner(backbone, NAMES, n_ctx=2)(feats)
