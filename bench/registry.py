"""Method registry: built-ins under ``methods/<name>/`` and plugins from entry points.

A built-in method package exposes ``METHODS``, a list of :class:`~bench.method.Method`
subclasses (a folder may register variants, e.g. ``winclip`` and ``winclip-fewshot``).
An external package registers each class under the entry-point group ``bench.methods``::

    [project.entry-points."bench.methods"]
    my-method = "my_package.module:MyMethod"
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from bench.errors import MethodError
from bench.method import Method

ENTRY_POINT_GROUP = "bench.methods"


def _check(cls: object, origin: str) -> type[Method]:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"{origin} does not name a bench.method.Method subclass (got {cls!r})")
    for attribute in ("name", "description", "tasks"):
        if not hasattr(cls, attribute):
            raise MethodError(
                f"{origin}: method class {cls.__name__} lacks the class attribute {attribute!r}"
            )
    return cls


@cache
def available_methods() -> dict[str, type[Method]]:
    """All registered methods by name: built-ins first, then entry-point plugins."""
    import methods as builtin_package

    found: dict[str, type[Method]] = {}

    def add(cls: type[Method], origin: str) -> None:
        if cls.name in found and found[cls.name] is not cls:
            raise MethodError(f"method name {cls.name!r} from {origin} is already registered; rename one")
        found[cls.name] = cls

    for module_info in sorted(pkgutil.iter_modules(builtin_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"methods.{module_info.name}")
        for cls in getattr(module, "METHODS", ()):
            add(_check(cls, f"methods/{module_info.name}"), f"methods/{module_info.name}")
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plugin must not hide the others' names
            raise MethodError(
                f"plugin entry point {entry.name!r} ({entry.value}) failed to load: {exc}"
            ) from exc
        add(_check(cls, f"entry point {entry.value}"), f"entry point {entry.value}")
    return found


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a clear error lists the known names."""
    methods = available_methods()
    if name not in methods:
        raise MethodError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(methods))} (see `bench methods`)"
        )
    return methods[name]


def resolve_method_names(spec: str | list[str]) -> list[str]:
    """Expand ``all`` or a comma-separated list into registered names (validated, order kept)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return sorted(available_methods())
    for name in names:
        get_method(name)
    return names
