"""Training augmentation through cached views (bench/kit/views.py) and its use by the few-shot
classifiers: views are a function of (image, view index, seed), crops and flips follow the
options, every view is encoded once whatever the number of epochs, fits and methods, and
training sees the scheduled view of each image in each epoch (tiny random-init model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_items

import methods.tipadapter as tipadapter_module
from bench.errors import MethodError
from bench.kit import FewShotClassifier, common_options
from bench.kit.views import (
    DASSL_CROP_SCALE,
    Augmentation,
    ViewPool,
    augmentation_from_config,
    augmented_embeds,
    view_rng,
    view_schedule,
    view_stats,
)
from bench.method import Method, MethodContext, SupportSet
from bench.types import ImageItem
from bench.weights import BackboneSpec, load_backbone
from methods.clipadapter import CLIPAdapter
from methods.coop import CoCoOp, CoOp
from methods.lpp import LPPlusPlus
from methods.tipadapter import TipAdapter, TipAdapterF


@pytest.fixture
def backbone(tmp_path: Path):
    """A fresh tiny backbone with its own empty cache (tests here count encodings)."""
    return load_backbone(BackboneSpec("bench-tiny-vit", "none", cache_dir=tmp_path / "cache", device="cpu"))


def support_of(items: list[ImageItem]) -> SupportSet:
    labels = np.arange(len(items)) % 3
    return SupportSet(tuple(items), labels, np.zeros((len(items), 8, 8), dtype=np.float32))


def make_method(cls: type[Method], backbone, tmp_path: Path, seed: int = 0, **config: Any) -> Method:
    ctx = MethodContext(
        device=backbone.device,
        seed=seed,
        shots=2,
        scratch_dir=tmp_path,
        config=config,
        eval_size=32,
        backbone_factory=lambda: backbone,
    )
    return cls(ctx)


class EncodeCounter:
    """Wraps ``backbone.encode_images`` (the only way a view reaches the frozen tower) and counts images."""

    def __init__(self, backbone, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        original = backbone.encode_images

        def counted(images: torch.Tensor) -> torch.Tensor:
            self.images += int(images.shape[0])
            return original(images)

        monkeypatch.setattr(backbone, "encode_images", counted)


# --------------------------------------------------------------------------- one view


def test_a_view_is_a_function_of_image_view_index_and_seed() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    aug = Augmentation(scale=DASSL_CROP_SCALE)
    first = aug(rgb, view_rng("img-a", 3, 7))
    np.testing.assert_array_equal(first, aug(rgb, view_rng("img-a", 3, 7)))  # same triple, same view
    for other in (("img-a", 4, 7), ("img-a", 3, 8), ("img-b", 3, 7)):
        view = aug(rgb, view_rng(*other))
        assert view.shape != first.shape or not np.array_equal(view, first), other
    crops = {aug.crop_box(60, 80, view_rng("img-a", v, 7)) for v in range(20)}
    assert len(crops) == 20  # every view index draws its own crop


def test_any_view_range_equals_the_same_rows_of_a_longer_call(backbone) -> None:
    items = random_items(2, seed=3, shape=(40, 56), prefix="r", key_prefix="range")
    five = augmented_embeds(backbone, items, 5, seed=2)
    middle = augmented_embeds(backbone, items, 2, seed=2, first_view=3)
    torch.testing.assert_close(middle, five[3:5], rtol=0, atol=0)
    assert not torch.equal(five[0], five[1])
    with pytest.raises(ValueError, match="first_view"):
        augmented_embeds(backbone, items, 1, seed=2, first_view=-1)


@pytest.mark.parametrize("scale", [DASSL_CROP_SCALE, (0.5, 1.0), (0.3, 0.4)])
def test_crop_area_and_aspect_follow_the_options(scale: tuple[float, float]) -> None:
    height, width = 400, 600
    aug = Augmentation(scale=scale)
    boxes = [aug.crop_box(height, width, view_rng("area", v, 0)) for v in range(600)]
    areas = np.array([h * w / (height * width) for _, _, h, w in boxes])
    aspects = np.array([w / h for _, _, h, w in boxes])
    for top, left, h, w in boxes:
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
    assert areas.min() >= scale[0] * 0.99 and areas.max() <= scale[1] * 1.01
    assert aspects.min() >= 0.75 * 0.99 and aspects.max() <= 4 / 3 * 1.01
    # the whole range is used: a sampler that ignored the option's scale would miss one end
    span = scale[1] - scale[0]
    assert areas.min() < scale[0] + 0.1 * span and areas.max() > scale[1] - 0.25 * span
    square = Augmentation(scale=scale, ratio=(1.0, 1.0))
    assert all(
        h == w for _, _, h, w in (square.crop_box(height, width, view_rng("sq", v, 0)) for v in range(50))
    )


def test_flip_is_applied_to_about_half_the_views_and_never_when_off() -> None:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # aspect 1.5: scale 1 keeps it whole
    options = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.5, 1.5]}
    flipping = augmentation_from_config({**options, "flip": True})
    views = [flipping(image, view_rng("flip", v, 0)) for v in range(400)]
    assert all(np.array_equal(v, image) or np.array_equal(v, image[:, ::-1]) for v in views)
    flipped = np.mean([np.array_equal(v, image[:, ::-1]) for v in views])
    assert 0.42 < flipped < 0.58  # p = 0.5: 400 draws stay within 3.2 standard deviations
    steady = augmentation_from_config({**options, "flip": False})
    assert steady.flip_p == 0.0 and flipping.flip_p == 0.5
    assert all(np.array_equal(steady(image, view_rng("flip", v, 0)), image) for v in range(100))


# --------------------------------------------------------------------------- schedule and pool


@pytest.mark.parametrize(("n_views", "epochs"), [(4, 10), (10, 10), (10, 3), (1, 5)])
def test_each_cycle_of_the_schedule_uses_every_view_once(n_views: int, epochs: int) -> None:
    schedule = view_schedule(6, n_views, epochs, seed=3)
    assert schedule.shape == (epochs, 6) and schedule.dtype == np.int64
    for start in range(0, epochs, n_views):
        block = schedule[start : start + n_views]
        for column in block.T:  # one image: no view repeats inside a cycle
            assert len(set(column.tolist())) == len(column)
            if len(column) == n_views:
                assert sorted(column.tolist()) == list(range(n_views))
    np.testing.assert_array_equal(schedule, view_schedule(6, n_views, epochs, seed=3))
    if n_views > 1:
        assert not np.array_equal(schedule, view_schedule(6, n_views, epochs, seed=4))
        assert len({tuple(column) for column in schedule.T}) > 1  # images have their own order


def test_view_pool_gathers_the_scheduled_view_of_every_image() -> None:
    views = torch.tensor([[[10.0], [11.0]], [[20.0], [21.0]], [[30.0], [31.0]]])  # (K=3, n=2, D=1): 10 v + i
    schedule = np.array([[0, 2], [1, 0], [2, 1], [2, 2]])
    pool = ViewPool(views, schedule)
    assert (pool.n_views, pool.n_items, pool.epochs) == (3, 2, 4)
    assert [pool.epoch(e)[:, 0].tolist() for e in range(4)] == [[10, 31], [20, 11], [30, 21], [30, 31]]
    part = pool.subset([1])
    assert [part.epoch(e)[:, 0].tolist() for e in range(4)] == [[31], [11], [21], [31]]
    fixed = ViewPool.fixed(torch.tensor([[1.0], [2.0]]), epochs=3)
    assert all(fixed.epoch(e)[:, 0].tolist() == [1.0, 2.0] for e in range(3))
    with pytest.raises(IndexError, match="epoch 4"):
        pool.epoch(4)
    with pytest.raises(ValueError, match="outside"):
        ViewPool(views, np.array([[0, 3]]))
    with pytest.raises(ValueError, match="schedule must be"):
        ViewPool(views, np.zeros((2, 3), dtype=np.int64))


# --------------------------------------------------------------------------- encoded once


def test_each_view_is_encoded_once_across_epochs_fits_methods_and_backbones(
    backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = support_of(random_items(6, seed=21, shape=(40, 56), prefix="s", key_prefix="once"))
    counter = EncodeCounter(backbone, monkeypatch)
    misses = backbone.cache_misses
    make_method(CoOp, backbone, tmp_path, epochs=5, augment_views=3).fit(support)
    assert counter.images == 6 * 3  # 3 views per image for 5 epochs: each view through the tower once
    assert backbone.cache_misses - misses == 6 * 3  # every view a counted miss of the view cache
    assert view_stats(backbone).encoded == 6 * 3
    # a second fit, CoCoOp and CLIP-Adapter (Dassl's augmentation too, same seed): all read back
    make_method(CoOp, backbone, tmp_path, epochs=2, augment_views=3).fit(support)
    make_method(CoCoOp, backbone, tmp_path, epochs=1, augment_views=2).fit(support)
    make_method(CLIPAdapter, backbone, tmp_path, epochs=4, augment_views=3).fit(support)
    assert counter.images == 6 * 3
    # another seed draws other views; a new backbone on the same cache folder reads them from disk
    make_method(CLIPAdapter, backbone, tmp_path, seed=1, epochs=2, augment_views=3).fit(support)
    assert counter.images == 2 * 6 * 3
    again = load_backbone(BackboneSpec("bench-tiny-vit", "none", cache_dir=tmp_path / "cache", device="cpu"))
    again_counter = EncodeCounter(again, monkeypatch)
    make_method(CoOp, again, tmp_path, seed=1, epochs=2, augment_views=3).fit(support)
    assert again_counter.images == 0 and again.cache_misses == 0


def test_lpp_and_tip_adapter_share_views_and_tip_adapter_f_trains_on_new_ones(
    backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = support_of(random_items(6, seed=22, shape=(40, 56), prefix="s", key_prefix="share"))
    counter = EncodeCounter(backbone, monkeypatch)
    make_method(LPPlusPlus, backbone, tmp_path, epochs=2).fit(support)
    assert counter.images == 6  # LP++: one view per image (view 0)
    make_method(TipAdapter, backbone, tmp_path, augment_views=3, search=False).fit(support)
    assert counter.images == 6 + 6 * 2  # the keys' views 1 and 2 are new, view 0 is LP++'s
    tip_f = {"augment_views": 3, "train_augment_views": 2, "search": False, "epochs": 3}
    make_method(TipAdapterF, backbone, tmp_path, **tip_f).fit(support)
    assert counter.images == 6 + 6 * 2 + 6 * 2  # views 3 and 4: the fine-tuning pool
    make_method(TipAdapterF, backbone, tmp_path, **tip_f).fit(support)
    assert counter.images == 6 * 5


# --------------------------------------------------------------------------- what training sees


def test_training_sees_the_scheduled_view_of_every_image_in_every_epoch(
    backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = support_of(random_items(6, seed=23, shape=(40, 56), prefix="s", key_prefix="seen"))
    method = make_method(CLIPAdapter, backbone, tmp_path, seed=5, epochs=4, augment_views=4)
    seen: list[torch.Tensor] = []
    original = method.class_logits

    def recording(raw: torch.Tensor) -> torch.Tensor:
        seen.append(raw.detach().clone())
        return original(raw)

    monkeypatch.setattr(method, "class_logits", recording)
    method.fit(support)
    assert len(seen) == 4 and all(batch.shape == (6, backbone.embed_dim) for batch in seen)  # 1 batch / epoch
    # independently: Dassl's crop scale, seed 5's views, the seeded epoch order
    views = augmented_embeds(backbone, support.items, 4, seed=5, augmentation=Augmentation(DASSL_CROP_SCALE))
    order = view_schedule(6, 4, 4, seed=5)
    for epoch, batch in enumerate(seen):
        expected = torch.stack([views[order[epoch, i], i] for i in range(6)])
        # the batch is a shuffled subset: match rows as sets
        assert sorted(map(tuple, batch.tolist())) == sorted(map(tuple, expected.tolist()))
    for i in range(6):  # each image: four epochs, four different views
        rows = {
            tuple(batch[j].tolist()) for batch in seen for j in range(6) if _is_view_of(batch[j], views[:, i])
        }
        assert len(rows) == 4
    plain = backbone.image_features(support.items).embeds
    assert not any(torch.equal(row, p) for batch in seen for row in batch for p in plain)


def _is_view_of(row: torch.Tensor, candidates: torch.Tensor) -> bool:
    return any(torch.equal(row, c) for c in candidates)


def test_tip_adapter_f_fine_tunes_on_views_apart_from_the_key_views(
    backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support = support_of(random_items(6, seed=24, shape=(40, 56), prefix="s", key_prefix="tipf"))
    queries: list[torch.Tensor] = []
    original = tipadapter_module.cache_logits

    def recording(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            queries.append(q.detach().clone())
        return original(q, *args, **kwargs)

    monkeypatch.setattr(tipadapter_module, "cache_logits", recording)
    method = make_method(
        TipAdapterF,
        backbone,
        tmp_path,
        seed=2,
        augment_views=2,
        train_augment_views=3,
        epochs=3,
        search=False,
    )
    method.fit(support)
    assert len(queries) == 3  # one batch of 6 per epoch
    train_views = F.normalize(augmented_embeds(backbone, support.items, 3, seed=2, first_view=2), dim=-1)
    key_views = F.normalize(augmented_embeds(backbone, support.items, 2, seed=2), dim=-1)
    order = view_schedule(6, 3, 3, seed=2)
    for epoch, batch in enumerate(queries):
        expected = torch.stack([train_views[order[epoch, i], i] for i in range(6)])
        assert sorted(map(tuple, batch.tolist())) == sorted(map(tuple, expected.tolist()))
        assert not any(_is_view_of(row, key_views.flatten(0, 1)) for row in batch)


def test_a_classifier_without_augmentation_options_gets_a_clear_error(backbone, tmp_path: Path) -> None:
    class Plain(FewShotClassifier):
        name = "plain-classifier"
        description = "test classifier without augmentation options"
        options = common_options()

        def fit(self, support: SupportSet) -> None:
            self.training_pool(support, 3)

        def logits(self, items):
            raise NotImplementedError

    method = make_method(Plain, backbone, tmp_path)
    with pytest.raises(MethodError, match="'plain-classifier' declares no augmentation options"):
        method.fit(support_of(random_items(3, seed=25, shape=(40, 56), prefix="s", key_prefix="plain")))
