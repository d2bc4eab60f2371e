"""Every registered method (built-ins and plugins) honours the Method contract.

One parametrised test per method runs it on the tiny random-init model through fit and
predict, twice with the same seed, and checks: the option schema (defaults valid, help on
built-ins), the Prediction contract for its declared tasks (the runner's own validator),
outputs present exactly for the declared tasks, determinism, ``uses_support`` (a zero-shot
method predicts without fit) and ``uses_backbone`` (a method that says it needs no CLIP gets
no backbone). A new method gets all of this for free by being registered.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import EVAL_SIZE, TINY_MODEL, random_items

import bench.registry as registry
from bench.kit import Option
from bench.kit.options import validate
from bench.method import TABLE_GROUPS, Method, MethodContext, Prediction, SupportSet
from bench.runner import Cell, FitUnit, validate_prediction
from bench.types import CLASSES, ImageItem, Task
from bench.weights import BackboneSpec, load_backbone


class ConformancePlugin(Method):
    """A test plugin declaring only ``default_config`` (its schema is inferred)."""

    name = "conformance-plugin"
    description = "test plugin: brightness score, no CLIP"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    uses_support = False
    uses_backbone = False
    default_config: ClassVar[dict[str, float]] = {"gain": 1.0}

    def predict(self, items):
        maps = np.stack(
            [np.full((EVAL_SIZE, EVAL_SIZE), item.rgb().mean() / 255.0, np.float32) for item in items]
        )
        return Prediction(scores=self.config["gain"] * maps[:, 0, 0].astype(np.float64), maps=maps)


@pytest.fixture(autouse=True)
def _with_plugin(method_registry) -> None:
    method_registry(ConformancePlugin)


def method_names() -> list[str]:
    return sorted({*registry.available_methods(), ConformancePlugin.name})


@pytest.fixture(scope="module")
def backbone_factory(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("conformance-cache")
    backbone = load_backbone(BackboneSpec(TINY_MODEL, "none", cache_dir=cache, device="cpu"))

    def factory():
        return backbone

    return factory


def support_set() -> SupportSet:
    """2 images per class; lesion images get a square lesion mask at the evaluation size."""
    items = random_items(6, seed=11, shape=(40, 48), prefix="sup", key_prefix="conformance-support")
    labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)
    masks = np.zeros((6, EVAL_SIZE, EVAL_SIZE), dtype=np.float32)
    masks[2:, 8:20, 10:24] = 1.0
    return SupportSet(tuple(items), labels, masks)


def query_items() -> list[ImageItem]:
    return random_items(4, seed=12, shape=(40, 48), prefix="test", key_prefix="conformance-test")


#: Options the tiny test model needs (its text encoder has 2 blocks, its image grid 4 x 4 patches;
#: the official settings assume CLIP's 12 text blocks and 37 x 37 patches).
TINY_MODEL_OPTIONS = {
    "anomalyclip": {"deep_depth": 2},
    # text prompts at text blocks 1..depth-1 of 2; 20 clusters do not fit the tiny model's 16 patches
    "adaclip": {"prompt_depth": 2, "k_clusters": 3},
    # the official 50 epochs of 11 augmented views at batch 1 are 3300 steps: the contract needs one epoch
    "mvfa": {"epochs": 1},
}


def fitted(cls: type[Method], factory, tmp_path: Path, seed: int = 0) -> Method:
    used_factory = factory if cls.uses_backbone else None
    ctx = MethodContext(
        device=torch.device("cpu"),
        seed=seed,
        shots=2,
        scratch_dir=tmp_path,
        config=TINY_MODEL_OPTIONS.get(cls.name, {}),
        eval_size=EVAL_SIZE,
        backbone_factory=used_factory,
    )
    method = cls(ctx)
    if cls.uses_support:
        method.fit(support_set())
    return method


def outputs(prediction: Prediction) -> Iterator[np.ndarray | None]:
    yield np.asarray(prediction.scores)
    yield None if prediction.probs is None else np.asarray(prediction.probs)
    yield None if prediction.maps is None else np.asarray(prediction.maps)


@pytest.mark.parametrize("name", method_names())
def test_method_conforms(name: str, backbone_factory, tmp_path: Path) -> None:
    cls = registry.get_method(name)

    # the option schema: defaults pass it, every built-in option explains itself
    assert validate(cls.options, {}, name) == dict(cls.default_config)
    assert all(isinstance(option, Option) for option in cls.options.values())
    if cls.__module__.startswith("methods."):
        assert all(option.help for option in cls.options.values()), f"{name}: options without help"
    assert cls.table_group in TABLE_GROUPS and isinstance(cls.table_rank, int)
    assert cls.ablation_of is None or cls.ablation_of in registry.available_methods()
    assert cls.tasks and cls.tasks <= set(Task) and cls.description

    items = query_items()
    first = fitted(cls, backbone_factory, tmp_path / "a").predict(items)
    tasks = fitted(cls, backbone_factory, tmp_path / "check").tasks  # an instance may narrow its tasks
    validate_prediction(first, items, tasks, EVAL_SIZE, Cell(FitUnit(name, 2, 0), "conformance"))
    assert (first.probs is not None) == (Task.CLASSIFY in tasks)
    assert (first.maps is not None) == (Task.LOCALIZE in tasks)
    if first.probs is not None:
        assert first.probs.shape == (len(items), len(CLASSES))

    second = fitted(cls, backbone_factory, tmp_path / "b").predict(items)
    for a, b in zip(outputs(first), outputs(second), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} is not deterministic for a fixed seed")


@pytest.mark.parametrize("name", method_names())
def test_declared_resources_are_honoured(name: str, backbone_factory, tmp_path: Path) -> None:
    """A zero-shot method predicts without fit; a no-CLIP method gets no backbone and needs none."""
    cls = registry.get_method(name)
    if cls.uses_backbone and cls.uses_support:
        pytest.skip("needs both the backbone and the support set")
    method = fitted(cls, backbone_factory, tmp_path)
    if not cls.uses_backbone:
        with pytest.raises(RuntimeError, match="uses_backbone"):
            _ = method.ctx.backbone
    prediction = method.predict(query_items())
    assert np.isfinite(np.asarray(prediction.scores)).all()


def test_paper_config_method_options_are_valid() -> None:
    """configs/paper.yaml's method_config names registered methods and passes their schemas: the
    official input sizes (518 px = 37 x 37 patches of ViT-L/14; MVFA's 240 px = 17 x 17 patches, run
    at 238 so the grid covers the whole image)."""
    from conftest import REPO_ROOT

    from bench.config import load_config

    config = load_config(REPO_ROOT / "configs" / "paper.yaml")
    official_grid = {"adaclip": 37, "anomalyclip": 37, "aprilgan": 37, "vcpclip": 37, "mvfa": 17}
    assert set(config.method_config) == set(official_grid)
    for name, options in config.method_config.items():
        validated = validate(registry.get_method(name).options, options, name)
        assert validated["input_size"] % 14 == 0 and validated["input_size"] // 14 == official_grid[name]
