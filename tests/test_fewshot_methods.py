"""The few-shot CLIP classifiers: Tip-Adapter(-F), CoOp, CoCoOp, CLIP-Adapter, LP++.

Defining formulas on hand-computed cases (prompt learners' text checked through CLIP's own
``encode_text``), frozen backbone, determinism, the un-augmented fit unchanged, accuracy on
an easy synthetic problem (clustered embeddings patched into the tiny random-init
backbone), and the grid runner end to end. Training augmentation: tests/test_kit_views.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSIFIER_METRICS, ConfigFactory, SyntheticData, cell_dirs, run_dir_of

import bench.kit.classifier as kit_classifier
import methods.tipadapter as tipadapter_module
from bench.errors import MethodError
from bench.kit import (
    CLIP_TEMPLATE,
    DEFAULT_CLASS_NAMES,
    Features,
    augmented_embeds,
    cache_logits,
    make_generator,
    one_hot,
)
from bench.method import Method, MethodContext, SupportSet
from bench.registry import available_methods, get_method
from bench.runner import run_grid
from bench.types import ImageItem, Task
from bench.weights import BackboneSpec, load_backbone
from methods.clipadapter import Adapter, CLIPAdapter, blend
from methods.coop import CoCoOp, CoOp
from methods.lpp import LPPlusPlus, class_sums, init_alpha, lpp_logits, lr_alpha, lr_weights
from methods.tipadapter import GridScore, TipAdapter, TipAdapterF, search_grid

FEWSHOT = ("tipadapter", "tipadapter-f", "coop", "cocoop", "clipadapter", "lpp")
#: Short schedules for the tests that do not measure accuracy.
QUICK: dict[str, dict[str, Any]] = {
    "tipadapter": {"augment_views": 2, "search_step": [20, 10]},
    "tipadapter-f": {
        "augment_views": 2,
        "train_augment_views": 2,
        "search_step": [20, 10],
        "epochs": 3,
        "cv_folds": 2,
    },
    "coop": {"epochs": 3, "augment_views": 2},
    "cocoop": {"epochs": 2, "augment_views": 2},
    "clipadapter": {"epochs": 3, "augment_views": 2},
    "lpp": {"epochs": 12},
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    spec = BackboneSpec(
        "bench-tiny-vit", "none", cache_dir=tmp_path_factory.mktemp("fsm-cache"), device="cpu"
    )
    return load_backbone(spec)


def make_support(shots: int, seed: int = 0, tag: str = "sup") -> SupportSet:
    rng = np.random.default_rng(seed)
    items, labels = [], []
    for c in range(3):
        for i in range(shots):
            image = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            image[..., 0] = np.clip(image[..., 0].astype(int) // 2 + 60 * c, 0, 255)  # some class signal
            items.append(ImageItem(id=f"{tag}{c}{i}", key=f"{tag}-{seed}-{c}-{i}", loader=lambda a=image: a))
            labels.append(c)
    return SupportSet(tuple(items), np.array(labels), np.zeros((len(items), 8, 8), dtype=np.float32))


def make_method(cls: type[Method], backbone, tmp_path: Path, shots: int = 2, seed: int = 0, **config):
    ctx = MethodContext(
        device=backbone.device,
        seed=seed,
        shots=shots,
        scratch_dir=tmp_path,
        config=config,
        eval_size=32,
        backbone_factory=lambda: backbone,
    )
    return cls(ctx)


# --------------------------------------------------------------------------- registration


def test_registered_with_detect_and_classify() -> None:
    methods = available_methods()
    for name in FEWSHOT:
        cls = methods[name]
        assert cls.tasks == frozenset({Task.DETECT, Task.CLASSIFY})
        assert cls.uses_support and cls.uses_backbone
        assert cls.default_config["class_names"] == {
            "normal": "normal breast tissue",
            "benign": "benign breast lesion",
            "malignant": "malignant breast lesion",
        }
    for name in ("tipadapter", "tipadapter-f", "clipadapter", "lpp"):
        assert methods[name].default_config["templates"] == ["a breast ultrasound image of {}."]


def test_published_hyperparameters_are_the_defaults(backbone, tmp_path: Path) -> None:
    coop = CoOp.default_config
    assert (coop["n_ctx"], coop["init_std"], coop["class_specific"], coop["class_token_position"]) == (
        16, 0.02, False, "end",
    )  # fmt: skip
    assert (coop["lr"], coop["batch_size"], coop["warmup_epochs"], coop["warmup_lr"]) == (0.002, 32, 1, 1e-5)
    assert [make_method(CoOp, backbone, tmp_path, shots=k).epochs for k in (1, 2, 4, 8, 16)] == [
        50, 100, 100, 200, 200,
    ]  # fmt: skip
    cocoop = CoCoOp.default_config
    assert (cocoop["ctx_init"], cocoop["batch_size"], cocoop["epochs"], cocoop["lr"]) == (
        "a photo of a",
        1,
        10,
        0.002,
    )
    tipf = TipAdapterF.default_config
    assert (tipf["lr"], tipf["eps"], tipf["epochs"], tipf["batch_size"], tipf["augment_views"]) == (
        0.001, 1e-4, 20, 256, 10,
    )  # fmt: skip
    assert CLIPAdapter.default_config["ratio"] == 0.2 and CLIPAdapter.default_config["reduction"] == 4
    assert LPPlusPlus.default_config["epochs"] == 300
    # training augmentation: Dassl's RandomResizedCrop scale for the three Dassl trainers, the
    # (0.5, 1) of Tip-Adapter's / LP++'s train_tranform; torchvision's ratio; flip on
    augmentation = ("augment_views", "crop_scale", "crop_ratio", "flip")
    for cls in (CoOp, CoCoOp, CLIPAdapter):
        assert [cls.default_config[k] for k in augmentation] == [10, [0.08, 1.0], [0.75, 4 / 3], True]
    assert [LPPlusPlus.default_config[k] for k in augmentation] == [1, [0.5, 1.0], [0.75, 4 / 3], True]
    for cls in (TipAdapter, TipAdapterF):
        assert [cls.default_config[k] for k in augmentation] == [10, [0.5, 1.0], [0.75, 4 / 3], True]
    assert tipf["train_augment_views"] == 10 and "train_augment_views" not in TipAdapter.default_config
    with pytest.raises(MethodError, match="method 'lpp': option 'class_names'"):
        make_method(LPPlusPlus, backbone, tmp_path, class_names={"normal": "a", "benign": "b"})
    with pytest.raises(MethodError, match="method 'tipadapter': option 'templates'"):
        make_method(TipAdapter, backbone, tmp_path, templates=["no placeholder"])
    clip_template = make_method(CLIPAdapter, backbone, tmp_path, templates=[CLIP_TEMPLATE])
    assert clip_template.templates == ["a photo of a {}."]


def test_options_are_declared_with_help_texts() -> None:
    for name in FEWSHOT:
        cls = get_method(name)
        assert set(cls.options) == set(cls.default_config)
        for key, option in cls.options.items():
            assert option.help and "\n" not in option.help, f"{name}.{key}: one-line help text"
    assert CoOp.options["class_token_position"].choices == ("end", "middle", "front")
    assert CoOp.default_config["epochs"] is None and CLIPAdapter.default_config["epochs"] is None
    assert TipAdapter.default_config["augment_seed"] is None


@pytest.mark.parametrize(
    ("cls", "key", "value", "problem"),
    [
        (CoOp, "epochs", "ten", "must be an integer"),
        (CoOp, "epochs", 0, "must be >= 1"),
        (CoOp, "class_token_position", "start", "must be one of"),
        (CoCoOp, "batch_size", 1.5, "must be an integer"),
        (CLIPAdapter, "ratio", 1.5, "must be <= 1"),
        (CLIPAdapter, "ratio", "0.2", "must be a finite number"),
        (LPPlusPlus, "alpha_every", 0, "must be >= 1"),
        (LPPlusPlus, "reset_alpha_grad", "yes", "must be true or false"),
        (TipAdapter, "crop_scale", [0.0, 1.0], "must be > 0"),
        (TipAdapter, "crop_scale", [0.5, 1.5], "must be <= 1"),
        (TipAdapter, "crop_scale", [0.9, 0.5], "low <= high"),
        (TipAdapter, "search_scale", [13.0], "exactly 2 values"),
        (TipAdapter, "search_step", [20, 0], "must be >= 1"),
        (TipAdapter, "search_step", [20.5, 10], "list of int"),
        (TipAdapter, "augment_views", -1, "must be >= 0"),
        (TipAdapterF, "train_augment_views", -1, "must be >= 0"),
        (CoOp, "augment_views", -1, "must be >= 0"),
        (CoCoOp, "crop_scale", [0.08, 1.2], "must be <= 1"),
        (CLIPAdapter, "crop_ratio", [1.5, 0.5], "low <= high"),
        (CLIPAdapter, "crop_ratio", [0.0, 1.0], "must be > 0"),
        (CoOp, "flip", "yes", "must be true or false"),
        (LPPlusPlus, "augment_views", 2, "must be <= 1"),
        (TipAdapter, "augment_seed", "x", "must be an integer"),
        (TipAdapterF, "cv_folds", 1, "must be >= 2"),
        (TipAdapterF, "unknown_option", 1, "unknown option"),
    ],
)
def test_invalid_options_are_rejected_naming_method_and_option(
    backbone, tmp_path: Path, cls: type[Method], key: str, value: Any, problem: str
) -> None:
    with pytest.raises(MethodError) as info:
        make_method(cls, backbone, tmp_path, **{key: value})
    message = str(info.value)
    assert f"method {cls.name!r}" in message and repr(key) in message and problem in message


def test_options_are_converted_and_nullable_options_accept_null(backbone, tmp_path: Path) -> None:
    coop = make_method(CoOp, backbone, tmp_path, shots=4, epochs=None, lr=1)
    assert coop.epochs == 100 and coop.lr == 1.0 and isinstance(coop.lr, float)  # CoOp's rule for 4 shots
    assert make_method(CoCoOp, backbone, tmp_path, shots=1, epochs=None).epochs == 50
    tip = make_method(
        TipAdapter, backbone, tmp_path, seed=3, crop_scale=(1, 1), augment_seed=None, flip=False
    )
    assert tip.config["crop_scale"] == [1.0, 1.0] and tip.augmentation.scale == (1.0, 1.0)
    assert tip.augmentation.flip_p == 0.0 and tip.augmentation.ratio == (0.75, 4 / 3)
    assert tip.augment_seed == 3  # null = the fit seed
    assert make_method(TipAdapter, backbone, tmp_path, seed=3, augment_seed=11).augment_seed == 11


# --------------------------------------------------------------------------- defining formulas


def test_tip_adapter_logits_hand_computed() -> None:
    query = torch.tensor([[0.6, 0.8]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    logits = cache_logits(query, keys, values, text, alpha=2.0, beta=5.0)
    # 100 f W^T = [60, 80, 100]; affinities [0.6, 0.8] -> exp(-5 * 0.4), exp(-5 * 0.2)
    expected = torch.tensor([[60 + 2 * math.exp(-2.0), 80 + 2 * math.exp(-1.0), 100.0]])
    torch.testing.assert_close(logits, expected)
    assert search_grid(13, 200)[:2] == pytest.approx([0.1, 0.1 + 12.9 / 200])
    assert len(search_grid(13, 20)) == 20 and max(search_grid(13, 20)) < 13


def test_tip_adapter_leave_one_out_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    keys = F.normalize(feats + 0.3 * torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.arange(3).repeat_interleave(3)
    values = one_hot(labels, 3).double()
    text = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=-1)
    betas, alphas = [0.5, 2.0, 6.0], [0.1, 1.0, 30.0]
    grid = GridScore(betas, alphas)
    grid.add(100 * feats @ text.T, feats @ keys.T, values, labels, 1 - torch.eye(9, dtype=torch.float64))
    for b, beta in enumerate(betas):
        for a, alpha in enumerate(alphas):
            correct, loss = 0, 0.0
            for i in range(9):
                keep = [j for j in range(9) if j != i]
                logit = cache_logits(feats[i : i + 1], keys[keep], values[keep], text, alpha, beta)
                correct += int(logit.argmax() == labels[i])
                loss -= float(torch.log_softmax(logit, 1)[0, labels[i]])
            assert grid.correct[b, a] == correct
            assert float(grid.loss[b, a]) == pytest.approx(loss, rel=1e-9)
    beta, alpha, acc = grid.best()
    acc_grid = grid.correct / 9
    assert acc == float(acc_grid.max())
    top = [(b, a) for b in range(3) for a in range(3) if acc_grid[b, a] == acc_grid.max()]
    b, a = min(top, key=lambda ba: float(grid.loss[ba]))
    assert (beta, alpha) == (betas[b], alphas[a])


def test_tip_adapter_keys_are_the_normalised_mean_of_views(backbone, tmp_path: Path) -> None:
    support = make_support(2, seed=1)
    method = make_method(TipAdapter, backbone, tmp_path, augment_views=3, search=False)
    method.fit(support)
    views = augmented_embeds(backbone, support.items, 3, seed=0)
    torch.testing.assert_close(method.keys, F.normalize(views.mean(0), dim=-1))
    assert torch.equal(method.values, one_hot(torch.as_tensor(support.labels), 3))
    assert (method.alpha, method.beta) == (2.0, 1.0)  # init values when the search is off
    queries = F.normalize(backbone.image_features(support.items).embeds, dim=-1)
    expected = cache_logits(queries, method.keys, method.values, method.text_weights(), 2.0, 1.0)
    torch.testing.assert_close(method.logits(support.items), expected)


def test_lpp_initialisation_and_step_sizes_hand_computed() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    text = torch.eye(2)
    torch.testing.assert_close(class_sums(feats, labels, 2), torch.tensor([[1.6, 0.8], [0.0, 2.0]]))
    # F^T F = [[1.36, 0.48], [0.48, 2.64]]: eigenvalues 2.8 and 1.2 -> lr_W = 4 * 4 / 2.8
    assert lr_weights(feats) == pytest.approx(16 / 2.8)
    # class means of f.t: [0.8, 0.4] and [0, 1] -> mean 0.55 -> alpha = 250 * 0.55
    assert init_alpha(feats, labels, text) == pytest.approx(137.5)
    # column sums of (f.t)^2: 1.36 and 2.64 -> lr_alpha = 4 / (4 * 2.64)
    assert lr_alpha(feats, text) == pytest.approx(4 / (4 * 2.64))
    logits = lpp_logits(feats, torch.ones(2, 2), torch.tensor([0.5, -0.5]), torch.tensor([2.0, 3.0]), text)
    torch.testing.assert_close(logits[1], torch.tensor([1.4 + 0.5 + 2 * 0.6, 1.4 - 0.5 + 3 * 0.8]))


def test_lpp_fit_uses_the_published_rule(backbone, tmp_path: Path) -> None:
    support = make_support(2, seed=2)
    # LP++ trains on ONE augmented view per image (Tip-Adapter's transform, view 0 of the fit seed)
    feats = F.normalize(augmented_embeds(backbone, support.items, 1, seed=0)[0], dim=-1)
    labels = torch.as_tensor(support.labels)
    one_epoch = make_method(LPPlusPlus, backbone, tmp_path, epochs=1)
    one_epoch.fit(support)
    text = one_epoch.text_weights()
    state = one_epoch.state
    assert state["lr_w"] == pytest.approx(lr_weights(feats))
    assert state["alpha_init"] == pytest.approx(init_alpha(feats, labels, text))
    assert state["lr_alpha"] == pytest.approx(lr_alpha(feats, text))
    # one full-batch SGD step (momentum buffer = gradient at the first step) from W0 = class sums
    w0 = class_sums(feats, labels, 3).requires_grad_(True)
    alpha = torch.full((3,), state["alpha_init"])
    generator = make_generator(0)
    bound = 1 / math.sqrt(feats.shape[1])
    b0 = (torch.rand(3, generator=generator) * 2 * bound - bound).requires_grad_(True)
    loss = F.cross_entropy(lpp_logits(feats, w0, b0, alpha, text), labels)
    gw, gb = torch.autograd.grad(loss, [w0, b0])
    torch.testing.assert_close(one_epoch.weight, w0.detach() - state["lr_w"] * gw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_epoch.bias, b0.detach() - state["lr_w"] * gb, atol=1e-6, rtol=1e-5)
    # alpha moves only every 10th epoch
    nine = make_method(LPPlusPlus, backbone, tmp_path, epochs=9)
    nine.fit(support)
    ten = make_method(LPPlusPlus, backbone, tmp_path, epochs=10)
    ten.fit(support)
    assert torch.equal(nine.alpha, torch.full((3,), float(state["alpha_init"])))
    assert not torch.equal(ten.alpha, nine.alpha)


def test_clip_adapter_residual_ratio(backbone, tmp_path: Path) -> None:
    adapter = Adapter(8, 4)
    layers = [m for m in adapter if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in layers] == [(8, 2, None), (2, 8, None)]
    assert isinstance(adapter[-1], torch.nn.ReLU)
    x = torch.randn(5, 8)
    torch.testing.assert_close(blend(x, adapter, 0.2), 0.2 * adapter(x) + 0.8 * x)
    assert (adapter(x) >= 0).all()
    support = make_support(2, seed=3)
    items = list(support.items)
    raw = backbone.image_features(items).embeds
    for ratio in (0.0, 0.2, 1.0):
        method = make_method(CLIPAdapter, backbone, tmp_path, ratio=ratio, epochs=2)
        method.fit(support)
        scale = backbone.logit_scale
        expected = scale * F.normalize(ratio * method.adapter(raw) + (1 - ratio) * raw, dim=-1)
        torch.testing.assert_close(method.logits(items), expected @ method.text_weights().T)
        if ratio == 0.0:  # no adapter contribution: zero-shot CLIP with the same text
            zero_shot = scale * F.normalize(raw, dim=-1) @ method.text_weights().T
            torch.testing.assert_close(method.logits(items), zero_shot)


def text_with_context(backbone, prompts: list[str], context: torch.Tensor) -> torch.Tensor:
    """CLIP's own ``encode_text`` of ``prompts`` with token positions 1 .. M replaced by ``context``
    (M, W): a forward hook on the token-embedding lookup, so none of the prompt learner's code
    (prompt assembly, truncation, ``encode_embeddings``) is involved."""

    def replace_context(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, 1 : 1 + context.shape[0]] = context.to(output.dtype)
        return output

    handle = backbone.model.token_embedding.register_forward_hook(replace_context)
    try:
        with torch.no_grad():
            return backbone.model.encode_text(backbone.tokenize(prompts)).float()
    finally:
        handle.remove()


def test_coop_logits_use_clip_logit_scale_and_learned_text(backbone, tmp_path: Path) -> None:
    support = make_support(2, seed=4)
    method = make_method(CoOp, backbone, tmp_path, epochs=2, augment_views=2)
    method.fit(support)
    feats = F.normalize(backbone.image_features(support.items).embeds, dim=-1)
    scale = backbone.logit_scale
    # "X X ... X <name>." with the 16 learned vectors in the X slots, through CLIP's encode_text
    ctx = method.learner.ctx.detach()
    assert ctx.shape == (16, backbone.text_width) and not torch.equal(ctx, torch.zeros_like(ctx))
    text = text_with_context(backbone, [" ".join(["X"] * 16) + f" {n}." for n in method.names], ctx)
    expected = scale * feats @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(method.logits(support.items), expected, atol=1e-4, rtol=1e-4)


def test_cocoop_logits_shift_the_context_by_the_meta_net_of_each_image(backbone, tmp_path: Path) -> None:
    support = make_support(2, seed=4)
    cocoop = make_method(CoCoOp, backbone, tmp_path, epochs=1, augment_views=2)
    cocoop.fit(support)
    feats = F.normalize(backbone.image_features(support.items[:2]).embeds, dim=-1)
    learner = cocoop.learner
    w1, b1 = learner.meta_net[0].weight.detach(), learner.meta_net[0].bias.detach()
    w2, b2 = learner.meta_net[2].weight.detach(), learner.meta_net[2].bias.detach()
    texts = []
    for f in feats:
        offset = torch.relu(w1 @ f + b1) @ w2.T + b2  # pi(x) = Linear - ReLU - Linear, by hand
        context = learner.ctx.detach() + offset  # added to each of the 4 "a photo of a" vectors
        texts.append(text_with_context(backbone, [f"a photo of a {n}." for n in cocoop.names], context))
    scale = backbone.logit_scale
    expected = torch.stack([scale * F.normalize(t, dim=-1) @ f for t, f in zip(texts, feats, strict=True)])
    torch.testing.assert_close(cocoop.logits(support.items[:2]), expected, atol=1e-4, rtol=1e-4)
    # the prompts depend on the image: image 0 scored with image 1's prompts gives other logits
    crossed = scale * F.normalize(texts[1], dim=-1) @ feats[0]
    assert (crossed - expected[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------- frozen backbone, determinism


@pytest.mark.parametrize("name", FEWSHOT)
def test_fit_leaves_the_backbone_bit_identical_and_is_deterministic(name, backbone, tmp_path: Path) -> None:
    cls = get_method(name)
    support = make_support(2, seed=5)
    test_items = list(make_support(1, seed=6, tag="tst").items)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    first = make_method(cls, backbone, tmp_path, seed=1, **QUICK[name])
    first.fit(support)
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "fitting changed the frozen backbone"
    assert all(not p.requires_grad and p.grad is None for p in backbone.model.parameters())
    pred = first.predict(test_items)
    second = make_method(cls, backbone, tmp_path, seed=1, **QUICK[name])
    second.fit(support)
    again = second.predict(test_items)
    np.testing.assert_array_equal(pred.probs, again.probs)
    np.testing.assert_array_equal(pred.scores, again.scores)
    assert pred.probs.shape == (3, 3) and pred.maps is None
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(pred.scores, 1.0 - pred.probs[:, 0], atol=1e-12)
    other_seed = make_method(cls, backbone, tmp_path, seed=2, **QUICK[name])
    other_seed.fit(support)
    assert not np.array_equal(other_seed.predict(test_items).probs, pred.probs)


#: Test-set probabilities of fits on the plain (un-augmented) support features, recorded with the
#: code BEFORE training augmentation existed (seed 1, support make_support(2, seed=5), test items
#: make_support(1, seed=6, tag="tst")); Tip-Adapter's are those of its augmented keys, unchanged.
BEFORE_AUGMENTATION: dict[str, tuple[dict[str, Any], list[list[float]]]] = {
    "coop": (
        {"epochs": 3},
        [
            [0.5167369953651546, 0.22271682013181499, 0.2605461845030303],
            [0.20915164111838466, 0.30834771868337346, 0.4825006401982418],
            [0.1160918649167347, 0.34316494457465774, 0.5407431905086075],
        ],
    ),
    "cocoop": (
        {"epochs": 2},
        [
            [0.6095608234086412, 0.19630112252960186, 0.194138054061757],
            [0.7200374999234056, 0.13924077676290889, 0.1407217233136855],
            [0.8957618245220323, 0.05047973608319068, 0.05375843939477703],
        ],
    ),
    "clipadapter": (
        {"epochs": 3, "lr": 0.05},
        [
            [0.7964385417086279, 0.0918519145601444, 0.1117095437312277],
            [0.5624271360528672, 0.21092161912408974, 0.22665124482304305],
            [0.22770395475947797, 0.430148287426028, 0.3421477578144942],
        ],
    ),
    "lpp": (
        {"epochs": 12},
        [
            [0.9837875266684042, 0.016210464664040608, 2.0086675550549797e-06],
            [0.12475229724615627, 0.8525894286909437, 0.02265827406290009],
            [0.0007039884462773014, 0.1553317700471542, 0.8439642415065685],
        ],
    ),
}
TIP_BEFORE_AUGMENTATION_CHANGE = [
    [0.9999999999998941, 1.0516935281048407e-13, 6.511267695833632e-16],
    [0.029528226664816398, 0.9696925897775065, 0.0007791835576769889],
    [3.8887840957031424e-09, 0.0036630228176435286, 0.9963369732935724],
]


@pytest.mark.parametrize("name", sorted(BEFORE_AUGMENTATION))
def test_augment_views_zero_reproduces_the_fit_before_augmentation(name, backbone, tmp_path: Path) -> None:
    config, before = BEFORE_AUGMENTATION[name]
    support = make_support(2, seed=5)
    test_items = list(make_support(1, seed=6, tag="tst").items)
    plain = make_method(get_method(name), backbone, tmp_path, seed=1, augment_views=0, **config)
    plain.fit(support)
    np.testing.assert_allclose(plain.predict(test_items).probs, before, rtol=1e-6, atol=1e-12)


def test_tip_adapter_cache_is_unchanged_by_the_augmentation_options(backbone, tmp_path: Path) -> None:
    support = make_support(2, seed=5)
    test_items = list(make_support(1, seed=6, tag="tst").items)
    tip = make_method(TipAdapter, backbone, tmp_path, seed=1, augment_views=2, search_step=[20, 10])
    tip.fit(support)
    np.testing.assert_allclose(
        tip.predict(test_items).probs, TIP_BEFORE_AUGMENTATION_CHANGE, rtol=1e-6, atol=1e-12
    )
    assert (tip.alpha, tip.beta) == pytest.approx((11.71, 12.355))


def test_predict_before_fit_fails(backbone, tmp_path: Path) -> None:
    with pytest.raises(MethodError, match="before fit"):
        make_method(LPPlusPlus, backbone, tmp_path).predict(list(make_support(1).items))


# --------------------------------------------------------------------------- easy synthetic problem


def clustered(backbone, monkeypatch: pytest.MonkeyPatch, dim: int, shots: int, patch_text: bool):
    """Well-separated clusters patched into the backbone: returns (support, test items, test labels).

    Image embeddings of class c: ``3 u_c + noise`` (u orthonormal). With ``patch_text`` the
    class prompts encode to directions ``v_c`` orthogonal to every ``u`` (so zero-shot text
    alone cannot classify: the support set must be used); augmented views are the embedding
    plus fresh noise.
    """
    g = torch.Generator().manual_seed(123)
    basis = torch.linalg.qr(torch.randn(dim, 6, generator=g))[0].T
    centres, text_dirs = 3.0 * basis[:3], basis[3:]
    noise = 0.2 * math.sqrt(32 / dim)
    table: dict[str, torch.Tensor] = {}

    def draw(n_per: int, tag: str) -> tuple[list[ImageItem], np.ndarray]:
        items, labels = [], []
        for c in range(3):
            for i in range(n_per):
                key = f"syn-{tag}-{c}-{i}"
                table[key] = centres[c] + noise * torch.randn(dim, generator=g)
                items.append(ImageItem(id=key, key=key, loader=lambda: np.zeros((8, 8, 3), np.uint8)))
                labels.append(c)
        return items, np.array(labels)

    s_items, s_labels = draw(shots, "s")
    t_items, t_labels = draw(20, "t")

    def image_features(items):
        embeds = torch.stack([table[item.key] for item in items])
        empty = torch.zeros(len(items), 1, 1)
        fields = {"embeds": embeds, "cls_tokens": empty, "patch_tokens": empty[..., None]}
        return Features(fields=fields, grid=(1, 1), layers=(0,))

    def augmented_embeds(bb, items, n_views, seed, augmentation=None, *, first_view=0):
        gv = torch.Generator().manual_seed(1000 * seed + first_view)
        base = torch.stack([table[item.key] for item in items])
        return base[None] + noise * torch.randn(n_views, *base.shape, generator=gv)

    monkeypatch.setattr(backbone, "image_features", image_features)
    # Tip-Adapter's keys and the base class's training views
    monkeypatch.setattr(tipadapter_module, "augmented_embeds", augmented_embeds)
    monkeypatch.setattr(kit_classifier, "augmented_embeds", augmented_embeds)
    if patch_text:
        names = list(DEFAULT_CLASS_NAMES.values())

        def encode_text(texts):
            return torch.stack([text_dirs[[n in t for n in names].index(True)] for t in texts])

        monkeypatch.setattr(backbone, "encode_text", encode_text)
    support = SupportSet(tuple(s_items), s_labels, np.zeros((len(s_items), 8, 8), dtype=np.float32))
    return support, t_items, t_labels


#: name -> (embedding dim, patch the text encoder, config overrides). Prompt learners keep the
#: tiny model's real 32-d text tower. CLIP-Adapter's and CoCoOp's published schedules take
#: ~100 steps at lr 0.002 here (1 batch per epoch), too few to move a random-init model far,
#: so the test checks that they learn with a larger step size; CoOp learns with the published
#: schedule, shortened to 40 epochs to keep the test fast.
SYNTHETIC: dict[str, tuple[int, bool, dict[str, Any]]] = {
    "tipadapter": (128, True, {}),
    "tipadapter-f": (128, True, {}),
    "lpp": (128, True, {}),
    "clipadapter": (128, True, {"lr": 0.05}),
    "coop": (32, False, {"epochs": 40}),
    "cocoop": (32, False, {"lr": 0.05, "epochs": 4}),
}


@pytest.mark.parametrize("name", FEWSHOT)
def test_easy_synthetic_problem(name, backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dim, patch_text, config = SYNTHETIC[name]
    support, items, labels = clustered(backbone, monkeypatch, dim, shots=4, patch_text=patch_text)
    method = make_method(get_method(name), backbone, tmp_path, shots=4, **config)
    method.fit(support)
    pred = method.predict(items)
    accuracy = float((pred.probs.argmax(1) == labels).mean())
    assert accuracy > 0.95, f"{name}: accuracy {accuracy:.3f}"
    # detection: the fraction of (normal, lesion) pairs the score orders correctly (the I-AUROC)
    normal, lesion = pred.scores[labels == 0], pred.scores[labels > 0]
    ordered = (lesion[None, :] > normal[:, None]).mean() + 0.5 * (lesion[None, :] == normal[:, None]).mean()
    assert ordered > 0.95, f"{name}: detection AUROC {ordered:.3f}"


def test_tip_adapter_search_prefers_the_cache_when_text_is_uninformative(
    backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support, items, labels = clustered(backbone, monkeypatch, 128, shots=4, patch_text=True)
    searched = make_method(TipAdapter, backbone, tmp_path, shots=4)
    searched.fit(support)
    assert searched.search_result["cv_accuracy"] > 0.9
    assert searched.alpha > 2.0  # the text says nothing here: the cache gets more weight than the init
    tiny_alpha = make_method(TipAdapter, backbone, tmp_path, shots=4, search=False, init_alpha=0.001)
    tiny_alpha.fit(support)
    assert float((tiny_alpha.predict(items).probs.argmax(1) == labels).mean()) < 0.9


# --------------------------------------------------------------------------- the grid runner


def test_all_six_run_in_the_grid(make_config: ConfigFactory, shared_data: SyntheticData) -> None:
    config = make_config(
        methods=",".join(FEWSHOT),
        shots="2",
        seeds="0",
        targets=str(shared_data.target_a.folder),
        method_config=QUICK,
    )
    summary = run_grid(config)
    run_dir = run_dir_of(config)
    cells = cell_dirs(run_dir)
    assert {c.split("/")[0] for c in cells} == set(FEWSHOT) and len(cells) == len(FEWSHOT)
    for cell in cells:
        record = json.loads((run_dir / cell / "cell.json").read_text())
        assert set(record["metrics"]) == CLASSIFIER_METRICS
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    # each image through the frozen backbone once: 6 support + 9 test images; the
    # augmented views of Tip-Adapter's keys are extra views, not counted there
    assert summary.images_encoded == 6 + 9
