"""Backbone, feature cache and weights handling, on the tiny random-init test model."""

from __future__ import annotations

import argparse
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.fileio as fileio
import bench.weights as weights_module
from bench.errors import BackboneError
from bench.feature_cache import (
    ENTRY_MAGIC,
    ENTRY_SUFFIX,
    FeatureCache,
    FeatureOverflowError,
    encode_entry,
    to_fp16,
)
from bench.kit.clip import default_layers
from bench.kit.requests import FeatureRequest, Features
from bench.kit.variants import get_variant
from bench.types import ImageItem
from bench.weights import RANDOM_INIT, BackboneSpec, load_backbone

TINY = "bench-tiny-vit"


def make_items(
    n: int, seed: int = 0, shape: tuple[int, int] = (48, 80), prefix: str = "img"
) -> list[ImageItem]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8) for _ in range(n)]
    return [
        ImageItem(id=f"{prefix}{i}", key=f"{prefix}-{seed}-{i:03d}", loader=lambda a=image: a)
        for i, image in enumerate(images)
    ]


def tiny(cache_dir: Path, **kwargs) -> object:
    spec = BackboneSpec(model=TINY, pretrained="none", cache_dir=cache_dir, device="cpu", **kwargs)
    return load_backbone(spec)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def backbone(cache_root: Path):
    return tiny(cache_root, batch_size=3)


def manual_block_outputs(backbone, items) -> list[torch.Tensor]:
    """Token sequences (B, 1+N, W) after every block, computed without forward_intermediates."""
    visual = backbone._visual
    x = torch.stack([backbone.preprocess(item.rgb()) for item in items])
    outputs = []
    with torch.no_grad():
        h = visual._embeds(x)
        for block in visual.transformer.resblocks:
            h = block(h)
            outputs.append(h.clone())
    return outputs


# -- layers, shapes, projections ----------------------------------------------------------
def test_default_layers_are_quarters(backbone) -> None:
    assert default_layers(24) == (5, 11, 17, 23)
    assert default_layers(12) == (2, 5, 8, 11)
    assert backbone.layers == (0, 1, 2, 3)
    assert backbone.identity.layers == backbone.layers
    assert backbone.identity.weights == RANDOM_INIT
    assert backbone.identity.input_size == 64


def test_attributes_and_shapes(backbone) -> None:
    assert (backbone.embed_dim, backbone.width, backbone.text_width) == (32, 64, 64)
    assert backbone.grid == (4, 4)
    assert backbone.input_size == 64
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.model.parameters())
    items = make_items(5, seed=1)
    feats = backbone.image_features(items)
    assert isinstance(feats, Features)
    assert feats.grid == (4, 4) and feats.layers == backbone.layers and len(feats) == 5
    assert set(feats) == {"embeds", "cls_tokens", "patch_tokens"}
    assert feats["patch_tokens"] is feats.patch_tokens
    assert feats.embeds.shape == (5, 32)
    assert feats.cls_tokens.shape == (5, 4, 64)
    assert feats.patch_tokens.shape == (5, 4, 16, 64)
    for t in (feats.embeds, feats.cls_tokens, feats.patch_tokens):
        assert t.dtype == torch.float32
        assert t.device == backbone.device
        assert not t.is_inference()


def test_chosen_layers_are_the_right_blocks_and_differ(backbone) -> None:
    items = make_items(2, seed=2)
    feats = backbone.image_features(items)
    blocks = manual_block_outputs(backbone, items)
    for j, layer in enumerate(backbone.layers):
        expected = blocks[layer]
        torch.testing.assert_close(feats.cls_tokens[:, j], expected[:, 0], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(feats.patch_tokens[:, j], expected[:, 1:], rtol=2e-3, atol=2e-3)
    for a in range(len(backbone.layers)):
        for b in range(a + 1, len(backbone.layers)):
            gap = (feats.patch_tokens[:, a] - feats.patch_tokens[:, b]).abs().max().item()
            assert gap > 1e-2, f"layers {backbone.layers[a]} and {backbone.layers[b]} gave the same tokens"


def test_custom_layers_are_sorted_and_validated(tmp_path: Path) -> None:
    bb = tiny(tmp_path, layers=(3, 1))
    assert bb.layers == (1, 3)
    items = make_items(2, seed=3)
    feats = bb.image_features(items)
    blocks = manual_block_outputs(bb, items)
    torch.testing.assert_close(feats.patch_tokens[:, 0], blocks[1][:, 1:], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(feats.patch_tokens[:, 1], blocks[3][:, 1:], rtol=2e-3, atol=2e-3)
    for bad in [(4,), (1, 1), (-1,), ()]:
        with pytest.raises(BackboneError):
            tiny(tmp_path, layers=bad)


def test_project_tokens_of_final_cls_is_the_image_embedding(backbone) -> None:
    items = make_items(3, seed=4)
    assert backbone.layers[-1] == backbone.depth - 1
    feats = backbone.image_features(items)
    projected = backbone.project_tokens(feats.cls_tokens[:, -1])
    # cached values are fp16-rounded, hence the tolerance
    torch.testing.assert_close(projected, feats.embeds, rtol=1e-2, atol=1e-2)
    # exact in fp32: encode_image == ln_post(final class token) @ proj
    x = torch.stack([backbone.preprocess(item.rgb()) for item in items])
    with torch.no_grad():
        final_cls = manual_block_outputs(backbone, items)[-1][:, 0]
        torch.testing.assert_close(
            backbone.model.encode_image(x), backbone.project_tokens(final_cls), rtol=1e-5, atol=1e-5
        )
    # any leading shape
    assert backbone.project_tokens(feats.patch_tokens).shape == (3, 4, 16, 32)


def test_preprocess_keeps_the_whole_image(backbone) -> None:
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    image[:, :30] = 255  # a bright strip at the far left, lost by a centre crop
    x = backbone.preprocess(image)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    mean = torch.tensor(backbone.mean).view(3, 1)
    std = torch.tensor(backbone.std).view(3, 1)
    left = x[:, :, 0] * std + mean
    right = x[:, :, -1] * std + mean
    torch.testing.assert_close(left, torch.ones_like(left), atol=1e-3, rtol=0)
    torch.testing.assert_close(right, torch.zeros_like(right), atol=1e-3, rtol=0)
    grey = backbone.preprocess(np.full((20, 30), 128, dtype=np.uint8))
    assert grey.shape == (3, 64, 64)
    assert "whole-image" in backbone.preprocessing_id and "bicubic" in backbone.preprocessing_id


# -- feature cache ----------------------------------------------------------------------
def test_cache_hits_and_no_reencoding(cache_root: Path) -> None:
    bb = tiny(cache_root)
    items = make_items(4, seed=5)
    first = bb.image_features(items)
    assert bb.n_encoded == 4 and bb.cache_misses == 4 and bb.cache_hits == 0
    second = bb.image_features(items[::-1])
    assert bb.n_encoded == 4 and bb.cache_hits == 4
    assert torch.equal(second.patch_tokens, first.patch_tokens.flip(0))
    # a fresh instance on the same folder reads everything back, bit-identical
    other = tiny(cache_root)
    third = other.image_features(items)
    assert other.n_encoded == 0 and other.cache_hits == 4 and other.cache_misses == 0
    assert torch.equal(third.embeds, first.embeds) and torch.equal(third.patch_tokens, first.patch_tokens)
    # duplicates in one call are encoded once
    fresh = make_items(2, seed=6)
    bb.image_features([fresh[0], fresh[1], fresh[0]])
    assert bb.n_encoded == 6


def test_cache_stats_sum_every_cache_and_n_encoded_counts_the_standard_request(tmp_path: Path) -> None:
    bb = tiny(tmp_path)
    items = make_items(2, seed=13)
    bb.image_features(items)
    stream = FeatureRequest.of("stream", block=2)
    bb.features(items, stream)
    bb.features(items, stream)
    assert bb.n_encoded == 2
    assert bb.encoded_by_request == {bb.resolve(FeatureRequest()): 2, bb.resolve(stream): 2}
    stats = bb.cache_stats()
    assert (stats.hits, stats.misses, stats.writes) == (2, 4, 4)
    assert (bb.cache.stats().hits, bb.cache.stats().misses) == (0, 2)  # the standard request's own
    # a cache registered for other frozen outputs is counted too
    bb.register_cache({"kind": "test-views"}, 3, "views").put("k", np.ones(3))
    assert bb.cache_stats().writes == 5
    # the run's request spelled out explicitly is the run's request
    bb.features(make_items(1, seed=14), FeatureRequest.of("standard", layers=bb.layers, input_size=64))
    assert bb.n_encoded == 3


def test_cache_batches_misses(backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    variant = get_variant("standard")
    original = variant.compute

    def spy(tower, images, layers, request):
        calls.append(len(images))
        return original(tower, images, layers, request)

    monkeypatch.setattr(variant, "compute", spy)
    before = backbone.encoded_by_request.get(backbone.resolve(FeatureRequest()), 0)
    backbone.image_features(make_items(7, seed=7))
    assert calls == [3, 3, 1]
    assert backbone.encoded_by_request[backbone.resolve(FeatureRequest())] == before + 7


def test_cache_folders_depend_on_config(tmp_path: Path) -> None:
    a = tiny(tmp_path)
    b = tiny(tmp_path, input_size=96)
    c = tiny(tmp_path, layers=(1, 3))
    d = tiny(tmp_path)
    assert len({a.cache.folder, b.cache.folder, c.cache.folder}) == 3
    assert d.cache.folder == a.cache.folder
    assert b.grid == (6, 6) and b.input_size == 96 and b.identity.input_size == 96
    items = make_items(1, seed=8)
    assert b.image_features(items).patch_tokens.shape == (1, 4, 36, 64)
    config = json.loads((b.cache.folder / "config.json").read_text())
    assert config["input_size"] == 96 and config["weights"] == RANDOM_INIT
    assert config["preprocessing"] == b.preprocessing_id and config["layers"] == [0, 1, 2, 3]


def test_cache_files_are_checked_fp16_entries(tmp_path: Path) -> None:
    bb = tiny(tmp_path)
    item = make_items(1, seed=9)[0]
    fresh = bb.image_features([item])
    path = bb.cache.path_for(item.key)
    assert path.is_file() and path.suffix == ENTRY_SUFFIX
    assert path.read_bytes().startswith(ENTRY_MAGIC)
    stored = bb.cache.get(item.key)
    assert stored is not None and stored.dtype == np.float16 and stored.shape == (bb.cache.length,)
    assert not stored.flags.writeable
    assert not list(path.parent.glob("*.tmp"))
    assert torch.equal(tiny(tmp_path).image_features([item]).patch_tokens, fresh.patch_tokens)


def _overwrite(path: Path, start: int, junk: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[start : start + len(junk)] = junk
    path.write_bytes(bytes(data))


def _set_last_value_to_nan(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2:] = np.array([np.nan], dtype="<f2").tobytes()  # the checksum is left as it was
    path.write_bytes(bytes(data))


#: name -> damage(entry path, the cache, the entry of another image)
CACHE_DAMAGES = {
    "garbage": lambda path, cache, other: path.write_bytes(b"not a cache entry"),
    "truncate": lambda path, cache, other: path.write_bytes(path.read_bytes()[:200]),
    "wrong_length": lambda path, cache, other: path.write_bytes(
        encode_entry(path.stem, np.zeros(10, dtype=np.float16))
    ),
    "nan": lambda path, cache, other: _set_last_value_to_nan(path),
    "damaged_header": lambda path, cache, other: _overwrite(path, 10, b"(((("),
    "other_image": lambda path, cache, other: path.write_bytes(other.read_bytes()),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGES))
def test_corrupt_cache_entry_is_recomputed(tmp_path: Path, damage: str) -> None:
    bb = tiny(tmp_path)
    item, other = make_items(2, seed=10)
    good = bb.image_features([item, other])
    CACHE_DAMAGES[damage](bb.cache.path_for(item.key), bb.cache, bb.cache.path_for(other.key))
    again = tiny(tmp_path)
    feats = again.image_features([item])
    assert again.n_encoded == 1
    stats = again.cache_stats()
    assert stats.corrupt == 1 and stats.misses == 1 and stats.corrupt_keys == [item.key]
    assert torch.equal(feats.patch_tokens, good.patch_tokens[:1])
    third = tiny(tmp_path)
    third.image_features([item])
    assert third.n_encoded == 0 and third.cache_hits == 1


def test_full_disk_leaves_the_run_uncached_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    items = make_items(3, seed=15)
    expected = tiny(tmp_path / "roomy").image_features(items)

    def no_space(fd: int, payload: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "_write_all", no_space)
    bb = tiny(tmp_path / "full", batch_size=2)
    with caplog.at_level("WARNING", logger="bench.feature_cache"):
        first = bb.image_features(items)
        second = bb.image_features(items)
    assert torch.equal(first.patch_tokens, expected.patch_tokens)
    assert torch.equal(second.embeds, expected.embeds)
    assert bb.n_encoded == 6 and bb.cache_stats().writes == 0  # nothing was stored: encoded twice
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(bb.cache.folder) in warning and "free disk space" in warning
    assert not [p for p in (tmp_path / "full").rglob("*") if p.is_file()]


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    assert to_fp16(np.array([300.0, -65000.0])).dtype == np.float16
    for bad in ([1e6], [np.inf], [np.nan]):
        with pytest.raises(FeatureOverflowError):
            to_fp16(np.array(bad))
    cache = FeatureCache(tmp_path, {"model": "x"}, length=2)
    with pytest.raises(FeatureOverflowError):
        cache.put("k", np.array([1.0, 7e4]))
    assert cache.get("k") is None


def test_unsafe_keys_are_hashed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"model": "x"}, length=3)
    cache.put("../../etc/passwd", np.ones(3))
    path = cache.path_for("../../etc/passwd")
    assert path.is_file() and cache.folder in path.parents
    np.testing.assert_array_equal(cache.get("../../etc/passwd"), np.ones(3, dtype=np.float16))


# -- determinism ----------------------------------------------------------------------------
def test_random_init_is_deterministic_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = tiny(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_draw)
    b = tiny(tmp_path / "b")
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    items = make_items(2, seed=11)
    fa, fb = a.image_features(items), b.image_features(items)
    assert a.n_encoded == 2 and b.n_encoded == 2
    assert torch.equal(fa.embeds, fb.embeds) and torch.equal(fa.patch_tokens, fb.patch_tokens)


# -- text side and prompt-learning access ----------------------------------------------------
TEXTS = ["a photo of a normal breast ultrasound image.", "a tumor", "x"]


def test_encode_embeddings_matches_encode_text(backbone) -> None:
    ids = backbone.tokenize(TEXTS)
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    emb = backbone.token_embeddings(ids)
    assert emb.shape == (3, 77, backbone.text_width)
    reference = backbone.encode_text(TEXTS)
    assert reference.shape == (3, backbone.embed_dim)
    torch.testing.assert_close(backbone.encode_embeddings(emb, ids), reference, rtol=1e-5, atol=1e-5)


def test_gradients_reach_embeddings_not_backbone(backbone) -> None:
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    ids = backbone.tokenize(TEXTS)
    ctx = torch.nn.Parameter(backbone.token_embeddings(ids).clone())
    out = backbone.encode_embeddings(ctx, ids)
    loss = out.pow(2).sum() + backbone.project_tokens(torch.randn(2, backbone.width)).sum()
    loss.backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- weights --------------------------------------------------------------------------------
HOW_TO = ("--pretrained /path/to/checkpoint.bin", "--pretrained none")


def assert_how_to(message: str) -> None:
    for fragment in HOW_TO:
        assert fragment in message
    assert "internet" in message


def test_missing_checkpoint_path_fails_with_how_to(tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as info:
        load_backbone(
            BackboneSpec(TINY, str(tmp_path / "missing" / "ckpt.bin"), cache_dir=tmp_path, device="cpu")
        )
    assert "does not exist" in str(info.value)
    assert_how_to(str(info.value))


def test_unknown_tag_fails_with_how_to(tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(TINY, "no_such_tag", cache_dir=tmp_path, device="cpu"))
    assert "no_such_tag" in str(info.value)
    assert_how_to(str(info.value))


@pytest.mark.parametrize(
    ("model", "tag"), [("ViT-B-16-quickgelu", "openai"), ("ViT-B-16", "laion2b_s34b_b88k")]
)
def test_offline_missing_weights_fail_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, tag: str
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(model, tag, cache_dir=tmp_path, device="cpu"))
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert_how_to(str(info.value))


def test_no_network_fails_fast_without_offline_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(weights_module, "_probe", lambda url: "hub.example is not reachable (test)")

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download without network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec("ViT-B-16-quickgelu", "openai", cache_dir=tmp_path, device="cpu"))
    assert "network is unavailable" in str(info.value)
    assert_how_to(str(info.value))


def test_probe_reports_unreachable_hosts() -> None:
    from bench.weights import _probe

    assert _probe("https://weights.invalid/model.bin") is not None


@pytest.mark.parametrize(
    ("model", "suggestion"), [("ViT-L-14-336", "ViT-L-14-336-quickgelu"), ("ViT-B-16", "ViT-B-16-quickgelu")]
)
def test_openai_tag_on_gelu_architecture_is_refused(tmp_path: Path, model: str, suggestion: str) -> None:
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(model, "openai", cache_dir=tmp_path, device="cpu"))
    assert suggestion in str(info.value) and "QuickGELU" in str(info.value)


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        load_backbone(BackboneSpec("ViT-B-61", "none", cache_dir=tmp_path, device="cpu"))


def test_local_checkpoint_loads_with_file_identity(tmp_path: Path, backbone) -> None:
    checkpoint = tmp_path / "tiny-weights.bin"
    torch.save(backbone.model.state_dict(), checkpoint)
    bb = load_backbone(BackboneSpec(TINY, str(checkpoint), cache_dir=tmp_path / "cache", device="cpu"))
    assert (
        bb.identity.weights.startswith("file:tiny-weights.bin:")
        and len(bb.identity.weights.split(":")[-1]) == 12
    )
    assert not bb.identity.random_init
    items = make_items(2, seed=12)
    torch.testing.assert_close(bb.image_features(items).embeds, backbone.image_features(items).embeds)
    # a checkpoint for another architecture is a BackboneError, not a traceback
    wrong = tmp_path / "wrong.bin"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(BackboneError, match="state dict"):
        load_backbone(BackboneSpec(TINY, str(wrong), cache_dir=tmp_path / "cache", device="cpu"))


def _truncated(path: Path, state_dict: dict) -> None:
    torch.save(state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_safetensors(path: Path, state_dict: dict) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in state_dict.items()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


#: name -> (file name, write(path, a real state dict), words the error must contain)
BAD_CHECKPOINTS = {
    "random-bytes": (
        "weights.pt",
        lambda path, sd: path.write_bytes(np.random.default_rng(0).bytes(4096)),
        ["corrupt, truncated"],
    ),
    "truncated": ("weights.pt", _truncated, ["corrupt, truncated"]),
    "text-file": (
        "weights.bin",
        lambda path, sd: path.write_text("<html>404 Not Found</html>\n"),
        ["corrupt"],
    ),
    "empty-file": ("weights.pth", lambda path, sd: path.write_bytes(b""), ["corrupt"]),
    "truncated-safetensors": ("weights.safetensors", _truncated_safetensors, ["corrupt, truncated"]),
    "training-checkpoint": (  # Python objects that weights_only unpickling refuses
        "checkpoint.pt",
        lambda path, sd: torch.save({"args": argparse.Namespace(lr=1e-3), "state_dict": sd}, path),
        ["argparse.Namespace", "arbitrary code", "state dict"],
    ),
    "not-a-state-dict": ("weights.pt", lambda path, sd: torch.save(torch.zeros(3), path), ["state dict"]),
}


def assert_safe_checkpoint_error(error: BackboneError) -> None:
    """Never pass on torch's advice to load with weights_only=False, not even in the chained cause."""
    shown: BaseException | None = error
    while shown is not None:  # every exception a traceback of ``error`` would print
        assert "weights_only" not in str(shown)
        shown = shown.__cause__ or (None if shown.__suppress_context__ else shown.__context__)


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_unreadable_checkpoint_names_the_file_and_the_fix(tmp_path: Path, backbone, case: str) -> None:
    name, write, words = BAD_CHECKPOINTS[case]
    checkpoint = tmp_path / name
    write(checkpoint, backbone.model.state_dict())
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(TINY, str(checkpoint), cache_dir=tmp_path / "cache", device="cpu"))
    message = str(info.value)
    assert f"checkpoint file {checkpoint} cannot be read" in message
    assert "re-download it" in message and "check that --pretrained points to the right file" in message
    for word in words:
        assert word in message
    assert_safe_checkpoint_error(info.value)


def test_corrupt_cached_download_says_to_delete_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backbone
) -> None:
    import huggingface_hub.constants
    import open_clip

    hf_cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    fake_hf_repo(hf_cache, "org/tiny", backbone.model.state_dict(), open_clip.get_model_config(TINY))
    (weights_file,) = hf_cache.rglob("open_clip_pytorch_model.bin")
    _truncated(weights_file, backbone.model.state_dict())
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(TINY, "hf-hub:org/tiny", cache_dir=tmp_path / "cache", device="cpu"))
    message = str(info.value)
    assert f"checkpoint file {weights_file} cannot be read" in message
    assert "hf-hub:org/tiny" in message and "delete it and run again to re-download it" in message
    assert_safe_checkpoint_error(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_checkpoint_without_read_permission_names_the_file(tmp_path: Path, backbone) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save(backbone.model.state_dict(), checkpoint)
    checkpoint.chmod(0o000)
    try:
        with pytest.raises(BackboneError, match="check its permissions") as info:
            load_backbone(BackboneSpec(TINY, str(checkpoint), cache_dir=tmp_path / "cache", device="cpu"))
    finally:
        checkpoint.chmod(0o600)
    assert str(checkpoint) in str(info.value)


def fake_hf_repo(cache: Path, repo: str, state_dict: dict, model_cfg: dict) -> None:
    """A Hugging Face cache entry as huggingface_hub lays it out (refs/main -> snapshot)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    torch.save(state_dict, snapshot / "open_clip_pytorch_model.bin")
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))


def test_hf_hub_weights_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backbone) -> None:
    import huggingface_hub.constants
    import open_clip

    hf_cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    model_cfg = open_clip.get_model_config(TINY)
    fake_hf_repo(hf_cache, "org/tiny", backbone.model.state_dict(), model_cfg)
    bb = load_backbone(BackboneSpec(TINY, "hf-hub:org/tiny", cache_dir=tmp_path / "cache", device="cpu"))
    assert bb.identity.weights == "hf-hub:org/tiny"
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.25, 0.25, 0.25)
    assert "mean=0.5,0.5,0.5" in bb.preprocessing_id
    # the repo says plain GELU, the architecture name builds QuickGELU: refused
    fake_hf_repo(hf_cache, "org/gelu", backbone.model.state_dict(), {**model_cfg, "quick_gelu": False})
    with pytest.raises(BackboneError, match="QuickGELU"):
        load_backbone(BackboneSpec(TINY, "hf-hub:org/gelu", cache_dir=tmp_path / "cache", device="cpu"))


def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Weights are neither cached nor downloadable (and any download attempt fails the test)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(weights_module, "_probe", lambda url: "hub.example is not reachable (test)")

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download without network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)


def test_auto_falls_back_to_random_init_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_network(monkeypatch, tmp_path)
    backbone = load_backbone(BackboneSpec("ViT-B-32-quickgelu", "auto", cache_dir=tmp_path, device="cpu"))
    assert backbone.identity.weights == "random-init" and backbone.identity.random_init
    assert backbone.weights_warning is not None
    assert "FALLING BACK TO RANDOM INIT" in backbone.weights_warning
    assert "tried openai" in backbone.weights_warning  # OpenAI's weights are tried first
    assert_how_to(backbone.weights_warning)
    # The fallback is the same deterministic random init as `none` (so caches are shared).
    explicit = load_backbone(BackboneSpec("ViT-B-32-quickgelu", "none", cache_dir=tmp_path, device="cpu"))
    assert explicit.weights_warning is None
    for (name, a), (_, b) in zip(
        backbone.model.state_dict().items(), explicit.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_auto_uses_weights_when_they_resolve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.bin"
    tiny = load_backbone(BackboneSpec("bench-tiny-vit", "none", device="cpu"))
    torch.save(tiny.model.state_dict(), checkpoint)
    calls: list[str] = []
    real = weights_module._resolve_weights

    def resolve(spec: BackboneSpec, model_cfg: dict) -> object:
        calls.append(spec.pretrained)
        if spec.pretrained == "openai":  # stands in for a tag whose weights are cached
            return real(BackboneSpec(spec.model, str(checkpoint)), model_cfg)
        return real(spec, model_cfg)

    monkeypatch.setattr(weights_module, "_resolve_weights", resolve)
    tags = ["laion", "openai"]
    monkeypatch.setattr("open_clip.pretrained.list_pretrained_tags_by_model", lambda model: tags)
    backbone = load_backbone(BackboneSpec("bench-tiny-vit", "auto", cache_dir=tmp_path, device="cpu"))
    assert calls == ["auto", "openai"]  # openai first, and no fallback once it resolves
    assert backbone.identity.weights.startswith("file:tiny.bin:") and backbone.weights_warning is None


def test_paper_config_is_strict_about_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.config import load_config

    _no_network(monkeypatch, tmp_path)
    config = load_config(Path(__file__).parents[1] / "configs" / "paper.yaml")
    assert (config.backbone, config.pretrained) == ("ViT-L-14-336-quickgelu", "openai")
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneSpec(config.backbone, config.pretrained, cache_dir=tmp_path, device="cpu"))
    assert_how_to(str(info.value))
