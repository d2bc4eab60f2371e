"""Class descriptions of UltraAD's frozen text memory ``W_text`` (ultraad.md, part 4).

The option ``descriptions`` names the set: ``"lesion-aware"`` (the BI-RADS sentences in
``descriptions.yaml`` next to this file, the default), ``"ultrasound-unaware"``
(``descriptions_us_unaware.yaml``: "This is a {class} image.", the paper's ablation), a path
to a YAML file of the same format, or an inline mapping. The format is one list of
sentences per class, keys exactly ``normal``, ``benign``, ``malignant``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from bench.errors import MethodError
from bench.method import class_names

#: Folder of the shipped description files (package data: ``*.yaml``).
HERE = Path(__file__).parent
#: Built-in description sets by name.
BUILTIN_SETS: dict[str, Path] = {
    "lesion-aware": HERE / "descriptions.yaml",
    "ultrasound-unaware": HERE / "descriptions_us_unaware.yaml",
}


def load_descriptions(spec: Any, method: str = "ultraad") -> dict[str, list[str]]:
    """The sentences per class (in class order) named by the option value ``spec``."""
    origin: str
    if isinstance(spec, Mapping):
        raw: Any = spec
        origin = "option 'descriptions' (inline mapping)"
    elif isinstance(spec, str | Path) and str(spec).strip():
        key = str(spec).strip()
        path = BUILTIN_SETS.get(key, Path(key).expanduser())
        origin = f"descriptions file {path}"
        if not path.is_file():
            raise MethodError(
                f"method {method!r}: option 'descriptions' is {key!r}, which is neither a built-in set "
                f"({', '.join(BUILTIN_SETS)}) nor an existing YAML file"
            )
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise MethodError(f"method {method!r}: cannot read {origin}: {exc}") from exc
    else:
        raise MethodError(
            f"method {method!r}: option 'descriptions' must be a built-in set name "
            f"({', '.join(BUILTIN_SETS)}), a YAML file path or a mapping, got {spec!r}"
        )
    wanted = list(class_names())
    if not isinstance(raw, Mapping) or set(raw) != set(wanted):
        found = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise MethodError(f"method {method!r}: {origin} must map exactly {wanted} to sentences, got {found}")
    out: dict[str, list[str]] = {}
    for name in wanted:
        sentences = raw[name]
        if isinstance(sentences, str):
            sentences = [sentences]
        if (
            not isinstance(sentences, list | tuple)
            or not sentences
            or not all(isinstance(s, str) and s.strip() for s in sentences)
        ):
            raise MethodError(
                f"method {method!r}: {origin}: class {name!r} needs a non-empty list of sentences, "
                f"got {sentences!r}"
            )
        out[name] = [s.strip() for s in sentences]
    return out
