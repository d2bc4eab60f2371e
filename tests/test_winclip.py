"""WinCLIP / WinCLIP+ (methods/winclip) on the tiny random-init backbone (64 px, 4 x 4 patch grid).

Each test names the bug it is there to catch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import SyntheticData, cell_dirs, run_dir_of, tiny_method

from bench.config import RunConfig
from bench.errors import MethodError
from bench.feature_cache import FeatureCache
from bench.kit import FeatureRequest, Features, nearest_distance, window_indices
from bench.kit.clip import Backbone
from bench.kit.variants import Windows, get_variant
from bench.method import SupportSet
from bench.runner import run_grid
from bench.types import ImageItem, Task
from bench.weights import BackboneSpec, load_backbone
from methods.winclip import METHODS, WinCLIP, WinCLIPFewShot
from methods.winclip.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, prompt_ensemble
from methods.winclip.windows import Coverage, anomaly_probability, harmonic_aggregation, harmonic_combine

EVAL_SIZE = 24
TINY = "bench-tiny-vit"


def make_items(
    n: int, seed: int = 0, prefix: str = "wc", shape: tuple[int, int] = (52, 70)
) -> list[ImageItem]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8) for _ in range(n)]
    return as_items(images, seed, prefix)


def as_items(images: list[np.ndarray], seed: int, prefix: str) -> list[ImageItem]:
    return [
        ImageItem(id=f"{prefix}{i}", key=f"{prefix}-{seed}-{i:03d}", loader=lambda a=image: a)
        for i, image in enumerate(images)
    ]


def windows_request(*scales: int, stride: int = 1) -> FeatureRequest:
    return FeatureRequest.of("windows", scales=list(scales), stride=stride)


def compute_windows(
    backbone: Backbone, images: torch.Tensor, request: FeatureRequest
) -> dict[str, torch.Tensor]:
    """The windows variant on preprocessed images, uncached and in full fp32."""
    resolved = backbone.resolve(request)
    assert resolved.layers is not None
    with torch.inference_mode():
        return get_variant("windows").compute(backbone.tower(), images, resolved.layers, resolved)


def normal_support(items: list[ImageItem]) -> SupportSet:
    n = len(items)
    return SupportSet(
        tuple(items), np.zeros(n, dtype=np.int64), np.zeros((n, EVAL_SIZE, EVAL_SIZE), np.float32)
    )


def new_backbone(cache_dir: Path, layers: tuple[int, ...] | None = None) -> Backbone:
    return load_backbone(BackboneSpec(TINY, "none", layers=layers, cache_dir=cache_dir, device="cpu"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    return new_backbone(tmp_path_factory.mktemp("winclip-cache"))


def make_method(backbone: Backbone, cls: type[WinCLIP] = WinCLIP, **config) -> WinCLIP:
    return tiny_method(cls, backbone, seed=0, shots=0, eval_size=EVAL_SIZE, **config)


def preprocessed(backbone: Backbone, items: list[ImageItem]) -> torch.Tensor:
    return torch.stack([backbone.preprocess(item.rgb()) for item in items])


# --------------------------------------------------------------------------- registration


def test_registration_and_options() -> None:
    assert [WinCLIP, WinCLIPFewShot] == METHODS
    assert (WinCLIP.name, WinCLIPFewShot.name) == ("winclip", "winclip-fewshot")
    for cls in METHODS:
        assert cls.tasks == frozenset({Task.DETECT, Task.LOCALIZE})  # no 3-class output
        assert cls.uses_backbone
    assert WinCLIP.uses_support is False and WinCLIPFewShot.uses_support is True
    cfg = WinCLIP.default_config
    assert cfg["temperature"] == 0.07 and list(cfg["scales"]) == [2, 3] and cfg["stride"] == 1
    assert cfg["object"] == "breast ultrasound image"
    assert set(WinCLIPFewShot.default_config) == set(cfg) | {"patch_features"}


def test_prompt_ensemble_is_the_published_one() -> None:
    """Catches a dropped / reordered state or template list (counts and first prompts)."""
    assert (len(NORMAL_STATES), len(ANOMALOUS_STATES), len(TEMPLATES)) == (7, 4, 21)
    normal = prompt_ensemble(NORMAL_STATES, TEMPLATES, "bottle")
    anomalous = prompt_ensemble(ANOMALOUS_STATES, TEMPLATES, "bottle")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[:2] == ["a cropped photo of the bottle.", "a close-up photo of a bottle."]
    assert normal[21] == "a cropped photo of the flawless bottle."
    assert anomalous[0] == "a cropped photo of the damaged bottle."
    assert anomalous[-1] == "a photo of a bottle with damage for anomaly detection."


# --------------------------------------------------------------------------- window geometry


def test_window_indices_on_a_4x4_grid() -> None:
    """Catches transposed / shifted windows and a wrong window count per scale."""
    two = window_indices((4, 4), 2)
    assert two.tolist() == [
        [0, 1, 4, 5], [1, 2, 5, 6], [2, 3, 6, 7],
        [4, 5, 8, 9], [5, 6, 9, 10], [6, 7, 10, 11],
        [8, 9, 12, 13], [9, 10, 13, 14], [10, 11, 14, 15],
    ]  # fmt: skip
    three = window_indices((4, 4), 3)
    assert three.tolist() == [
        [0, 1, 2, 4, 5, 6, 8, 9, 10],
        [1, 2, 3, 5, 6, 7, 9, 10, 11],
        [4, 5, 6, 8, 9, 10, 12, 13, 14],
        [5, 6, 7, 9, 10, 11, 13, 14, 15],
    ]
    assert window_indices((4, 4), 4).tolist() == [list(range(16))]
    assert window_indices((4, 4), 2, stride=2).tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]


def test_window_indices_on_a_non_square_grid() -> None:
    """Rows vs columns mixed up would pass on a square grid but not on 3 x 5."""
    windows = window_indices((3, 5), 2)
    assert windows.shape == (2 * 4, 4)
    assert windows[0].tolist() == [0, 1, 5, 6]
    assert windows[3].tolist() == [3, 4, 8, 9]
    assert windows[4].tolist() == [5, 6, 10, 11]
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((3, 5), 4)


def test_coverage_counts() -> None:
    """Corner patches lie in one 2x2 window, inner ones in four; every window is counted once per patch."""
    coverage = Coverage.of(window_indices((4, 4), 2), 16)
    counts = coverage.valid.sum(dim=1).reshape(4, 4)
    assert counts.tolist() == [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]
    assert sorted(coverage.index[5][coverage.valid[5]].tolist()) == [0, 1, 3, 4]


# --------------------------------------------------------------------------- aggregation


def test_harmonic_aggregation_hand_computed() -> None:
    """3 x 3 grid, four 2x2 windows scored 0.5, 0.25, 1.0, 0.2 (an arithmetic mean would differ)."""
    coverage = Coverage.of(window_indices((3, 3), 2), 9)
    scores = torch.tensor([[0.5, 0.25, 1.0, 0.2]])
    expected = torch.tensor(
        [
            [0.5, 2 / (2 + 4), 0.25],
            [2 / (2 + 1), 4 / (2 + 4 + 1 + 5), 2 / (4 + 5)],
            [1.0, 2 / (1 + 5), 0.2],
        ]
    )
    torch.testing.assert_close(harmonic_aggregation(scores, coverage).reshape(3, 3), expected)


def test_harmonic_aggregation_zero_and_uncovered() -> None:
    """A zero window score gives 0 where it covers (not NaN); a patch no window covers gives 0."""
    coverage = Coverage.of(window_indices((3, 3), 2), 9)
    out = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), coverage).reshape(3, 3)
    assert torch.isfinite(out).all()
    assert out[0, 0] == 0 and out[1, 1] == 0 and out[2, 2] == 0.5
    strided = Coverage.of(window_indices((3, 3), 2, stride=2), 9)  # only the top-left window
    out = harmonic_aggregation(torch.tensor([[0.4]]), strided).reshape(3, 3)
    assert out[:2, :2].eq(0.4).all() and out[2].eq(0).all() and out[:, 2].eq(0).all()


def test_harmonic_combine_and_nearest_distance_hand_computed() -> None:
    """Cross-scale harmonic mean and the (1 - cos) / 2 association with a min over ALL references."""
    maps = [torch.full((1, 2), 0.5), torch.full((1, 2), 0.25), torch.tensor([[1.0, 0.0]])]
    torch.testing.assert_close(harmonic_combine(maps), torch.tensor([[3 / 7, 0.0]]))
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    memory = torch.tensor([[-1.0, 0.0], [0.6, 0.8]])
    torch.testing.assert_close(
        nearest_distance(queries, memory), torch.tensor([[(1 - 0.6) / 2, (1 - 0.8) / 2]])
    )


# --------------------------------------------------------------------------- window embeddings


def test_full_window_reproduces_encode_image(backbone: Backbone) -> None:
    """One window holding every patch must be exactly model.encode_image (catches a missing
    positional embedding / ln_pre / ln_post / proj, or the class token not at position 0)."""
    items = make_items(3, seed=5)
    images = preprocessed(backbone, items)
    with torch.no_grad():
        reference = backbone.model.encode_image(images)
    fresh = compute_windows(backbone, images, windows_request(4))["windows_4"]
    assert fresh.shape == (3, 1, backbone.embed_dim)
    torch.testing.assert_close(fresh[:, 0], reference, atol=1e-5, rtol=1e-5)
    # through the cached request too (fp16-rounded)
    cached = backbone.features(items, windows_request(4))["windows_4"]
    torch.testing.assert_close(cached[:, 0], reference, atol=2e-3, rtol=2e-3)


def test_window_embedding_sees_only_its_patches(backbone: Backbone) -> None:
    """Changing the pixels of patch 0 changes exactly the windows containing patch 0 (catches the
    off-by-one gather that ignores the class token's slot, and windows leaking other patches).
    The images are 64 x 64, the model's input size, so preprocessing does not resample them and
    the change stays inside patch 0."""
    image = np.random.default_rng(6).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    changed = image.copy()
    changed[:16, :16] = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    items = as_items([image, changed], seed=6, prefix="patch0-")
    request = windows_request(2, 3)
    feats = backbone.features(items, request)
    for scale in (2, 3):
        windows = window_indices(backbone.grid, scale)
        a, b = feats[f"windows_{scale}"]
        differs = (a - b).abs().amax(dim=-1) > 1e-2
        assert differs.tolist() == (windows == 0).any(dim=1).tolist()
        same = ~(windows == 0).any(dim=1)
        assert torch.equal(a[same], b[same])


def test_window_features_are_cached_per_image(tmp_path: Path) -> None:
    """Second request for the same images computes nothing and returns identical tensors; the cache
    lives in <cache root>/winclip, its folder depends on the scales, and its configuration is the
    one WinCLIP's own window cache had (so existing cache folders stay valid)."""
    backbone = new_backbone(tmp_path / "cache")
    items = make_items(3, seed=7)
    request = backbone.resolve(windows_request(2, 3))
    cold = backbone.features(items, request)
    assert backbone.encoded_by_request[request] == 3
    assert backbone.n_encoded == 0  # not the run's standard request
    hits = backbone.cache_stats().hits
    warm = backbone.features(items + items[:1], windows_request(2, 3))
    # a key repeated in one call is looked up once
    assert backbone.encoded_by_request[request] == 3 and backbone.cache_stats().hits == hits + 3
    for name in ("windows_2", "windows_3"):
        assert torch.equal(cold[name], warm[name][:3]) and torch.equal(cold[name][0], warm[name][3])
    assert cold["windows_2"].shape == (3, 9, backbone.embed_dim)
    assert cold["windows_3"].shape == (3, 4, backbone.embed_dim)
    assert "final_patches" not in cold.fields  # the backbone's layers include the last block
    cache = backbone._cache_for(request)
    assert cache.folder.parent == tmp_path / "cache" / "winclip" == backbone.cache_root / Windows.cache_subdir
    assert (cache.folder / "config.json").is_file()
    assert backbone._cache_for(backbone.resolve(windows_request(2))).folder != cache.folder
    # the configuration (hence the folder) of the former WinCLIP window cache
    config = {
        key: value
        for key, value in backbone.cache.config.items()
        if key not in ("cache_format", "length", "layers", "layout", "hash")
    }
    config.update(
        {
            "kind": "winclip-window-embeddings",
            "winclip_cache_version": 1,
            "scales": [2, 3],
            "stride": 1,
            "n_windows": [9, 4],
            "final_patch_tokens": False,
            "layout": "flat: per scale windows (n_w, D) | last-block patch tokens (N, W) if stored",
        }
    )
    former = FeatureCache(backbone.cache_root / "winclip", config, (9 + 4) * backbone.embed_dim)
    assert former.folder == cache.folder
    # cached values are the fp16-rounded fresh ones
    fresh = compute_windows(backbone, preprocessed(backbone, items), request)
    torch.testing.assert_close(cold["windows_3"], fresh["windows_3"], atol=2e-3, rtol=2e-3)
    # the chunking of (image, window) pairs is memory-only: a tiny chunk gives the same values
    tiny_chunks = Windows()
    tiny_chunks.batch_tokens = 7
    assert request.layers is not None
    with torch.inference_mode():
        chunked = tiny_chunks.compute(
            backbone.tower(), preprocessed(backbone, items), request.layers, request
        )
    for name in ("windows_2", "windows_3"):
        torch.testing.assert_close(chunked[name], fresh[name], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- zero-shot


def test_text_is_the_mean_of_unnormalised_prompt_embeddings(backbone: Backbone) -> None:
    """anomalib averages raw encode_text outputs; normalising first is the option, not the default."""
    method = make_method(backbone)
    obj = method.config["object"]
    raw = backbone.encode_text(prompt_ensemble(ANOMALOUS_STATES, TEMPLATES, obj))
    torch.testing.assert_close(method.text[1], raw.mean(dim=0))
    normalised = make_method(backbone, normalize_prompts=True).text[1]
    torch.testing.assert_close(normalised, F.normalize(raw, dim=-1).mean(dim=0))
    assert not torch.allclose(F.normalize(normalised, dim=0), F.normalize(method.text[1], dim=0), atol=1e-4)


def test_whole_image_window_equals_plain_clip_zero_shot(backbone: Backbone) -> None:
    """With one window = the whole grid, every patch's score is plain CLIP zero-shot of the image:
    softmax(cos / 0.07)[anomalous], recomputed here straight from open_clip (catches a swapped
    class index, a wrong temperature, a different prompt ensemble)."""
    items = make_items(3, seed=8)
    tokenizer = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        image = F.normalize(backbone.model.encode_image(preprocessed(backbone, items)), dim=-1)
        text = torch.stack(
            [
                backbone.model.encode_text(
                    tokenizer(prompt_ensemble(s, TEMPLATES, "breast ultrasound image"))
                ).mean(0)
                for s in (NORMAL_STATES, ANOMALOUS_STATES)
            ]
        )
    expected = torch.softmax(image @ F.normalize(text, dim=-1).T / 0.07, dim=-1)[:, 1]
    for image_scale in (True, False):
        out = make_method(backbone, scales=[4], image_scale=image_scale).analyse(items)
        torch.testing.assert_close(out.scores, expected, atol=2e-3, rtol=0)
        torch.testing.assert_close(out.maps, expected[:, None, None].expand(-1, 4, 4), atol=2e-3, rtol=0)


def test_zero_shot_map_follows_window_scores(backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows whose embedding is the anomalous text light up exactly the patches they cover, with
    the harmonic mean over covering windows and the image score as one more scale."""
    method = make_method(backbone, scales=[2])
    items = make_items(1, seed=9)
    t_normal, t_anomalous = method.text
    windows = t_normal.expand(1, 9, -1).clone()
    windows[0, 0] = t_anomalous  # the top-left window covers patches 0, 1, 4, 5
    monkeypatch.setattr(
        method, "windows", lambda batch: Features({"windows_2": windows}, backbone.grid, backbone.layers)
    )
    out = method.analyse(items)
    p_a, p_n = (anomaly_probability(t, method.text, 0.07).item() for t in (t_anomalous, t_normal))
    image = out.scores.item()
    patch = harmonic_aggregation(anomaly_probability(windows, method.text, 0.07), method.coverages[0])
    expected = harmonic_combine([torch.full((1, 16), image), patch]).reshape(4, 4)
    torch.testing.assert_close(out.maps[0], expected)
    assert out.maps[0, 0, 0] == pytest.approx(2 / (1 / image + 1 / p_a), rel=1e-5)
    assert out.maps[0, 1, 1] == pytest.approx(2 / (1 / image + (1 / p_a + 3 / p_n) / 4), rel=1e-5)
    assert out.maps[0, 3, 3] == pytest.approx(2 / (1 / image + 1 / p_n), rel=1e-5)
    assert out.maps[0, 0, 0] > out.maps[0, 1, 1] > out.maps[0, 3, 3]


# --------------------------------------------------------------------------- few-shot


def test_query_identical_to_a_reference_scores_zero(backbone: Backbone) -> None:
    """Few-shot map of a reference image is 0 everywhere (min over references, not mean/max), so
    its final outputs are half the zero-shot ones; an unseen image scores above 0 somewhere."""
    refs = make_items(2, seed=10)
    method = make_method(backbone, WinCLIPFewShot)
    method.fit(normal_support(refs))
    assert method.n_references == 2
    # anomalib's patch memory: last-block patch tokens after ln_post, NOT projected (width W)
    raw = backbone.image_features(refs).patch_tokens[:, backbone.layers.index(backbone.depth - 1)]
    expected_memory = F.normalize(backbone._visual.ln_post(raw), dim=-1).reshape(-1, backbone.width)
    torch.testing.assert_close(method._patch_memory, expected_memory)
    out = method.analyse([refs[1], *make_items(1, seed=11)])
    assert out.few_shot_maps is not None
    torch.testing.assert_close(out.few_shot_maps[0], torch.zeros(4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.maps[0], out.zero_shot_maps[0] / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores[0], out.zero_shot_scores[0] / 2, atol=1e-6, rtol=0)
    assert out.few_shot_maps[1].max() > 1e-3
    expected_score = (out.zero_shot_scores[1] + out.few_shot_maps[1].max()) / 2
    torch.testing.assert_close(out.scores[1], expected_score)
    torch.testing.assert_close(out.maps[1], (out.zero_shot_maps[1] + out.few_shot_maps[1]) / 2)


def test_few_shot_uses_only_normal_references(backbone: Backbone) -> None:
    """Lesion images of the support set are not references; a support set without normals is refused."""
    normal, lesion = make_items(1, seed=12), make_items(1, seed=13)
    support = SupportSet(
        (normal[0], lesion[0]), np.array([0, 2]), np.zeros((2, EVAL_SIZE, EVAL_SIZE), np.float32)
    )
    method = make_method(backbone, WinCLIPFewShot)
    method.fit(support)
    assert method.n_references == 1
    out = method.analyse(lesion)
    assert out.few_shot_maps is not None and out.few_shot_maps.max() > 1e-3
    with pytest.raises(MethodError, match="normal reference"):
        make_method(backbone, WinCLIPFewShot).fit(
            SupportSet((lesion[0],), np.array([1]), np.zeros((1, EVAL_SIZE, EVAL_SIZE), np.float32))
        )
    with pytest.raises(MethodError, match="before fit"):
        make_method(backbone, WinCLIPFewShot).predict(lesion)


def test_last_block_tokens_when_the_backbone_layers_omit_it(backbone: Backbone, tmp_path: Path) -> None:
    """With --layers lacking the last block, the window cache stores the last block's patch tokens
    itself; the few-shot map must match the one built from the backbone's cached tokens."""
    partial = new_backbone(tmp_path / "partial", layers=(0, 1))
    refs, queries = make_items(2, seed=14), make_items(2, seed=15)
    outs = []
    for bb in (backbone, partial):
        method = make_method(bb, WinCLIPFewShot)
        method.fit(normal_support(refs))
        outs.append(method.analyse(queries))
    # the window request stores the last block's patch tokens only where the layers lack that block
    assert "final_patches" in partial.features(refs, windows_request(2, 3)).fields
    assert "final_patches" not in backbone.features(refs, windows_request(2, 3)).fields
    last = backbone.image_features(refs).patch_tokens[:, -1]
    final = partial.features(refs, windows_request(2, 3))["final_patches"]
    torch.testing.assert_close(final, last, atol=2e-3, rtol=0)
    assert outs[1].few_shot_maps is not None and outs[0].few_shot_maps is not None
    torch.testing.assert_close(outs[1].few_shot_maps, outs[0].few_shot_maps, atol=2e-3, rtol=0)
    torch.testing.assert_close(outs[1].scores, outs[0].scores, atol=2e-3, rtol=0)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("cls", [WinCLIP, WinCLIPFewShot])
def test_outputs_shapes_ranges_and_determinism(cls: type[WinCLIP], tmp_path: Path) -> None:
    """Right shapes, dtypes and ranges; a fresh instance on a warm cache gives identical outputs."""
    backbone = new_backbone(tmp_path / "cache")
    items, refs = make_items(5, seed=16), make_items(2, seed=17)
    predictions = []
    request = backbone.resolve(make_method(backbone, cls).request)
    for _ in range(2):
        method = make_method(backbone, cls)
        before = dict(backbone.encoded_by_request)
        method.fit(normal_support(refs))
        predictions.append(method.predict(items))
        cold = len(items) + (len(refs) if cls is WinCLIPFewShot else 0)
        encoded = backbone.encoded_by_request.get(request, 0) - before.get(request, 0)
        assert encoded == (cold if len(predictions) == 1 else 0)
        assert backbone.n_encoded == cold  # the image embeddings: once, on the first pass
    first, second = predictions
    assert first.probs is None
    assert first.scores.shape == (5,) and first.scores.dtype == np.float64
    assert first.maps is not None and first.maps.shape == (5, EVAL_SIZE, EVAL_SIZE)
    assert first.maps.dtype == np.float32
    assert np.isfinite(first.scores).all() and np.isfinite(first.maps).all()
    assert ((first.scores >= 0) & (first.scores <= 1)).all()
    assert ((first.maps >= 0) & (first.maps <= 1)).all()
    assert first.maps.std() > 0  # not a constant map
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.maps, second.maps)


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (WinCLIP, {"no_such_option": 1}, "unknown option(s) ['no_such_option']"),
        (WinCLIP, {"patch_features": "ln_post"}, "unknown option(s) ['patch_features']"),  # few-shot only
        (WinCLIPFewShot, {"patch_features": "mean"}, "option 'patch_features' must be one of ['ln_post', "),
        (WinCLIP, {"scales": []}, "option 'scales' must not be empty, got []"),
        (WinCLIP, {"scales": [2, 2]}, "option 'scales' must hold distinct window sizes, got [2, 2]"),
        (WinCLIP, {"scales": [0]}, "option 'scales' must be >= 1, got [0]"),
        (WinCLIP, {"scales": [2.5]}, "option 'scales' must be a list of int values, got [2.5]"),
        (WinCLIP, {"temperature": 0}, "option 'temperature' must be > 0, got 0"),
        (WinCLIP, {"stride": 0}, "option 'stride' must be >= 1, got 0"),
        (WinCLIP, {"stride": 1.5}, "option 'stride' must be an integer, got 1.5"),
        (WinCLIP, {"image_scale": "yes"}, "option 'image_scale' must be true or false, got 'yes'"),
        (WinCLIP, {"templates": ["no {}", "none"]}, "option 'templates' needs exactly one '{}' placeholder"),
        (WinCLIP, {"object": ""}, "option 'object' must not be empty, got ''"),
    ],
)
def test_bad_options_are_refused(backbone: Backbone, cls: type[WinCLIP], options: dict, message: str) -> None:
    """The schema refuses each bad value, naming the method, the option and the value."""
    with pytest.raises(MethodError) as info:
        make_method(backbone, cls, **options)
    assert str(info.value).startswith(f"method {cls.name!r}: ")
    assert message in str(info.value)


def test_window_scale_larger_than_the_grid_is_refused(backbone: Backbone) -> None:
    with pytest.raises(MethodError, match=r"method 'winclip': .*does not fit"):
        make_method(backbone, scales=[5]).predict(make_items(1))
    method = make_method(backbone, temperature=1)  # an int for a float option is converted
    assert method.temperature == 1.0 and isinstance(method.config["temperature"], float)


# --------------------------------------------------------------------------- the grid


def test_both_variants_run_in_the_grid(
    make_config: Callable[..., RunConfig], shared_data: SyntheticData
) -> None:
    """winclip runs once per target (shots 0), winclip-fewshot once per (shots, seed, target)."""
    target = shared_data.target_a
    config = make_config(methods="winclip,winclip-fewshot", shots="2", seeds="0", targets=str(target.folder))
    summary = run_grid(config, show_progress=False)
    assert cell_dirs(run_dir_of(config)) == {
        f"winclip/{target.name}/shots0_seed0",
        f"winclip-fewshot/{target.name}/shots2_seed0",
    }
    assert len(summary.cells_done) == 2
    for cell in cell_dirs(run_dir_of(config)):
        metrics = json.loads((run_dir_of(config) / cell / "cell.json").read_text())["metrics"]
        assert {"image_auroc", "pixel_auroc", "pixel_ap"} <= set(metrics)
        assert "class_auroc" not in metrics
