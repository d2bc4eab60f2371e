"""The toolkit's forward variants, trainable passes and deep text prompts (bench/kit), on the tiny
random-init backbone (64 px, 16-px patches: a 4 x 4 grid, 4 blocks of width 64, 2 heads).

Every formula is checked against a reference written out here from open_clip's own modules
(blocks, packed attention weights), so a wrong formula in the toolkit fails a test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, random_items

import bench.kit.variants as variants_module
from bench.errors import BackboneError
from bench.kit.clip import Backbone
from bench.kit.requests import FeatureRequest, Features
from bench.kit.tower import AttentionWeights, VisionTower
from bench.kit.trainable import TrainablePass
from bench.kit.variants import ForwardVariant, get_variant, register_variant, variant_names, vv_attention
from bench.types import ImageItem
from bench.weights import BackboneSpec, load_backbone

#: Tolerance for comparing cached (fp16-rounded) features with fp32 references.
FP16_ATOL = 5e-3


def make_items(n: int, seed: int) -> list[ImageItem]:
    return random_items(n, seed, (40, 56), prefix="kv", key_prefix="kit-variants")


def new_backbone(cache_dir: Path, **kwargs) -> Backbone:
    return load_backbone(BackboneSpec(TINY_MODEL, "none", cache_dir=cache_dir, device="cpu", **kwargs))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return new_backbone(tmp_path_factory.mktemp("kit-variants-cache"), batch_size=4)


def preprocessed(backbone: Backbone, items: list[ImageItem], size: int | None = None) -> torch.Tensor:
    return torch.stack([backbone.preprocess(item.rgb(), size) for item in items])


def reference_streams(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """[x_0, x_1, ..., x_depth]: x_b is the stream ENTERING block b (x_depth: after the last),
    computed with open_clip's own embedding and blocks."""
    visual = backbone._visual
    with torch.no_grad():
        x = visual._embeds(images)
        streams = [x]
        for block in visual.transformer.resblocks:
            x = block(x)
            streams.append(x)
    return streams


def hand_vv_attention(tokens: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """out_proj(softmax(v_h v_h^T / sqrt(d)) v_h), head by head, from the packed in_proj weights."""
    width = tokens.shape[-1]
    heads = attn.num_heads
    d = width // heads
    w_v = attn.in_proj_weight[2 * width : 3 * width]
    b_v = attn.in_proj_bias[2 * width : 3 * width]
    v = tokens @ w_v.T + b_v
    per_head = []
    for h in range(heads):
        vh = v[..., h * d : (h + 1) * d]
        weights = torch.softmax(vh @ vh.transpose(-2, -1) / math.sqrt(d), dim=-1)
        per_head.append(weights @ vh)
    merged = torch.cat(per_head, dim=-1)
    return merged @ attn.out_proj.weight.T + attn.out_proj.bias


def weights_snapshot(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in backbone.model.state_dict().items()}


def assert_unchanged(backbone: Backbone, snapshot: dict[str, torch.Tensor]) -> None:
    now = backbone.model.state_dict()
    assert set(now) == set(snapshot)
    for name, value in snapshot.items():
        assert now[name].shape == value.shape and torch.equal(now[name], value), name


def assert_no_backbone_grad(backbone: Backbone) -> None:
    offenders = [
        name for name, p in backbone.model.named_parameters() if p.grad is not None or p.requires_grad
    ]
    assert offenders == []


# --------------------------------------------------------------------------- vv-attention


def test_vv_attention_matches_a_hand_computation_from_the_packed_weights(backbone: Backbone) -> None:
    """q = k = v = the value projection (rows 2W:3W of in_proj), per-head softmax, out_proj."""
    block = 1
    tower = backbone.tower()
    images = preprocessed(backbone, make_items(2, seed=1))
    x_b = reference_streams(backbone, images)[block]
    resblock = backbone._visual.transformer.resblocks[block]
    with torch.no_grad():
        tokens = resblock.ln_1(x_b)
        expected = hand_vv_attention(tokens, resblock.attn)
        got = vv_attention(tokens, tower.attention(block))
    assert got.shape == x_b.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # not the block's ordinary attention (q, k and v differ there)
    with torch.no_grad():
        ordinary = resblock.attn(tokens, tokens, tokens, need_weights=False)[0]
    assert (got - ordinary).abs().max() > 1e-3


def test_vv_attention_is_mha_with_query_and_key_weights_set_to_the_value_weights() -> None:
    """An independent reference: torch's MultiheadAttention whose q, k, v projections are all W_v
    (random weights AND biases, so a dropped bias, wrong row block or wrong scale shows)."""
    torch.manual_seed(0)
    width, heads = 12, 3
    in_weight = torch.randn(3 * width, width)
    in_bias = torch.randn(3 * width)
    out_weight, out_bias = torch.randn(width, width), torch.randn(width)
    weights = AttentionWeights(in_weight, in_bias, out_weight, out_bias, heads)
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(in_weight[2 * width :].repeat(3, 1))
        mha.in_proj_bias.copy_(in_bias[2 * width :].repeat(3))
        mha.out_proj.weight.copy_(out_weight)
        mha.out_proj.bias.copy_(out_bias)
        tokens = torch.randn(2, 7, width)
        expected = mha(tokens, tokens, tokens, need_weights=False)[0]
        got = vv_attention(tokens, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    no_bias = AttentionWeights(in_weight, None, out_weight, None, heads)
    with torch.no_grad():
        mha.in_proj_bias.zero_()
        mha.out_proj.bias.zero_()
        torch.testing.assert_close(
            vv_attention(tokens, no_bias),
            mha(tokens, tokens, tokens, need_weights=False)[0],
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("start", [0, 2])
def test_vv_tokens_accumulate_over_the_original_stream(backbone: Backbone, start: int) -> None:
    """x_vv after block b >= s is x_s + sum_{s <= b' <= b} vv(ln_1(x_b')), x_b' the ORIGINAL stream
    entering block b' (no FFN on the new path); blocks before s give the original tokens; embeds
    come from the original path."""
    items = make_items(3, seed=2)
    images = preprocessed(backbone, items)
    streams = reference_streams(backbone, images)
    blocks = backbone._visual.transformer.resblocks
    expected_by_block: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        x_vv = streams[start]
        for b in range(backbone.depth):
            if b < start:
                expected_by_block[b] = streams[b + 1][:, 1:]
            else:
                x_vv = x_vv + hand_vv_attention(blocks[b].ln_1(streams[b]), blocks[b].attn)
                expected_by_block[b] = x_vv[:, 1:]
        reference_embeds = backbone.model.encode_image(images)
    layers = tuple(range(backbone.depth))
    expected = torch.stack([expected_by_block[b] for b in layers], dim=1)
    request = FeatureRequest.of("vv-attention", layers=layers, start=start)
    resolved = backbone.resolve(request)
    assert resolved.layers is not None
    with torch.inference_mode():
        fresh = get_variant("vv-attention").compute(backbone.tower(), images, resolved.layers, resolved)
    torch.testing.assert_close(fresh["vv_tokens"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh["embeds"], reference_embeds, atol=1e-5, rtol=1e-5)
    cached = backbone.features(items, request)
    assert set(cached) == {"embeds", "cls_token", "vv_tokens"}
    # the original path's raw class token after the last block, no ln_post (AnomalyCLIP's global feature)
    final_standard = backbone.features(items, FeatureRequest.of("standard", layers=[backbone.depth - 1]))
    torch.testing.assert_close(cached.cls_token, final_standard.cls_tokens[:, 0], atol=0, rtol=0)
    assert cached.vv_tokens.shape == (3, backbone.depth, backbone.n_patches, backbone.width)
    torch.testing.assert_close(cached.vv_tokens, expected, atol=FP16_ATOL, rtol=1e-2)
    standard = backbone.features(items, FeatureRequest.of("standard", layers=layers))
    torch.testing.assert_close(cached.embeds, standard.embeds, atol=2e-3, rtol=0)
    for j, b in enumerate(layers):
        if b < start:
            torch.testing.assert_close(cached.vv_tokens[:, j], standard.patch_tokens[:, j], atol=2e-3, rtol=0)
        else:  # the parallel path really is another stream
            assert (cached.vv_tokens[:, j] - standard.patch_tokens[:, j]).abs().max() > 1e-2


def test_vv_attention_requests_are_checked(backbone: Backbone) -> None:
    with pytest.raises(BackboneError, match="needs the option start"):
        backbone.features(make_items(1, seed=3), FeatureRequest.of("vv-attention"))
    with pytest.raises(BackboneError, match=r"outside 0\.\.3"):
        backbone.resolve(FeatureRequest.of("vv-attention", start=4))
    with pytest.raises(BackboneError, match="unknown forward variant 'no-such-variant'"):
        backbone.resolve(FeatureRequest.of("no-such-variant"))


# --------------------------------------------------------------------------- stream + TrainablePass


@pytest.mark.parametrize("start", [0, 2])
def test_prefix_then_blocks_reproduces_the_standard_features(backbone: Backbone, start: int) -> None:
    items = make_items(3, seed=4)
    layers = tuple(b for b in backbone.layers if b >= start)
    tower_pass = TrainablePass(backbone, start, layers=layers)
    prefix = tower_pass.prefix(items)
    assert prefix.shape == (3, 1 + backbone.n_patches, backbone.width)
    streams = reference_streams(backbone, preprocessed(backbone, items))
    torch.testing.assert_close(prefix, streams[start], atol=FP16_ATOL, rtol=1e-2)
    with torch.no_grad():
        out = tower_pass(prefix)
    standard = backbone.features(items, FeatureRequest.of("standard", layers=layers))
    assert out.patch_tokens.shape == standard.patch_tokens.shape
    torch.testing.assert_close(out.patch_tokens, standard.patch_tokens, atol=FP16_ATOL, rtol=1e-2)
    torch.testing.assert_close(out.cls_tokens, standard.cls_tokens, atol=FP16_ATOL, rtol=1e-2)
    torch.testing.assert_close(out.embeds, standard.embeds, atol=FP16_ATOL, rtol=1e-2)
    torch.testing.assert_close(out.final_tokens, streams[-1], atol=FP16_ATOL, rtol=1e-2)


def test_trainable_pass_refuses_layers_before_its_start(backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="start before the trainable block 2"):
        TrainablePass(backbone, 2, layers=(1, 3))
    with pytest.raises(BackboneError, match=r"outside 0\.\.3"):
        TrainablePass(backbone, 4, layers=(3,))


def test_hook_changes_only_later_blocks_and_gets_the_gradient(backbone: Backbone) -> None:
    hooked_block = 2
    items = make_items(2, seed=5)
    tower_pass = TrainablePass(backbone, 0, layers=(0, 1, 2, 3))
    prefix = tower_pass.prefix(items)
    shift = torch.nn.Parameter(0.5 * torch.randn(backbone.width, generator=torch.Generator().manual_seed(0)))
    seen: list[tuple[int, tuple[int, ...]]] = []

    def hook(block: int, tokens: torch.Tensor) -> torch.Tensor:
        seen.append((block, tuple(tokens.shape)))
        return tokens + shift

    plain = tower_pass(prefix)
    hooked = tower_pass(prefix, hooks={hooked_block: hook})
    assert seen == [(hooked_block, (2, 1 + backbone.n_patches, backbone.width))]
    for j, b in enumerate(tower_pass.layers):
        same = torch.equal(hooked.patch_tokens[:, j], plain.patch_tokens[:, j])
        assert same == (b < hooked_block), f"block {b}"
    # the hook's output is what the next block reads: block 2's output is exactly shifted
    torch.testing.assert_close(hooked.patch_tokens[:, 2], plain.patch_tokens[:, 2] + shift.detach())
    (hooked.patch_tokens.sum() + hooked.embeds.pow(2).sum()).backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0
    assert_no_backbone_grad(backbone)


def test_visual_prompts_change_only_later_blocks_and_are_never_returned(backbone: Backbone) -> None:
    items = make_items(2, seed=6)
    tower_pass = TrainablePass(backbone, 0, layers=(0, 1, 2, 3))
    prefix = tower_pass.prefix(items)
    generator = torch.Generator().manual_seed(1)
    first = torch.nn.Parameter(torch.randn(3, backbone.width, generator=generator))
    second = torch.nn.Parameter(torch.randn(2, 2, backbone.width, generator=generator))  # per image
    plain = tower_pass(prefix)
    out = tower_pass(prefix, prompts={1: first, 3: second})
    n = backbone.n_patches
    assert out.patch_tokens.shape == (2, 4, n, backbone.width)  # prompt tokens never returned
    assert out.cls_tokens.shape == (2, 4, backbone.width)
    assert out.final_tokens.shape == (2, 1 + n, backbone.width)
    assert torch.equal(out.patch_tokens[:, 0], plain.patch_tokens[:, 0])
    for j in (1, 2, 3):
        assert (out.patch_tokens[:, j] - plain.patch_tokens[:, j]).abs().max() > 1e-3
    # reference: prompts appended at the end of the stream before their block, a later set
    # REPLACING an earlier one, written with open_clip's blocks
    blocks = backbone._visual.transformer.resblocks
    x = prefix
    collected = []
    for b, block in enumerate(blocks):
        if b == 1:
            x = torch.cat([x[:, : 1 + n], first.unsqueeze(0).expand(2, -1, -1)], dim=1)
        if b == 3:
            x = torch.cat([x[:, : 1 + n], second], dim=1)
        x = block(x)
        collected.append(x[:, 1 : 1 + n])
    torch.testing.assert_close(out.patch_tokens, torch.stack(collected, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embeds, backbone._visual.ln_post(x[:, 0]) @ backbone._visual.proj)
    # the tower's own run keeps the prompts at the end of its final stream
    run = tower_pass.tower.run_blocks(prefix, 0, prompts={1: first})
    assert run.tokens.shape == (2, 1 + n + 3, backbone.width) and run.n_prompts == 3
    out.patch_tokens.sum().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert second.grad is not None and second.grad.abs().sum() > 0
    assert_no_backbone_grad(backbone)


def test_prompts_and_hooks_outside_the_blocks_run_are_refused(backbone: Backbone) -> None:
    tower = backbone.tower()
    tokens = torch.zeros(1, 1 + backbone.n_patches, backbone.width)
    with pytest.raises(ValueError, match=r"blocks \[1\] are outside the blocks run \(2..3\)"):
        tower.run_blocks(tokens, 2, prompts={1: torch.zeros(1, backbone.width)})
    with pytest.raises(ValueError, match=r"blocks \[0\] are outside"):
        tower.run_blocks(tokens, 1, hooks={0: lambda b, t: t})


# --------------------------------------------------------------------------- input size


def test_input_size_request_gives_a_larger_grid_without_touching_the_model(backbone: Backbone) -> None:
    visual = backbone._visual
    before = weights_snapshot(backbone)
    positional = visual.positional_embedding
    items = make_items(2, seed=7)
    request = FeatureRequest.of("standard", input_size=96)
    feats = backbone.features(items, request)
    assert feats.grid == (6, 6)
    assert feats.patch_tokens.shape == (2, len(backbone.layers), 36, backbone.width)
    assert backbone.tower(96).grid == (6, 6) and not backbone.tower(96).native
    # the shared model and the run's own tower are untouched
    assert_unchanged(backbone, before)
    assert visual.positional_embedding is positional and positional.shape == (17, backbone.width)
    assert tuple(visual.grid_size) == (4, 4) and backbone.grid == (4, 4) and backbone.input_size == 64
    standard = backbone.image_features(items)
    assert standard.patch_tokens.shape[2] == 16
    # the resized positional embedding: class token kept, grid resampled (bicubic, antialiased)
    resized = backbone.tower(96)._positional
    assert resized.shape == (37, backbone.width)
    assert torch.equal(resized[0], positional[0].detach())
    grid = positional.detach()[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(resized[1:], expected.permute(0, 2, 3, 1).reshape(36, -1))
    # the 96-px features are a different cache entry
    resolved = backbone.resolve(request)
    folder = backbone._cache_for(resolved).folder
    assert folder != backbone.cache.folder
    config = json.loads((folder / "config.json").read_text())
    assert config["input_size"] == 96 and config["grid"] == [6, 6] and "96x96" in config["preprocessing"]
    with pytest.raises(BackboneError, match="not a multiple of the patch size"):
        backbone.resolve(FeatureRequest.of("standard", input_size=90))


def test_resized_and_native_positional_embeddings_do_not_share_a_cache(tmp_path: Path) -> None:
    native = new_backbone(tmp_path, input_size=96)  # its own (random) 6 x 6 positional embedding
    resized = new_backbone(tmp_path)  # 4 x 4, resized to 6 x 6 for the request
    request = resized.resolve(FeatureRequest.of("standard", input_size=96))
    items = make_items(1, seed=12)
    native_feats = native.image_features(items)
    fresh = new_backbone(tmp_path / "fresh").features(items, request)
    assert not torch.equal(native_feats.patch_tokens, fresh.patch_tokens)  # they really differ
    assert resized._cache_for(request).folder != native.cache.folder


def variant_requests(size: int | None = None) -> list[FeatureRequest]:
    return [
        FeatureRequest.of("standard", input_size=size),
        FeatureRequest.of("standard", layers=(1, 2), input_size=size),
        FeatureRequest.of("windows", input_size=size, scales=[2, 3], stride=1),
        FeatureRequest.of("windows", layers=(0, 1), input_size=size, scales=[2], stride=2),
        FeatureRequest.of("vv-attention", input_size=size, start=1),
        FeatureRequest.of("stream", input_size=size, block=2),
    ]


@pytest.mark.parametrize("size", [None, 96])
def test_no_variant_mutates_the_shared_model(tmp_path: Path, size: int | None) -> None:
    backbone = new_backbone(tmp_path)
    items = make_items(2, seed=8)
    reference = backbone.image_features(items)
    before = weights_snapshot(backbone)
    for request in variant_requests(size):
        backbone.features(items, request)
        assert_unchanged(backbone, before)
    # a fresh cache folder: the standard features are still what they were
    again = new_backbone(tmp_path / "again").image_features(items)
    assert torch.equal(again.patch_tokens, reference.patch_tokens)


# --------------------------------------------------------------------------- caching


@pytest.mark.parametrize("size", [None, 96])
def test_every_variant_is_bit_identical_cold_and_warm(tmp_path: Path, size: int | None) -> None:
    backbone = new_backbone(tmp_path, batch_size=2)
    items = make_items(3, seed=9)
    for request in variant_requests(size):
        resolved = backbone.resolve(request)
        cold = backbone.features(items, request)
        assert backbone.encoded_by_request[resolved] == 3, request
        hits = backbone.cache_stats().hits
        warm = backbone.features(items, request)
        assert backbone.encoded_by_request[resolved] == 3, request  # nothing recomputed
        assert backbone.cache_stats().hits == hits + 3, request
        assert list(cold) == list(warm)
        for name in cold:
            assert cold[name].dtype == torch.float32 and not cold[name].is_inference()
            assert torch.equal(cold[name], warm[name]), (request, name)
        # what a new process reads back from disk is what the cold call returned
        reread = new_backbone(tmp_path, batch_size=2).features(items, request)
        for name in cold:
            assert torch.equal(cold[name], reread[name]), (request, name)
    assert backbone.n_encoded == (3 if size is None else 0)  # only the run's standard request counts


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (FeatureRequest.of("vv-attention", start=1), FeatureRequest.of("vv-attention", start=2)),
        (FeatureRequest.of("stream", block=1), FeatureRequest.of("stream", block=2)),
        (
            FeatureRequest.of("windows", scales=[2], stride=1),
            FeatureRequest.of("windows", scales=[2], stride=2),
        ),
        (FeatureRequest.of("standard"), FeatureRequest.of("standard", layers=(0, 3))),
    ],
)
def test_requests_differing_in_one_option_use_different_folders(
    tmp_path: Path, a: FeatureRequest, b: FeatureRequest
) -> None:
    backbone = new_backbone(tmp_path)
    items = make_items(1, seed=10)
    fa, fb = backbone.features(items, a), backbone.features(items, b)
    folder_a = backbone._cache_for(backbone.resolve(a)).folder
    folder_b = backbone._cache_for(backbone.resolve(b)).folder
    assert folder_a != folder_b
    assert (folder_a / "config.json").is_file() and (folder_b / "config.json").is_file()
    assert any(not torch.equal(fa[name], fb[name]) or fa[name].shape != fb[name].shape for name in fa)


def test_a_request_is_the_same_however_it_is_spelled(backbone: Backbone) -> None:
    """Option order, list vs tuple and layer order do not make a new cache entry."""
    a = FeatureRequest.of("windows", layers=[3, 0], scales=[2, 3], stride=1)
    b = FeatureRequest.of("windows", layers=(0, 3), stride=1, scales=(2, 3))
    assert a == b and hash(a) == hash(b)
    assert a.option("scales") == (2, 3) and a.option("missing", 7) == 7


# --------------------------------------------------------------------------- deep text prompts

TEXTS = ["a photo of a normal breast ultrasound image.", "a tumor", "x"]


def hand_text_forward(
    backbone: Backbone,
    embeddings: torch.Tensor,
    ids: torch.Tensor,
    prompts: dict[int, torch.Tensor],
    start: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """open_clip's text forward with deep prompts written into the stream entering each block;
    returns the pooled projected output and the stream entering each block."""
    model = backbone.model
    x = embeddings + model.positional_embedding
    entering = []
    for layer, block in enumerate(model.transformer.resblocks):
        if layer in prompts:
            prompt = prompts[layer]
            prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1) if prompt.dim() == 2 else prompt
            x = torch.cat([x[:, :start], prompt, x[:, start + prompt.shape[1] :]], dim=1)
        entering.append(x)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return pooled @ model.text_projection, entering


def test_deep_prompts_none_is_the_plain_path(backbone: Backbone) -> None:
    ids = backbone.tokenize(TEXTS)
    emb = backbone.token_embeddings(ids)
    plain = backbone.encode_embeddings(emb, ids)
    assert torch.equal(backbone.encode_embeddings(emb, ids, deep_prompts=None), plain)
    assert torch.equal(backbone.encode_embeddings(emb, ids, deep_prompts={}), plain)
    torch.testing.assert_close(plain, backbone.encode_text(TEXTS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deep_start", [1, 3])
def test_deep_prompt_replaces_exactly_its_positions(backbone: Backbone, deep_start: int) -> None:
    ids = backbone.tokenize(TEXTS)
    emb = backbone.token_embeddings(ids)
    with torch.no_grad():
        _, entering = hand_text_forward(backbone, emb, ids, {}, deep_start)
    # the stream's own values as the prompt: nothing changes (right layer, right positions)
    own = entering[1][:, deep_start : deep_start + 4].clone()
    torch.testing.assert_close(
        backbone.encode_embeddings(emb, ids, deep_prompts={1: own}, deep_start=deep_start),
        backbone.encode_embeddings(emb, ids),
        atol=1e-5,
        rtol=1e-5,
    )
    # other values: exactly what writing them into those positions entering block 1 gives
    prompt = torch.randn(4, backbone.text_width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = hand_text_forward(backbone, emb, ids, {1: prompt}, deep_start)
    got = backbone.encode_embeddings(emb, ids, deep_prompts={1: prompt}, deep_start=deep_start)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - backbone.encode_embeddings(emb, ids)).abs().max() > 1e-3
    # a prompt one position off gives another result
    with torch.no_grad():
        shifted, _ = hand_text_forward(backbone, emb, ids, {1: prompt}, deep_start + 1)
    assert (got - shifted).abs().max() > 1e-4


def test_deep_prompt_gradients_reach_the_prompt_only(backbone: Backbone) -> None:
    ids = backbone.tokenize(TEXTS)
    context = torch.nn.Parameter(backbone.token_embeddings(ids).clone())
    prompt = torch.nn.Parameter(
        torch.randn(2, backbone.text_width, generator=torch.Generator().manual_seed(3))
    )
    before = weights_snapshot(backbone)
    backbone.encode_embeddings(context, ids, deep_prompts={1: prompt}).pow(2).sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert_no_backbone_grad(backbone)
    assert_unchanged(backbone, before)


def test_deep_prompts_are_checked(backbone: Backbone) -> None:
    ids = backbone.tokenize(TEXTS)
    emb = backbone.token_embeddings(ids)
    prompt = torch.zeros(2, backbone.text_width)
    with pytest.raises(ValueError, match=r"deep prompt layers \[0\] are outside 1..1"):
        backbone.encode_embeddings(emb, ids, deep_prompts={0: prompt})
    with pytest.raises(ValueError, match="does not fit"):
        backbone.encode_embeddings(emb, ids, deep_prompts={1: torch.zeros(80, backbone.text_width)})


# --------------------------------------------------------------------------- plugin variants


class MeanPatch(ForwardVariant):
    """A plugin's variant: the mean of the final block's patch tokens."""

    name = "test-mean-patch"

    def fields(self, tower: VisionTower, layers: tuple[int, ...], request: FeatureRequest) -> dict:
        return {"mean_patch": (tower.width,)}

    def compute(
        self, tower: VisionTower, images: torch.Tensor, layers: tuple[int, ...], request: FeatureRequest
    ) -> dict[str, torch.Tensor]:
        return {"mean_patch": tower.run_blocks(tower.embed(images)).tokens[:, 1:].mean(dim=1)}


class OtherStandard(MeanPatch):
    name = "standard"


@pytest.fixture
def private_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Variants registered by a test disappear with it."""
    monkeypatch.setattr(variants_module, "_VARIANTS", dict(variants_module._VARIANTS))
    yield


@pytest.mark.usefixtures("private_registry")
def test_a_plugin_variant_is_served_and_cached(tmp_path: Path) -> None:
    assert "test-mean-patch" not in variant_names()
    register_variant(MeanPatch())
    register_variant(MeanPatch())  # the same class again is harmless (module re-import)
    assert "test-mean-patch" in variant_names()
    backbone = new_backbone(tmp_path)
    items = make_items(3, seed=11)
    request = FeatureRequest.of("test-mean-patch")
    feats = backbone.features(items, request)
    assert isinstance(feats, Features) and list(feats) == ["mean_patch"]
    expected = backbone.image_features(items).patch_tokens[:, -1].mean(dim=1)
    torch.testing.assert_close(feats.mean_patch, expected, atol=FP16_ATOL, rtol=1e-2)
    resolved = backbone.resolve(request)
    assert backbone.encoded_by_request[resolved] == 3
    again = backbone.features(items, request)
    assert backbone.encoded_by_request[resolved] == 3 and torch.equal(again.mean_patch, feats.mean_patch)
    config = json.loads((backbone._cache_for(resolved).folder / "config.json").read_text())
    assert config["variant"] == "test-mean-patch" and config["fields"] == {"mean_patch": [backbone.width]}


@pytest.mark.usefixtures("private_registry")
def test_a_taken_name_is_refused() -> None:
    standard = get_variant("standard")
    with pytest.raises(ValueError, match="'standard' is already registered"):
        register_variant(OtherStandard())
    assert get_variant("standard") is standard
    nameless = MeanPatch()
    nameless.name = ""
    with pytest.raises(ValueError, match="has no name"):
        register_variant(nameless)


def test_the_frozen_prefix_is_computed_once_whatever_blocks_a_pass_returns(tmp_path: Path) -> None:
    backbone = new_backbone(tmp_path)
    items = make_items(3, seed=21)
    first = TrainablePass(backbone, 2, layers=[2, 3])
    second = TrainablePass(backbone, 2, layers=[3])
    a = first.prefix(items)
    before = backbone.cache_stats()
    b = second.prefix(items)
    after = backbone.cache_stats()
    assert torch.equal(a, b)
    assert after.misses == before.misses and after.hits == before.hits + len(items)
    assert sum(backbone.encoded_by_request.values()) == len(items)


def test_bilinear_and_bicubic_position_resizes_are_different_features(tmp_path: Path) -> None:
    """AnomalyCLIP resizes the positional embedding bilinearly, open_clip bicubically: both are
    served, cached apart, and the run's own size ignores the mode (nothing is resized there)."""
    backbone = new_backbone(tmp_path)
    items = make_items(2, seed=31)
    bicubic = backbone.features(items, FeatureRequest.of("standard", input_size=96))
    bilinear = backbone.features(items, FeatureRequest.of("standard", input_size=96, resize="bilinear"))
    assert (bicubic.patch_tokens - bilinear.patch_tokens).abs().max() > 1e-3
    folders = {p.parent.name for p in tmp_path.rglob("config.json")}
    assert len(folders) == 2
    native = backbone.resolve(FeatureRequest.of("standard", resize="bilinear"))
    assert native == backbone.resolve(FeatureRequest.of("standard"))
    with pytest.raises(BackboneError, match="resize must be one of"):
        backbone.features(items, FeatureRequest.of("standard", input_size=96, resize="nearest"))
