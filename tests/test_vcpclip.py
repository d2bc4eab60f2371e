"""VCP-CLIP (methods/vcpclip) on the tiny random-init backbone.

The tiny model: 64 px input, 16 px patches (a 4 x 4 grid), 4 vision blocks of width 64, joint
embedding 32, a text encoder of 2 blocks of width 64 (so the deep text prompts enter block 1
only). Every formula is written out here from the official code (/tmp/spec_vcpclip.md,
xiaozhen228/VCP-CLIP) with open_clip's own modules (the test reads ``backbone.model``; the
method never does) and compared with the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, lesion_support, pixel_auroc, tiny_method

from bench.errors import MethodError
from bench.kit import FeatureRequest, seeded
from bench.kit.clip import Backbone
from bench.method import SupportSet
from bench.weights import BackboneSpec, load_backbone
from methods.vcpclip import VCPCLIP, ContextPrompting, PostVCP, VCPModel, top_k_mean
from methods.vcpclip.modules import match_width

EVAL = 32
#: Cached features are fp16-rounded; the references below use the same cached features.
ATOL = 1e-5


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def new_backbone(cache_dir: Path) -> Backbone:
    return load_backbone(BackboneSpec(TINY_MODEL, "none", cache_dir=cache_dir, device="cpu"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return new_backbone(tmp_path_factory.mktemp("vcpclip-cache"))


def lesion_task(shots: int, seed: int, tag: str, size: int = EVAL) -> SupportSet:
    """The shared synthetic lesion task (tests/conftest.py ``lesion_support``) with this file's keys."""
    return lesion_support(shots, seed, tag, size, key_prefix="vcp")


def make(backbone: Backbone, seed: int = 0, **config: Any) -> VCPCLIP:
    return tiny_method(VCPCLIP, backbone, seed=seed, shots=2, eval_size=EVAL, **config)


def new_model(backbone: Backbone, method: VCPCLIP, seed: int = 0) -> VCPModel:
    """A VCPModel as ``fit`` builds it (4 used blocks of width 64 on the tiny model)."""
    with seeded(seed):
        model = VCPModel(backbone, method.config, len(backbone.layers), backbone.width)
    model.text.seed(seed + 1)
    return model.eval()


@pytest.fixture(scope="module")
def support() -> SupportSet:
    return lesion_task(2, seed=0, tag="support")


def scramble(model: VCPModel, seed: int = 3) -> None:
    """Non-trivial values for every parameter whose default init would hide a mistake (the prompt
    LayerNorm starts as (1, 0), the temperatures equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if model.text.deep_enabled:
            model.text.norm.weight.copy_(1.0 + 0.5 * torch.randn(model.text.norm.weight.shape, generator=g))
            model.text.norm.bias.copy_(0.5 * torch.randn(model.text.norm.bias.shape, generator=g))
        model.pre_temperature.fill_(2.0)
        model.post_temperature.fill_(3.0)


# --------------------------------------------------------------------------- hand references


def official_text(
    backbone: Backbone,
    model: VCPModel,
    image: torch.Tensor,
    templates: tuple[list[str], list[str]],
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """model_CLIP.py ``encode_text`` + prompt_ensemble.py ``forward_ensemble``, one image, state and
    template at a time on the full 77-token sequence:

    class tokens replace the slot token (pos), the sequence keeps 77 (tokens[pos + 1 : 77 - r + 1]);
    the positional embedding is added; the projected shallow prompt goes in at index 1 (no
    positional embedding), the last n tokens are dropped; entering block i >= 1 index 1..n is
    REPLACED by proj(deep[i - 1]); after the last block index 1..n is removed, prompt_norm, then
    ln_final; EOT at argmax(ids) + r - 1; @ text_projection; normalised, template mean, normalised.
    ``masks`` (B, 2, blocks, n, W): dropout masks multiplied into the projected prompts.
    """
    clip = backbone.model
    text = model.text
    class_tokens = model.context(image)  # (B, r, W)
    r = class_tokens.shape[1]
    slot_id = int(backbone.tokenize(["x"])[0, 1])
    out = []
    for b in range(image.shape[0]):
        states = []
        for state, state_templates in enumerate(templates):
            feats = []
            for template in state_templates:
                ids = backbone.tokenize([template.replace("{}", "x")])[0]
                (pos,) = torch.nonzero(ids == slot_id)[0].tolist()
                emb = clip.token_embedding(ids)
                x = torch.cat([emb[:pos], class_tokens[b], emb[pos + 1 : 77 - r + 1]])
                x = (x + clip.positional_embedding).unsqueeze(0)
                if text.deep_enabled:
                    prompts = text.proj(torch.cat([text.shallow, text.deep]))  # (blocks, n, W)
                    if masks is not None:
                        prompts = prompts * masks[b, state]
                    n = prompts.shape[1]
                    x = torch.cat([x[:, :1], prompts[0:1], x[:, 1:-n]], dim=1)
                for i, block in enumerate(clip.transformer.resblocks):
                    if text.deep_enabled and i >= 1:
                        x = torch.cat([x[:, :1], prompts[i : i + 1], x[:, 1 + n :]], dim=1)
                    x = block(x, attn_mask=clip.attn_mask)
                if text.deep_enabled:
                    x = text.norm(torch.cat([x[:, :1], x[:, 1 + n :]], dim=1))
                x = clip.ln_final(x)
                eot = int(ids.argmax()) + r - 1
                feats.append(F.normalize(x[0, eot] @ clip.text_projection, dim=-1))
            states.append(F.normalize(torch.stack(feats).mean(dim=0), dim=-1))
        out.append(torch.stack(states))
    return torch.stack(out)


def official_post_vcp(post: PostVCP, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """post_vcp.py ``Zero_Parameter.forward`` head by head in float64: q from the text, k = v from
    the patches, softmax over the patches of q . k (beta_t = 1, no 1/sqrt(d)), heads concatenated,
    proj_post_t, normalised."""
    d = post.q.out_features // post.heads
    q = (text.double() @ post.q.weight.double().T) + post.q.bias.double()
    k = (patches.double() @ post.k.weight.double().T) + post.k.bias.double()
    v = (patches.double() @ post.v.weight.double().T) + post.v.bias.double()
    heads = []
    for h in range(post.heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(-1, -2), dim=-1) @ vh)
    mixed = torch.cat(heads, dim=-1)
    return F.normalize(mixed @ post.out.weight.double().T + post.out.bias.double(), dim=-1)


def official_layer_probabilities(
    model: VCPModel, embeds: torch.Tensor, tokens: torch.Tensor, size: int, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """train.py / test.py: per layer, pre = exp(tau_1) norm(Linear_l(P_l)) @ T^T, post =
    exp(tau_2) norm(P_l) @ PostVCP(T, norm(P_l))^T; (B, 2, h, w) upsampled bilinearly with
    align_corners=True, softmax over the 2 channels. Returns (B, L, 2, S, S) each."""
    text = model.text_features(embeds)  # (B, 2, D)
    pre_maps, post_maps = [], []
    for layer in range(tokens.shape[1]):
        dense = F.normalize(model.linears[layer](tokens[:, layer]), dim=-1)
        pre = model.pre_temperature.exp() * dense @ text.transpose(1, 2)  # (B, N, 2)
        patches = F.normalize(tokens[:, layer], dim=-1)
        attended = official_post_vcp(model.post, text, patches).float()
        post = model.post_temperature.exp() * patches @ attended.transpose(1, 2)
        for logits, out in ((pre, pre_maps), (post, post_maps)):
            grid_logits = logits.permute(0, 2, 1).reshape(logits.shape[0], 2, *grid)
            up = F.interpolate(grid_logits, size=(size, size), mode="bilinear", align_corners=True)
            out.append(torch.softmax(up, dim=1))
    return torch.stack(pre_maps, dim=1), torch.stack(post_maps, dim=1)


def official_fusion(pre: np.ndarray, post: np.ndarray, sigma: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """test.py ``calcuate_metric``: gaussian_filter(0.2 pre + 0.8 post, sigma, axes (1, 2)) and
    mean(top k of pre) + mean(top k of post) by np.partition (before the min-max)."""
    fused = np.stack([scipy.ndimage.gaussian_filter(m, sigma=sigma) for m in 0.2 * pre + 0.8 * post])
    top_pre = np.partition(pre.reshape(pre.shape[0], -1), kth=-k)[:, -k:]
    top_post = np.partition(post.reshape(post.shape[0], -1), kth=-k)[:, -k:]
    return fused, top_pre.mean(axis=1) + top_post.mean(axis=1)


def official_focal(two_channel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py FocalLoss (no nonlinearity, alpha None, gamma 2, smooth 1e-5) on (B, 2, S, S) probabilities."""
    logit = two_channel.reshape(two_channel.shape[0], 2, -1).permute(0, 2, 1).reshape(-1, 2)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], 2, dtype=logit.dtype).scatter_(1, idx, 1.0).clamp(1e-5, 1.0 - 1e-5)
    pt = (one_hot * logit).sum(1) + 1e-5
    return (-torch.pow(1.0 - pt, 2.0) * pt.log()).mean()


def official_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py BinaryDiceLoss: 1 - sum_b (2 sum(p g) + 1) / (sum p + sum g + 1) / B."""
    p, g = probs.flatten(1), target.flatten(1)
    return 1.0 - ((2.0 * (p * g).sum(1) + 1.0) / (p.sum(1) + g.sum(1) + 1.0)).sum() / p.shape[0]


# --------------------------------------------------------------------------- Pre-VCP and the text


def test_class_tokens_are_the_query_plus_the_conv_of_the_global_embedding() -> None:
    """Conv1d(1 -> r, kernel 3, padding same) slides along the channels of g: c_j[i] = q_j[i] + b_j +
    sum_t w_j[t] g[i + t - 1] (zero outside). use_global=False: the query alone."""
    torch.manual_seed(0)
    module = ContextPrompting(width=10, length=2, use_global=True)
    g = torch.randn(3, 10)
    padded = F.pad(g, (1, 1))
    w, b = module.conv.weight[:, 0], module.conv.bias  # (r, 3), (r,)
    expected = (
        torch.stack(
            [
                torch.stack([(w[j] * padded[:, i : i + 3]).sum(-1) for i in range(10)], dim=-1) + b[j]
                for j in range(2)
            ],
            dim=1,
        )
        + module.query
    )
    torch.testing.assert_close(module(g), expected)
    module.use_global = False
    torch.testing.assert_close(module(g), module.query.expand(3, -1, -1))
    # official init: query ~ trunc_normal(0, 1, [-2, 2]); conv 6 weights + 2 biases
    assert module.query.shape == (1, 2, 10) and module.query.abs().max() <= 2.0
    assert sum(p.numel() for p in module.conv.parameters()) == 8
    # widths: unchanged when equal (every CLIP); linear resampling keeps the end values otherwise
    assert match_width(g, 10) is g
    wide = match_width(g, 19)
    assert wide.shape == (3, 19)
    torch.testing.assert_close(wide[:, ::2], g)  # align_corners: every other sample is an input value


@pytest.mark.parametrize(
    ("config", "templates"),
    [
        ({}, (["a photo of a good {}"], ["a photo of a damaged {}"])),
        (
            {
                "class_length": 3,
                "deep_length": 2,
                "normal_templates": ["a photo of a good {}", "{} without defect ."],
                "abnormal_templates": ["a damaged {} in the photo"],
            },
            (["a photo of a good {}", "{} without defect ."], ["a damaged {} in the photo"]),
        ),
        ({"deep_prompts": False}, (["a photo of a good {}"], ["a photo of a damaged {}"])),
    ],
)
def test_text_is_the_official_text_forward(
    backbone: Backbone, config: dict[str, Any], templates: tuple[list[str], list[str]]
) -> None:
    """The text features equal a hand-rolled official encode_text: class tokens AT the slot (before the
    positional embedding), the shallow prompt at index 1 AFTER it, deep prompts replacing index 1..n
    entering later blocks, prompt_norm then ln_final, EOT + r - 1, template ensemble. Catches a prompt
    with a positional embedding, the class at the end, appended instead of replaced deep tokens, a
    missing prompt_norm, a wrong pooling index."""
    method = make(backbone, **config)
    model = new_model(backbone, method)
    scramble(model)
    image = torch.randn(2, backbone.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.text_features(image)
        expected = official_text(backbone, model, image, templates)
    assert got.shape == (2, 2, backbone.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the image matters (Pre-VCP), and so do the prompts where they exist
    with torch.no_grad():
        other = model.text_features(image.flip(0))
        assert (other - got.flip(0)).abs().max() < 1e-5 and (got[0] - got[1]).abs().max() > 1e-4
        if model.text.deep_enabled:
            model.text.deep.add_(0.5)
            changed = model.text_features(image)
            assert (changed - got).abs().max() > 1e-4
            torch.testing.assert_close(
                changed, official_text(backbone, model, image, templates), atol=1e-5, rtol=1e-5
            )


def test_text_prompt_parameters_and_dropout(backbone: Backbone) -> None:
    """Official shapes and init (shallow (1, n, W) and deep (blocks - 1, n, W) uniform(-1, 1), one
    proj, LayerNorm eps 1e-6); in training the projected prompts get an independent inverted-dropout
    mask per image and state (the official code encodes each in its own call) and match the hand
    forward with those masks; in eval no dropout."""
    method = make(backbone)
    model = new_model(backbone, method)
    text = model.text
    assert text.shallow.shape == (1, 1, backbone.text_width)
    assert text.deep.shape == (backbone.text_depth - 1, 1, backbone.text_width)
    assert text.shallow.abs().max() <= 1.0 and text.deep.abs().max() <= 1.0
    assert text.norm.eps == 1e-6 and text.dropout == 0.1
    templates = (["a photo of a good {}"], ["a photo of a damaged {}"])
    image = torch.randn(3, backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    model.train()
    with torch.no_grad():
        text.seed(11)
        got = model.text_features(image)
        text.seed(11)
        masks = text.dropout_masks((3, 2, backbone.text_depth, 1, backbone.text_width), torch.device("cpu"))
        expected = official_text(backbone, model, image, templates, masks)
        again = model.text_features(image)  # the generator moved on: other masks
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (again - got).abs().max() > 1e-5
    torch.testing.assert_close(masks.unique(), torch.tensor([0.0, 1.0 / 0.9]))
    assert 0.05 < float((masks == 0).float().mean()) < 0.15
    assert not torch.equal(masks[0, 0], masks[0, 1]) and not torch.equal(masks[0], masks[1])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.text_features(image), official_text(backbone, model, image, templates)
        )


# --------------------------------------------------------------------------- Post-VCP and the maps


def test_post_vcp_is_the_official_cross_attention() -> None:
    """Against a per-head float64 computation; also catches a 1/sqrt(d) scaling, a residual, or
    the softmax over the heads or texts instead of the patches."""
    torch.manual_seed(0)
    post = PostVCP(text_dim=6, width=16, heads=4)
    text = F.normalize(torch.randn(2, 2, 6), dim=-1)
    patches = F.normalize(torch.randn(2, 9, 16), dim=-1)
    got = post(text, patches)
    assert got.shape == (2, 2, 16)
    torch.testing.assert_close(got.double(), official_post_vcp(post, text, patches), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2, 2))
    # with the 1/sqrt(d) scaling it would differ (the official scale is never applied)
    scaled = PostVCP(text_dim=6, width=16, heads=4)
    scaled.load_state_dict(post.state_dict())
    with torch.no_grad():
        scaled.q.weight.mul_(0.5)  # = 1 / sqrt(head_dim 4)
        scaled.q.bias.mul_(0.5)
    assert (scaled(text, patches) - got).abs().max() > 1e-3
    assert sum(p.numel() for p in post.parameters()) == (6 * 16 + 16) + 3 * (16 * 16 + 16)


@pytest.mark.parametrize("size", [EVAL, 16])
def test_fusion_gaussian_and_top_k_score_are_official(backbone: Backbone, size: int) -> None:
    """0.2 pre + 0.8 post, scipy gaussian_filter with sigma 8 px at the input (64) rescaled to the map,
    and mean(top k pre) + mean(top k post) on the UNSMOOTHED maps, k = 2000 px at the input
    resolution rescaled by area (2000 * size^2 / 64^2 on the tiny model)."""
    method = make(backbone)
    assert method.input_size == 64
    k = round(2000 * size * size / 64**2)
    assert method.top_k(size) == k
    g = torch.Generator().manual_seed(4)
    pre, post = torch.rand(3, size, size, generator=g), torch.rand(3, size, size, generator=g)
    fused, score = method.fuse(pre, post)
    expected_map, expected_score = official_fusion(
        pre.double().numpy(), post.double().numpy(), sigma=8.0 * size / 64, k=k
    )
    np.testing.assert_allclose(fused.numpy(), expected_map, atol=1e-5)
    np.testing.assert_allclose(score.numpy(), expected_score, atol=1e-5)
    unsmoothed, _ = make(backbone, sigma=0).fuse(pre, post)
    np.testing.assert_allclose(unsmoothed.numpy(), (0.2 * pre + 0.8 * post).numpy(), atol=1e-6)
    assert make(backbone, top_k=10**6).top_k(size) == size * size
    torch.testing.assert_close(top_k_mean(torch.arange(8.0).reshape(1, 2, 4), 3), torch.tensor([6.0]))


@pytest.mark.parametrize("normalize", ["none", "support-minmax"])
def test_prediction_is_the_official_pipeline(backbone: Backbone, support: SupportSet, normalize: str) -> None:
    """With the initial (scrambled) parts: maps and scores are the official per-layer pre / post maps,
    averaged over layers, fused, smoothed and scored; ``support-minmax`` rescales both with the
    SUPPORT images' min and max (never the test images')."""
    method = make(backbone, epochs=0, normalize=normalize)
    method.fit(support)
    assert method.model is not None
    scramble(method.model)
    if normalize == "support-minmax":
        with torch.no_grad():
            embeds, tokens = method.features(support.items)
            maps, scores = method.raw_outputs(embeds, tokens, EVAL)
        method.map_range = (float(maps.min()), float(maps.max()))
        method.score_range = (float(scores.min()), float(scores.max()))
    queries = lesion_task(1, seed=6, tag="pred").items
    prediction = method.predict(queries)

    feats = backbone.features(queries, method.request)
    with torch.no_grad():
        pre, post = official_layer_probabilities(method.model, feats.embeds, feats.patch_tokens, EVAL, (4, 4))
    k = round(2000 * EVAL * EVAL / 64**2)
    expected_map, expected_score = official_fusion(
        pre[:, :, 1].mean(1).double().numpy(), post[:, :, 1].mean(1).double().numpy(), 8.0 * EVAL / 64, k
    )
    if normalize == "support-minmax":
        (lo, hi), (slo, shi) = method.map_range, method.score_range
        expected_map, expected_score = (expected_map - lo) / (hi - lo), (expected_score - slo) / (shi - slo)
        assert hi > lo and shi > slo
    np.testing.assert_allclose(prediction.maps, expected_map, atol=1e-4)
    np.testing.assert_allclose(prediction.scores, expected_score, atol=1e-4)
    assert prediction.scores.dtype == np.float64 and prediction.maps.dtype == np.float32
    assert prediction.maps.shape == (len(queries), EVAL, EVAL)


def test_support_ranges_come_from_the_support_only(backbone: Backbone, support: SupportSet) -> None:
    """The rescaling is fixed at fit: predicting other images (or fewer) never changes it."""
    method = make(backbone, epochs=1)
    method.fit(support)
    ranges = (method.map_range, method.score_range)
    queries = lesion_task(2, seed=9, tag="ranges").items
    full = method.predict(queries)
    part = method.predict(queries[:2])
    assert (method.map_range, method.score_range) == ranges
    np.testing.assert_allclose(part.maps, full.maps[:2], atol=1e-6)
    on_support = method.predict(support.items)
    assert on_support.maps.min() == pytest.approx(0.0, abs=1e-5)
    assert on_support.maps.max() == pytest.approx(1.0, abs=1e-5)
    assert on_support.scores.min() == pytest.approx(0.0, abs=1e-5)
    assert on_support.scores.max() == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- training


def test_training_loss_is_the_official_loss(backbone: Backbone, support: SupportSet) -> None:
    """One full-batch step (no dropout, so the hand loss is deterministic): sum over the 4 layers of
    FocalLoss(2-channel map) + Dice(p_abn) for the pre AND the post map, weights 1."""
    method = make(backbone, epochs=1, batch_size=len(support), prompt_dropout=0.0)
    initial = new_model(backbone, method)  # the same seeded initialisation
    method.fit(support)
    embeds, tokens = method.features(support.items)
    with torch.no_grad():
        pre, post = official_layer_probabilities(initial, embeds, tokens, EVAL, (4, 4))
    masks = torch.from_numpy(support.masks)
    terms = {
        name: sum(official_focal(maps[:, i], masks) + official_dice(maps[:, i, 1], masks) for i in range(4))
        for name, maps in (("pre", pre.double()), ("post", post.double()))
    }
    (first,) = method.history
    assert first["pre"] == pytest.approx(float(terms["pre"]), rel=1e-4)
    assert first["post"] == pytest.approx(float(terms["post"]), rel=1e-4)
    assert first["total"] == pytest.approx(float(terms["pre"] + terms["post"]), rel=1e-4)


def test_gradients_reach_only_the_methods_parameters(backbone: Backbone, support: SupportSet) -> None:
    """One step: every part (class query and conv, shallow / deep prompts, proj, prompt norm, the 4
    linears, Post-VCP, both temperatures) gets a non-zero gradient; no CLIP weight any; the two
    learning rates go to their official groups."""
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = make(backbone, epochs=1, batch_size=len(support))
    method.fit(support)
    assert method.model is not None
    names = {name for name, _ in method.model.named_parameters()}
    assert names == {
        "linears.0.weight", "linears.0.bias", "linears.1.weight", "linears.1.bias",
        "linears.2.weight", "linears.2.bias", "linears.3.weight", "linears.3.bias",
        "context.query", "context.conv.weight", "context.conv.bias",
        "text.shallow", "text.deep", "text.proj.weight", "text.proj.bias",
        "text.norm.weight", "text.norm.bias",
        "post.q.weight", "post.q.bias", "post.k.weight", "post.k.bias", "post.v.weight", "post.v.bias",
        "post.out.weight", "post.out.bias", "pre_temperature", "post_temperature",
    }  # fmt: skip
    for name, parameter in method.model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    assert not {id(p) for p in backbone.model.parameters()} & {id(p) for p in method.model.parameters()}
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    # fixed temperatures: no gradient, not optimised
    fixed = make(backbone, epochs=1, batch_size=len(support), learn_temperature=False)
    fixed.fit(support)
    assert fixed.model is not None
    assert fixed.model.pre_temperature.grad is None and float(fixed.model.pre_temperature) == pytest.approx(
        float(np.log(1 / 0.07))
    )


def test_temperatures_use_their_own_learning_rate(backbone: Backbone, support: SupportSet) -> None:
    """Adam's first step moves every parameter by about its group's lr: the temperatures by 0.01,
    the rest by the main lr (official groups)."""
    method = make(backbone, epochs=1, batch_size=len(support), lr=1e-4, temperature_lr=0.02)
    initial = new_model(backbone, method)
    method.fit(support)
    assert method.model is not None
    moved = float((method.model.pre_temperature - initial.pre_temperature).detach())
    assert abs(moved) == pytest.approx(0.02, rel=1e-3)
    step = (method.model.post.q.weight - initial.post.q.weight).detach().abs()
    assert float(step.max()) == pytest.approx(1e-4, rel=1e-3)


def test_learns_to_localise(backbone: Backbone) -> None:
    """The loss goes down and the fitted map beats the unfitted one on the support and on held-out
    images (catches a loss on the wrong channel, a sign error, parts not reaching the optimiser).
    The official lr 4e-5 makes a handful of steps too small to see on 12 images: 1e-3 here."""
    task = lesion_task(4, seed=3, tag="learn")
    held_out = lesion_task(3, seed=11, tag="held")
    unfitted = make(backbone, epochs=0)
    unfitted.fit(task)
    method = make(backbone, epochs=15, batch_size=8, lr=1e-3)
    method.fit(task)
    history = method.history
    assert len(history) == 15 and set(history[0]) == {"pre", "post", "total"}
    assert history[-1]["total"] < history[0]["total"]
    assert history[-1]["pre"] < history[0]["pre"] and history[-1]["post"] < history[0]["post"]
    for data in (task, held_out):
        before = pixel_auroc(unfitted.predict(data.items).maps, data.masks)
        after = pixel_auroc(method.predict(data.items).maps, data.masks)
        assert after >= 0.7 and after >= before + 0.1, (before, after)  # seen: 0.63 -> 0.86, 0.56 -> 0.77


def test_deterministic_for_a_seed(backbone: Backbone, support: SupportSet) -> None:
    """Same seed -> bit-identical predictions (dropout masks included); another seed -> others."""
    queries = lesion_task(1, seed=8, tag="det").items
    runs = []
    for seed in (0, 0, 1):
        method = make(backbone, seed=seed, epochs=3, batch_size=4, lr=1e-3)
        method.fit(support)
        runs.append(method.predict(queries))
    assert np.array_equal(runs[0].scores, runs[1].scores) and np.array_equal(runs[0].maps, runs[1].maps)
    assert not np.allclose(runs[0].maps, runs[2].maps)
    assert not np.allclose(runs[0].scores, runs[2].scores)


def test_each_image_goes_through_the_tower_once(tmp_path: Path) -> None:
    """fit + predict on the same images encode each image once (the standard request)."""
    fresh = new_backbone(tmp_path / "cache")
    method = make(fresh, epochs=1)
    task = lesion_task(2, seed=12, tag="once")
    method.fit(task)
    method.predict(task.items)
    method.predict(task.items[:3])
    assert fresh.encoded_by_request == {fresh.resolve(method.request): len(task)}


# --------------------------------------------------------------------------- options and errors


def test_defaults_are_the_official_settings() -> None:
    cfg = VCPCLIP.default_config
    assert cfg["normal_templates"] == ["a photo of a good {}"]
    assert cfg["abnormal_templates"] == ["a photo of a damaged {}"]
    expected = {
        "class_length": 2, "deep_length": 1, "deep_prompts": True, "use_global": True,
        "prompt_dropout": 0.1, "heads": 8, "temperature": 0.07, "learn_temperature": True,
        "pre_weight": 0.2, "sigma": 8.0, "top_k": 2000, "normalize": "support-minmax",
    }  # fmt: skip
    assert {key: cfg[key] for key in expected} == expected
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["betas"]) == (10, 32, 4e-5, [0.5, 0.999])
    assert (cfg["temperature_lr"], cfg["focal_gamma"], cfg["focal_smooth"], cfg["dice_smooth"]) == (
        0.01, 2.0, 1e-5, 1.0,
    )  # fmt: skip
    assert VCPCLIP.table_group == "anomaly" and VCPCLIP.table_rank == 3


def test_bad_options_and_misuse_are_clear_errors(backbone: Backbone, support: SupportSet) -> None:
    """Catches an option accepted without validation, or an error not naming method and option."""
    bad_values = (
        {"normal_templates": ["a photo of a good"]},
        {"abnormal_templates": ["{} and {}"]},
        {"normal_templates": []},
        {"class_length": 0},
        {"deep_length": 0},
        {"prompt_dropout": 1.0},
        {"heads": 0},
        {"temperature": 0},
        {"pre_weight": 1.5},
        {"top_k": 0},
        {"normalize": "test-minmax"},
        {"betas": [0.5]},
        {"layers": []},
    )
    for bad in bad_values:
        key = next(iter(bad))
        with pytest.raises(MethodError, match=f"method 'vcpclip': option '{key}'"):
            make(backbone, **bad)
    with pytest.raises(MethodError, match="method 'vcpclip': unknown option"):
        make(backbone, depth=2)
    with pytest.raises(MethodError, match=r"method 'vcpclip': option 'heads' 3 must divide .* 64"):
        make(backbone, heads=3, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'vcpclip': template 'a{}'.*stand apart"):
        make(backbone, normal_templates=["a{}"], epochs=0).fit(support)
    # 73 words + 2 class tokens + 1 prompt token + SOS + EOT = 78 > 77; 72 words fit exactly
    with pytest.raises(MethodError, match=r"method 'vcpclip': template .* longer than .* 77 tokens"):
        make(backbone, normal_templates=["a " * 73 + "{}"], epochs=0).fit(support)
    make(backbone, normal_templates=["a " * 72 + "{}"], epochs=0).fit(support)
    make(backbone, normal_templates=["a " * 73 + "{}"], deep_prompts=False, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'vcpclip'.*layers"):
        make(backbone, layers=[7], epochs=0).fit(support)
    with pytest.raises(MethodError, match="method 'vcpclip': predict"):
        make(backbone).predict(support.items)
    assert make(backbone, layers=[1, 3]).request == FeatureRequest.of("standard", layers=[1, 3])
