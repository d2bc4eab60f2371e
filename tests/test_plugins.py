"""External methods registered under the ``bench.methods`` entry-point group, and the README example.

No pip install: each test writes a module and an installed-distribution record
(``<name>-<version>.dist-info/`` with ``METADATA`` and ``entry_points.txt``) into a tmp folder
and puts it on ``sys.path``, which is exactly what ``importlib.metadata`` scans.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from conftest import (
    REPO_ROOT,
    SyntheticData,
    bench,
    cell_dirs,
    flat,
    run_dir_of,
    table_rows,
    tiny_config,
)

import bench.registry as registry
from bench.errors import MethodError
from bench.runner import run_grid

EXT_PLUGIN = """
from bench.method import Method, Prediction
from bench.types import Task
import numpy as np


class ExtMethod(Method):
    name = "ext-method"
    description = "external test plugin: constant scores"
    tasks = frozenset({Task.DETECT})
    uses_support = False
    uses_backbone = False

    def predict(self, items):
        return Prediction(scores=np.arange(len(items), dtype=np.float64))


class Shadow(ExtMethod):
    name = "zeroshot"


def helper():
    return 42
"""

Installer = Callable[[str, Mapping[str, str], Mapping[str, str]], Path]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Installer]:
    """``install_plugin(dist, {module path: source}, {entry name: "module:attr"})`` -> its folder.

    The method registry's cache is cleared before the test and after it (so no other test
    sees the plugin), and the plugin's modules are forgotten afterwards.
    """
    modules: list[str] = []

    def install(dist: str, files: Mapping[str, str], entries: Mapping[str, str]) -> Path:
        site = tmp_path / f"site-{dist}"
        for relative, source in files.items():
            path = site / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source, encoding="utf-8")
            top = Path(relative).parts[0]
            modules.append(top.removesuffix(".py"))
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
        (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}")
        monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches
        registry.available_methods.cache_clear()
        return site

    registry.available_methods.cache_clear()
    yield install
    registry.available_methods.cache_clear()
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]


def test_entry_point_plugin_is_found(install_plugin: Installer) -> None:
    install_plugin("extplugin", {"extplugin.py": EXT_PLUGIN}, {"ext-method": "extplugin:ExtMethod"})
    methods = registry.available_methods()
    assert methods["ext-method"].__module__ == "extplugin"
    assert {"zeroshot", "intensity"} <= set(methods)  # the built-ins are still there
    assert registry.get_method("ext-method") is methods["ext-method"]
    assert registry.resolve_method_names("all") == sorted(methods)


@pytest.mark.usefixtures("wide_consoles")
def test_bench_methods_lists_the_plugin(install_plugin: Installer) -> None:
    install_plugin("extplugin", {"extplugin.py": EXT_PLUGIN}, {"ext-method": "extplugin:ExtMethod"})
    code, out, _ = bench("methods")
    assert code == 0
    rows = table_rows(out)
    assert rows["ext-method"][1:6] == ["yes", "-", "-", "zero-shot", "external test plugin: constant scores"]
    assert "zeroshot" in rows and "intensity" in rows


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        (
            "extplugin_missing:Nope",
            ["plugin entry point 'broken' (extplugin_missing:Nope) failed to load", "extplugin_missing"],
        ),
        ("extplugin:NoSuchClass", ["plugin entry point 'broken' (extplugin:NoSuchClass) failed to load"]),
        ("extplugin:helper", ["entry point extplugin:helper does not name a bench.method.Method subclass"]),
        ("extplugin:Shadow", ["method name 'zeroshot'", "already registered"]),
    ],
)
def test_broken_entry_point_is_a_clear_method_error(
    install_plugin: Installer, entry: str, fragments: list[str]
) -> None:
    install_plugin("extplugin", {"extplugin.py": EXT_PLUGIN}, {"broken": entry})
    with pytest.raises(MethodError) as info:
        registry.available_methods()
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.usefixtures("wide_consoles", "isolated_env")
def test_broken_entry_point_through_the_cli(install_plugin: Installer) -> None:
    install_plugin("extplugin", {"extplugin.py": EXT_PLUGIN}, {"broken": "extplugin_missing:Nope"})
    code, out, err = bench("methods")
    assert code == 2 and "Traceback" not in out + err
    assert "error: plugin entry point 'broken' (extplugin_missing:Nope) failed to load" in flat(err)


# --------------------------------------------------------------------------- the README's example


def readme_section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_example_method_runs_as_a_plugin(
    install_plugin: Installer, shared_data: SyntheticData, tmp_path: Path, isolated_env: Path
) -> None:
    """The README's toy plugin (a custom forward variant + adapters inside the frozen tower)
    runs through `bench run` as an installed plugin, with no edit of bench/."""
    section = readme_section("Add a method")
    (code,) = fenced_blocks(section, "python")
    first_line = code.splitlines()[0]
    assert first_line.startswith("# ") and first_line.endswith(".py"), first_line
    module_path = first_line[2:].strip()  # "tower_probe/__init__.py"
    (toml_block,) = fenced_blocks(section, "toml")
    entries = tomllib.loads(toml_block)["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    assert entries == {"tower-probe": "tower_probe:TowerProbe"}

    install_plugin("tower-probe", {module_path: code}, entries)
    cls = registry.get_method("tower-probe")
    assert cls.__module__ == "tower_probe"
    assert {str(t) for t in cls.tasks} == {"detect", "localize"} and cls.uses_support

    config = tiny_config(tmp_path, shared_data, isolated_env, methods="tower-probe,intensity", seeds="0,1")
    summary = run_grid(config, show_progress=False)
    assert len(summary.cells_done) == 6
    run_dir = run_dir_of(config)
    probe_cells = {f"tower-probe/{t.name}/shots2_seed{s}" for t in shared_data.targets for s in (0, 1)}
    assert probe_cells <= cell_dirs(run_dir)
    for cell in probe_cells:
        record = json.loads((run_dir / cell / "cell.json").read_text())
        assert {"image_auroc", "pixel_auroc", "pixel_ap"} <= set(record["metrics"])
        assert record["tasks"] == ["detect", "localize"]
        stored = json.loads((run_dir / cell / "support.json").read_text())
        assert all(len(ids) == 2 for ids in stored["ids"].values())
    # the plugin's forward variant and the trainable pass's frozen prefix were cached like any feature
    folders = {json.loads(p.read_text()).get("variant") for p in isolated_env.rglob("config.json")}
    assert {"patch-energy", "stream"} <= folders
    # two seeds fitted different adapters: the trained part really learned from its own fit
    seed0, seed1 = (
        (run_dir / f"tower-probe/{shared_data.target_a.name}/shots2_seed{s}/predictions.csv").read_text()
        for s in (0, 1)
    )
    assert seed0 != seed1
