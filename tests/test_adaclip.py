"""AdaCLIP (methods/adaclip) on the tiny random-init backbone.

The tiny model: 64 px input, 16 px patches (a 4 x 4 grid, 16 tokens), 4 vision blocks of width
64, joint embedding 32, a text encoder of 2 blocks. So the tests run with ``prompt_depth: 2``
(text prompts can only enter text block 1) and ``k_clusters: 3`` (the HSF clusters the 15 most
anomalous of the 16 tokens); visual-only runs (``prompting_branch: V``) use deeper prompts.
Every formula is written out here from the official code's description (/tmp/spec_adaclip.md)
with open_clip's own modules (the test reads ``backbone.model``; the method never does) and
compared with the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, pixel_auroc, tiny_method
from sklearn.cluster import KMeans

from bench.errors import MethodError
from bench.kit.clip import Backbone
from bench.method import SupportSet
from bench.types import ImageItem
from bench.weights import BackboneSpec, load_backbone
from methods.adaclip import AdaCLIP
from methods.adaclip.model import HybridPrompts, hybrid_semantic_fusion
from methods.adaclip.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, sentences

EVAL = 32
#: What the tiny model needs: its text encoder has 2 blocks, its grid 16 tokens.
TINY = {"prompt_depth": 2, "k_clusters": 3}
#: Cached features are fp16-rounded; hand-computed fp32 references agree to about this.
FP16_ATOL = 1e-3


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def new_backbone(cache_dir: Path) -> Backbone:
    return load_backbone(BackboneSpec(TINY_MODEL, "none", cache_dir=cache_dir, device="cpu"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return new_backbone(tmp_path_factory.mktemp("adaclip-cache"))


def lesion_task(
    shots: int, seed: int, tag: str, size: int = EVAL, classes: tuple[int, ...] = (0, 1, 2)
) -> SupportSet:
    """``shots`` images per class (as tests/test_anomalyclip.py): normal speckle; benign a bright
    disc, malignant a dark disc, with the disc's mask at ``size``."""
    rng = np.random.default_rng(seed)
    items, labels, masks = [], [], []
    yy, xx = np.mgrid[:64, :64] + 0.5
    ys, xs = (np.mgrid[:size, :size] + 0.5) * 64 / size
    for c in classes:
        for i in range(shots):
            image = rng.integers(70, 130, size=(64, 64), dtype=np.uint8)
            mask = np.zeros((size, size), np.float32)
            if c > 0:
                cy, cx = rng.uniform(18, 46, 2)
                r = rng.uniform(9, 14)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 235 if c == 1 else 10
                mask = ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r).astype(np.float32)
            rgb = np.repeat(image[:, :, None], 3, axis=2)
            items.append(
                ImageItem(id=f"{tag}-{c}-{i}", key=f"ada-{tag}-{seed}-{c}-{i}", loader=lambda a=rgb: a)
            )
            labels.append(c)
            masks.append(mask)
    return SupportSet(tuple(items), np.array(labels), np.stack(masks))


def make(backbone: Backbone, seed: int = 0, **config: Any) -> AdaCLIP:
    return tiny_method(AdaCLIP, backbone, seed=seed, shots=2, eval_size=EVAL, **{**TINY, **config})


def built(backbone: Backbone, seed: int = 0, **config: Any) -> AdaCLIP:
    """A method with its initial (seeded) prompts, as fit() creates them, and its sentences."""
    method = make(backbone, seed=seed, **config)
    method.prompts = method._build()
    method._sentences()
    return method


@pytest.fixture(scope="module")
def support() -> SupportSet:
    return lesion_task(2, seed=0, tag="support")


def known_text(batch: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(batch, 2, dim, generator=torch.Generator().manual_seed(7)), dim=-1)


# --------------------------------------------------------------------------- hand references


def hand_visual(
    backbone: Backbone, prompts: HybridPrompts, prefix: torch.Tensor, embeds: torch.Tensor, layers
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official prompted image encoder (``forward_visual`` per block), with open_clip's blocks.

    Context of block i = stack of the ``length`` generator heads on the unprompted embedding
    + static prompt i. Before block 0 it is APPENDED after [CLS, patches]; before blocks
    1..depth-1 the last ``length`` tokens are REPLACED by it; later blocks carry the last one.
    Taps: the stream after the used blocks without the prompt tokens. Pooled: ln_post(CLS) @ proj.
    Returns the normalised (class feature, per-layer projected patch features).
    """
    visual = backbone.model.visual
    length, depth = prompts.length, prompts.depth
    with torch.no_grad():
        dynamic = torch.stack([head(embeds) for head in prompts.visual_generator], dim=1)
        x = prefix
        taps = []
        for index, block in enumerate(visual.transformer.resblocks):
            if index < depth:
                context = dynamic + prompts.static_visual[index]
                x = torch.cat([x if index == 0 else x[:, :-length], context], dim=1)
            x = block(x)
            if index in layers:
                taps.append(x[:, :-length])
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
        patches = torch.stack([proj(t[:, 1:]) for proj, t in zip(prompts.patch_proj, taps, strict=True)], 1)
        return F.normalize(prompts.cls_proj(pooled), dim=-1), F.normalize(patches, dim=-1)


def hand_text(backbone: Backbone, prompts: HybridPrompts, embeds: torch.Tensor, obj: str) -> torch.Tensor:
    """The official prompted text encoder on the full 77-token sentences, per image (B, 2, D).

    Entering text block i (1 <= i < depth), positions 1..length (right after SOT) are OVERWRITTEN
    by dynamic (from the image) + static prompt i; block 0 gets nothing. Then ln_final, the EOT
    token, text_projection; per state the normalised mean of the normalised sentences.
    """
    model = backbone.model
    normal = sentences(NORMAL_STATES, TEMPLATES, obj)
    abnormal = sentences(ABNORMAL_STATES, TEMPLATES, obj)
    ids = backbone.tokenize(normal + abnormal)
    length, depth = prompts.length, prompts.depth
    out = []
    with torch.no_grad():
        for image in embeds:
            dynamic = torch.stack([head(image) for head in prompts.text_generator], dim=0)  # (P, Wt)
            x = model.token_embedding(ids) + model.positional_embedding
            for index, block in enumerate(model.transformer.resblocks):
                if 1 <= index < depth:
                    context = (dynamic + prompts.static_text[index - 1]).expand(x.shape[0], -1, -1)
                    x = torch.cat([x[:, :1], context, x[:, 1 + length :]], dim=1)
                x = block(x, attn_mask=model.attn_mask)
            x = model.ln_final(x)
            pooled = F.normalize(
                x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection, dim=-1
            )
            rows = [pooled[: len(normal)].mean(0), pooled[len(normal) :].mean(0)]
            out.append(F.normalize(torch.stack(rows), dim=-1))
    return torch.stack(out)


def official_hsf(
    patches: torch.Tensor, logits: torch.Tensor, k_clusters: int, seed: int, per_cluster: int = 5
) -> torch.Tensor:
    """HybridSemanticFusion.forward as written: per-layer lists, top-k, KMeans on the channel-concatenated
    tokens, per cluster the mean of its tokens of all layers (torch.cat then mean), mean of centres."""
    layers = [patches[:, i] for i in range(patches.shape[1])]
    maps = [logits[:, i] for i in range(logits.shape[1])]
    anomaly = torch.softmax(torch.mean(torch.stack(maps, dim=1), dim=1), dim=2)[:, :, 1]
    k = min(anomaly.shape[1], per_cluster * k_clusters)
    top = torch.topk(anomaly, k=k, dim=1).indices
    selected = [t.gather(1, top.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in layers]
    stacked = torch.cat(selected, dim=2)
    result = []
    for b in range(stacked.shape[0]):
        labels = KMeans(n_clusters=k_clusters, n_init="auto", random_state=seed).fit_predict(
            stacked[b].detach().cpu().numpy()
        )
        centres = [
            torch.cat([s[b][labels == c] for s in selected], dim=0).mean(dim=0, keepdim=True)
            for c in range(k_clusters)
        ]
        result.append(torch.cat(centres).mean(dim=0))
    return F.normalize(torch.stack(result), dim=1)


def official_focal(two_channel: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5):
    """loss.py's FocalLoss (apply_nonlin None, alpha None -> 1) on (N, 2, ...) probabilities."""
    if two_channel.dim() > 2:
        logit = two_channel.reshape(two_channel.shape[0], 2, -1).permute(0, 2, 1).reshape(-1, 2)
    else:
        logit = two_channel
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], 2, dtype=logit.dtype).scatter_(1, idx, 1.0)
    one_hot = torch.clamp(one_hot, smooth / (2 - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1.0 * torch.pow(1.0 - pt, gamma) * pt.log()).mean()


def official_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss.py's BinaryDiceLoss: N = target.size(0), each of the N rows of the flattened maps a sample."""
    n = target.shape[0]
    p, g = probs.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).sum() / n


def hand_upsampled(logits: torch.Tensor, grid, size: int, align_corners: bool = True) -> torch.Tensor:
    """(B, L, N, 2) -> (B, L, 2, S, S): permute, view (B, 2, H, H), F.interpolate bilinear per layer."""
    b, n_layers, _, _ = logits.shape
    per_layer = [
        F.interpolate(
            logits[:, i].permute(0, 2, 1).reshape(b, 2, *grid),
            size=size,
            mode="bilinear",
            align_corners=align_corners,
        )
        for i in range(n_layers)
    ]
    return torch.stack(per_layer, dim=1)


# --------------------------------------------------------------------------- visual prompts


@pytest.mark.parametrize(("branch", "depth"), [("V", 3), ("V", 1), ("VL", 2)])
def test_visual_prompts_enter_where_the_official_code_inserts_them(
    backbone: Backbone, branch: str, depth: int
) -> None:
    """The method's prompted pass equals the hand-rolled official loop: appended before block 0,
    replacing the last ``length`` tokens before blocks 1..depth-1, dynamic + static summed, carried
    to the end, taps without prompts, pooled class feature. Catches insertion at every block,
    re-appending instead of replacing, the wrong depth, a missing dynamic or static part, taps with
    prompt tokens, the unprompted pooled feature."""
    method = built(backbone, prompting_branch=branch, prompt_depth=depth)
    prompts = method.prompts
    assert prompts is not None and len(prompts.static_visual) == depth
    with torch.no_grad():  # make the static prompts and biases large enough to matter
        for p in prompts.static_visual:
            p.mul_(50.0)
    items = lesion_task(1, seed=4, tag="vis").items
    prefix, embeds = method.frozen(items)
    with torch.no_grad():
        out = method.tower_pass(prefix, prompts=prompts.visual_prompts(embeds))
        cls, patches = prompts.project(out.patch_tokens, out.embeds)
    hand_cls, hand_patches = hand_visual(backbone, prompts, prefix, embeds, backbone.layers)
    torch.testing.assert_close(patches, hand_patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, hand_cls, atol=1e-5, rtol=1e-5)
    # each part matters: without the dynamic part, or with one block more of prompts, it differs
    saved = [p.detach().clone() for p in prompts.static_visual]
    with torch.no_grad():
        no_dynamic = {b: prompts.static_visual[b] for b in range(depth)}
        other = method.tower_pass(prefix, prompts=no_dynamic)
        assert (F.normalize(prompts.cls_proj(other.embeds), dim=-1) - cls).abs().max() > 1e-3
        deeper = dict(prompts.visual_prompts(embeds))
        if depth < backbone.depth:
            deeper[depth] = deeper[depth - 1] * 0.5
            other = method.tower_pass(prefix, prompts=deeper)
            assert (other.patch_tokens[:, -1] - out.patch_tokens[:, -1]).abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(saved, prompts.static_visual, strict=True))


@pytest.mark.parametrize("kind", ["S", "D", "SD"])
def test_prompting_type_picks_static_dynamic_or_their_sum(kind: str) -> None:
    """S: the block's static prompt only (shared by the batch); D: the generated prompt at every
    block; SD: their sum (official forward_visual / forward_text branches)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prompts = HybridPrompts(
            width=6,
            text_width=4,
            embed_dim=3,
            n_layers=2,
            length=2,
            depth=3,
            static="S" in kind,
            dynamic="D" in kind,
        )
    image = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    visual, text = prompts.visual_prompts(image), prompts.text_prompts(image)
    assert visual is not None and text is not None
    assert sorted(visual) == [0, 1, 2] and sorted(text) == [1, 2]
    for block in range(3):
        expected = torch.zeros(2, 2, 6)
        if "D" in kind:
            expected = expected + torch.stack([head(image) for head in prompts.visual_generator], dim=1)
        if "S" in kind:
            expected = expected + prompts.static_visual[block]
        torch.testing.assert_close(visual[block].expand(2, -1, -1), expected)
    for block in (1, 2):
        expected = torch.zeros(2, 2, 4)
        if "D" in kind:
            expected = expected + torch.stack([head(image) for head in prompts.text_generator], dim=1)
        if "S" in kind:
            expected = expected + prompts.static_text[block - 1]
        torch.testing.assert_close(text[block].expand(2, -1, -1), expected)
    assert len(prompts.static_visual) == (3 if "S" in kind else 0)
    assert len(prompts.visual_generator) == (2 if "D" in kind else 0)


def test_frozen_inputs_are_the_cached_prefix_and_the_unprompted_image_embedding(backbone: Backbone) -> None:
    """The prefix is the stream entering block 0 (patch embedding + class + positions + ln_pre), and
    the dynamic prompts' input is CLIP's own unprompted ``encode_image`` (ln_post(CLS) @ proj, not
    normalised) of the same images: the official generate_and_set_dynamic_promtps."""
    method = make(backbone)
    items = lesion_task(1, seed=5, tag="frozen").items
    prefix, embeds = method.frozen(items)
    images = torch.stack([backbone.preprocess(item.rgb()) for item in items])
    with torch.no_grad():
        torch.testing.assert_close(prefix, backbone.model.visual._embeds(images), atol=FP16_ATOL, rtol=0)
        torch.testing.assert_close(embeds, backbone.model.encode_image(images), atol=FP16_ATOL, rtol=0)
    assert method.tower_pass.start == 0 and method.tower_pass.request.option("block") == 0


# --------------------------------------------------------------------------- text prompts


def test_text_prompts_overwrite_positions_after_sot_in_text_block_1(backbone: Backbone) -> None:
    """The method's text features equal the hand-rolled official text forward: positions 1..5
    entering text block 1 overwritten by the image's dynamic + the static prompt, per image.
    Catches insertion instead of replacement, block 0 prompted, the wrong positions, one text for
    every image, a missing normalisation or state order."""
    method = built(backbone)
    prompts = method.prompts
    assert prompts is not None and len(prompts.static_text) == 1  # block 0 gets none
    with torch.no_grad():
        prompts.static_text[0].mul_(50.0)
    items = lesion_task(1, seed=6, tag="text").items[:2]
    _, embeds = method.frozen(items)
    with torch.no_grad():
        got = method.text_features(embeds)
    assert got.shape == (2, 2, backbone.embed_dim)
    expected = hand_text(backbone, prompts, embeds, "breast ultrasound image")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-4  # the dynamic part makes the text image-specific
    ids = backbone.tokenize(["a bad photo of a breast ultrasound image."])
    assert ids.argmax(dim=-1).item() > prompts.length  # the 5 replaced tokens are "a bad photo of a"


@pytest.mark.parametrize("config", [{"prompt_depth": 1}, {"prompting_branch": "V"}])
def test_without_text_prompts_the_text_is_the_plain_ensemble(backbone: Backbone, config: dict) -> None:
    """Depth 1 (no text block after the first) or the visual branch only: the 48 sentences through
    CLIP unchanged, per state the normalised mean of the normalised embeddings."""
    method = built(backbone, **config)
    assert method.prompts is not None and method.prompts.text_prompts(torch.zeros(1, 32)) is None
    normal = sentences(NORMAL_STATES, TEMPLATES, "breast ultrasound image")
    abnormal = sentences(ABNORMAL_STATES, TEMPLATES, "breast ultrasound image")
    assert len(normal) == 28 and len(abnormal) == 20
    assert normal[0] == "a bad photo of a breast ultrasound image."
    assert abnormal[-1] == "a cropped photo of the breast ultrasound image with damage."
    plain = F.normalize(backbone.encode_text(normal + abnormal), dim=-1)
    rows = F.normalize(torch.stack([plain[:28].mean(0), plain[28:].mean(0)]), dim=-1)
    with torch.no_grad():
        got = method.text_features(torch.zeros(3, backbone.embed_dim))
    assert got.shape == (3, 2, backbone.embed_dim)
    torch.testing.assert_close(got, rows.expand(3, -1, -1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- HSF, scores, maps


def test_hsf_on_a_hand_checked_case() -> None:
    """6 tokens, 2 layers, k_clusters 2 (k = 4 tokens). The layer-MEAN anomaly ranks tokens 0-3 on
    top (layer 0 alone would pick token 4); they form two clusters, {0, 1, 2} and {3}. The fused
    feature is the normalised mean of the two cluster centres, each the mean of its members' tokens
    of BOTH layers. Catches per-layer top-k, a mean over all selected tokens (cluster-size
    weighted), using one layer's tokens, selecting low-anomaly tokens."""
    e1, e2, e3 = torch.eye(3)
    layer0 = torch.stack([e1, e1 + 0.1 * e2, e1 + 0.1 * e3, e2, e3, e3 + 0.1 * e1])
    layer1 = torch.stack([e1 + 0.2 * e3, e1, e1 + 0.2 * e2, e2 + 0.1 * e3, e3, e3])
    patches = F.normalize(torch.stack([layer0, layer1])[None], dim=-1)  # (1, 2, 6, 3)
    margin0 = torch.tensor([1.0, 2.0, 1.5, 1.2, 5.0, -3.0])  # abnormal - normal logit, layer 0
    margin1 = torch.tensor([1.0, 2.0, 1.5, 1.2, -9.0, -3.0])
    logits = torch.stack(
        [torch.stack([torch.zeros(6), margin0], -1), torch.stack([torch.zeros(6), margin1], -1)]
    )[None]
    got = hybrid_semantic_fusion(patches, logits, k_clusters=2, tokens_per_cluster=2, seed=0)
    centre_a = patches[0, :, [0, 1, 2]].reshape(-1, 3).mean(0)
    centre_b = patches[0, :, [3]].reshape(-1, 3).mean(0)
    expected = F.normalize((centre_a + centre_b) / 2, dim=0)
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=0)
    weighted = F.normalize(patches[0, :, :4].reshape(-1, 3).mean(0), dim=0)
    assert (got[0] - weighted).abs().max() > 1e-2
    torch.testing.assert_close(
        got, official_hsf(patches, logits, 2, seed=0, per_cluster=2), atol=1e-6, rtol=0
    )


def test_hsf_matches_the_official_code_on_random_tokens() -> None:
    """Random (B, L, N, D) tokens and logits: the vectorised HSF equals the official loop (same
    KMeans seed), and gradients flow to the selected tokens (the official no_grad is commented out)."""
    g = torch.Generator().manual_seed(2)
    patches = F.normalize(torch.randn(2, 4, 16, 8, generator=g), dim=-1).requires_grad_(True)
    logits = 3 * torch.randn(2, 4, 16, 2, generator=g)
    got = hybrid_semantic_fusion(patches, logits, k_clusters=3, tokens_per_cluster=5, seed=0)
    torch.testing.assert_close(got, official_hsf(patches, logits, 3, seed=0), atol=1e-6, rtol=0)
    got.sum().backward()
    assert patches.grad is not None
    touched = (patches.grad.abs().sum(dim=(1, 3)) > 0).sum(dim=1)
    assert touched.tolist() == [15, 15]  # exactly the 15 most anomalous tokens of each image


def test_image_score_blends_hsf_and_class_feature(backbone: Backbone) -> None:
    """score = softmax(s * normalise(0.2 HSF + 0.8 cls) . T)[1] (official s = 100; a small scale here so
    the softmax does not saturate on random vectors); without HSF the class feature alone."""
    scale = 3.0
    method = make(backbone, logit_scale=scale)
    g = torch.Generator().manual_seed(3)
    cls = F.normalize(torch.randn(2, 32, generator=g), dim=-1)
    patches = F.normalize(torch.randn(2, 4, 16, 32, generator=g), dim=-1)
    text = known_text(2, 32)
    logits = method.logits(patches, text)
    torch.testing.assert_close(logits, scale * torch.einsum("blnd,bkd->blnk", patches, text))
    fused = official_hsf(patches, logits, 3, seed=0)
    f = F.normalize(0.2 * fused + 0.8 * cls, dim=1)
    expected = torch.softmax(scale * (f[:, None] @ text.transpose(1, 2))[:, 0], dim=1)
    torch.testing.assert_close(method.image_probabilities(cls, patches, logits, text), expected)
    plain = make(backbone, use_hsf=False, logit_scale=scale).image_probabilities(cls, patches, logits, text)
    torch.testing.assert_close(plain, torch.softmax(scale * torch.einsum("bd,bkd->bk", cls, text), dim=1))
    assert (plain - expected).abs().max() > 1e-3
    half = make(backbone, hsf_alpha=0.5, logit_scale=scale).image_probabilities(cls, patches, logits, text)
    f_half = F.normalize(0.5 * fused + 0.5 * cls, dim=1)
    torch.testing.assert_close(half, torch.softmax(scale * torch.einsum("bd,bkd->bk", f_half, text), dim=1))


@pytest.mark.parametrize("size", [EVAL, 16])
def test_anomaly_map_is_the_official_test_map(backbone: Backbone, size: int) -> None:
    """Per-layer logits bilinearly upsampled with align_corners, MEAN over layers, softmax over the
    two classes, (p1 + 1 - p0) / 2, then scipy's gaussian_filter with sigma 4 px at the input size.
    Catches softmax before the layer mean, align_corners False, a sum over layers, the sigma."""
    method = make(backbone)
    g = torch.Generator().manual_seed(4)
    logits = 20 * torch.randn(2, 4, 16, 2, generator=g)
    got = method.anomaly_map(logits, size).numpy()
    probs = torch.softmax(hand_upsampled(logits, (4, 4), size).mean(dim=1), dim=1)
    raw = ((probs[:, 1:] + 1 - probs[:, :1]) / 2.0)[:, 0].double().numpy()
    expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4.0 * size / 64) for m in raw])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    per_layer = torch.softmax(hand_upsampled(logits, (4, 4), size), dim=2).mean(dim=1)[:, 1].double().numpy()
    smoothed = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4.0 * size / 64) for m in per_layer])
    assert np.abs(got - smoothed).max() > 1e-3
    unaligned = make(backbone, align_corners=False, sigma=0).anomaly_map(logits, size).numpy()
    probs_u = torch.softmax(hand_upsampled(logits, (4, 4), size, False).mean(dim=1), dim=1)
    np.testing.assert_allclose(unaligned, ((probs_u[:, 1] + 1 - probs_u[:, 0]) / 2).numpy(), atol=1e-6)


def test_prediction_is_the_forward_score_and_map(backbone: Backbone, support: SupportSet) -> None:
    """predict() = the prompted forward's HSF score and test map, float64 scores, float32 maps."""
    method = make(backbone, epochs=0)
    method.fit(support)
    queries = lesion_task(1, seed=6, tag="pred").items
    prediction = method.predict(queries)
    prefix, embeds = method.frozen(queries)
    with torch.no_grad():
        cls, patches, text = method.forward(prefix, embeds)
        hand_cls, hand_patches = hand_visual(backbone, method.prompts, prefix, embeds, backbone.layers)
        text_hand = hand_text(backbone, method.prompts, embeds, "breast ultrasound image")
    torch.testing.assert_close(patches, hand_patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, hand_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, text_hand, atol=1e-5, rtol=1e-5)
    logits = 100.0 * torch.einsum("blnd,bkd->blnk", hand_patches, text_hand)
    f = F.normalize(0.2 * official_hsf(hand_patches, logits, 3, seed=0) + 0.8 * hand_cls, dim=1)
    scores = torch.softmax(100.0 * torch.einsum("bd,bkd->bk", f, text_hand), dim=1)[:, 1]
    np.testing.assert_allclose(prediction.scores, scores.double().numpy(), atol=1e-5)
    probs = torch.softmax(hand_upsampled(logits, (4, 4), EVAL).mean(dim=1), dim=1)
    raw = ((probs[:, 1] + 1 - probs[:, 0]) / 2).double().numpy()
    expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4.0 * EVAL / 64) for m in raw])
    np.testing.assert_allclose(prediction.maps, expected, atol=1e-4)
    assert prediction.scores.dtype == np.float64 and prediction.maps.dtype == np.float32


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("per_row", [True, False])
def test_one_step_loss_is_the_official_loss(backbone: Backbone, per_row: bool) -> None:
    """One lesion image, one step, the initial parameters: image Focal on the HSF probabilities
    (label 1) + sum over layers of [Focal(per-layer softmax map) + Dice(p1, gt) + Dice(p0, 1 - gt)],
    Dice over the mask's ROWS (the official gt.squeeze() at batch 1) or per image. Catches a
    layer-mean map in training, softmax before upsampling, a wrong Dice target or unit, an image
    loss on the class feature alone, a missing term."""
    task = lesion_task(1, seed=9, tag="loss", classes=(1,))  # benign: an anomaly (label 1)
    method = make(backbone, epochs=1, dice_per_row=per_row)
    initial = built(backbone, dice_per_row=per_row)  # the same seeded initialisation
    method.fit(task)
    prefix, embeds = initial.frozen(task.items)
    with torch.no_grad():
        cls, patches = hand_visual(backbone, initial.prompts, prefix, embeds, backbone.layers)
        text = hand_text(backbone, initial.prompts, embeds, "breast ultrasound image")
    logits = 100.0 * torch.einsum("blnd,bkd->blnk", patches, text)
    f = F.normalize(0.2 * official_hsf(patches, logits, 3, seed=0) + 0.8 * cls, dim=1)
    score = torch.softmax(100.0 * torch.einsum("bd,bkd->bk", f, text), dim=1)
    image_loss = official_focal(score, torch.ones(1, 1))
    gt = torch.from_numpy(task.masks)  # (1, S, S)
    gt_official = gt.squeeze() if per_row else gt  # (S, S): N = S rows, as the official batch of 1
    maps = torch.softmax(hand_upsampled(logits, (4, 4), EVAL), dim=2)
    pixel = sum(
        official_focal(maps[:, i], gt)
        + official_dice(maps[:, i, 1], gt_official)
        + official_dice(maps[:, i, 0], 1 - gt_official)
        for i in range(4)
    )
    (first,) = method.history
    assert first["image"] == pytest.approx(image_loss.item(), rel=1e-4)
    assert first["pixel"] == pytest.approx(pixel.item(), rel=1e-4)
    assert first["total"] == pytest.approx(image_loss.item() + pixel.item(), rel=1e-4)


def test_gradients_reach_only_the_method_parameters(backbone: Backbone) -> None:
    """One step: every static prompt (visual blocks 0..depth-1, text block 1), both generators, every
    patch projection and the class projection get non-zero gradients; no CLIP weight gets any and
    none changes. The official AdamW(lr 0.01, betas (0.5, 0.999), weight decay 0.01)."""
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    task = lesion_task(1, seed=10, tag="grad", classes=(1,))
    seen: dict[str, Any] = {}
    original = torch.optim.AdamW

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            seen.update(kwargs)

    torch.optim.AdamW = Spy
    try:
        method = make(backbone, epochs=1)
        method.fit(task)
    finally:
        torch.optim.AdamW = original
    assert seen == {"lr": 0.01, "betas": (0.5, 0.999), "weight_decay": 0.01}
    prompts = method.prompts
    assert prompts is not None
    names = {name for name, _ in prompts.named_parameters()}
    assert {"static_visual.0", "static_visual.1", "static_text.0", "cls_proj.weight"} <= names
    assert len(prompts.visual_generator) == len(prompts.text_generator) == 5
    for name, parameter in prompts.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    assert not backbone_ids & {id(p) for p in prompts.parameters()}
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_official_schedule_learns_to_localise(backbone: Backbone) -> None:
    """Official schedule (5 epochs, AdamW 0.01, batch 1): the loss goes down and the fitted map beats
    the unfitted one on the support and on held-out images (catches a loss on the wrong channel or
    target, a sign error, parameters not reaching the optimiser)."""
    task = lesion_task(4, seed=3, tag="learn")
    held_out = lesion_task(3, seed=11, tag="held")
    unfitted = make(backbone, epochs=0)
    unfitted.fit(task)
    method = make(backbone)
    method.fit(task)
    history = method.history
    assert len(history) == 5 and set(history[0]) == {"pixel", "image", "total"}
    assert history[-1]["total"] < history[0]["total"] and history[-1]["pixel"] < history[0]["pixel"]
    for h in history:
        assert h["total"] == pytest.approx(h["pixel"] + h["image"], rel=1e-5)
    for data in (task, held_out):
        before = pixel_auroc(unfitted.predict(data.items).maps, data.masks)
        after = pixel_auroc(method.predict(data.items).maps, data.masks)
        assert after >= 0.75 and after >= before + 0.2, (before, after)  # seen: 0.63 -> 0.92, 0.50 -> 0.91


def test_deterministic_for_a_seed(backbone: Backbone, support: SupportSet) -> None:
    """Same seed -> bit-identical predictions (seeded init, batches and k-means); another seed differs."""
    queries = lesion_task(1, seed=8, tag="det").items
    runs = []
    for seed in (0, 0, 1):
        method = make(backbone, seed=seed, epochs=1)
        method.fit(support)
        runs.append(method.predict(queries))
    assert np.array_equal(runs[0].scores, runs[1].scores) and np.array_equal(runs[0].maps, runs[1].maps)
    assert not np.allclose(runs[0].maps, runs[2].maps)
    assert not np.allclose(runs[0].scores, runs[2].scores)


def test_each_image_goes_through_the_frozen_tower_once_per_grid(tmp_path: Path) -> None:
    """fit + two predicts: each image's prefix (stream entering block 0) and unprompted embedding
    are computed once; another input size (another grid) computes them once more, for that grid."""
    fresh = new_backbone(tmp_path / "cache")
    method = make(fresh, epochs=1)
    task = lesion_task(1, seed=12, tag="once")
    method.fit(task)
    method.predict(task.items)
    method.predict(task.items[:2])
    stream = fresh.resolve(method.tower_pass.request)
    standard = fresh.resolve(method.request)
    assert stream.variant == "stream" and stream.option("block") == 0
    assert fresh.encoded_by_request == {stream: len(task), standard: len(task)}
    small = make(fresh, epochs=1, input_size=32, k_clusters=2)  # a 2 x 2 grid
    small.fit(task)
    small.predict(task.items)
    assert small.grid == (2, 2)
    counts = fresh.encoded_by_request
    assert len(counts) == 4 and all(v == len(task) for v in counts.values())


# --------------------------------------------------------------------------- options and errors


def test_defaults_are_the_official_settings() -> None:
    cfg = AdaCLIP.default_config
    assert (cfg["prompt_length"], cfg["prompt_depth"], cfg["init_std"]) == (5, 4, 0.02)
    assert (cfg["prompting_type"], cfg["prompting_branch"]) == ("SD", "VL")
    assert (cfg["use_hsf"], cfg["k_clusters"], cfg["hsf_tokens_per_cluster"], cfg["hsf_alpha"]) == (
        True,
        20,
        5,
        0.2,
    )
    assert (cfg["logit_scale"], cfg["align_corners"], cfg["sigma"]) == (100.0, True, 4.0)
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["betas"], cfg["weight_decay"]) == (
        5,
        1,
        0.01,
        [0.5, 0.999],
        0.01,
    )
    assert (cfg["focal_gamma"], cfg["focal_smooth"], cfg["dice_smooth"], cfg["dice_per_row"]) == (
        2.0,
        1e-5,
        1.0,
        True,
    )
    assert cfg["templates"] == list(TEMPLATES) and len(cfg["normal_states"]) == 7
    assert AdaCLIP.table_group == "anomaly" and AdaCLIP.table_rank == 1


def test_bad_options_and_misuse_are_clear_errors(backbone: Backbone, support: SupportSet) -> None:
    """Catches an option accepted without validation, or an error not naming method and option."""
    bad_values = (
        {"prompting_type": "X"},
        {"prompting_branch": ""},
        {"prompt_depth": 0},
        {"prompt_length": 0},
        {"k_clusters": 0},
        {"hsf_alpha": 1.5},
        {"betas": [0.5]},
        {"lr": 0},
        {"layers": []},
        {"templates": []},
    )
    for bad in bad_values:
        key = next(iter(bad))
        with pytest.raises(MethodError, match=f"method 'adaclip': option '{key}'"):
            make(backbone, **bad)
    with pytest.raises(MethodError, match="method 'adaclip': unknown option"):
        make(backbone, depth=2)
    # the official defaults on the tiny model: clear errors, not an IndexError or a sklearn error
    with pytest.raises(MethodError, match=r"method 'adaclip': option 'prompt_depth' 4 .*text encoder"):
        make(backbone, prompt_depth=4, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'adaclip': option 'k_clusters' 20 exceeds the 16"):
        make(backbone, k_clusters=20, epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'adaclip': option 'prompt_depth' 5 exceeds"):
        make(backbone, prompt_depth=5, prompting_branch="V", epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'adaclip': option 'prompt_length' 8 .*end token"):
        make(backbone, prompt_length=8, object="x", epochs=0).fit(support)
    with pytest.raises(MethodError, match=r"method 'adaclip'.*layers"):
        make(backbone, layers=[7], epochs=0).fit(support)
    with pytest.raises(MethodError, match="method 'adaclip': predict"):
        make(backbone).predict(support.items)
