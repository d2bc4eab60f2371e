"""Shared anomaly-localisation building blocks of the method toolkit (bench/kit: maps.py, losses.py,
adapters.py, memory.py): hand-checked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from bench.kit import (
    LayerAdapters,
    PrototypeCrossAttention,
    cache_logits,
    dice_loss,
    focal_loss,
    gaussian_smooth,
    sigma_at,
    text_similarity_maps,
    upsample_grid,
)
from bench.kit.maps import gaussian_kernel1d

# --------------------------------------------------------------------------- losses


def test_dice_loss_by_hand() -> None:
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.0]], [[0.25, 0.25], [0.0, 0.5]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # image 1: 2*1.5 + 1 over 1.5 + 2 + 1 = 4 / 4.5; image 2 (normal): 1 / (1 + 1) = 0.5
    expected = 1.0 - (4.0 / 4.5 + 0.5) / 2.0
    assert dice_loss(probs, target).item() == pytest.approx(expected, abs=1e-7)
    # smooth 0: plain soft Dice of image 1 only
    assert dice_loss(probs[:1], target[:1], smooth=0.0).item() == pytest.approx(1.0 - 3.0 / 3.5, abs=1e-7)
    # a perfect map costs nothing; the inverted map costs (almost) everything
    assert dice_loss(target[:1], target[:1]).item() == pytest.approx(0.0, abs=1e-7)
    assert dice_loss(1.0 - target[:1], target[:1]).item() == pytest.approx(1.0 - 1.0 / 5.0, abs=1e-7)
    with pytest.raises(ValueError):
        dice_loss(probs, target[:, :1])


def test_focal_loss_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # p_t = 0.9, 0.8, 0.4, 1.0
    terms = [0.1**2 * -math.log(0.9), 0.2**2 * -math.log(0.8), 0.6**2 * -math.log(0.4), 0.0]
    assert focal_loss(probs, target).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    # gamma 0 is the binary cross-entropy
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(
        F.binary_cross_entropy(probs, target).item(), rel=1e-5
    )
    # alpha weights positives by alpha and negatives by 1 - alpha
    weighted = [0.25 * terms[0], 0.75 * terms[1], 0.75 * terms[2], 0.0]
    assert focal_loss(probs, target, alpha=0.25).item() == pytest.approx(sum(weighted) / 4, rel=1e-6)
    # a confidently wrong pixel is finite (clamped log) and large
    bad = focal_loss(torch.tensor([0.0]), torch.tensor([1.0]))
    assert math.isfinite(bad.item()) and bad.item() > 10


def test_focal_equals_april_gan_two_channel_form() -> None:
    """April-GAN applies its FocalLoss to the softmax map [1 - p, p] with the label as class index."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 5, generator=generator)
    target = (torch.rand(2, 5, 5, generator=generator) > 0.6).float()
    two = torch.stack([1 - probs, probs], dim=1)  # (B, 2, H, W)
    pt = two.gather(1, target.long()[:, None])[:, 0]
    reference = (-((1 - pt) ** 2) * torch.log(pt)).mean()
    assert focal_loss(probs, target).item() == pytest.approx(reference.item(), rel=1e-6)


# --------------------------------------------------------------------------- smoothing


@pytest.mark.parametrize(("sigma", "shape"), [(1.5, (2, 20, 17)), (3.05, (1, 32, 32)), (6.0, (1, 9, 11))])
def test_gaussian_smooth_matches_scipy(sigma: float, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    maps = rng.random(shape).astype(np.float64)
    ours = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    for i in range(shape[0]):
        reference = gaussian_filter(maps[i], sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(ours[i], reference, atol=1e-12)


def test_gaussian_smooth_properties() -> None:
    maps = torch.full((3, 2, 16, 16), 0.7, dtype=torch.float32)
    assert torch.allclose(gaussian_smooth(maps, 2.0), maps, atol=1e-6)  # constants stay
    spike = torch.zeros(1, 15, 15)
    spike[0, 7, 7] = 1.0
    blurred = gaussian_smooth(spike, 1.0)
    assert blurred.shape == spike.shape and blurred.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert blurred[0, 7, 7] < 0.2 and blurred[0, 7, 8] > 0  # spread out
    assert gaussian_smooth(spike, 0.0) is spike
    kernel = gaussian_kernel1d(2.0)
    assert kernel.numel() == 2 * int(4 * 2.0 + 0.5) + 1 and kernel.sum().item() == pytest.approx(1.0)
    assert sigma_at(256, 4.0, 336) == pytest.approx(4.0 * 256 / 336)


# --------------------------------------------------------------------------- maps


def test_text_similarity_maps_by_hand() -> None:
    t_n, t_a = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    text = torch.stack([t_n, t_a])
    # 2x2 grid: patches equal t_a, t_n, a mix, and a 3x-scaled t_a (cosine ignores the scale)
    patches = torch.stack([t_a, t_n, (t_n + t_a), 3 * t_a])[None, None]  # (1, 1, 4, 3)
    grid_maps = text_similarity_maps(patches, text, (2, 2), None, tau=0.07)
    high = 1.0 / (1.0 + math.exp(-1.0 / 0.07))
    expected = torch.tensor([[high, 1 - high], [0.5, high]])
    assert grid_maps.shape == (1, 1, 2, 2)
    assert torch.allclose(grid_maps[0, 0], expected, atol=1e-6)
    # tau changes the sharpness
    soft = text_similarity_maps(patches, text, (2, 2), None, tau=1.0)
    assert soft[0, 0, 0, 0].item() == pytest.approx(1.0 / (1.0 + math.exp(-1.0)), rel=1e-6)
    # upsampled: softmax first then bilinear, equal to interpolating the grid map
    up = text_similarity_maps(patches, text, (2, 2), 8, tau=0.07)
    reference = F.interpolate(grid_maps, size=(8, 8), mode="bilinear", align_corners=False)
    assert up.shape == (1, 1, 8, 8) and torch.allclose(up, reference, atol=1e-6)
    # April-GAN's order (upsample the logits, then softmax) differs in between patches
    logits_first = text_similarity_maps(patches, text, (2, 2), 8, tau=0.07, upsample="logits")
    assert not torch.allclose(logits_first, up, atol=1e-3)
    assert torch.allclose(logits_first[..., 0, 0], up[..., 0, 0], atol=1e-6)  # corners agree
    with pytest.raises(ValueError, match="upsample"):
        text_similarity_maps(patches, text, (2, 2), 8, upsample="nearest")


def test_text_similarity_maps_text_shapes() -> None:
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 3, 6, 5, generator=generator)  # B=2, L=3, grid 2x3, D=5
    shared = torch.randn(2, 5, generator=generator)
    per_image = shared[None].repeat(2, 1, 1)
    per_layer = shared[None, None].repeat(2, 3, 1, 1)
    a = text_similarity_maps(patches, shared, (2, 3), 7)
    b = text_similarity_maps(patches, per_image, (2, 3), 7)
    c = text_similarity_maps(patches, per_layer, (2, 3), 7)
    assert a.shape == (2, 3, 7, 7) and torch.equal(a, b) and torch.equal(a, c)
    assert (a >= 0).all() and (a <= 1).all()
    # per-layer text really is used per layer
    changed = per_layer.clone()
    changed[:, 1] = changed[:, 1].flip(1)
    d = text_similarity_maps(patches, changed, (2, 3), 7)
    assert torch.equal(d[:, 0], a[:, 0]) and not torch.allclose(d[:, 1], a[:, 1])
    # the grid is row-major: patch index 1 is row 0, column 1
    grid_only = text_similarity_maps(patches, shared, (2, 3), None)
    flat = torch.softmax(F.normalize(patches, dim=-1) @ F.normalize(shared, dim=-1).T / 0.07, dim=-1)[..., 1]
    assert torch.allclose(grid_only[0, 0, 0, 1], flat[0, 0, 1])
    assert upsample_grid(torch.ones(4, 6), (2, 3), (5, 4)).shape == (4, 5, 4)


def test_layer_adapters_use_one_linear_per_layer() -> None:
    torch.manual_seed(0)
    adapters = LayerAdapters(3, 8, 4)
    tokens = torch.randn(2, 3, 5, 8)
    out = adapters(tokens)
    assert out.shape == (2, 3, 5, 4)
    for i in range(3):
        assert torch.allclose(out[:, i], adapters.linears[i](tokens[:, i]))
    assert not torch.allclose(adapters.linears[0].weight, adapters.linears[1].weight)
    assert LayerAdapters(2, 8, 4, bias=False).linears[0].bias is None
    with pytest.raises(ValueError):
        adapters(tokens[:, :2])


# --------------------------------------------------------------------------- cache model


def test_cache_logits_by_hand() -> None:
    queries = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha, beta = 1.0, 5.5
    q1 = queries[1]
    affinity1 = [q1 @ keys[j] for j in range(3)]
    expected_cache = torch.tensor(
        [
            [1.0, math.exp(-5.5) + math.exp(-5.5 * 0.4)],
            [
                math.exp(-5.5 * (1 - affinity1[0])),
                math.exp(-5.5 * (1 - affinity1[1])) + math.exp(-5.5 * (1 - affinity1[2])),
            ],
        ]
    )
    # clip_scale 0 leaves the cache term alone
    cache_only = cache_logits(queries, keys, values, text, alpha, beta, clip_scale=0.0)
    assert torch.allclose(cache_only, expected_cache, atol=1e-6)
    full = cache_logits(queries, keys, values, text, 2.0, beta, clip_scale=100.0)
    assert torch.allclose(full, 100.0 * queries @ text.T + 2.0 * expected_cache, atol=1e-5)


def test_cache_logits_match_tip_adapter() -> None:
    generator = torch.Generator().manual_seed(3)
    queries = F.normalize(torch.randn(4, 6, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(9, 6, generator=generator), dim=-1)
    values = F.one_hot(torch.arange(9) % 3, 3).float()
    text = F.normalize(torch.randn(3, 6, generator=generator), dim=-1)
    alpha, beta = 1.3, 5.5
    ours = cache_logits(queries, keys, values, text, alpha, beta, 100.0)
    # Tip-Adapter's official main.py (keys and text weights stored transposed there)
    cache_keys, clip_weights = keys.T, text.T
    affinity = queries @ cache_keys
    tip_cache = ((-1) * (beta - beta * affinity)).exp() @ values
    tip = 100.0 * queries @ clip_weights + tip_cache * alpha
    assert torch.allclose(ours, tip, atol=1e-5)
    # UltraAD's former memory_logits weighted before the product, ((alpha E) L): with its
    # default alpha = 1 that is bit-identical to cache_logits' alpha (E L)
    old_order = 100.0 * queries @ text.T + (1.0 * torch.exp(-beta * (1.0 - queries @ keys.T))) @ values
    assert torch.equal(cache_logits(queries, keys, values, text, 1.0, beta, 100.0), old_order)


# --------------------------------------------------------------------------- cross-attention


def test_prototype_cross_attention() -> None:
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(2, 2, 16), dim=-1)
    tokens = torch.randn(2, 7, 16) * 5
    zero = PrototypeCrossAttention(16, 8, zero_init=True)
    assert torch.allclose(zero(prototypes, tokens), prototypes, atol=1e-6)  # identity at init
    fusion = PrototypeCrossAttention(16, 8, zero_init=False)
    out = fusion(prototypes, tokens)
    assert out.shape == (2, 2, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    assert not torch.allclose(out, prototypes, atol=1e-3)
    # attention over a set: the token order does not matter; the token scale does not
    # either when tokens are normalised first
    assert torch.allclose(fusion(prototypes, tokens.flip(1)), out, atol=1e-5)
    assert torch.allclose(fusion(prototypes, tokens * 0.1), out, atol=1e-5)
    raw = PrototypeCrossAttention(16, 8, zero_init=False, normalize_tokens=False)
    raw.load_state_dict(fusion.state_dict())
    assert not torch.allclose(raw(prototypes, tokens * 0.1), raw(prototypes, tokens), atol=1e-3)
    # learned W_q, W_k, W_v and output projection all receive gradients
    out.sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="divisible"):
        PrototypeCrossAttention(10, 8)
