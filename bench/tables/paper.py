"""The UltraAD paper's own numbers, read from ``results/paper.yaml`` (for ``--compare paper``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.errors import ConfigError

#: Repository root (``bench/..``); the paper's numbers live in ``results/paper.yaml`` under it.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PAPER_YAML = REPO_ROOT / "results" / "paper.yaml"
#: Key of the paper's ablation section among :attr:`PaperNumbers.tables`.
PAPER_ABLATION_KEY = "ablation"


@dataclass(frozen=True)
class PaperMethod:
    """One method row of a paper table; ``values[(dataset, shots, metric)]`` in percent.

    Zero-shot methods are keyed with shots 0. ``None`` = the paper prints "-".
    """

    method: str
    paper_name: str
    zero_shot: bool
    values: Mapping[tuple[str, int, str], float | None]

    def lookup(self, dataset: str, shots: int, metric: str) -> tuple[bool, float | None]:
        """``(reported, value)`` for a cell; zero-shot rows answer for every ``shots``."""
        key = (dataset, 0 if self.zero_shot else shots, metric)
        if key in self.values:
            return True, self.values[key]
        return False, None

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for d, _, _ in self.values))

    @property
    def shots(self) -> list[int]:
        return sorted({s for _, s, _ in self.values})


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper (detection, classification, localization or ablation)."""

    key: str
    title: str
    metrics: tuple[str, ...]
    methods: Mapping[str, PaperMethod]

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for m in self.methods.values() for d in m.datasets))

    @property
    def shots(self) -> list[int]:
        """Few-shot settings the table reports (0, zero-shot, left out)."""
        return sorted({s for m in self.methods.values() for s in m.shots if s > 0})


@dataclass(frozen=True)
class PaperNumbers:
    """The content of ``results/paper.yaml``."""

    path: Path
    source: str
    backbone: str
    support_source: str
    seeds: int
    shots: tuple[int, ...]
    datasets: Mapping[str, str]
    public: Mapping[str, bool]
    tables: Mapping[str, PaperTable]


def load_paper(path: Path | str | None = None) -> PaperNumbers:
    """Read the paper's numbers (default: ``<repo>/results/paper.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_PAPER_YAML
    if not path.is_file():
        raise ConfigError(
            f"paper numbers file {path} not found; restore results/paper.yaml "
            "or pass its path (paper_yaml=...)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        datasets = {str(k): str(v["description"]).strip() for k, v in raw["datasets"].items()}
        public = {str(k): bool(v.get("public", False)) for k, v in raw["datasets"].items()}
        tables: dict[str, PaperTable] = {}
        table_items = [*raw["tables"].items(), (PAPER_ABLATION_KEY, raw["ablation"])]
        for key, table in table_items:
            metrics = tuple(str(m) for m in table["metrics"])
            methods: dict[str, PaperMethod] = {}
            for method, entry in table["methods"].items():
                values: dict[tuple[str, int, str], float | None] = {}
                for dataset, by_shots in entry["values"].items():
                    if dataset not in datasets:
                        raise ConfigError(
                            f"{path}: table {key!r}, method {method!r} names dataset {dataset!r}, "
                            f"which is not under `datasets` ({', '.join(datasets)})"
                        )
                    for shots, by_metric in by_shots.items():
                        for metric, value in by_metric.items():
                            if metric not in metrics:
                                raise ConfigError(
                                    f"{path}: table {key!r}, method {method!r}: metric {metric!r} "
                                    f"is not one of the table's metrics {list(metrics)}"
                                )
                            values[(str(dataset), int(shots), str(metric))] = (
                                None if value is None else float(value)
                            )
                methods[str(method)] = PaperMethod(
                    method=str(method),
                    paper_name=str(entry.get("paper_name", method)),
                    zero_shot=bool(entry.get("zero_shot", False)),
                    values=values,
                )
            tables[str(key)] = PaperTable(str(key), str(table.get("title", key)), metrics, methods)
        return PaperNumbers(
            path=path,
            source=str(raw.get("source", "")).strip(),
            backbone=str(raw.get("backbone", "")).strip(),
            support_source=str(raw.get("support_source", "")).strip(),
            seeds=int(raw.get("seeds", 0)),
            shots=tuple(int(s) for s in raw["shots"]),
            datasets=datasets,
            public=public,
            tables=tables,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{path} does not have the expected layout ({exc!r}); see its header comment"
        ) from exc
