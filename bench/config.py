"""Run configuration: defaults, a YAML file, then command-line flags, in that order of precedence.

The YAML file uses the same keys as :class:`RunConfig` plus ``method_config``, a mapping
from method name to that method's options (see ``bench methods --verbose``)::

    methods: [ultraad, zeroshot]
    shots: [4, 8, 16]
    seeds: [0, 1, 2]
    source: bus-uclm
    targets: [busi, udiat]
    backbone: ViT-L-14-336-quickgelu
    pretrained: openai
    method_config:
      zeroshot: {logit_scale: 100}
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bench.errors import ConfigError

#: Side length of the square evaluation resolution: every map and mask is compared here.
DEFAULT_EVAL_SIZE = 256
#: Largest support-sampling seed (numpy seeds are 32-bit).
MAX_SEED = 2**32 - 1
#: The dtypes ``--save-maps`` can store maps in.
MAPS_DTYPES = ("float32", "float16")


@dataclass
class RunConfig:
    """Everything that defines a grid run. Field names are the YAML keys and the CLI flags."""

    methods: list[str] = field(default_factory=lambda: ["all"])
    # The built-in default is a demonstration grid that runs in minutes on a CPU (every method,
    # 4 shots, one seed); the protocol's grid is `--shots 4,8,16 --seeds 0,1,2`, which
    # configs/paper.yaml sets.
    shots: list[int] = field(default_factory=lambda: [4])
    seeds: list[int] = field(default_factory=lambda: [0])
    # The built-in phantom: support from one simulated device, targets on two others.
    source: str = "phantom:device-a"
    targets: list[str] = field(default_factory=lambda: ["phantom:device-b", "phantom:device-c"])
    # A CPU-friendly CLIP (7x7 patch grid) for the built-in default; the paper's backbone is
    # ViT-L-14-336-quickgelu (configs/paper.yaml).
    backbone: str = "ViT-B-32-quickgelu"
    # Standard weights when cached or downloadable, else random init after a loud warning.
    pretrained: str = "auto"
    input_size: int | None = None
    layers: list[int] | None = None
    eval_size: int = DEFAULT_EVAL_SIZE
    data_root: str = field(default_factory=lambda: os.environ.get("BENCH_DATA_ROOT", "./data"))
    out: str = "results"
    name: str | None = None
    device: str = "auto"
    batch_size: int = 32
    cache_dir: str | None = None
    save_maps: bool = False
    # float32 keeps exactly what the pixel metrics were computed from (subgroup tables and
    # intervals then reproduce them); float16 halves the disk and rounds the maps.
    maps_dtype: str = "float32"
    shard: str = "1/1"
    method_config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError("no methods given; use --methods all or a comma-separated list")
        if not self.targets:
            raise ConfigError("no target datasets given; use --targets NAME[,NAME...]")
        if any(k < 1 for k in self.shots):
            raise ConfigError(f"shots must be positive integers, got {self.shots}")
        bad_seeds = [s for s in self.seeds if not 0 <= s <= MAX_SEED]
        if bad_seeds:
            raise ConfigError(
                f"seeds must lie in 0..{MAX_SEED} (numpy's seed range), got {', '.join(map(str, bad_seeds))}"
            )
        if self.name is not None:
            check_run_name(self.name)
        for key in ("methods", "shots", "seeds", "targets"):
            values = getattr(self, key)
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"{key} lists {', '.join(repeated)} more than once: {values}")
        if self.eval_size < 8:
            raise ConfigError(
                f"eval_size {self.eval_size} is too small; the protocol default is {DEFAULT_EVAL_SIZE}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        shard_index(self.shard)
        if self.maps_dtype not in MAPS_DTYPES:
            raise ConfigError(f"maps_dtype must be one of {', '.join(MAPS_DTYPES)}, got {self.maps_dtype!r}")
        if not isinstance(self.method_config, dict) or not all(
            isinstance(v, dict) for v in self.method_config.values()
        ):
            raise ConfigError("method_config must map method names to option mappings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_run_name(name: str) -> None:
    """A run name is one plain folder name inside ``--out``: it can never point elsewhere."""
    if (
        not name.strip()
        or name.startswith(".")
        or any(sep in name for sep in ("/", "\\", "\0"))
        or Path(name).is_absolute()
    ):
        raise ConfigError(
            f"--name must be a plain folder name inside --out (no '/', '\\', leading '.' or absolute "
            f"path), got {name!r}; use --out to choose where results go"
        )


def slug(text: str) -> str:
    """A file-system-safe name: letters, digits, dot, dash and underscore only; never hidden
    (no leading dot: the store skips hidden folders, which hold cells being written)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lstrip(".").strip("-")
    return cleaned or "_"


def shard_index(shard: str) -> tuple[int, int]:
    """Parse ``I/N`` (1-based) into (I, N), with a clear error."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"--shard must look like I/N with 1 <= I <= N (e.g. 2/8), got {shard!r}")
    return int(match.group(1)), int(match.group(2))


def parse_list(value: str | list[Any] | None, kind: type = str) -> list[Any] | None:
    """``"4,8,16"`` -> ``[4, 8, 16]``; lists pass through (converted); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:  # a single YAML scalar, e.g. ``shots: 4``
        items = [value]
    try:
        return [kind(str(item).strip()) for item in items if str(item).strip()]
    except ValueError as exc:
        raise ConfigError(f"cannot read {value!r} as a list of {kind.__name__}: {exc}") from exc


_LIST_FIELDS = {"methods": str, "shots": int, "seeds": int, "targets": str, "layers": int}


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then the YAML file at ``path``, then every override that is not None."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(RunConfig)}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of options, got {type(loaded).__name__}")
        unknown = set(loaded) - known
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name, kind in _LIST_FIELDS.items():
        if name in values:
            values[name] = parse_list(values[name], kind)
    for name in ("source", "backbone", "pretrained", "data_root", "out", "device", "shard", "maps_dtype"):
        if name in values and values[name] is not None:
            values[name] = str(values[name])
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
