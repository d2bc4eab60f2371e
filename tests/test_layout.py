"""The code layout the toolkit promises: methods hold only what makes them different.

Methods import the toolkit (``bench.kit``), the method contract and core types, never other
harness modules; no method runs CLIP's internals itself, writes its own training loop or
parses its options by hand. These checks read the source, so a method that slips back into
one of those habits fails here with the file and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

METHOD_FILES = sorted((REPO_ROOT / "methods").rglob("*.py"))
#: Harness modules a method may import (besides the toolkit).
ALLOWED_IMPORTS = ("bench.kit", "bench.method", "bench.types", "bench.errors", "methods.")

#: Source patterns that mean a method reaches into CLIP or re-implements shared machinery.
FORBIDDEN = {
    r"\.visual\b|\._visual\b|\.resblocks\b|\.transformer\b|\bconv1\b|positional_embedding": "CLIP internals",
    r"backbone\.model\b": "the shared open_clip model",
    r"\.(step|zero_grad)\(\)": "a hand-written training loop (use bench.kit.train)",
    r"\bfor\s+\w+\s+in\s+.*epochs?\b": "a hand-written epoch loop (use bench.kit.train)",
    r"float\(cfg\[|int\(cfg\[|float\(self\.config\[|int\(self\.config\[": "hand-written option parsing",
    r"^\s+default_config\s*[:=]": "a hand-written default_config (declare options instead)",
}


def _id(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


@pytest.mark.parametrize("path", METHOD_FILES, ids=_id)
def test_methods_import_only_the_toolkit(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench"):
            assert node.module.startswith(ALLOWED_IMPORTS), (
                f"{_id(path)}:{node.lineno} imports {node.module}; methods use bench.kit"
            )
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("bench") or alias.name.startswith(ALLOWED_IMPORTS), (
                    f"{_id(path)}:{node.lineno} imports {alias.name}; methods use bench.kit"
                )


@pytest.mark.parametrize("path", METHOD_FILES, ids=_id)
def test_methods_reimplement_nothing_shared(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        code = line.split("#", 1)[0]
        if code.strip().startswith(('"', "'")) or not code.strip():
            continue
        for pattern, what in FORBIDDEN.items():
            assert not re.search(pattern, code), f"{_id(path)}:{number} uses {what}: {line.strip()}"


def test_the_checks_catch_what_they_name() -> None:
    """Each pattern fires on a line that does what it forbids (so the checks above can fail)."""
    offenders = {
        "x = backbone._visual.transformer(x)": "CLIP internals",
        "self.ctx.backbone.model.encode_image(x)": "the shared open_clip model",
        "        optimiser.step()": "a hand-written training loop (use bench.kit.train)",
        "for epoch in range(self.epochs):": "a hand-written epoch loop (use bench.kit.train)",
        "lr = float(cfg['lr'])": "hand-written option parsing",
        "    default_config = {'a': 1}": "a hand-written default_config (declare options instead)",
    }
    for line, what in offenders.items():
        assert any(re.search(p, line) for p, w in FORBIDDEN.items() if w == what), line
