"""AnomalyCLIP (methods/anomalyclip) on the tiny random-init backbone.

The tiny model: 64 px input, 16 px patches (a 4 x 4 grid), 4 vision blocks of width 64 (2
heads), joint embedding 32, a text encoder of 2 blocks (so ``deep_depth: 2``: one deep layer,
text block 1). Every formula is written out here from the official code's description
(/tmp/spec_anomalyclip.md) with open_clip's own modules (the test reads ``backbone.model``;
the method never does) and compared with the method.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, lesion_support, pixel_auroc, tiny_method

from bench.errors import MethodError
from bench.kit import FeatureRequest
from bench.kit.clip import Backbone
from bench.method import SupportSet
from bench.types import ImageItem
from bench.weights import BackboneSpec, load_backbone
from methods.anomalyclip import AgnosticPrompts, AnomalyCLIP

EVAL = 32
#: The tiny text encoder has 2 blocks: deep tokens can only enter block 1.
TINY = {"deep_depth": 2}
#: Cached features are fp16-rounded; hand-computed fp32 references agree to about this.
FP16_ATOL = 1e-3


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def new_backbone(cache_dir: Path) -> Backbone:
    return load_backbone(BackboneSpec(TINY_MODEL, "none", cache_dir=cache_dir, device="cpu"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return new_backbone(tmp_path_factory.mktemp("anomalyclip-cache"))


def lesion_task(shots: int, seed: int, tag: str, size: int = EVAL) -> SupportSet:
    """The shared synthetic lesion task (tests/conftest.py ``lesion_support``) with this file's keys."""
    return lesion_support(shots, seed, tag, size, key_prefix="ac")


def make(backbone: Backbone, seed: int = 0, **config: Any) -> AnomalyCLIP:
    return tiny_method(AnomalyCLIP, backbone, seed=seed, shots=2, eval_size=EVAL, **{**TINY, **config})


@pytest.fixture(scope="module")
def support() -> SupportSet:
    return lesion_task(2, seed=0, tag="support")


def known_text(dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(7)), dim=-1)


# --------------------------------------------------------------------------- hand references


def hand_vv_attention(tokens: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """out_proj(softmax(v_h v_h^T / sqrt(d)) v_h) head by head, from the packed in_proj weights."""
    width = tokens.shape[-1]
    heads = attn.num_heads
    d = width // heads
    v = tokens @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
    per_head = []
    for h in range(heads):
        vh = v[..., h * d : (h + 1) * d]
        per_head.append(torch.softmax(vh @ vh.transpose(-2, -1) / math.sqrt(d), dim=-1) @ vh)
    return torch.cat(per_head, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def hand_image_side(
    backbone: Backbone, items: list[ImageItem], layers: tuple[int, ...], start: int
) -> dict[str, torch.Tensor]:
    """The official dual-path image encoder, written out with open_clip's blocks.

    From block ``start`` on: vv <- vv + VV_b(ln_1(ori entering b)), vv starting as the stream
    entering ``start``; the original stream is plain CLIP. Taps: vv (or ori before ``start``)
    patch tokens -> ln_post -> proj. Global: the final ori class token @ proj (no ln_post).
    """
    visual = backbone.model.visual
    images = torch.stack([backbone.preprocess(item.rgb()) for item in items])
    with torch.no_grad():
        x = visual._embeds(images)
        vv = None
        taps = {}
        for b, block in enumerate(visual.transformer.resblocks):
            if b >= start:
                update = hand_vv_attention(block.ln_1(x), block.attn)
                vv = (x if vv is None else vv) + update
            x = block(x)
            if b in layers:
                taps[b] = (vv if vv is not None else x)[:, 1:]
        tokens = torch.stack([taps[b] for b in layers], dim=1)
        return {
            "patches": F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1),
            "image": F.normalize(x[:, 0] @ visual.proj, dim=-1),
            "encode_image": F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1),
        }


def hand_probabilities(
    patches: torch.Tensor, text: torch.Tensor, grid, size: int, temperature: float = 0.07
) -> torch.Tensor:
    """compute_similarity + get_similarity_map: softmax(cos / temperature) over the 2 classes per token,
    then bilinear (align_corners False) to S. (B, L, 2, S, S)."""
    b, n_layers = patches.shape[:2]
    probs = torch.softmax(patches @ text.T / temperature, dim=-1)  # (B, L, N, 2)
    probs = probs.permute(0, 1, 3, 2).reshape(b * n_layers, 2, *grid)
    up = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)
    return up.reshape(b, n_layers, 2, size, size)


def official_map(probabilities: np.ndarray, sigma: float) -> np.ndarray:
    """test.py: sum over layers of (p_abn + 1 - p_norm) / 2, scipy gaussian_filter per map."""
    summed = ((probabilities[:, :, 1] + 1.0 - probabilities[:, :, 0]) / 2.0).sum(axis=1)
    return np.stack(
        [scipy.ndimage.gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in summed]
    )


def hand_agnostic_text(backbone: Backbone, prompts: AgnosticPrompts, phrases: list[str]) -> torch.Tensor:
    """The official learnable text forward on the full 77-token sequence: [SOS][ctx x n][phrase .][EOT],
    positions 1..len(deep) REPLACED by the shared deep tokens entering text blocks 1.., EOT pooled."""
    model = backbone.model
    ctx = prompts.learner.ctx.detach()  # (2, n_ctx, W): one context per class
    n_ctx = ctx.shape[1]
    ids = backbone.tokenize([" ".join(["X"] * n_ctx) + f" {phrase}." for phrase in phrases])
    with torch.no_grad():
        embeddings = model.token_embedding(ids).clone()
        embeddings[:, 1 : 1 + n_ctx] = ctx
        x = embeddings + model.positional_embedding
        deep = [d.detach() for d in prompts.deep]
        for index, block in enumerate(model.transformer.resblocks):
            if 1 <= index <= len(deep):
                tokens = deep[index - 1]
                x = torch.cat(
                    [x[:, :1], tokens.expand(x.shape[0], -1, -1), x[:, 1 + tokens.shape[0] :]], dim=1
                )
            x = block(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection
    return F.normalize(pooled, dim=-1)


# --------------------------------------------------------------------------- maps and scores


@pytest.mark.parametrize("size", [EVAL, 16])
def test_anomaly_map_is_the_official_sum_and_gaussian(backbone: Backbone, size: int) -> None:
    """Catches a mean over layers, p_abn alone, a sigma not rescaled to the map (4 px at the input size),
    or another border mode: compared with scipy.ndimage.gaussian_filter(mode="reflect", truncate=4)."""
    method = make(backbone)
    assert method.input_size == 64
    g = torch.Generator().manual_seed(3)
    probabilities = torch.rand(2, 3, 2, size, size, generator=g)  # not complementary on purpose
    got = method.anomaly_map(probabilities).numpy()
    expected = official_map(probabilities.double().numpy(), sigma=4.0 * size / 64)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    unsmoothed = make(backbone, sigma=0).anomaly_map(probabilities).numpy()
    np.testing.assert_allclose(unsmoothed, official_map(probabilities.double().numpy(), 1e-9), atol=1e-5)


@pytest.mark.parametrize(
    ("layers", "dpam_start", "start"), [(None, None, 0), ([1, 3], None, 1), ([1, 3], 2, 2)]
)
def test_features_come_from_the_dpam_start_the_method_chose(
    backbone: Backbone, layers: list[int] | None, dpam_start: int | None, start: int
) -> None:
    """Patch features are the vv tokens (ln_post + proj) of the dual path from ``dpam_start`` (default:
    the first used layer); the image feature is the final class token @ proj WITHOUT ln_post.
    Catches a wrong default start, the original path's tokens, a missing ln_post/proj, or encode_image."""
    method = make(backbone, layers=layers, dpam_start=dpam_start)
    used = tuple(layers) if layers is not None else backbone.layers
    assert method.request.option("start") == start and method.request.variant == "vv-attention"
    items = lesion_task(1, seed=4, tag="feat").items
    image, patches = method.features(items)
    hand = hand_image_side(backbone, list(items), used, start)
    torch.testing.assert_close(patches, hand["patches"], atol=FP16_ATOL, rtol=0)
    torch.testing.assert_close(image, hand["image"], atol=FP16_ATOL, rtol=0)
    # the start matters: another start gives other tokens; ln_post matters for the global feature
    other = hand_image_side(backbone, list(items), used, start + 1)
    assert (patches - other["patches"]).abs().max() > 20 * FP16_ATOL
    assert (image - hand["encode_image"]).abs().max() > 20 * FP16_ATOL
    encode_image, _ = make(
        backbone, layers=layers, dpam_start=dpam_start, image_feature="encode-image"
    ).features(items)
    torch.testing.assert_close(encode_image, hand["encode_image"], atol=FP16_ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_prediction_is_the_official_score_and_map(
    backbone: Backbone, support: SupportSet, temperature: float
) -> None:
    """With a known text: score = softmax(cos(norm(cls @ proj), T) / 0.07)[abnormal] (not CLIP's
    encode_image; the fixed temperature, not CLIP's logit scale, which is 1 / 0.07 on the
    random-init model, hence the second temperature), map = official sum + Gaussian sigma
    4 * S / input size of softmax-then-upsample (align_corners False) probabilities."""
    method = make(backbone, epochs=0, temperature=temperature)
    method.fit(support)
    text = known_text(backbone.embed_dim)
    method._text = text
    queries = lesion_task(1, seed=6, tag="pred").items
    prediction = method.predict(queries)

    feats = backbone.features(queries, method.request)
    visual = backbone.model.visual
    image = F.normalize(feats.cls_token @ visual.proj, dim=-1)
    expected_scores = torch.softmax(image @ text.T / temperature, dim=-1)[:, 1]
    np.testing.assert_allclose(prediction.scores, expected_scores.double().numpy(), atol=1e-6)
    with_ln_post = torch.softmax(F.normalize(feats.embeds, dim=-1) @ text.T / temperature, dim=-1)[:, 1]
    assert np.abs(prediction.scores - with_ln_post.double().numpy()).max() > 1e-3

    patches = F.normalize(visual.ln_post(feats.vv_tokens) @ visual.proj, dim=-1)
    probabilities = hand_probabilities(patches, text, backbone.grid, EVAL, temperature)
    expected_map = official_map(probabilities.double().numpy(), sigma=4.0 * EVAL / 64)
    np.testing.assert_allclose(prediction.maps, expected_map, atol=1e-4)
    assert prediction.scores.dtype == np.float64 and prediction.maps.dtype == np.float32


# --------------------------------------------------------------------------- deep prompts


@pytest.mark.parametrize("deep_length", [4, 2])
def test_deep_tokens_replace_their_positions_entering_text_block_1(
    backbone: Backbone, deep_length: int
) -> None:
    """The text features equal a hand-rolled text forward where positions 1..deep_length entering
    block 1 are overwritten by the (shared) deep tokens. Catches insertion instead of replacement,
    the wrong block or positions, per-class deep tokens, a missing normalisation."""
    config = make(backbone, deep_length=deep_length).config
    prompts = AgnosticPrompts(backbone, config, seed=0)
    assert len(prompts.deep) == 1 and prompts.deep[0].shape == (deep_length, backbone.text_width)
    phrases = ["object", "damaged object"]
    with torch.no_grad():
        got = prompts()
    assert got.shape == (2, backbone.embed_dim)
    torch.testing.assert_close(got, hand_agnostic_text(backbone, prompts, phrases), atol=1e-5, rtol=1e-5)
    # a changed deep token changes the output, still as the hand forward says
    with torch.no_grad():
        prompts.deep[0][0].add_(torch.randn(backbone.text_width, generator=torch.Generator().manual_seed(5)))
        changed = prompts()
    assert (changed - got).abs().max() > 1e-4
    torch.testing.assert_close(changed, hand_agnostic_text(backbone, prompts, phrases), atol=1e-5, rtol=1e-5)
    # the deep tokens really are used at block 1: without them the output is the plain prompt's
    with torch.no_grad():
        plain = F.normalize(prompts.learner(), dim=-1)
    assert (changed - plain).abs().max() > 1e-4


def test_deep_tokens_exist_only_for_used_layers(backbone: Backbone) -> None:
    """ParameterList of deep_depth - 1 tensors (block 0 gets none); deep_depth 1 is the plain prompt."""
    one = AgnosticPrompts(backbone, make(backbone, deep_depth=1).config, seed=0)
    assert len(one.deep) == 0
    with torch.no_grad():
        torch.testing.assert_close(one(), F.normalize(one.learner(), dim=-1))
        torch.testing.assert_close(one(), hand_agnostic_text(backbone, one, ["object", "damaged object"]))
    two = AgnosticPrompts(backbone, make(backbone).config, seed=0)
    assert len(two.deep) == 1
    names = {name for name, _ in two.named_parameters()}
    assert names == {"learner.ctx", "deep.0"}
    assert two.learner.ctx.shape == (2, 12, backbone.text_width)  # separate contexts, n_ctx 12


# --------------------------------------------------------------------------- training


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


def hand_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py's BinaryDiceLoss (smooth 1): 1 - mean_b (2 sum(p g) + 1) / (sum p + sum g + 1)."""
    p, g = probs.flatten(1), target.flatten(1)
    return 1.0 - ((2.0 * (p * g).sum(1) + 1.0) / (p.sum(1) + g.sum(1) + 1.0)).mean()


def test_training_loss_is_the_official_loss(backbone: Backbone, support: SupportSet) -> None:
    """The loss of one full-batch step with the initial prompts: 4 * sum over layers of [Focal(2-channel
    map) + Dice(p_abn, mask) + Dice(p_norm, 1 - mask)] + CE(image logits / 0.07, normal vs lesion).
    Catches a wrong image label (benign counted normal), Dice targets, the weight lam, a mean over layers."""
    method = make(backbone, epochs=1, batch_size=len(support))
    initial = AgnosticPrompts(backbone, method.config, seed=0)  # the same seeded initialisation
    method.fit(support)
    with torch.no_grad():
        text = initial()
    image, patches = method.features(support.items)
    probs = hand_probabilities(patches, text, backbone.grid, EVAL).double()
    masks = torch.from_numpy(support.masks).double()
    pixel = sum(
        official_focal(probs[:, i], masks, 2.0, 1e-5)
        + hand_dice(probs[:, i, 1], masks)
        + hand_dice(probs[:, i, 0], 1.0 - masks)
        for i in range(probs.shape[1])
    )
    lesion = torch.as_tensor(support.labels != 0, dtype=torch.long)
    logits = (image @ text.T / 0.07).double()
    image_loss = -torch.log_softmax(logits, dim=-1)[torch.arange(len(lesion)), lesion].mean()
    (first,) = method.history
    assert first["pixel"] == pytest.approx(pixel.item(), rel=1e-4)
    assert first["image"] == pytest.approx(image_loss.item(), rel=1e-4)
    assert first["total"] == pytest.approx(4.0 * pixel.item() + image_loss.item(), rel=1e-4)


def test_gradients_reach_only_the_prompts(backbone: Backbone, support: SupportSet) -> None:
    """One training step: both contexts and the deep tokens get non-zero gradients, no CLIP weight any."""
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = make(backbone, epochs=1, batch_size=len(support))  # exactly one step
    method.fit(support)
    assert len(method.history) == 1 and method.prompts is not None
    ctx_grad = method.prompts.learner.ctx.grad
    assert ctx_grad is not None and (ctx_grad.abs().sum(dim=(1, 2)) > 0).all()  # normal and abnormal
    deep_grad = method.prompts.deep[0].grad
    assert deep_grad is not None and (deep_grad.abs().sum(dim=1) > 0).all()  # every deep token
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    assert not backbone_ids & {id(p) for p in method.prompts.parameters()}
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_official_schedule_learns_to_localise(backbone: Backbone) -> None:
    """Official schedule (15 epochs, Adam 1e-3, betas 0.5/0.999, batch 8, lam 4): the loss goes down and
    the fitted map beats the unfitted one on the support and on held-out images (catches a loss on
    the wrong channel or target, a sign error, prompts not reaching the optimizer)."""
    task = lesion_task(4, seed=3, tag="learn")
    held_out = lesion_task(3, seed=11, tag="held")
    unfitted = make(backbone, epochs=0)
    unfitted.fit(task)
    method = make(backbone)
    method.fit(task)
    history = method.history
    assert len(history) == 15 and set(history[0]) == {"pixel", "image", "total"}
    assert history[-1]["total"] < history[0]["total"] and history[-1]["pixel"] < history[0]["pixel"]
    for h in history:
        assert h["total"] == pytest.approx(4.0 * h["pixel"] + h["image"], rel=1e-5)
    for data in (task, held_out):
        before = pixel_auroc(unfitted.predict(data.items).maps, data.masks)
        after = pixel_auroc(method.predict(data.items).maps, data.masks)
        assert after >= 0.7 and after >= before + 0.2, (before, after)  # seen: 0.35 -> 0.83, 0.38 -> 0.74


def test_deterministic_for_a_seed(backbone: Backbone, support: SupportSet) -> None:
    """Same seed -> bit-identical predictions; another seed -> other prompts and maps."""
    queries = lesion_task(1, seed=8, tag="det").items
    runs = []
    for seed in (0, 0, 1):
        method = make(backbone, seed=seed, epochs=3)
        method.fit(support)
        runs.append(method.predict(queries))
    assert np.array_equal(runs[0].scores, runs[1].scores) and np.array_equal(runs[0].maps, runs[1].maps)
    assert not np.allclose(runs[0].maps, runs[2].maps)
    assert not np.allclose(runs[0].scores, runs[2].scores)


def test_each_image_goes_through_the_tower_once(tmp_path: Path) -> None:
    """Two attention paths, one pass: fit + predict on the same images encode each image once, for the
    vv-attention request only (the standard request is never computed)."""
    fresh = new_backbone(tmp_path / "cache")
    method = make(fresh, epochs=1)
    task = lesion_task(2, seed=12, tag="once")
    method.fit(task)
    method.predict(task.items)
    method.predict(task.items[:3])
    request = fresh.resolve(method.request)
    assert request.variant == "vv-attention"
    assert fresh.encoded_by_request == {request: len(task)}
    assert fresh.n_encoded == 0
    assert fresh.resolve(FeatureRequest()) not in fresh.encoded_by_request


# --------------------------------------------------------------------------- options and errors


def test_defaults_are_the_official_settings() -> None:
    cfg = AnomalyCLIP.default_config
    assert (cfg["n_ctx"], cfg["deep_length"], cfg["deep_depth"], cfg["init_std"]) == (12, 4, 9, 0.02)
    assert (cfg["normal_prompt"], cfg["abnormal_prompt"]) == ("object", "damaged object")
    assert (cfg["temperature"], cfg["sigma"], cfg["image_feature"]) == (0.07, 4.0, "cls-proj")
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["betas"]) == (15, 8, 1e-3, [0.5, 0.999])
    assert (cfg["pixel_loss_weight"], cfg["focal_gamma"], cfg["focal_smooth"]) == (4.0, 2.0, 1e-5)
    assert cfg["position_resize"] == "bilinear" and cfg["dpam_start"] is None


def test_bad_options_and_misuse_are_clear_errors(backbone: Backbone, support: SupportSet) -> None:
    """Catches an option accepted without validation, or an error not naming method and option."""
    bad_values = (
        {"image_feature": "foo"},
        {"betas": [0.5]},
        {"temperature": 0},
        {"deep_depth": 0},
        {"n_ctx": 0},
        {"position_resize": "nearest"},
        {"dpam_start": -1},
        {"layers": []},
    )
    for bad in bad_values:
        key = next(iter(bad))
        with pytest.raises(MethodError, match=f"method 'anomalyclip': option '{key}'"):
            make(backbone, **bad)
    with pytest.raises(MethodError, match="method 'anomalyclip': unknown option"):
        make(backbone, depth=2)
    # deeper than the text encoder (2 blocks): a clear error, not an IndexError or silent truncation
    with pytest.raises(
        MethodError, match=r"method 'anomalyclip': option 'deep_depth' 3 .*text encoder has 1"
    ):
        make(backbone, deep_depth=3, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'anomalyclip': option 'deep_depth' 9"):
        make(backbone, deep_depth=9, epochs=0).fit(support)  # the official default on the tiny model
    with pytest.raises(MethodError, match=r"method 'anomalyclip'.*deep_length"):
        make(backbone, deep_length=5, n_ctx=4, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'anomalyclip'.*(dpam|start|vv-attention)"):
        make(backbone, dpam_start=9, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'anomalyclip'.*layers"):
        make(backbone, layers=[7], epochs=0).fit(support)
    with pytest.raises(MethodError, match="method 'anomalyclip': predict"):
        make(backbone).predict(support.items)
