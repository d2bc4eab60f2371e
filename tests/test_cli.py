"""The ``bench`` command line, in process (typer's CliRunner) on synthetic data and the tiny model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import (
    DAMAGES,
    EVAL_SIZE,
    SHARED_DATASETS,
    TINY_MODEL,
    SyntheticData,
    bench,
    cell_dirs,
    flat,
    requires_shared_datasets,
    rewrite_row,
    table_rows,
)

from bench.data import NAMED_DATASETS

pytestmark = pytest.mark.usefixtures("isolated_env", "wide_consoles")


def run_args(data: SyntheticData, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--methods", "zeroshot,intensity",
        "--shots", "2",
        "--seeds", "0",
        "--source", str(data.source.folder),
        "--targets", data.target_specs,
        "--backbone", TINY_MODEL,
        "--pretrained", "none",
        "--eval-size", str(EVAL_SIZE),
        "--device", "cpu",
        "--out", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- bench methods


def test_methods_lists_the_builtins_with_their_tasks() -> None:
    code, out, _ = bench("methods")
    assert code == 0
    rows = table_rows(out)
    assert rows["name"][1:4] == ["detect", "classify", "localize"]
    assert rows["zeroshot"][1:5] == ["yes", "yes", "yes", "zero-shot"]
    assert rows["intensity"][1:5] == ["yes", "-", "yes", "zero-shot"]
    assert "prompt ensembles" in rows["zeroshot"][5]


def test_methods_verbose_lists_options() -> None:
    code, out, _ = bench("methods", "--verbose")
    assert code == 0
    text = flat(out)
    assert "intensity options" in text and "sigma: float = 4.0, > 0: Gaussian sigma in pixels" in text
    assert "quantile: float = 0.99, >= 0 <= 1: quantile of the map used as the image score" in text
    assert "zeroshot options" in text and "logit_scale: float = 100.0" in text
    assert "choices" not in text and "one of ['probabilities', 'logits']" in text


# --------------------------------------------------------------------------- bench datasets


def test_datasets_without_argument_lists_the_named_sets(tmp_path: Path) -> None:
    code, out, _ = bench("datasets", "--data-root", tmp_path)
    assert code == 0
    rows = table_rows(out)
    for name, relative in NAMED_DATASETS.items():
        assert rows[name][1:] == [str(tmp_path / relative), "no"]
    assert {"bus-uclm", "busi", "udiat", "breast"} <= set(NAMED_DATASETS)


@requires_shared_datasets
def test_datasets_finds_the_shared_sets() -> None:
    code, out, _ = bench("datasets", "--data-root", SHARED_DATASETS)
    assert code == 0
    rows = table_rows(out)
    assert rows["bus-uclm"][2] == "yes" and rows["udiat"][2] == "yes" and rows["breast"][2] == "yes"
    code, out, _ = bench("datasets", "udiat", "--data-root", SHARED_DATASETS)
    assert code == 0
    assert "163 (0 normal / 109 benign / 54 malignant)" in flat(out)


def test_datasets_describes_a_manifest(shared_data: SyntheticData) -> None:
    code, out, _ = bench("datasets", shared_data.source.manifest)
    assert code == 0
    rows = table_rows(out)
    assert rows["images"][1] == "18 (6 normal / 6 benign / 6 malignant)"
    assert rows["with mask"][1] == "0 normal / 6 benign / 6 malignant"
    assert rows["pixel-usable"][1] == "6 normal / 6 benign / 6 malignant"
    assert (rows["width"][1], rows["height"][1]) == ("48", "40")
    assert "no problems found" in out


def test_datasets_reports_problems(data: SyntheticData) -> None:
    rewrite_row(data.target_b.manifest, 3, mask="")  # a benign image without its mask
    code, out, _ = bench("datasets", data.target_b.folder)
    assert code == 0
    assert "problems found" in out
    assert "1 image labelled benign/malignant without a mask file (tgtb_benign_000)" in flat(out)


# --------------------------------------------------------------------------- bench run / table


def test_run_then_table_in_every_format(
    shared_data: SyntheticData, tmp_path: Path, isolated_env: Path
) -> None:
    out_dir = tmp_path / "results"
    code, out, err = bench(*run_args(shared_data, out_dir))
    assert code == 0, err
    assert "done: 4 cells computed, 0 already finished" in flat(err)
    assert "RANDOM-INIT" in err
    assert "random-init" in out and "zeroshot" in out and "intensity" in out  # the rich tables
    # the feature cache went where BENCH_CACHE_DIR points (no --cache-dir given): entries beside
    # each folder's config.json, whatever their file format
    assert any(p.is_file() and p.name != "config.json" for p in isolated_env.rglob("*"))
    # default run name: source, backbone and resolved weights
    (run_dir,) = out_dir.iterdir()
    assert run_dir.name.endswith("src__bench-tiny-vit__random-init")
    assert cell_dirs(run_dir) == {
        f"{m}/{t}/shots0_seed0" for m in ("zeroshot", "intensity") for t in ("tgta", "tgtb")
    }

    for fmt in ("markdown", "csv", "latex"):
        code, text, err = bench("table", out_dir, "--format", fmt)
        assert code == 0, err
        assert "zeroshot" in text and "intensity" in text, fmt
        assert "random-init" in text, fmt
        assert "Traceback" not in text + err
    code, text, _ = bench("table", out_dir, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and {"backbone", "random_init"} <= set(rows[0])
    assert {r["random_init"] for r in rows} <= {"True", "true", "1", "yes"}
    code, text, _ = bench("table", out_dir, "--format", "latex")
    assert "\\begin{tabular}" in text or "\\begin{table}" in text
    code, text, _ = bench("table", out_dir, "--format", "markdown")
    assert "| zeroshot" in text or "zeroshot (zero-shot)" in text

    # the same command again resumes: nothing to compute, nothing encoded
    code, _, err = bench(*run_args(shared_data, out_dir), "--no-table")
    assert code == 0
    assert "done: 0 cells computed, 4 already finished; backbone encoded 0 images" in flat(err)


def test_yaml_config_with_flags_overriding(shared_data: SyntheticData, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "methods": ["intensity"],
                "source": str(shared_data.source.folder),
                "targets": [str(t.folder) for t in shared_data.targets],
                "backbone": TINY_MODEL,
                "pretrained": "none",
                "eval_size": 48,
                "device": "cpu",
                "name": "from-yaml",
                "out": str(tmp_path / "yaml-out"),
                "method_config": {"intensity": {"sigma": 2.0}},
            }
        )
    )
    flags = ["--eval-size", str(EVAL_SIZE), "--name", "from-flag", "--no-progress", "--no-table"]
    code, _, err = bench("run", "--config", config, *flags)
    assert code == 0, err
    run_dir = tmp_path / "yaml-out" / "from-flag"  # --name beat the YAML, --out came from it
    assert cell_dirs(run_dir) == {"intensity/tgta/shots0_seed0", "intensity/tgtb/shots0_seed0"}
    assert not (tmp_path / "yaml-out" / "from-yaml").exists()
    record = json.loads((run_dir / "intensity/tgta/shots0_seed0/cell.json").read_text())
    assert record["eval_size"] == EVAL_SIZE
    stored = yaml.safe_load((run_dir / "intensity/tgta/shots0_seed0/config.yaml").read_text())
    assert stored["eval_size"] == EVAL_SIZE and stored["name"] == "from-flag"
    assert stored["method_config"] == {"intensity": {"sigma": 2.0, "quantile": 0.99}}


# --------------------------------------------------------------------------- errors


def assert_clean_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert "error:" in err
    message = flat(err[err.index("error:") :])  # what comes before is the run's own log
    for fragment in fragments:
        assert flat(fragment) in message, fragment


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--methods", "intensity,nosuch"], ["unknown method 'nosuch'", "intensity", "zeroshot"]),
        (["--shard", "3/2"], ["--shard must look like I/N", "'3/2'"]),
        (["--shots", "2,x"], ["cannot read '2,x' as a list of int"]),
        (["--targets", "busi"], ["dataset 'busi' not found", "--data-root"]),
        (["--targets", "no-such-set"], ["'no-such-set' is neither a dataset name", "bus-uclm"]),
        (["--backbone", "ViT-Nope"], ["unknown open_clip model 'ViT-Nope'"]),
        (["--config", "missing.yaml"], ["config file missing.yaml not found"]),
    ],
)
def test_run_errors_exit_2_with_the_message(
    args: list[str], fragments: list[str], shared_data: SyntheticData, tmp_path: Path
) -> None:
    code, out, err = bench(*run_args(shared_data, tmp_path / "out"), *args)
    assert_clean_error(code, out, err, *fragments)


def test_unknown_method_option_in_yaml_exits_2(shared_data: SyntheticData, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("method_config:\n  intensity: {sigmaa: 3}\n")
    code, out, err = bench(*run_args(shared_data, tmp_path / "out"), "--config", config)
    assert_clean_error(code, out, err, "method 'intensity': unknown option(s) ['sigmaa']", "'sigma'")


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_dataset_exits_2_naming_the_file(damage: str, data: SyntheticData, tmp_path: Path) -> None:
    make_damage, fragments = DAMAGES[damage]
    make_damage(data)
    if damage in ("truncated-image", "grey-mask"):  # found when pixels are decoded: only by a run
        code, out, err = bench(*run_args(data, tmp_path / "out"))
    else:  # found when the dataset is read: `bench datasets` already says so
        code, out, err = bench("datasets", data.target_b.manifest)
    assert_clean_error(code, out, err, *fragments(data))


def test_table_errors_exit_2(tmp_path: Path) -> None:
    code, out, err = bench("table", tmp_path / "nowhere")
    assert_clean_error(code, out, err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, out, err = bench("table", tmp_path / "empty")
    assert_clean_error(code, out, err, "no finished cells under")
    code, out, err = bench("table", tmp_path / "empty", "--format", "xml")
    assert_clean_error(code, out, err, "unknown --format 'xml'")


def test_datasets_error_exits_2(tmp_path: Path) -> None:
    code, out, err = bench("datasets", tmp_path / "nothing-here")
    assert_clean_error(code, out, err, "neither a dataset name")


@pytest.mark.parametrize("label", ["[red]", "[/]"])
def test_error_messages_are_printed_verbatim(label: str, data: SyntheticData) -> None:
    rewrite_row(data.target_b.manifest, 0, label=label)
    code, out, err = bench("datasets", data.target_b.manifest)
    assert_clean_error(code, out, err, f"unknown label '{label}'")


def test_phantom_export_writes_a_busi_folder_that_reads_back(tmp_path: Path, wide_consoles: None) -> None:
    out = tmp_path / "export"
    code, stdout, _ = bench("phantom", "export", out, "--device", "device-b", "--n", "2", "--size", "96x64")
    assert code == 0 and "wrote 6 device-b phantom images" in flat(stdout)
    for label in ("normal", "benign", "malignant"):
        names = sorted(p.name for p in (out / label).glob("*.png"))
        expected = [f"{label} ({i}){suffix}.png" for i in (1, 2) for suffix in ("", "_mask")]
        assert names == expected
    code, stdout, _ = bench("datasets", out)
    assert code == 0 and "no problems found" in flat(stdout)
    # Exporting into a folder that already holds a dataset is refused, not overwritten.
    code, _, stderr = bench("phantom", "export", out, "--n", "1")
    assert code == 2 and "error:" in stderr
    code, _, stderr = bench("phantom", "export", tmp_path / "bad", "--size", "ten")
    assert code == 2 and "--size must look like" in flat(stderr)


def test_phantom_devices_lists_every_simulated_device(wide_consoles: None) -> None:
    from bench.phantom import DEVICES

    code, stdout, _ = bench("phantom", "devices")
    assert code == 0 and len(DEVICES) >= 4
    for name in DEVICES:
        assert name in stdout
