"""Output that people pipe: no method, dataset or target name is ever cut or wrapped.

Every command runs in process (typer's CliRunner) with an 80-column, non-TTY console: what rich
uses when the output goes to a pipe, e.g. ``bench methods | grep ultraad-us-unaware``. Each name
must then be found whole on one line (:func:`grep`), and no cell anywhere is cut with "…".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import EVAL_SIZE, TINY_MODEL, SyntheticData, bench
from rich.console import Console
from rich.table import Table
from rich.text import Text
from test_tables import ALL_TASKS, RANDOM, cell

from bench.cli_support import FOLD_FLOOR, natural_width, print_table
from bench.data import NAMED_DATASETS, dataset_names
from bench.results import CellRecord, atomic_write_json, load_cells

WIDTH = 80
ELLIPSIS = "…"

#: Long names, as a phantom target spec (``phantom:device-b?n=5&size=96``) names its target.
LONG_TARGETS = ("phantom-device-b-n5-size96", "phantom-device-c-n5-size96")


def narrow_console(width: int = WIDTH, stderr: bool = False) -> Console:
    return Console(width=width, stderr=stderr, force_terminal=False, color_system=None)


def set_console_width(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """The CLI's consoles as in a pipe (not a terminal), ``width`` columns."""
    import bench.cli as cli
    import bench.cli_support as cli_support

    for module in (cli, cli_support):
        monkeypatch.setattr(module, "console", narrow_console(width))
        monkeypatch.setattr(module, "err_console", narrow_console(width, stderr=True))


@pytest.fixture
def piped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's consoles as in a pipe: 80 columns, not a terminal."""
    set_console_width(monkeypatch, WIDTH)


def grep(text: str, name: str) -> list[str]:
    """The lines holding ``name`` whole (not as part of a longer name), like ``grep -w``."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    return [line for line in text.splitlines() if pattern.search(line)]


def widest_line(text: str) -> int:
    return max(len(line) for line in text.splitlines())


# --------------------------------------------------------------------------- listings


@pytest.mark.usefixtures("piped", "isolated_env")
def test_bench_methods_names_every_method_whole_and_fits_80_columns() -> None:
    from bench.registry import available_methods

    code, out, err = bench("methods")
    assert code == 0, err
    names = sorted(available_methods())
    assert "ultraad-us-unaware" in names  # the example: cut to "ultraad-us-una…" before
    for name in names:
        (line,) = grep(out, name)
        assert "few-shot" in line or "zero-shot" in line  # the name shares its line with its row
    assert ELLIPSIS not in out
    assert widest_line(out) <= WIDTH  # the descriptions wrap instead


@pytest.mark.usefixtures("piped", "isolated_env")
def test_bench_datasets_names_every_dataset_whole(tmp_path: Path) -> None:
    deep_root = tmp_path / ("a-rather-long-folder-name-for-the-data-root" * 2)
    code, out, err = bench("datasets", "--data-root", deep_root)
    assert code == 0, err
    for name in NAMED_DATASETS:
        (line,) = grep(out, name)
        assert re.search(r"│ no +│$", line)  # the folded path did not push "present" off the row
    for name in dataset_names():
        if name not in NAMED_DATASETS:
            assert grep(out, f"{name}[:<device>]")
    assert ELLIPSIS not in out
    assert widest_line(out) <= WIDTH  # the long path folds


@pytest.mark.usefixtures("piped", "isolated_env")
def test_bench_datasets_describe_and_by_keep_names_whole() -> None:
    code, out, err = bench("datasets", "phantom:device-b?n=1&size=96", "--by", "device")
    assert code == 0, err
    assert grep(out, "phantom-device-b-n1-size96")
    assert re.search(r"^│ device-b +│ +1 │ +1 │ +1 │ +3 │$", out, flags=re.M)  # the --by counts row
    assert ELLIPSIS not in out


@pytest.mark.usefixtures("piped")
def test_bench_phantom_devices_names_every_device_whole() -> None:
    from bench.phantom import DEVICES

    code, out, err = bench("phantom", "devices")
    assert code == 0, err
    for name, device in DEVICES.items():
        (line,) = grep(out, name)
        assert device.geometry in line
    assert "centre frequency" in out and ELLIPSIS not in out
    assert widest_line(out) <= WIDTH


def _listed_names() -> dict[str, list[str]]:
    from bench.phantom import DEVICES
    from bench.registry import available_methods

    extra = [f"{name}[:<device>]" for name in dataset_names() if name not in NAMED_DATASETS]
    return {
        "methods": sorted(available_methods()),
        "datasets": [*NAMED_DATASETS, *extra],
        "phantom devices": list(DEVICES),
    }


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.parametrize("command", ["methods", "datasets", "phantom devices"])
def test_names_and_headers_stay_whole_in_a_very_narrow_terminal(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Narrower than the name columns alone: the table is printed at its natural width."""
    set_console_width(monkeypatch, 30)
    code, out, err = bench(*command.split())
    assert code == 0, err
    for name in _listed_names()[command]:
        assert grep(out, name), name
    assert grep(out, "name") and ELLIPSIS not in out
    if command == "phantom devices":
        assert "centre frequency" in out and "image (W x H)" in out


# --------------------------------------------------------------------------- bench table


def _store(root: Path) -> list[CellRecord]:
    """Finished cells with long target names, three shots, two seeds: wider than 80 columns."""
    records: list[CellRecord] = []
    full = {"image_auroc": 0.81, "class_auroc": 0.62, "pixel_auroc": 0.9, "pixel_ap": 0.41}
    for target in LONG_TARGETS:
        for shots in (4, 8, 16):
            for seed in (0, 1):
                metrics = {k: v + 0.01 * seed for k, v in full.items()}
                for method, tasks in (
                    ("ultraad-us-unaware", ALL_TASKS),
                    ("ultraad", ALL_TASKS),
                    ("lpp", ("classify", "detect")),
                    ("mvfa", ("detect", "localize")),
                ):
                    records.append(
                        cell(method, target, shots, seed, metrics, tasks=tasks, backbone=RANDOM, source="src")
                    )
        zero_shot = {"image_auroc": 0.7, "pixel_auroc": 0.8, "pixel_ap": 0.1}
        records.append(
            cell(
                "intensity",
                target,
                0,
                0,
                zero_shot,
                tasks=("detect", "localize"),
                uses_support=False,
                backbone=RANDOM,
                source="src",
            )
        )
    for record in records:
        folder = root / record.method / record.target / f"shots{record.shots}_seed{record.seed}"
        atomic_write_json(folder / "cell.json", record.to_json())
    return records


@pytest.mark.usefixtures("piped")
def test_bench_table_keeps_every_header_and_label_whole(tmp_path: Path) -> None:
    _store(tmp_path)
    code, out, err = bench("table", tmp_path)
    assert code == 0, err
    assert ELLIPSIS not in out
    assert widest_line(out) > WIDTH  # the tables are wider than the pipe: printed whole, not cut
    sections = re.split(r"^\s*(Detection|Classification|Localization):.*$", out, flags=re.M)
    tables = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert set(tables) == {"Detection", "Classification", "Localization"}
    expected_rows = {
        "Detection": ["intensity (zero-shot)", "mvfa", "lpp", "ultraad", "ultraad-us-unaware"],
        "Classification": ["lpp", "ultraad", "ultraad-us-unaware"],
        "Localization": ["intensity (zero-shot)", "mvfa", "ultraad", "ultraad-us-unaware"],
    }
    for key, text in tables.items():
        body = text.split("Legend:")[0]
        for target in LONG_TARGETS:
            # named whole (not "phantom-de…"), once, over the first of its shots columns
            assert len(grep(body, target)) == 1, (key, target)
        labels = [line.strip().split("  ")[0] for line in body.splitlines() if re.search(r"\d\.\d", line)]
        assert labels == expected_rows[key]


@pytest.mark.usefixtures("piped")
def test_bench_table_with_the_papers_rows_keeps_labels_whole(tmp_path: Path) -> None:
    _store(tmp_path)
    code, out, err = bench("table", tmp_path, "--compare", "paper")
    assert code == 0, err
    assert ELLIPSIS not in out
    for label in ("winclip (zero-shot) [paper only]", "coop [paper only]", "ultraad [paper]"):
        assert grep(out, label), label
    assert grep(out, "BUSZS [paper]")


@pytest.mark.usefixtures("piped")
def test_bench_table_ablation_keeps_variant_names_whole(tmp_path: Path) -> None:
    _store(tmp_path)
    code, out, err = bench("table", tmp_path, "--ablation")
    assert code == 0, err
    assert ELLIPSIS not in out
    for name in ("ultraad", "ultraad-us-unaware", "ultraad-no-joint", "ultraad-no-pif"):
        assert grep(out, name), name


# --------------------------------------------------------------------------- print_table


def _value_table(label: str, columns: int) -> Table:
    table = Table()
    table.add_column("method", no_wrap=True)
    for i in range(columns):
        table.add_column(f"target-{i}\n4-shot", no_wrap=True, justify="right")
    table.add_row(Text(label), *["80.0 ± 10.0 (n=3)"] * columns)
    return table


def test_print_table_never_cuts_a_no_wrap_cell_with_spaces() -> None:
    """Rich measures a no_wrap column by its longest word: a spaced label would be cut to fit."""
    label = "winclip (zero-shot) [paper only]"
    target = narrow_console()
    with target.capture() as plain:
        target.print(_value_table(label, 3))
    assert label not in plain.get()  # what rich alone does: the bug this guards against
    table = _value_table(label, 3)
    with target.capture() as captured:
        print_table(target, table)
    out = captured.get()
    assert ELLIPSIS not in out and grep(out, label)
    assert table.width is None  # the table is left as it was given


def test_print_table_prints_a_too_wide_table_at_its_natural_width() -> None:
    target = narrow_console()
    table = _value_table("ultraad-us-unaware", 6)
    with target.capture() as captured:
        print_table(target, table)
    out = captured.get()
    # borders and padding: 3 per column (2 padding + 1 rule) + 1 for the outer edge
    natural = len("ultraad-us-unaware") + 6 * len("80.0 ± 10.0 (n=3)") + 3 * 7 + 1
    assert natural_width(target, table) == natural > WIDTH
    assert {len(line) for line in out.splitlines()} == {natural}
    assert out.count("80.0 ± 10.0 (n=3)") == 6


def test_print_table_folds_free_text_down_to_the_floor_before_widening() -> None:
    target = narrow_console()
    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold")
    name = "n" * 50
    table.add_row(name, "an-unbreakable-word-of-thirty-cells words")
    # fits: 50 + the floor of 11 cells ("description") + 7 border and padding cells = 68
    assert natural_width(target, table) == 50 + max(FOLD_FLOOR, len("description")) + 7
    with target.capture() as captured:
        print_table(target, table)
    out = captured.get()
    assert widest_line(out) <= WIDTH and grep(out, name) and ELLIPSIS not in out
    assert "an-unbreakable" in out  # the long word folded at the column edge, not cut
    narrow = Table()
    narrow.add_column("name", no_wrap=True)
    narrow.add_column("description", overflow="fold")
    narrow.add_row("n" * 75, "x" * 30)
    assert natural_width(target, narrow) == 75 + len("description") + 7  # the header is never folded


# --------------------------------------------------------------------------- bench run, bench compare


@pytest.mark.usefixtures("piped")
def test_bench_run_and_compare_keep_names_whole(shared_data: SyntheticData, tmp_path: Path) -> None:
    """The closing tables of ``bench run`` and the ``bench compare`` table (ten uncut columns,
    wider than 80: cut with "…" before) through the same pipe."""
    out_dir = tmp_path / "results"
    args = [
        "run",
        "--methods", "zeroshot,intensity",
        "--seeds", "0",
        "--source", str(shared_data.source.folder),
        "--targets", shared_data.target_specs,
        "--backbone", TINY_MODEL,
        "--pretrained", "none",
        "--eval-size", str(EVAL_SIZE),
        "--device", "cpu",
        "--out", str(out_dir),
        "--no-progress",
    ]  # fmt: skip
    code, out, err = bench(*args)
    assert code == 0, err
    targets = sorted({c.target for c in load_cells(out_dir)})
    assert len(targets) == 2
    for name in ("zeroshot (zero-shot)", "intensity (zero-shot)", *targets):
        assert grep(out, name), name
    assert ELLIPSIS not in out
    code, out, err = bench("compare", out_dir, "zeroshot", "intensity", "--resamples", "20")
    assert code == 0, err
    assert ELLIPSIS not in out
    for target in targets:
        rows = grep(out, target)
        assert rows and all(("DeLong" in row or "paired bootstrap" in row) for row in rows)
    (header,) = [line for line in out.splitlines() if "┃" in line and "A - B" in line]
    for column in ("target", "shots", "seed", "metric", "zeroshot", "intensity", "95% CI", "test"):
        assert column in header
