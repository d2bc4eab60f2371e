"""UltraAD (methods/ultraad) and its ablation variants on the tiny random-init backbone.

Synthetic tasks: 64 px grey speckle images; benign images carry a bright disc, malignant a
dark disc, with the disc's mask at the evaluation size (32). Covers output shapes and
ranges, the published formulas (score, map fusion, W_text), which parts are trainable and
which stay frozen, that each ablation switch changes only what it names, the loss going
down, determinism, that the model learns to localise, and the grid end to end.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ConfigFactory, SyntheticData, cell_dirs, run_dir_of, tiny_method

from bench.errors import MethodError
from bench.kit import dice_loss, gaussian_smooth
from bench.method import Method, SupportSet
from bench.metrics import pixel_metrics
from bench.registry import available_methods
from bench.results import load_cells
from bench.runner import run_grid
from bench.tables import render_tables
from bench.types import ImageItem, Task
from bench.weights import BackboneSpec, load_backbone
from methods.ultraad import (
    UltraAD,
    UltraADNoJoint,
    UltraADNoPIF,
    UltraADUltrasoundUnaware,
)
from methods.ultraad.descriptions import load_descriptions

EVAL = 32
VARIANTS = ("ultraad", "ultraad-us-unaware", "ultraad-no-joint", "ultraad-no-pif")
#: The tiny model's class token is 32-d: the default MiniNet (d / 16 = 2 hidden units) can be
#: dead at init, so tests that need every part to learn widen it (an option, d / 4 = 8).
LIVE = {"mininet_reduction": 4}


#: Tiny tensors: one torch thread is faster and immune to other processes' load.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    spec = BackboneSpec(
        "bench-tiny-vit", "none", cache_dir=tmp_path_factory.mktemp("ultraad-cache"), device="cpu"
    )
    return load_backbone(spec)


def blob_task(shots: int, seed: int, size: int = EVAL, tag: str = "blob") -> SupportSet:
    """K images per class: normal speckle, benign bright disc, malignant dark disc (+ masks)."""
    rng = np.random.default_rng(seed)
    items, labels, masks = [], [], []
    yy, xx = np.mgrid[:64, :64] + 0.5
    ys, xs = (np.mgrid[:size, :size] + 0.5) * 64 / size
    for c in range(3):
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
                ImageItem(id=f"{tag}{seed}-{c}-{i}", key=f"{tag}-{seed}-{c}-{i}", loader=lambda a=rgb: a)
            )
            labels.append(c)
            masks.append(mask)
    return SupportSet(tuple(items), np.array(labels), np.stack(masks))


def make(cls: type[Method], backbone, seed: int = 0, **config: Any) -> Any:
    return tiny_method(cls, backbone, seed=seed, shots=2, eval_size=EVAL, **config)


@pytest.fixture(scope="module")
def support() -> SupportSet:
    return blob_task(2, seed=0)


@pytest.fixture(scope="module")
def fitted(backbone, support: SupportSet) -> UltraAD:
    method = make(UltraAD, backbone, epochs=6, **LIVE)
    method.fit(support)
    return method


# --------------------------------------------------------------------------- registration


def test_variants_are_registered_with_one_switch_each() -> None:
    methods = available_methods()
    assert all(name in methods for name in VARIANTS)
    full = dict(methods["ultraad"].default_config)
    switches = {"ultraad-us-unaware": "descriptions", "ultraad-no-joint": "joint", "ultraad-no-pif": "pif"}
    for name, key in switches.items():
        cfg = dict(methods[name].default_config)
        assert set(cfg) == set(full)
        assert [k for k in full if cfg[k] != full[k]] == [key], name
    assert methods["ultraad-us-unaware"].default_config["descriptions"] == "ultrasound-unaware"
    assert methods["ultraad-no-joint"].default_config["joint"] is False
    assert methods["ultraad-no-pif"].default_config["pif"] is False
    all_tasks = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
    assert methods["ultraad"].tasks == methods["ultraad-no-pif"].tasks == all_tasks
    assert methods["ultraad-us-unaware"].tasks == all_tasks
    assert methods["ultraad-no-joint"].tasks == frozenset({Task.LOCALIZE})  # the paper's "-" for I-AUROC
    assert all(methods[n].uses_support and methods[n].uses_backbone for n in VARIANTS)


def test_every_ultraad_md_choice_is_an_option_with_its_default() -> None:
    expected = {
        "ctx_init": "a photo of a",  # M = 4 from "a photo of a"
        "n_ctx": 4,
        "normal_prompt": "normal breast ultrasound image",
        "abnormal_prompt": "abnormal breast ultrasound image",
        "mininet_reduction": 16,  # Linear(d, d/16) - ReLU - Linear
        "tau": 0.07,
        "alpha": 1.0,
        "beta": 5.5,
        "clip_logit_scale": 100.0,
        "residual_ratio": 0.2,
        "pif_heads": 8,
        "epochs": 20,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "focal_gamma": 2.0,
        "dice_weight": 1.0,
        "focal_weight": 1.0,
        "ce_weight": 1.0,
        "map_weight": 0.5,  # (M + M') / 2
        "smooth_sigma": 4.0,  # at 336 px
        "smooth_reference_size": 336,
        "score_weight": 0.5,  # 0.5 (1 - p_normal) + 0.5 max(map)
        "layers": None,  # the backbone's quarters (6/12/18/24 of ViT-L)
        "descriptions": "lesion-aware",
        "joint": True,
        "pif": True,
        "pif_tokens": "per-layer",
        "lr_schedule": "constant",
    }
    assert {k: UltraAD.default_config[k] for k in expected} == expected
    # every option is declared with a help line (shown by `bench methods --verbose`)
    assert set(UltraAD.options) == set(UltraAD.default_config)
    assert all(option.help for option in UltraAD.options.values())


def test_bad_options_are_refused(backbone, support: SupportSet) -> None:
    bad_values = (
        {"tau": 0},
        {"pif_tokens": "some"},
        {"upsample": "nearest"},
        {"lr_schedule": "step"},
        {"joint": "yes"},
        {"epochs": -1},
        {"batch_size": 0},
        {"map_weight": 2.0},
        {"score_weight": -0.1},
        {"layers": [1, 1]},
        {"layers": ["a"]},
        {"normal_prompt": " "},
    )
    for bad in bad_values:
        key = next(iter(bad))
        with pytest.raises(MethodError, match=f"method 'ultraad': option '{key}'"):
            make(UltraAD, backbone, **bad)
    # the variants share the schema and name themselves
    with pytest.raises(MethodError, match="method 'ultraad-no-pif': option 'tau'"):
        make(UltraADNoPIF, backbone, tau=-1.0)
    with pytest.raises(MethodError, match=r"method 'ultraad': unknown option.*heads"):
        make(UltraAD, backbone, heads=8)
    with pytest.raises(MethodError, match="method 'ultraad': option 'layers'"):
        make(UltraAD, backbone, layers=[7], epochs=0).fit(support)  # the tiny model has blocks 0-3
    with pytest.raises(MethodError, match=r"method 'ultraad': option 'ctx_init'.*option 'n_ctx'"):
        make(UltraAD, backbone, n_ctx=6, epochs=0).fit(support)
    with pytest.raises(MethodError, match="method 'ultraad': the support set must hold every class"):
        make(UltraAD, backbone, epochs=0).fit(support.of_class(1))


# --------------------------------------------------------------------------- descriptions


def test_shipped_descriptions_follow_the_template_and_are_package_data() -> None:
    files = resources.files("methods.ultraad")
    assert files.joinpath("descriptions.yaml").is_file()
    assert files.joinpath("descriptions_us_unaware.yaml").is_file()
    lesion = load_descriptions("lesion-aware")
    assert list(lesion) == ["normal", "benign", "malignant"]
    for name, sentences in lesion.items():
        assert len(sentences) >= 3
        assert all(s.startswith(f"This is a {name} ultrasound image with ") for s in sentences)
    text = " ".join(lesion["benign"] + lesion["malignant"]).lower()
    for term in (
        "oval",
        "circumscribed",
        "parallel",
        "posterior acoustic enhancement",
        "irregular",
        "spiculated",
        "shadowing",
    ):
        assert term in text
    unaware = load_descriptions("ultrasound-unaware")
    assert unaware == {c: [f"This is a {c} image."] for c in ("normal", "benign", "malignant")}


def test_descriptions_option_takes_a_path_or_a_mapping(backbone, tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("normal: [a calm sea.]\nbenign: [a small boat.]\nmalignant: [a storm.]\n")
    from_file = make(UltraAD, backbone, descriptions=str(path))
    inline = make(
        UltraAD,
        backbone,
        descriptions={"normal": ["a calm sea."], "benign": "a small boat.", "malignant": ["a storm."]},
    )
    assert (
        from_file.descriptions
        == inline.descriptions
        == {
            "normal": ["a calm sea."],
            "benign": ["a small boat."],
            "malignant": ["a storm."],
        }
    )
    expected = F.normalize(backbone.encode_text(["a calm sea.", "a small boat.", "a storm."]), dim=-1)
    assert torch.allclose(from_file.class_text(), expected, atol=1e-6)
    path.write_text("normal: [x]\nbenign: [y]\n")
    with pytest.raises(MethodError, match="normal"):
        make(UltraAD, backbone, descriptions=str(path))
    with pytest.raises(MethodError, match="neither a built-in set"):
        make(UltraAD, backbone, descriptions=str(tmp_path / "missing.yaml"))
    # a description longer than the text encoder's context is refused, never silently cut
    long = {"normal": ["word " * 100], "benign": ["b."], "malignant": ["m."]}
    with pytest.raises(MethodError, match=r"method 'ultraad': option 'descriptions'.*longer"):
        make(UltraAD, backbone, descriptions=long).class_text()


def test_class_text_is_the_mean_of_normalised_description_embeddings(backbone) -> None:
    method = make(UltraAD, backbone)
    w_text = method.class_text()
    assert w_text.shape == (3, backbone.embed_dim)
    for row, name in enumerate(("normal", "benign", "malignant")):
        embeds = F.normalize(backbone.encode_text(method.descriptions[name]), dim=-1)
        assert torch.allclose(w_text[row], F.normalize(embeds.mean(0), dim=-1), atol=1e-6)


# --------------------------------------------------------------------------- outputs


def test_prediction_shapes_ranges_and_formulas(fitted: UltraAD, support: SupportSet) -> None:
    items = blob_task(2, seed=9, tag="query").items[:5]
    prediction = fitted.predict(items)
    assert prediction.scores.shape == (5,) and prediction.scores.dtype == np.float64
    assert prediction.probs is not None and prediction.probs.shape == (5, 3)
    assert prediction.maps is not None and prediction.maps.shape == (5, EVAL, EVAL)
    assert prediction.maps.dtype == np.float32
    assert np.allclose(prediction.probs.sum(1), 1.0) and (prediction.probs >= 0).all()
    assert (prediction.maps >= 0).all() and (prediction.maps <= 1).all()
    assert ((prediction.scores >= 0) & (prediction.scores <= 1)).all()
    expected = 0.5 * (1 - prediction.probs[:, 0]) + 0.5 * prediction.maps.reshape(5, -1).max(1)
    np.testing.assert_allclose(prediction.scores, expected, atol=1e-6)

    out = fitted.outputs(items)
    n_layers = len(fitted.ctx.backbone.layers)
    assert out.layer_maps.shape == out.fused_layer_maps.shape == (5, n_layers, EVAL, EVAL)
    assert torch.allclose(out.map, out.layer_maps.mean(1)) and torch.allclose(
        out.fused_map, out.fused_layer_maps.mean(1)
    )
    assert out.logits is not None and out.logits.shape == (5, 3)
    assert torch.allclose(
        torch.softmax(out.logits.double(), 1), torch.from_numpy(prediction.probs), atol=1e-9
    )
    assert torch.allclose(out.prompts.norm(dim=-1), torch.ones(5, 2), atol=1e-5)
    # map = (M + M') / 2, then Gaussian sigma 4 px at 336 (rescaled to 32 px)
    fused = gaussian_smooth((out.map + out.fused_map) / 2, 4.0 * EVAL / 336)
    assert np.allclose(prediction.maps, fused.clamp(0, 1).numpy(), atol=1e-6)
    # the map depends on the image (instance-aware prompts + patch tokens)
    assert not np.allclose(prediction.maps[0], prediction.maps[1])


def test_no_joint_variant_localises_only(backbone, support: SupportSet) -> None:
    method = make(UltraADNoJoint, backbone, epochs=2)
    method.fit(support)
    assert method.tasks == frozenset({Task.LOCALIZE}) and method.model.memory_keys is None
    prediction = method.predict(support.items)
    assert prediction.probs is None and prediction.maps.shape == (len(support), EVAL, EVAL)
    np.testing.assert_allclose(prediction.scores, prediction.maps.reshape(len(support), -1).max(1), atol=1e-7)
    # the switch on the base class does the same (tasks follow the option)
    assert make(UltraAD, backbone, joint=False).tasks == frozenset({Task.LOCALIZE})


# --------------------------------------------------------------------------- trainable vs frozen


def test_fit_trains_exactly_the_trainable_parts(backbone, support: SupportSet) -> None:
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = make(UltraAD, backbone, epochs=4, **LIVE)
    model = method.init_model(support)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w_text = model.class_text.clone()
    method.fit(support)  # re-initialises the same way (same seed), then trains
    model = method.model

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("prompt.ctx", "mininet.", "g.", "adapters.", "pif.", "memory_keys")
    assert all(n.startswith(prefixes) for n in names)
    assert {p for p in prefixes if any(n.startswith(p) for n in names)} == set(prefixes)
    assert "class_text" not in names and "class_text" in dict(model.named_buffers())
    # no backbone tensor is part of the method's module
    backbone_ids = {id(p) for p in backbone.model.parameters()}
    assert not backbone_ids & {id(p) for p in model.parameters()}
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter.detach(), initial[name]), f"{name} did not train"
    assert torch.equal(model.class_text, w_text) and torch.equal(model.class_text, initial["class_text"])
    assert torch.equal(model.memory_values, initial["memory_values"])
    assert torch.equal(model.memory_values, F.one_hot(torch.as_tensor(support.labels), 3).float())
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, frozen[key]), f"backbone {key} changed"
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    # keys are initialised from the support images' normalised embeds, then trained
    embeds, _ = method.features(support.items)
    assert torch.allclose(initial["memory_keys"], F.normalize(embeds, dim=-1))


def test_loss_components_and_decrease(backbone, support: SupportSet) -> None:
    method = make(UltraAD, backbone, epochs=40, **LIVE)
    method.fit(support)
    history = method.history
    assert len(history) == 40
    assert set(history[0]) == {"dice_m", "focal_m", "dice_fused", "focal_fused", "ce", "total"}
    first, last = history[0], history[-1]
    assert last["total"] < 0.6 * first["total"]
    assert last["dice_fused"] < first["dice_fused"] and last["ce"] < first["ce"]
    for h in history:  # total = Dice + Focal on M and M' + CE, equally weighted
        parts = h["dice_m"] + h["focal_m"] + h["dice_fused"] + h["focal_fused"] + h["ce"]
        assert h["total"] == pytest.approx(parts, rel=1e-5)


def test_seg_loss_per_layer_sums_the_layers(backbone, support: SupportSet) -> None:
    per_layer = make(UltraAD, backbone, seg_loss_per_layer=True, epochs=0)
    model = per_layer.init_model(support)
    embeds, tokens = per_layer.features(support.items)
    masks = torch.from_numpy(support.masks)
    labels = torch.as_tensor(support.labels)
    with torch.no_grad():
        out = model(embeds, tokens, EVAL)
        parts = per_layer.loss_components(out, masks, labels)
    expected = sum(dice_loss(out.layer_maps[:, i], masks) for i in range(out.layer_maps.shape[1]))
    assert parts["dice_m"].item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------- ablation switches


def test_no_pif_map_is_m_of_the_full_model(fitted: UltraAD, backbone, support: SupportSet) -> None:
    no_pif = make(UltraADNoPIF, backbone, smooth_sigma=0.0, **LIVE)
    model = no_pif.init_model(support)
    missing, unexpected = model.load_state_dict(fitted.model.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith("pif.") for k in unexpected)
    assert model.pif is None
    items = support.items
    full_out = fitted.outputs(items)
    prediction = no_pif.predict(items)
    assert np.allclose(prediction.maps, full_out.map.clamp(0, 1).numpy(), atol=1e-6)
    assert not np.allclose(prediction.maps, ((full_out.map + full_out.fused_map) / 2).numpy(), atol=1e-4)
    # classification is untouched by the switch
    assert np.allclose(prediction.probs, torch.softmax(full_out.logits.double(), 1).numpy(), atol=1e-9)
    # and its loss has no fused terms
    no_pif.fit(support)
    assert set(no_pif.history[0]) == {"dice_m", "focal_m", "ce", "total"}


def test_us_unaware_changes_only_w_text(backbone, support: SupportSet) -> None:
    full = make(UltraAD, backbone).init_model(support).state_dict()
    unaware_method = make(UltraADUltrasoundUnaware, backbone)
    unaware = unaware_method.init_model(support).state_dict()
    assert set(full) == set(unaware)
    differing = [k for k in full if not torch.equal(full[k], unaware[k])]
    assert differing == ["class_text"]
    expected = F.normalize(
        backbone.encode_text(
            ["This is a normal image.", "This is a benign image.", "This is a malignant image."]
        ),
        dim=-1,
    )
    assert torch.allclose(unaware["class_text"], expected, atol=1e-6)


def test_no_joint_drops_exactly_the_ce_term(backbone, support: SupportSet) -> None:
    joint = make(UltraAD, backbone, **LIVE)
    alone = make(UltraADNoJoint, backbone, **LIVE)
    joint_model, alone_model = joint.init_model(support), alone.init_model(support)
    shared = {k: v for k, v in joint_model.state_dict().items() if not k.startswith("memory_")}
    assert alone_model.state_dict().keys() == shared.keys()
    assert all(torch.equal(v, alone_model.state_dict()[k]) for k, v in shared.items())
    embeds, tokens = joint.features(support.items)
    masks, labels = torch.from_numpy(support.masks), torch.as_tensor(support.labels)
    with torch.no_grad():
        a = joint.loss_components(joint_model(embeds, tokens, EVAL), masks, labels)
        b = alone.loss_components(alone_model(embeds, tokens, EVAL), masks, labels)
    assert set(a) - set(b) == {"ce"} and set(b) <= set(a)
    for key in ("dice_m", "focal_m", "dice_fused", "focal_fused"):
        assert torch.equal(a[key], b[key])
    assert (a["total"] - a["ce"]).item() == pytest.approx(b["total"].item(), rel=1e-6)
    alone.fit(support)
    assert all("ce" not in h for h in alone.history)


# --------------------------------------------------------------------------- determinism, learning


def test_deterministic_for_a_seed(backbone, support: SupportSet) -> None:
    runs = []
    for seed in (0, 0, 1):
        method = make(UltraAD, backbone, seed=seed, epochs=3, **LIVE)
        method.fit(support)
        runs.append(method.predict(support.items))
    for field in ("scores", "probs", "maps"):
        assert np.array_equal(getattr(runs[0], field), getattr(runs[1], field)), field
    assert not np.allclose(runs[0].maps, runs[2].maps)


def test_it_learns_to_localise_a_visible_lesion(backbone) -> None:
    task = blob_task(4, seed=3, tag="learn")
    unfitted = make(UltraAD, backbone, seed=0, epochs=0)
    unfitted.fit(task)
    method = make(UltraAD, backbone, seed=0, epochs=40)
    method.fit(task)
    before = pixel_metrics(unfitted.predict(task.items).maps, task.masks).values["pixel_auroc"]
    after = pixel_metrics(method.predict(task.items).maps, task.masks).values["pixel_auroc"]
    assert after >= 0.9 and after >= before + 0.15, (before, after)
    # and it transfers to new images of the same kind
    held_out = blob_task(4, seed=11, tag="held")
    transfer = pixel_metrics(method.predict(held_out.items).maps, held_out.masks).values["pixel_auroc"]
    assert transfer >= 0.85, transfer


def test_pif_feeds_each_layer_its_own_tokens_or_all_layers_at_once(backbone, support: SupportSet) -> None:
    """'per-layer': T'_l attends to layer l's adapted tokens only and drives layer l's map;
    'all-layers': one T' from every layer's tokens (a set: layer order does not matter)."""
    items = support.items[:2]
    per_layer = make(UltraAD, backbone, pif_zero_init=False)
    model = per_layer.init_model(support)  # random, non-zero attention: T' differs from the prototypes
    embeds, tokens = per_layer.features(items)
    with torch.no_grad():
        out = model(embeds, tokens, backbone.grid[0])
        adapted = model.adapters(tokens)
        protos = model.prototypes(out.prompts)
        fused = model.fused_text(out.prompts, adapted)
        n_layers = adapted.shape[1]
        assert fused.shape == (2, n_layers, 2, backbone.embed_dim)
        for layer in range(n_layers):
            own = model.pif(protos, adapted[:, layer])
            torch.testing.assert_close(fused[:, layer], own)
            assert not torch.allclose(own, protos, atol=1e-3)
            # layer l's fused map = softmax(cos(P_l, T'_l) / tau)[abnormal] on the patch grid
            cos = F.normalize(adapted[:, layer], dim=-1) @ F.normalize(own, dim=-1).transpose(1, 2)
            probs = torch.softmax(cos / 0.07, dim=-1)[..., 1].reshape(2, *backbone.grid)
            torch.testing.assert_close(out.fused_layer_maps[:, layer], probs)
        changed = adapted.clone()
        changed[:, 2] = changed[:, 2].flip(-1)
        moved = model.fused_text(out.prompts, changed)
        assert [not torch.allclose(moved[:, i], fused[:, i]) for i in range(n_layers)] == [
            i == 2 for i in range(n_layers)
        ]

    all_layers = make(UltraAD, backbone, pif_tokens="all-layers", pif_zero_init=False)
    model = all_layers.init_model(support)
    with torch.no_grad():
        out = model(embeds, tokens, backbone.grid[0])
        adapted = model.adapters(tokens)
        protos = model.prototypes(out.prompts)
        fused = model.fused_text(out.prompts, adapted)
        pooled = model.pif(protos, torch.cat([adapted[:, i] for i in range(n_layers)], dim=1))
        torch.testing.assert_close(fused, pooled)
        torch.testing.assert_close(model.fused_text(out.prompts, adapted.flip(1)), pooled)
        assert not torch.allclose(fused, model.pif(protos, adapted[:, 0]), atol=1e-3)
        for layer in range(n_layers):  # every layer's map uses the one T'
            cos = F.normalize(adapted[:, layer], dim=-1) @ F.normalize(pooled, dim=-1).transpose(1, 2)
            probs = torch.softmax(cos / 0.07, dim=-1)[..., 1].reshape(2, *backbone.grid)
            torch.testing.assert_close(out.fused_layer_maps[:, layer], probs)
        # one layer's tokens repeated L times weigh as they do once: the same T' as per layer
        same = adapted[:, :1].expand(-1, n_layers, -1, -1)
        torch.testing.assert_close(model.fused_text(out.prompts, same), model.pif(protos, adapted[:, 0]))


def test_layers_option_uses_exactly_the_named_blocks(backbone, support: SupportSet) -> None:
    """layers [3, 1] = the cached blocks 1 and 3 in block order, each with its own adapter."""
    items = support.items[:3]
    subset = make(UltraAD, backbone, layers=[backbone.layers[-1], backbone.layers[1]], pif_zero_init=False)
    last = len(backbone.layers) - 1
    assert subset.layer_positions() == [1, last]
    cached = backbone.image_features(items).patch_tokens.float()
    assert torch.equal(subset.features(items)[1], cached[:, [1, last]])
    # the subset model with the full model's weights for blocks 1 and 3 gives the full model's layer maps
    full = make(UltraAD, backbone, pif_zero_init=False)
    full_model = full.init_model(support)
    weights = {k: v for k, v in full_model.state_dict().items() if not k.startswith("adapters.")}
    for mine, theirs in enumerate((1, last)):
        for name in ("weight", "bias"):
            weights[f"adapters.linears.{mine}.{name}"] = full_model.state_dict()[
                f"adapters.linears.{theirs}.{name}"
            ]
    subset.init_model(support).load_state_dict(weights)
    mine_out, full_out = subset.outputs(items), full.outputs(items)
    assert mine_out.layer_maps.shape[1] == 2
    torch.testing.assert_close(mine_out.layer_maps, full_out.layer_maps[:, [1, last]])
    torch.testing.assert_close(mine_out.fused_layer_maps, full_out.fused_layer_maps[:, [1, last]])
    torch.testing.assert_close(mine_out.map, full_out.layer_maps[:, [1, last]].mean(1))
    torch.testing.assert_close(mine_out.logits, full_out.logits)  # the classifier does not use the layers


# --------------------------------------------------------------------------- the grid


def test_all_variants_run_in_the_grid_and_fill_the_tables(
    make_config: ConfigFactory, shared_data: SyntheticData
) -> None:
    quick = {name: {"epochs": 2} for name in VARIANTS}
    config = make_config(
        methods=",".join(VARIANTS),
        shots="2",
        seeds="0",
        targets=str(shared_data.target_a.folder),
        method_config=quick,
    )
    run_grid(config, show_progress=False)
    run_dir = run_dir_of(config)
    cells = cell_dirs(run_dir)
    assert {c.split("/")[0] for c in cells} == set(VARIANTS)
    pixel = {"pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_dice"}
    image = {"image_auroc", "class_auroc", "class_accuracy", "class_balanced_accuracy"}
    for cell in cells:
        record = json.loads((run_dir / cell / "cell.json").read_text())
        metrics = set(record["metrics"])
        if cell.startswith("ultraad-no-joint/"):
            assert metrics == pixel
        else:
            assert metrics == pixel | image
        assert record["method_options"]["epochs"] == 2
    text = render_tables(load_cells(run_dir), fmt="markdown", ablation=True)
    for name in VARIANTS:
        assert name in text
