"""April-GAN (methods/aprilgan) and the toolkit pieces it adds, on the tiny random-init backbone.

The tiny model: 64 px input, 16 px patches (a 4 x 4 grid), 4 vision blocks of width 64, joint
embedding 32. Every formula is written out here from the official code's description
(/tmp/spec_aprilgan.md: train.py, test.py, few_shot.py, loss.py) and compared with the method,
so a wrong scale, order of softmax and upsampling, memory or score fusion fails a test.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, lesion_support, pixel_auroc, tiny_method

import methods.aprilgan as aprilgan_module
from bench.errors import MethodError
from bench.kit import LayerAdapters, focal_loss, nearest_cosine_distance
from bench.kit.clip import Backbone
from bench.kit.ensembles import VAND_ABNORMAL_STATES as ABNORMAL_STATES
from bench.kit.ensembles import VAND_NORMAL_STATES as NORMAL_STATES
from bench.kit.ensembles import VAND_TEMPLATES as TEMPLATES
from bench.method import SupportSet
from bench.weights import BackboneSpec, load_backbone
from methods.aprilgan import AprilGAN

EVAL = 32


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    spec = BackboneSpec(TINY_MODEL, "none", cache_dir=tmp_path_factory.mktemp("aprilgan-cache"), device="cpu")
    return load_backbone(spec)


def lesion_task(shots: int, seed: int, tag: str, size: int = EVAL) -> SupportSet:
    """The shared synthetic lesion task (tests/conftest.py ``lesion_support``) with this file's keys."""
    return lesion_support(shots, seed, tag, size, key_prefix="ag")


def make(backbone: Backbone, seed: int = 0, **config: Any) -> AprilGAN:
    return tiny_method(AprilGAN, backbone, seed=seed, shots=2, eval_size=EVAL, **config)


@pytest.fixture(scope="module")
def support() -> SupportSet:
    return lesion_task(2, seed=0, tag="support")


# --------------------------------------------------------------------------- toolkit: losses, memory


def official_focal(
    two_channel: torch.Tensor, target: torch.Tensor, gamma: float, smooth: float
) -> torch.Tensor:
    """loss.py's FocalLoss (apply_nonlin=None, alpha=1) on a (B, 2, ...) softmax map [normal, abnormal]."""
    logit = two_channel.reshape(two_channel.shape[0], 2, -1).permute(0, 2, 1).reshape(-1, 2)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], 2, dtype=logit.dtype).scatter_(1, idx, 1.0)
    one_hot = torch.clamp(one_hot, smooth / (2 - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1.0 * torch.pow(1.0 - pt, gamma) * pt.log()).mean()


def test_focal_loss_with_smooth_is_the_official_two_channel_focal_loss() -> None:
    """Catches a wrong label smoothing (clamp of the one-hot, + smooth on p_t) or a wrong p_t."""
    # one pixel by hand: p = 0.9, y = 1, smooth 0.1 -> one-hot [0.1, 0.9], p_t = 0.1*0.1 + 0.9*0.9 + 0.1
    pt = 0.1 * 0.1 + 0.9 * 0.9 + 0.1
    by_hand = -((1 - pt) ** 2) * math.log(pt)
    got = focal_loss(
        torch.tensor([[0.9]], dtype=torch.float64),
        torch.tensor([[1.0]], dtype=torch.float64),
        2.0,
        smooth=0.1,
    )
    assert got.item() == pytest.approx(by_hand, rel=1e-12)
    # y = 0, p = 0.3, gamma 1.5: one-hot [0.9, 0.1], p_t = 0.9*0.7 + 0.1*0.3 + 0.1
    pt = 0.9 * 0.7 + 0.1 * 0.3 + 0.1
    got = focal_loss(
        torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), 1.5, smooth=0.1
    )
    assert got.item() == pytest.approx(-((1 - pt) ** 1.5) * math.log(pt), rel=1e-12)
    # a batch of maps, the official smooth 1e-5, against loss.py written out
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 5, 4, generator=g, dtype=torch.float64)
    target = (torch.rand(3, 5, 4, generator=g) > 0.5).double()
    for gamma in (2.0, 0.0, 3.0):
        expected = official_focal(torch.stack([1 - probs, probs], dim=1), target, gamma, 1e-5)
        got = focal_loss(probs, target, gamma, smooth=1e-5)
        assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)
    # smooth really changes the value (not silently ignored)
    assert focal_loss(probs, target, 2.0, smooth=0.05).item() != pytest.approx(
        focal_loss(probs, target, 2.0).item(), rel=1e-6
    )


def test_focal_loss_without_smooth_is_unchanged() -> None:
    """smooth=None: p_t = p | 1 - p, eps clamp in the log only (catches smoothing leaking into it)."""
    probs = torch.tensor([0.9, 0.2, 0.0], dtype=torch.float64)
    target = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    eps = 1e-6
    terms = [-(0.1**2) * math.log(0.9), -(0.2**2) * math.log(0.8), -(1.0**2) * math.log(eps)]
    assert focal_loss(probs, target, 2.0).item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    assert focal_loss(probs, target, 2.0, smooth=None).item() == focal_loss(probs, target, 2.0).item()
    # alpha weighting still applies: alpha_t = 0.25 on y = 1, 0.75 on y = 0
    weighted = (0.25 * terms[0] + 0.75 * terms[1] + 0.25 * terms[2]) / 3
    assert focal_loss(probs, target, 2.0, alpha=0.25).item() == pytest.approx(weighted, rel=1e-12)


def test_nearest_cosine_distance_by_hand() -> None:
    """min over every token of every reference of (1 - cos); ``exclude`` drops exactly the named reference."""
    queries = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # (1, 2, 2): any scale
    references = torch.tensor(
        [
            [[1.0, 1.0], [-2.0, 0.0]],  # reference 0: cos to q0 = 1/sqrt2 and -1
            [[0.0, 2.0], [0.0, -1.0]],  # reference 1: cos to q1 = 1 and -1
        ]
    )
    s = 1.0 - 1.0 / math.sqrt(2.0)
    torch.testing.assert_close(nearest_cosine_distance(queries, references), torch.tensor([[s, 0.0]]))
    torch.testing.assert_close(
        nearest_cosine_distance(queries, references, torch.tensor([-1])), torch.tensor([[s, 0.0]])
    )
    # without reference 1, q1 only sees reference 0 (cos 1/sqrt2); without reference 0, q0 sees only
    # reference 1 (cos 0 and 0 -> distance 1)
    torch.testing.assert_close(
        nearest_cosine_distance(queries, references, torch.tensor([1])), torch.tensor([[s, s]])
    )
    torch.testing.assert_close(
        nearest_cosine_distance(queries, references, torch.tensor([0])), torch.tensor([[1.0, 0.0]])
    )
    # per query image its own exclusion
    both = torch.cat([queries, queries])
    torch.testing.assert_close(
        nearest_cosine_distance(both, references, torch.tensor([0, 1])), torch.tensor([[1.0, 0.0], [s, s]])
    )


# --------------------------------------------------------------------------- the method's formulas


def known_weights(n_layers: int, width: int, dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(dim, width, generator=g) * 0.2, torch.randn(dim, generator=g) * 0.5)
        for _ in range(n_layers)
    ]


class FixedAdapters(LayerAdapters):
    """LayerAdapters whose Linear layers hold :func:`known_weights`."""

    def __init__(self, n_layers: int, in_dim: int, out_dim: int, **kwargs: Any) -> None:
        super().__init__(n_layers, in_dim, out_dim, **kwargs)
        with torch.no_grad():
            for linear, (weight, bias) in zip(
                self.linears, known_weights(n_layers, in_dim, out_dim), strict=True
            ):
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)


def known_text(dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(99)), dim=-1)


def hand_probability_maps(
    tokens: torch.Tensor,
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    text: torch.Tensor,
    grid,
    size: int,
) -> torch.Tensor:
    """test.py: per layer 100 * norm(Linear(tokens)) @ T as (B, 2, H, H), bilinear align_corners to S,
    then softmax over the 2 classes."""
    b = tokens.shape[0]
    text = text / text.norm(dim=-1, keepdim=True)
    out = []
    for layer, (weight, bias) in enumerate(weights):
        adapted = tokens[:, layer] @ weight.T + bias
        adapted = adapted / adapted.norm(dim=-1, keepdim=True)
        logits = 100.0 * adapted @ text.T  # (B, N, 2)
        logits = logits.permute(0, 2, 1).reshape(b, 2, *grid)
        up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
        out.append(torch.softmax(up, dim=1))
    return torch.stack(out, dim=1)  # (B, L, 2, S, S)


def hand_memory_map(tokens: torch.Tensor, bank: torch.Tensor, grid, size: int) -> torch.Tensor:
    """few_shot.py + test.py: per layer min over the [k*N, W] bank of (1 - cos), upsampled, summed."""
    b, n_layers = tokens.shape[:2]
    total = torch.zeros(b, size, size)
    for layer in range(n_layers):
        memory = bank[:, layer].reshape(-1, bank.shape[-1])
        memory = memory / memory.norm(dim=-1, keepdim=True)
        query = tokens[:, layer] / tokens[:, layer].norm(dim=-1, keepdim=True)
        distance = (1.0 - query @ memory.T).min(dim=-1).values  # (B, N)
        up = F.interpolate(
            distance.reshape(b, 1, *grid), size=(size, size), mode="bilinear", align_corners=True
        )
        total = total + up[:, 0]
    return total


def test_text_is_the_official_prompt_ensemble(backbone: Backbone) -> None:
    """Catches a wrong sentence order/format or averaging: normalise each, mean, renormalise, per class."""
    method = make(backbone, object="lesion")
    text = method.text()
    assert text.shape == (2, backbone.embed_dim)
    for row, states in enumerate((NORMAL_STATES, ABNORMAL_STATES)):
        sentences = [t.format(s.format("lesion")) for s in states for t in TEMPLATES]
        assert len(sentences) == 35 * len(states)
        embeds = F.normalize(backbone.encode_text(sentences), dim=-1)
        torch.testing.assert_close(text[row], F.normalize(embeds.mean(0), dim=-1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("memory", [True, False])
def test_maps_and_scores_are_the_official_formulas(
    backbone: Backbone, support: SupportSet, monkeypatch: pytest.MonkeyPatch, memory: bool
) -> None:
    """Catches: a wrong logit scale (CLIP's own instead of 100), softmax before upsampling,
    align_corners False, a mean instead of a sum over layers, a memory of the wrong images or
    not left out for its own image, a wrong image probability, a wrong fused score."""
    monkeypatch.setattr(aprilgan_module, "LayerAdapters", FixedAdapters)
    method = make(backbone, epochs=0, memory=memory)
    text = known_text(backbone.embed_dim)
    method._text = text
    method.fit(support)
    n_layers = len(backbone.layers)
    weights = known_weights(n_layers, backbone.width, backbone.embed_dim)
    grid = backbone.grid

    support_feats = backbone.image_features(support.items)
    queries = lesion_task(1, seed=5, tag="query").items
    feats = backbone.image_features(queries)
    tokens = feats.patch_tokens
    with torch.no_grad():
        probs = method.probability_maps(tokens, EVAL)
    expected_probs = hand_probability_maps(tokens, weights, text, grid, EVAL)
    torch.testing.assert_close(probs, expected_probs, atol=1e-5, rtol=1e-5)

    prediction = method.predict(queries)
    expected_map = expected_probs[:, :, 1].sum(dim=1)
    image_probability = torch.softmax(100.0 * F.normalize(feats.embeds, dim=-1) @ text.T, dim=-1)[:, 1]
    normal = np.flatnonzero(support.labels == 0)
    if not memory:
        assert method.memory is None
        np.testing.assert_allclose(prediction.maps, expected_map.numpy(), atol=1e-5)
        np.testing.assert_allclose(prediction.scores, image_probability.double().numpy(), atol=1e-6)
        return
    bank = support_feats.patch_tokens[torch.as_tensor(normal)]
    expected_map = expected_map + hand_memory_map(tokens, bank, grid, EVAL)
    np.testing.assert_allclose(prediction.maps, expected_map.numpy(), atol=1e-5)
    # the stored support range: each support image's map maximum, its own tokens out of the memory
    support_probs = hand_probability_maps(support_feats.patch_tokens, weights, text, grid, EVAL)
    peaks = []
    for i in range(len(support)):
        keep = [j for j in normal if j != i]
        own = hand_memory_map(
            support_feats.patch_tokens[i : i + 1], support_feats.patch_tokens[keep], grid, EVAL
        )
        peaks.append(float((support_probs[i, :, 1].sum(0) + own[0]).max()))
    low, high = method.score_range
    assert low == pytest.approx(min(peaks), abs=1e-5) and high == pytest.approx(max(peaks), abs=1e-5)
    peak = expected_map.flatten(1).max(dim=1).values.double()
    expected_scores = 0.5 * (image_probability.double() + (peak - low) / (high - low))
    np.testing.assert_allclose(prediction.scores, expected_scores.numpy(), atol=1e-5)
    # score_fusion 'probability': the image probability alone, whatever the map
    method_probability = make(backbone, epochs=0, score_fusion="probability")
    method_probability._text = text
    method_probability.fit(support)
    np.testing.assert_allclose(
        method_probability.predict(queries).scores, image_probability.double().numpy(), atol=1e-6
    )


# --------------------------------------------------------------------------- training


def hand_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py's BinaryDiceLoss (smooth 1): 1 - mean_b (2 sum(p g) + 1) / (sum p + sum g + 1)."""
    p, g = probs.flatten(1), target.flatten(1)
    return 1.0 - ((2.0 * (p * g).sum(1) + 1.0) / (p.sum(1) + g.sum(1) + 1.0)).mean()


def test_training_loss_is_the_official_loss(
    backbone: Backbone, support: SupportSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss of one full-batch step is sum over layers of [FocalLoss(2-channel map) + Dice(abnormal
    channel, mask)] on the upsampled softmax maps (catches a mean over layers, Dice on the wrong
    channel, focal without the official smoothing)."""
    monkeypatch.setattr(aprilgan_module, "LayerAdapters", FixedAdapters)
    method = make(backbone, epochs=1, batch_size=len(support), memory=False)
    text = known_text(backbone.embed_dim)
    method._text = text
    method.fit(support)
    tokens = backbone.image_features(support.items).patch_tokens
    weights = known_weights(len(backbone.layers), backbone.width, backbone.embed_dim)
    probs = hand_probability_maps(tokens, weights, text, backbone.grid, EVAL).double()
    masks = torch.from_numpy(support.masks).double()
    focal = sum(official_focal(probs[:, i], masks, 2.0, 1e-5) for i in range(probs.shape[1]))
    dice = sum(hand_dice(probs[:, i, 1], masks) for i in range(probs.shape[1]))
    (first,) = method.history
    assert first["focal"] == pytest.approx(focal.item(), rel=1e-4)
    assert first["dice"] == pytest.approx(dice.item(), rel=1e-4)
    assert first["total"] == pytest.approx((focal + dice).item(), rel=1e-4)


def test_gradients_reach_only_the_adapters(backbone: Backbone, support: SupportSet) -> None:
    """One training step: every Linear weight and bias gets a non-zero gradient, no CLIP weight any
    (catches a detached adapter, a layer left out of the loss, or CLIP weights in the optimizer)."""
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = make(backbone, epochs=1, batch_size=len(support))  # exactly one step
    method.fit(support)
    assert len(method.history) == 1
    assert method.adapters is not None
    for name, parameter in method.adapters.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    assert not backbone_ids & {id(p) for p in method.adapters.parameters()}
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_official_schedule_learns_to_localise(backbone: Backbone) -> None:
    """Official schedule (15 epochs, Adam 1e-3, betas 0.5/0.999, batch 8), memory off so the map is
    the trained part: the loss goes down and the fitted map beats the unfitted one (catches a
    loss on the wrong channel, a sign error, or an optimizer not stepping the adapters)."""
    task = lesion_task(4, seed=3, tag="learn")
    held_out = lesion_task(3, seed=11, tag="held")
    unfitted = make(backbone, epochs=0, memory=False)
    unfitted.fit(task)
    method = make(backbone, memory=False)
    method.fit(task)
    history = method.history
    assert len(history) == 15 and set(history[0]) == {"focal", "dice", "total"}
    assert history[-1]["total"] < history[0]["total"]
    assert history[-1]["focal"] < history[0]["focal"]
    for h in history:
        assert h["total"] == pytest.approx(h["focal"] + h["dice"], rel=1e-5)
    for data in (task, held_out):
        before = pixel_auroc(unfitted.predict(data.items).maps, data.masks)
        after = pixel_auroc(method.predict(data.items).maps, data.masks)
        assert after >= 0.75 and after >= before + 0.15, (before, after)  # seen: 0.66 -> 0.90, 0.58 -> 0.82


def test_deterministic_for_a_seed(backbone: Backbone, support: SupportSet) -> None:
    """Same seed -> bit-identical predictions; another seed -> other adapters and maps."""
    queries = lesion_task(1, seed=7, tag="det").items
    runs = []
    for seed in (0, 0, 1):
        method = make(backbone, seed=seed, epochs=3)
        method.fit(support)
        runs.append(method.predict(queries))
    assert np.array_equal(runs[0].scores, runs[1].scores) and np.array_equal(runs[0].maps, runs[1].maps)
    assert not np.allclose(runs[0].maps, runs[2].maps)


# --------------------------------------------------------------------------- options and errors


def test_defaults_are_the_official_settings() -> None:
    cfg = AprilGAN.default_config
    assert cfg["logit_scale"] == 100.0 and cfg["align_corners"] is True and cfg["memory"] is True
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["betas"]) == (15, 8, 1e-3, [0.5, 0.999])
    assert (cfg["focal_gamma"], cfg["focal_smooth"], cfg["dice_smooth"]) == (2.0, 1e-5, 1.0)
    assert cfg["score_fusion"] == "support-minmax"


def test_bad_options_and_misuse_are_clear_errors(backbone: Backbone, support: SupportSet) -> None:
    """Catches an option accepted without validation, or an error that does not name method and option."""
    bad_values = (
        {"betas": [0.5]},
        {"betas": [0.5, 1.5]},
        {"score_fusion": "max"},
        {"logit_scale": 0},
        {"epochs": -1},
        {"layers": []},
        {"focal_smooth": 0.9},
        {"normal_states": []},
    )
    for bad in bad_values:
        key = next(iter(bad))
        with pytest.raises(MethodError, match=f"method 'aprilgan': option '{key}'"):
            make(backbone, **bad)
    with pytest.raises(MethodError, match="method 'aprilgan': unknown option"):
        make(backbone, gamma=2)
    with pytest.raises(MethodError, match=r"method 'aprilgan'.*layers"):
        make(backbone, layers=[7], epochs=0).fit(support)  # the tiny model has blocks 0-3
    with pytest.raises(MethodError, match="method 'aprilgan': predict"):
        make(backbone).predict(support.items)
    with pytest.raises(MethodError, match=r"method 'aprilgan'.*normal support images"):
        make(backbone, epochs=0).fit(support.of_class(1))
