"""The runner and store under hostile use: other data under one run name, bad --out and --name,
concurrent processes on one grid, stale claims, bad options and malformed method output."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import ConfigFactory, SyntheticData, bench, build_dataset, cell_dirs, flat, run_dir_of

from bench.claims import ClaimBook
from bench.config import RunConfig
from bench.errors import ConfigError, DatasetError, MethodError, ResultsError
from bench.method import Method, Prediction, SupportSet
from bench.runner import run_grid, unit_claim_name
from bench.types import ImageItem, Task


class MeanIntensity(Method):
    """Test method: a few-shot detector on mean grey level; logs every fit to ``log`` (if set)."""

    name = "mean-test"
    description = "test only: few-shot mean intensity"
    tasks = frozenset({Task.DETECT})
    uses_support = True
    uses_backbone = False
    log: ClassVar[Path | None] = None
    fit_seconds: ClassVar[float] = 0.0

    def fit(self, support: SupportSet) -> None:
        self.reference = float(np.mean([item.rgb().mean() for item in support.items]))
        if self.fit_seconds:
            time.sleep(self.fit_seconds)
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {self.ctx.shots} {self.ctx.seed}\n")

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        return Prediction(scores=np.array([abs(item.rgb().mean() - self.reference) for item in items]))


class TextOutput(Method):
    """Test method: one of its outputs (``broken``) holds strings instead of numbers."""

    name = "text-output"
    description = "test only: returns strings"
    tasks = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
    uses_support = False
    uses_backbone = False
    broken: ClassVar[str] = "scores"

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        b, size = len(items), self.ctx.eval_size
        outputs: dict[str, object] = {
            "scores": np.zeros(b),
            "probs": np.full((b, 3), 1 / 3),
            "maps": np.zeros((b, size, size)),
        }
        outputs[self.broken] = np.full(np.shape(outputs[self.broken]), "high")
        return Prediction(**outputs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- resume identity


def test_rerun_with_another_source_under_the_same_name_is_refused(
    make_config: ConfigFactory, method_registry: Callable[..., None], tmp_path: Path
) -> None:
    method_registry(MeanIntensity)
    run_grid(make_config(methods="mean-test,intensity"), show_progress=False)
    other = build_dataset(tmp_path / "other-src", {"normal": 4, "benign": 4, "malignant": 4})
    with pytest.raises(ResultsError, match="support drawn from other source data"):
        run_grid(make_config(methods="mean-test", source=str(other.folder)), show_progress=False)
    # A zero-shot method never used the source: its cells are still reused.
    summary = run_grid(make_config(methods="intensity", source=str(other.folder)), show_progress=False)
    assert summary.cells_done == [] and len(summary.cells_skipped) == 2


def test_another_target_folder_with_the_same_name_is_refused(
    make_config: ConfigFactory, tmp_path: Path, shared_data: SyntheticData
) -> None:
    run_grid(make_config(targets=str(shared_data.target_a.folder)), show_progress=False)
    lookalike = build_dataset(tmp_path / "elsewhere" / shared_data.target_a.name, tag="lookalike")
    with pytest.raises(ResultsError, match="another target set"):
        run_grid(make_config(targets=str(lookalike.folder)), show_progress=False)


def test_a_changed_target_image_is_noticed(make_config: ConfigFactory, data: SyntheticData) -> None:
    config = make_config(source=str(data.source.folder), targets=str(data.target_a.folder))
    run_grid(config, show_progress=False)
    image = data.target_a.image_path(data.target_a.ids["benign"][0])
    shutil.copyfile(data.target_a.image_path(data.target_a.ids["benign"][1]), image)
    from bench.data import clear_caches

    clear_caches()
    with pytest.raises(ResultsError, match="another target set"):
        run_grid(config, show_progress=False)


# --------------------------------------------------------------------------- --out and --name


def test_out_that_is_a_file_fails_before_any_work(make_config: ConfigFactory, tmp_path: Path) -> None:
    blocker = tmp_path / "results-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder; choose another --out"):
        run_grid(make_config(out=str(blocker)), show_progress=False)
    code, _, err = bench("run", "--out", blocker, "--name", "x", "--methods", "intensity", "--no-progress")
    assert code == 2 and "Traceback" not in err and "choose another --out" in flat(err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_out_fails_before_any_work(make_config: ConfigFactory, tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="choose a writable --out"):
            run_grid(make_config(out=str(out)), show_progress=False)
    finally:
        out.chmod(0o700)


def test_unwritable_out_is_reported_even_as_root(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.name.startswith(".write-test-"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(ConfigError, match=r"Read-only file system.*choose a writable --out"):
        run_grid(make_config(), show_progress=False)


def test_disk_full_while_writing_a_cell_leaves_nothing_and_resumes(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.results as results

    real = results.atomic_write_bytes

    def full(path: Path, payload: bytes, **kwargs: object) -> None:
        if path.name == "maps.npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload, **kwargs)  # type: ignore[arg-type]

    config = make_config(save_maps=True)
    monkeypatch.setattr(results, "atomic_write_bytes", full)
    with pytest.raises(ResultsError, match=r"No space left on device.*free disk space.*resume"):
        run_grid(config, show_progress=False)
    run_dir = run_dir_of(config)
    assert not list(run_dir.rglob("cell.json"))
    leftovers = [p for p in run_dir.rglob("*") if ".writing-" in p.name or p.name == "predictions.csv"]
    assert leftovers == []
    monkeypatch.undo()
    summary = run_grid(config, show_progress=False)
    assert len(summary.cells_done) == 2


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "..", "a/b", ".hidden", ""])
def test_name_cannot_escape_out(make_config: ConfigFactory, name: str) -> None:
    with pytest.raises(ConfigError, match="--name must be a plain folder name inside --out"):
        make_config(name=name) if name else RunConfig(name=" ")


# --------------------------------------------------------------------------- options and data


def test_unknown_method_in_method_config_is_an_error(make_config: ConfigFactory) -> None:
    config = make_config(methods="intensity")
    config.method_config = {"ultrad": {"lr": 0.1}}
    with pytest.raises(ConfigError, match=r"method_config names unknown method.*'ultrad'.*ultraad"):
        run_grid(config, show_progress=False)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seeds_outside_numpys_range_are_refused(make_config: ConfigFactory, seed: str) -> None:
    with pytest.raises(ConfigError, match=r"seeds must lie in 0\.\.4294967295"):
        make_config(seeds=seed)


def test_target_sharing_images_with_the_source_is_refused(
    make_config: ConfigFactory, method_registry: Callable[..., None], data: SyntheticData
) -> None:
    method_registry(MeanIntensity)
    leaked = data.source.image_path(data.source.ids["benign"][0])
    target = data.target_a.image_path(data.target_a.ids["benign"][0])
    shutil.copyfile(leaked, target)
    config = make_config(
        methods="mean-test", source=str(data.source.folder), targets=str(data.target_a.folder)
    )
    with pytest.raises(DatasetError, match="shares 1 image"):
        run_grid(config, show_progress=False)
    assert not list(run_dir_of(config).rglob("cell.json")) if run_dir_of(config).exists() else True


@pytest.mark.parametrize(
    ("broken", "what"), [("scores", "scores"), ("probs", "probabilities"), ("maps", "maps")]
)
def test_non_numeric_output_names_the_method(
    make_config: ConfigFactory,
    method_registry: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
    what: str,
) -> None:
    method_registry(TextOutput)
    monkeypatch.setattr(TextOutput, "broken", broken)
    with pytest.raises(MethodError, match=rf"'text-output' returned non-numeric {what} \(dtype <U4\)"):
        run_grid(make_config(methods="text-output"), show_progress=False)


# --------------------------------------------------------------------------- concurrency


def _run_in_child(config: RunConfig, log: Path) -> None:
    """A separate process running the grid (spawned: forking after torch started threads can
    deadlock), with the test method registered as a plugin would be."""
    import bench.registry as registry

    original = registry.available_methods
    registry.available_methods = lambda: {**original(), MeanIntensity.name: MeanIntensity}  # type: ignore[assignment]
    MeanIntensity.log = log
    MeanIntensity.fit_seconds = 0.4
    run_grid(config, show_progress=False)


def test_concurrent_runs_of_one_grid_fit_every_unit_once(
    make_config: ConfigFactory, method_registry: Callable[..., None], tmp_path: Path
) -> None:
    method_registry(MeanIntensity)  # for this process's config check; children register their own
    config = make_config(methods="mean-test", shots="1,2", seeds="0,1,2")
    log = tmp_path / "fits.log"
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_run_in_child, args=(config, log)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    fits = [line.split() for line in log.read_text().splitlines()]
    units = sorted((int(k), int(s)) for _, k, s in fits)
    assert units == sorted((k, s) for k in (1, 2) for s in (0, 1, 2))  # each unit fitted exactly once
    assert len({pid for pid, _, _ in fits}) >= 2  # and the work was shared
    assert len(cell_dirs(run_dir_of(config))) == 12
    assert not list((run_dir_of(config) / ".claims").glob("*.json"))  # every claim released


def test_a_claim_left_by_a_killed_process_is_taken_over(
    make_config: ConfigFactory, method_registry: Callable[..., None], tmp_path: Path
) -> None:
    method_registry(MeanIntensity)
    config = make_config(methods="mean-test", shots="1")
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    claims = run_dir_of(config) / ".claims"
    claims.mkdir(parents=True)
    from bench.runner import FitUnit

    name = unit_claim_name(FitUnit("mean-test", 1, 0))
    import socket

    (claims / f"{name}.json").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old", "started": 0})
    )
    summary = run_grid(config, show_progress=False)
    assert len(summary.cells_done) == 2


def test_claims_of_other_hosts_go_stale_only_without_heartbeat(tmp_path: Path) -> None:
    book = ClaimBook(tmp_path, heartbeat_seconds=0.05, stale_seconds=60)
    path = tmp_path / ".claims" / "u.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "started": 0}))
    assert book.try_claim("u") is None  # fresh heartbeat: alive
    assert book.held_by_other("u")
    old = time.time() - 120
    os.utime(path, (old, old))
    claim = book.try_claim("u")  # no heartbeat for 2 minutes: taken over
    assert claim is not None and json.loads(path.read_text())["token"] == claim.token
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # our heartbeat keeps it fresh
    book.close()
    assert not path.exists()


def test_slugs_are_never_hidden_or_empty() -> None:
    from bench.config import slug

    assert slug(".data") == "data"  # a hidden folder would be skipped by the store
    assert slug("...") == "_"  # an empty name would write into the parent folder
    assert slug("phantom:device-b?n=5") == "phantom-device-b-n-5"
