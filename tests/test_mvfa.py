"""MVFA (methods/mvfa) on the tiny random-init backbone.

The tiny model: 64 px input, 16 px patches (a 4 x 4 grid), 4 vision blocks of width 64, joint
embedding 32 (so the adapters are Linear(64 -> 32) / Linear(32 -> 64)); its default blocks are
0, 1, 2, 3. Every formula is written out here from the official code (MediaBrain-SJTU/MVFA-AD:
``CLIP/adapter.py``, ``train_few.py``, ``utils.py``, ``loss.py``) with open_clip's own modules
(the test reads ``backbone.model``; the method never does) and compared with the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, lesion_support, pixel_auroc, tiny_method
from PIL import Image

from bench.errors import MethodError
from bench.kit import FeatureRequest
from bench.kit.clip import Backbone
from bench.kit.ensembles import VAND_ABNORMAL_STATES as ABNORMAL_STATES
from bench.kit.ensembles import VAND_NORMAL_STATES as NORMAL_STATES
from bench.kit.ensembles import VAND_TEMPLATES as TEMPLATES
from bench.method import SupportSet
from bench.types import ImageItem
from bench.weights import BackboneSpec, load_backbone
from methods.mvfa import MVFA
from methods.mvfa.adapters import ImplantedAdapters
from methods.mvfa.views import ViewTransform, official_views, render_view, view_item, view_masks

EVAL = 32
#: Cached prefixes are fp16-rounded; a reference from the raw image agrees to about this.
FP16_ATOL = 2e-3
#: No augmentation: one view per support image.
NO_AUG: dict[str, Any] = {"rotations": [], "translations": [], "flips": False}


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def new_backbone(cache_dir: Path) -> Backbone:
    return load_backbone(BackboneSpec(TINY_MODEL, "none", cache_dir=cache_dir, device="cpu"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return new_backbone(tmp_path_factory.mktemp("mvfa-cache"))


def lesion_task(shots: int, seed: int, tag: str, size: int = EVAL) -> SupportSet:
    """The shared synthetic lesion task (tests/conftest.py ``lesion_support``) with this file's keys."""
    return lesion_support(shots, seed, tag, size, key_prefix="mv")


def make(backbone: Backbone, seed: int = 0, **config: Any) -> MVFA:
    return tiny_method(MVFA, backbone, seed=seed, shots=2, eval_size=EVAL, **config)


@pytest.fixture(scope="module")
def support() -> SupportSet:
    return lesion_task(2, seed=0, tag="support")


def known_text(dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(7)), dim=-1)


# --------------------------------------------------------------------------- hand references


def hand_update(
    adapters: ImplantedAdapters, i: int, x: torch.Tensor, weights: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """adapter.py: med = LeakyReLU(x W1^T), out = LeakyReLU(med W2^T) (no biases) for the seg and the
    det adapter of used block i, on the same x; x <- 0.8 x + 0.1 seg_out + 0.1 det_out."""
    meds, outs = [], []
    for adapter in (adapters.seg[i], adapters.det[i]):
        med = F.leaky_relu(x @ adapter.fc1[0].weight.T, 0.01)
        meds.append(med)
        outs.append(F.leaky_relu(med @ adapter.fc2[0].weight.T, 0.01))
    return weights[0] * x + weights[1] * outs[0] + weights[2] * outs[1], meds[0], meds[1]


def hand_tower(
    backbone: Backbone,
    adapters: ImplantedAdapters,
    x: torch.Tensor,
    start: int,
    weights: Sequence[float] = (0.8, 0.1, 0.1),
    before: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP_Inplanted.forward from the stream ``x`` entering block ``start`` (or, ``start = -1``, the
    stream after block ``blocks[0]``): every block of open_clip's tower, the adapters AFTER each used
    block (``before=True``: before it, a wrong placement). Returns (seg, det) (B, L, 1 + N, D)."""
    blocks = list(adapters.blocks)
    resblocks = backbone.model.visual.transformer.resblocks
    seg, det = [], []
    with torch.no_grad():
        if start == -1:
            x, s, d = hand_update(adapters, 0, x, weights)
            seg.append(s)
            det.append(d)
            start = blocks[0] + 1
        for b in range(start, len(resblocks)):
            if before and b in blocks:
                x, s, d = hand_update(adapters, blocks.index(b), x, weights)
                seg.append(s)
                det.append(d)
            x = resblocks[b](x)
            if not before and b in blocks:
                x, s, d = hand_update(adapters, blocks.index(b), x, weights)
                seg.append(s)
                det.append(d)
    return torch.stack(seg, dim=1), torch.stack(det, dim=1)


def hand_from_images(
    backbone: Backbone, adapters: ImplantedAdapters, items: Sequence[ImageItem], **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    visual = backbone.model.visual
    images = torch.stack([backbone.preprocess(item.rgb()) for item in items])
    with torch.no_grad():
        x = visual._embeds(images)
    return hand_tower(backbone, adapters, x, 0, **kwargs)


def official_zero_map(seg: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
    """test(): per layer 100 * norm(p[1:]) @ T -> (1, 2, H, H), bilinear align_corners to S, softmax
    over the 2 channels, channel 1; np.sum over layers. seg (L, 1 + N, D) -> (S, S)."""
    total = torch.zeros(size, size, dtype=torch.float64)
    for layer in range(seg.shape[0]):
        p = seg[layer, 1:]
        p = p / p.norm(dim=-1, keepdim=True)
        logits = (100.0 * p @ text.T).unsqueeze(0)  # (1, N, 2)
        h = int(math.sqrt(logits.shape[1]))
        up = F.interpolate(
            logits.permute(0, 2, 1).reshape(1, 2, h, h), size=size, mode="bilinear", align_corners=True
        )
        total += torch.softmax(up, dim=1)[0, 1].double()
    return total


def official_det_zero(det: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per layer mean over patches of softmax(100 norm(p[1:]) @ T)[:, 1]: (L,)."""
    p = det[:, 1:] / det[:, 1:].norm(dim=-1, keepdim=True)
    return torch.softmax(100.0 * p @ text.T, dim=-1)[..., 1].mean(dim=-1)


def cos_sim(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """utils.py cos_sim."""
    a = a / torch.clamp(a.norm(dim=1)[:, None], min=eps)
    b = b / torch.clamp(b.norm(dim=1)[:, None], min=eps)
    return a @ b.T


def official_few_map(tokens: torch.Tensor, memory: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """test(): per layer min over the memory (M, D) of 1 - cos_sim(mem, p[1:]) -> (1, 1, H, H),
    bilinear align_corners to S; summed over layers. tokens (L, 1 + N, D) -> (S, S)."""
    total = torch.zeros(size, size, dtype=torch.float64)
    for layer in range(tokens.shape[0]):
        cos = cos_sim(memory[layer], tokens[layer, 1:])
        h = int(math.sqrt(cos.shape[1]))
        distance = torch.min(1 - cos, 0)[0].reshape(1, 1, h, h)
        total += F.interpolate(distance, size=size, mode="bilinear", align_corners=True)[0, 0].double()
    return total


def official_focal(two_channel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py FocalLoss (gamma 2, alpha ones, smooth 1e-5) on a (B, 2, ...) softmax map."""
    logit = two_channel.reshape(two_channel.shape[0], 2, -1).permute(0, 2, 1).reshape(-1, 2)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], 2, dtype=logit.dtype).scatter_(1, idx, 1.0)
    one_hot = torch.clamp(one_hot, 1e-5, 1.0 - 1e-5)
    pt = (one_hot * logit).sum(1) + 1e-5
    return (-1.0 * torch.pow(1.0 - pt, 2) * pt.log()).mean()


def official_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py BinaryDiceLoss."""
    p, g = probs.flatten(1), target.flatten(1)
    return 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).sum() / p.shape[0]


def official_augment(x: torch.Tensor) -> torch.Tensor:
    """utils.py augment (view-major): x, 4 rotations, 4 translations, hflip, vflip (B, C, H, W)."""

    def warp(theta: list[list[float]]) -> torch.Tensor:
        mat = torch.tensor(theta, dtype=torch.float32)[None].repeat(x.shape[0], 1, 1)
        grid = F.affine_grid(mat, list(x.size()), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)

    out = [x]
    for angle in [-np.pi / 8, -np.pi / 16, np.pi / 16, np.pi / 8]:
        c, s = math.cos(angle), math.sin(angle)
        out.append(warp([[c, -s, 0], [s, c, 0]]))
    for a, b in [(0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)]:
        out.append(warp([[1, 0, a], [0, 1, b]]))
    out.append(torch.flip(x, dims=[-1]))
    out.append(torch.flip(x, dims=[-2]))
    return torch.cat(out)


# --------------------------------------------------------------------------- the adapted tower


@pytest.mark.parametrize(("layers", "prefix_block"), [(None, 1), ([1, 3], 2), ([0, 2], 1), ([3], 3)])
def test_adapters_follow_the_official_blocks_and_residual(
    backbone: Backbone, layers: list[int] | None, prefix_block: int
) -> None:
    """The bottlenecks through TrainablePass hooks equal a hand-rolled loop over open_clip's blocks
    with both adapters AFTER each used block and x <- 0.8 x + 0.1 seg_out + 0.1 det_out; the cached
    prefix is the stream after the first used block. Catches adapters before the block, other
    residual weights, a missing LeakyReLU or a bias, a recomputed frozen block."""
    method = make(backbone, layers=layers, epochs=0, **NO_AUG)
    items = lesion_task(1, seed=4, tag="tower").items
    method.fit(lesion_task(1, seed=1, tag="tower-support"))
    blocks = tuple(layers) if layers is not None else backbone.layers
    assert method.blocks == blocks and method.tower_pass.start == prefix_block
    assert method.tower_pass.request.option("block") == prefix_block
    adapters = method.adapters
    assert adapters is not None
    with torch.no_grad():
        seg, det = method.bottlenecks(method.prefix(items))
    assert seg.shape == det.shape == (len(items), len(blocks), 1 + 16, backbone.embed_dim)
    # from the image: agrees to fp16 rounding of the cached prefix
    hand_seg, hand_det = hand_from_images(backbone, adapters, items)
    torch.testing.assert_close(seg, hand_seg, atol=FP16_ATOL, rtol=0)
    torch.testing.assert_close(det, hand_det, atol=FP16_ATOL, rtol=0)
    # from the cached prefix (the stream after the first used block; with the last block alone, the
    # stream entering it): exact
    start = -1 if prefix_block > blocks[0] else prefix_block
    exact_seg, exact_det = hand_tower(backbone, adapters, method.prefix(items), start)
    torch.testing.assert_close(seg, exact_seg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(det, exact_det, atol=1e-5, rtol=1e-5)
    # a wrong placement gives other features; so do other weights, once a later block reads the update
    wrong = [hand_from_images(backbone, adapters, items, before=True)[0]]
    if len(blocks) > 1:
        wrong.append(hand_from_images(backbone, adapters, items, weights=(1.0, 0.1, 0.1))[0])
    for features in wrong:
        assert (seg - features).abs().max() > 20 * FP16_ATOL


def test_residual_weights_option_reaches_the_stream(backbone: Backbone) -> None:
    """residual_weights: [1, 0, 0] leaves the stream untouched (the bottlenecks are then read off the
    plain CLIP stream); [0.5, 0.3, 0.2] matches the hand loop with those weights."""
    items = lesion_task(1, seed=4, tag="tower").items
    support = lesion_task(1, seed=1, tag="tower-support")
    for weights in ([1.0, 0.0, 0.0], [0.5, 0.3, 0.2]):
        method = make(backbone, epochs=0, residual_weights=weights, **NO_AUG)
        method.fit(support)
        assert method.adapters is not None
        with torch.no_grad():
            seg, det = method.bottlenecks(method.prefix(items))
        hand_seg, hand_det = hand_tower(backbone, method.adapters, method.prefix(items), -1, weights=weights)
        torch.testing.assert_close(seg, hand_seg, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(det, hand_det, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- maps and scores


def test_text_is_the_official_prompt_ensemble(backbone: Backbone) -> None:
    """utils.py encode_text_with_prompt_ensemble: template.format(state.format(obj)), normalise each,
    mean, renormalise; column 0 normal, 1 abnormal (the lists are April-GAN's, identical)."""
    assert len(NORMAL_STATES) == 7 and len(ABNORMAL_STATES) == 5 and len(TEMPLATES) == 35
    assert TEMPLATES[0] == "a bad photo of a {}." and TEMPLATES[-1] == "this is one {} in the scene."
    method = make(backbone, object="lesion")
    text = method.text()
    for row, states in enumerate((NORMAL_STATES, ABNORMAL_STATES)):
        sentences = [t.format(s.format("lesion")) for s in states for t in TEMPLATES]
        embeds = F.normalize(backbone.encode_text(sentences), dim=-1)
        torch.testing.assert_close(text[row], F.normalize(embeds.mean(0), dim=-1), atol=1e-6, rtol=1e-6)


def test_branch_formulas_on_known_tokens(backbone: Backbone) -> None:
    """Known bottlenecks, text and memory: zero map (upsample the 100-cos logits, then softmax, sum over
    layers), det probability (mean over patches), memory map (min 1 - cos over every memory token,
    upsampled, summed), leave-one-out, all as the official code (catches softmax before upsampling,
    align_corners false, CLIP's logit scale, a mean over layers, the class token scored)."""
    method = make(backbone, epochs=0, **NO_AUG)
    method.fit(lesion_task(1, seed=1, tag="tower-support"))
    text = known_text(backbone.embed_dim)
    method._text = text
    g = torch.Generator().manual_seed(5)
    seg = torch.randn(2, 4, 17, backbone.embed_dim, generator=g)
    memory = torch.randn(3, 4, 2 * 17, backbone.embed_dim, generator=g)  # 3 images, 2 views each
    maps = method.text_maps(seg, EVAL).sum(dim=1)
    for b in range(2):
        torch.testing.assert_close(maps[b].double(), official_zero_map(seg[b], text, EVAL), atol=1e-5, rtol=0)
    det = method.det_probabilities(seg)
    for b in range(2):
        torch.testing.assert_close(det[b], official_det_zero(seg[b], text), atol=1e-6, rtol=0)
    few = method.memory_maps(seg, memory, EVAL)
    exclude = torch.tensor([1, -1])
    few_loo = method.memory_maps(seg, memory, EVAL, exclude)
    for b in range(2):
        bank = [memory[:, layer].reshape(-1, memory.shape[-1]) for layer in range(4)]
        torch.testing.assert_close(few[b].double(), official_few_map(seg[b], bank, EVAL), atol=1e-5, rtol=0)
        keep = [k for k in range(3) if k != int(exclude[b])]
        bank = [memory[keep, layer].reshape(-1, memory.shape[-1]) for layer in range(4)]
        torch.testing.assert_close(
            few_loo[b].double(), official_few_map(seg[b], bank, EVAL), atol=1e-5, rtol=0
        )
    assert (few_loo[0] - few[0]).abs().max() > 1e-3  # the left-out image mattered
    # a one-token by-hand case: memory tokens (1, 0) and (1, 1), query (0, 2) -> 1 - cos = 1 - 1/sqrt 2
    tiny = torch.zeros(1, 1, 17, backbone.embed_dim)
    tiny[0, 0, 1:, 1] = 2.0
    bank = torch.zeros(1, 1, 2, backbone.embed_dim)
    bank[0, 0, 0, 0] = 1.0
    bank[0, 0, 1, :2] = 1.0
    expected = torch.full((1, EVAL, EVAL), 1.0 - 1.0 / math.sqrt(2.0))
    torch.testing.assert_close(method.memory_maps(tiny, bank, EVAL), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("image_score", ["map-max", "det"])
def test_prediction_is_the_official_fusion_with_support_statistics(
    backbone: Backbone, support: SupportSet, image_score: str
) -> None:
    """End to end with the initial adapters and a known text: the memory holds the 11 views of every
    normal support image (class token kept); map = 0.5 (zero - lo) / (hi - lo) + 0.5 (few - lo') /
    (hi' - lo') with lo/hi the min/max over the SUPPORT images (a normal one scored without its own
    views); score = the map's max ('map-max') or the same fusion of the det-head scores ('det')."""
    method = make(backbone, epochs=0, image_score=image_score)
    text = known_text(backbone.embed_dim)
    method._text = text
    method.fit(support)
    adapters = method.adapters
    assert adapters is not None
    transforms = official_views(
        [-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8],
        [[0.1, 0.1], [-0.1, 0.1], [-0.1, -0.1], [0.1, -0.1]],
        True,
    )
    assert len(transforms) == 11

    def tokens(items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        return hand_tower(backbone, adapters, method.prefix(items), -1)

    normal = [i for i in range(len(support)) if support.labels[i] == 0]
    banks = []  # per normal image: (seg, det) per layer (V * (1 + N), D)
    for i in normal:
        seg_v, det_v = tokens([view_item(support.items[i], t, 64) for t in transforms])
        banks.append(
            (
                [seg_v[:, layer].reshape(-1, seg_v.shape[-1]) for layer in range(4)],
                [det_v[:, layer].reshape(-1, det_v.shape[-1]) for layer in range(4)],
            )
        )

    def bank(head: int, leave_out: int | None) -> list[torch.Tensor]:
        kept = [banks[j][head] for j in range(len(banks)) if j != leave_out]
        return [torch.cat([k[layer] for k in kept]) for layer in range(4)]

    def branches(items: Sequence[ImageItem], leave_out: list[int | None]) -> dict[str, list[torch.Tensor]]:
        seg, det = tokens(items)
        out: dict[str, list[torch.Tensor]] = {"zero_map": [], "few_map": [], "zero_det": [], "few_det": []}
        for b in range(len(items)):
            out["zero_map"].append(official_zero_map(seg[b], text, EVAL))
            out["few_map"].append(official_few_map(seg[b], bank(0, leave_out[b]), EVAL))
            out["zero_det"].append(official_det_zero(det[b], text).sum().double())
            out["few_det"].append(official_few_map(det[b], bank(1, leave_out[b]), EVAL).mean())
        return out

    own = [normal.index(i) if i in normal else None for i in range(len(support))]
    stats = branches(support.items, own)
    ranges = {
        key: (float(min(v.min() for v in vals)), float(max(v.max() for v in vals)))
        for key, vals in stats.items()
    }
    for key in ("zero_map", "few_map"):
        assert method.ranges[key] == pytest.approx(ranges[key], abs=1e-5)
    queries = lesion_task(1, seed=6, tag="pred").items
    prediction = method.predict(queries)
    got = branches(queries, [None] * len(queries))

    def norm(key: str, value: torch.Tensor) -> torch.Tensor:
        low, high = ranges[key]
        return (value - low) / (high - low)

    maps = torch.stack(
        [
            0.5 * norm("zero_map", z) + 0.5 * norm("few_map", f)
            for z, f in zip(got["zero_map"], got["few_map"], strict=True)
        ]
    )
    np.testing.assert_allclose(prediction.maps, maps.numpy(), atol=1e-4)
    if image_score == "map-max":
        expected = maps.flatten(1).max(dim=1).values
    else:
        for key in ("zero_det", "few_det"):
            assert method.ranges[key] == pytest.approx(ranges[key], abs=1e-5)
        expected = torch.stack(
            [
                0.5 * norm("zero_det", z) + 0.5 * norm("few_det", f)
                for z, f in zip(got["zero_det"], got["few_det"], strict=True)
            ]
        )
    np.testing.assert_allclose(prediction.scores, expected.numpy(), atol=1e-4)
    assert prediction.scores.dtype == np.float64 and prediction.maps.dtype == np.float32
    # the support maps span [0, 1] after normalisation (support statistics, not the test set's)
    support_maps = method.predict(support.items).maps
    assert support_maps.max() <= 1.0 + 1e-6


# --------------------------------------------------------------------------- augmented views


def test_views_are_the_official_augmentation() -> None:
    """utils.py augment on the image resized to the input size: 11 views in the official order, each
    equal to affine_grid + grid_sample (reflection) / flips of the resized image to uint8 rounding;
    the sign conventions checked on exact cases (a quarter-turn, a 1/8-width shift, flips)."""
    views = official_views(
        [-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8],
        [[0.1, 0.1], [-0.1, 0.1], [-0.1, -0.1], [0.1, -0.1]],
        True,
    )
    assert [v.kind for v in views] == ["identity"] + ["rotate"] * 4 + ["translate"] * 4 + ["hflip", "vflip"]
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)  # not square: squashed first
    item = ImageItem(id="a", key="view-a", loader=lambda: rgb)
    resized = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    official = official_augment(torch.from_numpy(resized).permute(2, 0, 1)[None])  # (11, 3, 64, 64)
    keys = set()
    for v, transform in enumerate(views):
        derived = view_item(item, transform, 64)
        keys.add(derived.key)
        if transform.kind == "identity":
            assert derived is item
            continue
        assert derived.key.startswith("view-a.") and derived.rgb().shape == (64, 64, 3)
        expected = official[v].permute(1, 2, 0).numpy()
        assert np.abs(derived.rgb().astype(np.float32) - expected).max() <= 0.5 + 1e-3
    assert len(keys) == 11
    square = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    sq = ImageItem(id="s", key="view-s", loader=lambda: square)
    # theta [[0, -1], [1, 0]]: output (x, y) samples input (-y, x): out[i, j] = in[j, W - 1 - i]
    turned = render_view(sq, ViewTransform("rotate", (math.pi / 2,)), 64)
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    np.testing.assert_array_equal(turned, square[cols, 63 - rows])
    # a shift of 0.25 in normalised x = 8 px: out[:, j] = in[:, j + 8]
    shifted = render_view(sq, ViewTransform("translate", (0.25, 0.0)), 64)
    np.testing.assert_array_equal(shifted[:, :56], square[:, 8:])
    shifted = render_view(sq, ViewTransform("translate", (0.0, -0.25)), 64)
    np.testing.assert_array_equal(shifted[8:], square[:56])
    np.testing.assert_array_equal(render_view(sq, ViewTransform("hflip"), 64), square[:, ::-1])
    np.testing.assert_array_equal(render_view(sq, ViewTransform("vflip"), 64), square[::-1])
    # masks: the same transform at the mask's own size, thresholded at 0.5
    mask = torch.zeros(1, 32, 32)
    mask[0, 4:12, 20:30] = 1.0
    for v, transform in enumerate(views):
        expected = official_augment(mask[:, None])[v, 0] > 0.5
        torch.testing.assert_close(view_masks(mask, transform)[0], expected.float())


# --------------------------------------------------------------------------- training


def test_training_loss_is_the_official_loss(backbone: Backbone, support: SupportSet) -> None:
    """One full-batch step over the 11 views of every support image with the initial adapters:
    sum over layers of [Focal(2-channel upsampled softmax map) + Dice(abnormal channel, mask)] and of
    BCEWithLogits(mean abnormal probability of the det bottlenecks, lesion label) on a PROBABILITY,
    as train_few.py; the view masks are the official augment of the masks, thresholded at 0.5.
    Catches a mean over layers, BCE on logits, benign counted normal, masks not augmented."""
    text = known_text(backbone.embed_dim)
    initial = make(backbone, epochs=0)
    initial._text = text
    initial.fit(support)
    method = make(backbone, epochs=1, batch_size=11 * len(support))
    method._text = text
    method.fit(support)
    assert initial.adapters is not None
    transforms = official_views(
        [-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8],
        [[0.1, 0.1], [-0.1, 0.1], [-0.1, -0.1], [0.1, -0.1]],
        True,
    )
    views = [view_item(item, t, 64) for t in transforms for item in support.items]  # view-major
    seg, det = hand_tower(backbone, initial.adapters, initial.prefix(views), -1)
    masks = (official_augment(torch.from_numpy(support.masks)[:, None])[:, 0] > 0.5).double()
    labels = torch.tensor(np.tile(support.labels > 0, 11), dtype=torch.float64)
    seg_loss = torch.zeros((), dtype=torch.float64)
    det_loss = torch.zeros((), dtype=torch.float64)
    for layer in range(4):
        p = seg[:, layer, 1:] / seg[:, layer, 1:].norm(dim=-1, keepdim=True)
        logits = (100.0 * p @ text.T).permute(0, 2, 1).reshape(len(views), 2, 4, 4)
        probs = torch.softmax(
            F.interpolate(logits, size=EVAL, mode="bilinear", align_corners=True), dim=1
        ).double()
        seg_loss += official_focal(probs, masks) + official_dice(probs[:, 1], masks)
        score = official_det_zero(det[:, layer], text).double()
        det_loss += torch.nn.BCEWithLogitsLoss()(score, labels)
    (first,) = method.history
    assert first["seg"] == pytest.approx(seg_loss.item(), rel=1e-4)
    assert first["det"] == pytest.approx(det_loss.item(), rel=1e-4)
    assert first["total"] == pytest.approx(seg_loss.item() + det_loss.item(), rel=1e-4)


def test_gradients_reach_only_the_adapters(backbone: Backbone, support: SupportSet) -> None:
    """One step: every adapter weight gets a gradient except fc2 of the last block's adapters, which only
    feeds the discarded pooled output (as in the official code); no CLIP weight gets one or changes."""
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = make(backbone, epochs=1, batch_size=len(support), **NO_AUG)
    method.fit(support)
    assert method.adapters is not None
    last = len(method.blocks) - 1
    for name, parameter in method.adapters.named_parameters():
        if name in (f"seg.{last}.fc2.0.weight", f"det.{last}.fc2.0.weight"):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    assert not backbone_ids & {id(p) for p in method.adapters.parameters()}
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_learns_to_localise(backbone: Backbone) -> None:
    """Official optimiser, batch 1 and augmentation, 4 epochs (the official 50 are too slow for a unit
    test): the loss goes down and the fitted map beats the unfitted one on the support and on held-out
    images (catches a loss on the wrong channel or target, a sign error, adapters not optimised)."""
    task = lesion_task(2, seed=3, tag="learn")
    held_out = lesion_task(3, seed=11, tag="held")
    unfitted = make(backbone, epochs=0)
    unfitted.fit(task)
    method = make(backbone, epochs=4)
    method.fit(task)
    history = method.history
    assert len(history) == 4 and set(history[0]) == {"seg", "det", "total"}
    assert history[-1]["total"] < history[0]["total"] and history[-1]["seg"] < history[0]["seg"]
    for data in (task, held_out):
        before = pixel_auroc(unfitted.predict(data.items).maps, data.masks)
        after = pixel_auroc(method.predict(data.items).maps, data.masks)
        assert after >= 0.85 and after >= before + 0.2, (before, after)  # seen: 0.66 -> 0.96, 0.52 -> 0.93


def test_deterministic_for_a_seed(backbone: Backbone, support: SupportSet) -> None:
    """Same seed -> bit-identical predictions; another seed -> other adapters and maps."""
    queries = lesion_task(1, seed=8, tag="det").items
    runs = []
    for seed in (0, 0, 1):
        method = make(backbone, seed=seed, epochs=1)
        method.fit(support)
        runs.append(method.predict(queries))
    assert np.array_equal(runs[0].scores, runs[1].scores) and np.array_equal(runs[0].maps, runs[1].maps)
    assert not np.allclose(runs[0].maps, runs[2].maps)


def test_each_prefix_is_computed_once(tmp_path: Path) -> None:
    """The frozen prefix of every image and every augmented view is computed once: fit encodes 11 views
    per support image (the identity view is the image itself), predicting the support images and
    refitting encode nothing more, new images once each; the standard request is never computed."""
    fresh = new_backbone(tmp_path / "cache")
    task = lesion_task(2, seed=12, tag="once")
    method = make(fresh, epochs=1)
    method.fit(task)
    method.predict(task.items)
    request = fresh.resolve(method.tower_pass.request)
    assert request.variant == "stream" and request.option("block") == 1
    assert fresh.encoded_by_request == {request: 11 * len(task)}
    again = make(fresh, epochs=1, seed=1)
    again.fit(task)
    again.predict(task.items[:3])
    assert fresh.encoded_by_request == {request: 11 * len(task)}
    new = lesion_task(1, seed=13, tag="new").items
    again.predict(new)
    assert fresh.encoded_by_request == {request: 11 * len(task) + len(new)}
    assert fresh.n_encoded == 0 and fresh.resolve(FeatureRequest()) not in fresh.encoded_by_request


# --------------------------------------------------------------------------- options and errors


def test_defaults_are_the_official_settings() -> None:
    cfg = MVFA.default_config
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["betas"]) == (50, 1, 1e-3, [0.5, 0.999])
    assert cfg["residual_weights"] == [0.8, 0.1, 0.1] and cfg["negative_slope"] == 0.01
    assert cfg["logit_scale"] == 100.0 and cfg["align_corners"] is True
    assert cfg["fusion_weights"] == [0.5, 0.5] and cfg["image_score"] == "map-max"
    assert cfg["rotations"] == pytest.approx([-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8])
    assert cfg["translations"] == [[0.1, 0.1], [-0.1, 0.1], [-0.1, -0.1], [0.1, -0.1]] and cfg["flips"]
    assert (cfg["focal_gamma"], cfg["focal_smooth"], cfg["dice_smooth"]) == (2.0, 1e-5, 1.0)
    assert MVFA.table_group == "anomaly" and MVFA.table_rank == 4


def test_bad_options_and_misuse_are_clear_errors(backbone: Backbone, support: SupportSet) -> None:
    """Catches an option accepted without validation, or an error that does not name method and option."""
    bad_values = (
        {"residual_weights": [0.8, 0.1]},
        {"fusion_weights": [0.0, 0.0]},
        {"fusion_weights": [-0.5, 0.5]},
        {"image_score": "max"},
        {"translations": [[0.1]]},
        {"translations": [0.1, 0.1]},
        {"rotations": ["a"]},
        {"logit_scale": 0},
        {"betas": [0.5]},
        {"epochs": -1},
        {"layers": []},
        {"negative_slope": -1},
    )
    for bad in bad_values:
        key = next(iter(bad))
        with pytest.raises(MethodError, match=f"method 'mvfa': option '{key}'"):
            make(backbone, **bad)
    with pytest.raises(MethodError, match="method 'mvfa': unknown option"):
        make(backbone, bottleneck=768)
    with pytest.raises(MethodError, match=r"method 'mvfa': option 'layers'"):
        make(backbone, layers=[7], epochs=0).fit(support)  # the tiny model has blocks 0-3
    with pytest.raises(MethodError, match=r"method 'mvfa': option 'layers' / 'input_size'.*patch"):
        make(backbone, input_size=70, epochs=0).fit(support)
    with pytest.raises(MethodError, match="method 'mvfa': predict"):
        make(backbone).predict(support.items)
    with pytest.raises(MethodError, match=r"method 'mvfa'.*normal support images"):
        make(backbone, epochs=0).fit(support.of_class(1))
