"""What every figure shares: choosing the cells to draw, titles, the output path, saving.

**Which cells.** A figure draws cells of ONE set-up: backbone identity (model, weights,
input size, layers), support source and evaluation size (:func:`bench.tables.cells.group_key`,
the rule the tables follow). A selection that spans several set-ups is an error that lists
them; ``--backbone MODEL`` narrows it by model name. The same cell stored twice (two run
folders) is counted once, the newest kept, with a warning (:func:`bench.tables.cells.dedupe_cells`).

**Zero-shot methods** (``uses_support`` false) are stored once, at 0 shots and seed 0; the
figures show them beside the few-shot methods of any shots and seed.

**Method order** is the tables' row order (group, rank, name) from the ``method_meta``
stored with the cells; only records written before that metadata existed make the order
fall back to :class:`bench.tables.placement.Placement` (which loads the method registry).
"""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.errors import BenchError, ResultsError
from bench.fileio import atomic_write_bytes
from bench.results import BackboneIdentity, CellRecord, load_cells
from bench.tables.cells import created_key, dedupe_cells, group_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_DPI",
    "FIGURES_DIR",
    "FIGURE_FORMATS",
    "FigureResult",
    "Point",
    "Selection",
    "check_output",
    "choose",
    "choose_point",
    "figure_style",
    "file_stem",
    "load_store",
    "method_order",
    "new_figure",
    "one_setup",
    "output_path",
    "save_figure",
    "setup_title",
    "shots_label",
    "split_list",
]

#: File suffix -> matplotlib format.
FIGURE_FORMATS: dict[str, str] = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
#: Default output folder, under the results directory the figure was drawn from.
FIGURES_DIR = "figures"
DEFAULT_DPI = 200

#: Publication style: small fonts, TrueType fonts embedded in PDF (editable, accepted by
#: journals that refuse Type 3), text kept as text in SVG, SVG ids salted with a constant
#: (reproducible files).
_STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "figure.titlesize": 9,
    "pdf.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "ultraad-bench",
}
#: No creation dates in the files, so that the same store gives byte-identical PDFs and SVGs.
_METADATA: dict[str, dict[str, Any]] = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}

T = TypeVar("T")


@dataclass
class FigureResult:
    """A drawn figure: the matplotlib ``Figure``, its default file stem, notes for the user
    (methods left out and why) and the numbers it shows (``data``, figure-specific)."""

    figure: Figure
    name: str
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """Deduplicated cells of one set-up (see the module docstring); ``notes`` are the
    duplicate warnings."""

    root: Path
    cells: list[CellRecord]
    identity: BackboneIdentity
    source: str
    eval_size: int
    notes: list[str]


@dataclass(frozen=True)
class Point:
    """One (target, shots, seed) of the grid and the cell of each method there (zero-shot
    methods: their only cell), in display order."""

    selection: Selection
    target: str
    shots: int
    seed: int
    cells: dict[str, CellRecord]
    explicit: bool
    notes: list[str]


# --------------------------------------------------------------------------- options


def split_list(text: str | None, flag: str) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (duplicates dropped, order kept); None stays None."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise BenchError(f"{flag} must be a comma-separated list without empty items, got {text!r}")
    return list(dict.fromkeys(items))


def choose(
    what: str, flag: str, given: T | None, stored: Sequence[T], context: str, plural: str | None = None
) -> T:
    """``given`` when it is among ``stored``; without ``given``, the only stored value.
    Anything else is an error listing the stored values (``plural`` names them, default ``what + "s"``)."""
    listed = ", ".join(str(v) for v in stored) or "none"
    if given is not None:
        if given not in stored:
            raise BenchError(f"{what} {given!r} is not stored for {context} (stored: {listed})")
        return given
    if len(stored) == 1:
        return stored[0]
    if not stored:
        raise BenchError(f"no {what} is stored for {context}")
    raise BenchError(
        f"several {plural or what + 's'} are stored for {context} ({listed}); choose one with {flag}"
    )


def shots_label(shots: int, seed: int) -> str:
    """``"4-shot, seed 1"``, or ``"zero-shot"`` for 0 shots."""
    return "zero-shot" if shots == 0 else f"{shots}-shot, seed {seed}"


def file_stem(*parts: object) -> str:
    """A file-name-safe stem: characters outside ``[A-Za-z0-9._-]`` become ``-`` (targets
    may be specs such as ``phantom:device-b?n=20``)."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


# --------------------------------------------------------------------------- cells


def load_store(results_dir: Path, backbone: str | None) -> list[CellRecord]:
    """Every finished cell under ``results_dir`` (of backbone model ``backbone`` if given)."""
    root = Path(results_dir)
    cells = load_cells(root)
    if not cells:
        raise ResultsError(f"no finished cells under {root}; run `bench run --out {root}` first")
    if backbone is None:
        return cells
    kept = [c for c in cells if c.backbone.model == backbone]
    if not kept:
        models = ", ".join(sorted({c.backbone.model for c in cells}))
        raise BenchError(f"no cell under {root} was made with --backbone {backbone!r} (stored: {models})")
    return kept


def one_setup(cells: Sequence[CellRecord], root: Path, what: str) -> Selection:
    """``cells`` deduplicated, after checking that they share one set-up (never pooled)."""
    if not cells:
        raise BenchError(f"no finished cells for {what} under {root}")
    groups: dict[Any, list[CellRecord]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    if len(groups) > 1:
        described = [
            f"[{identity.label}; layers {','.join(map(str, identity.layers))}; support source {source}; "
            f"eval size {size}; e.g. {members[0].path}]"
            for (identity, source, size), members in groups.items()
        ]
        models = sorted({identity.model for identity, _, _ in groups})
        fix = (
            f"choose one with --backbone MODEL ({', '.join(models)})"
            if len(models) > 1
            else f"point the command at one run folder under {root} instead"
        )
        raise ResultsError(
            f"the cells for {what} under {root} come from {len(groups)} set-ups, which are never "
            f"pooled: {' '.join(described)}; {fix}"
        )
    (identity, source, eval_size), members = next(iter(groups.items()))
    kept, warnings = dedupe_cells(members)
    return Selection(Path(root), kept, identity, source, eval_size, warnings)


def method_order(cells: Sequence[CellRecord], methods: Iterable[str]) -> list[str]:
    """``methods`` in the tables' row order (see the module docstring)."""
    from bench.method import TABLE_GROUPS

    wanted = set(methods)
    stored = {}
    for cell in sorted(cells, key=created_key):  # the newest record's placement wins, as in the tables
        if cell.method_meta is not None:
            stored[cell.method] = cell.method_meta
    if not wanted <= set(stored):
        from bench.tables.placement import Placement

        return Placement(cells).order(wanted)

    def key(method: str) -> tuple[int, int, str]:
        meta = stored[method]
        group = meta.table_group if meta.table_group in TABLE_GROUPS else "other"
        return (TABLE_GROUPS.index(group), meta.table_rank, method)

    return sorted(wanted, key=key)


def _stored_points(cells: Iterable[CellRecord]) -> str:
    """``"2-shot seeds 0,1; 4-shot seeds 0"`` (or ``"zero-shot"``)."""
    seeds: dict[int, set[int]] = {}
    for cell in cells:
        seeds.setdefault(cell.shots if cell.uses_support else 0, set()).add(cell.seed)
    return "; ".join(
        "zero-shot" if k == 0 else f"{k}-shot seeds {','.join(map(str, sorted(s)))}"
        for k, s in sorted(seeds.items())
    )


def choose_point(
    results_dir: Path,
    *,
    target: str | None,
    shots: int | None,
    seed: int | None,
    methods: list[str] | None,
    backbone: str | None,
) -> Point:
    """The cells of one (target, shots, seed) for a per-point figure (maps, ROC).

    Each of ``target``, ``shots`` and ``seed`` defaults to the only value stored (an error
    lists them when there are several). ``methods`` (explicit, shown in the given order) must
    all have a cell there; by default every method with one is taken, in table order, and
    the others are named in ``notes``.
    """
    root = Path(results_dir)
    cells = load_store(root, backbone)
    target = choose("target", "--target", target, sorted({c.target for c in cells}), f"the results in {root}")
    selection = one_setup([c for c in cells if c.target == target], root, f"target {target!r}")
    stored_methods = method_order(selection.cells, {c.method for c in selection.cells})
    if methods is not None:
        unknown = [m for m in methods if m not in stored_methods]
        if unknown:
            raise BenchError(
                f"unknown method {', '.join(map(repr, unknown))} for target {target!r} in {root}; "
                f"methods stored there: {', '.join(stored_methods)}"
            )
    pool = methods if methods is not None else stored_methods
    few_shot = [c for c in selection.cells if c.method in pool and c.uses_support]
    context = f"target {target!r} (methods {', '.join(pool)})"
    if not few_shot:
        context += ": zero-shot methods only, leave out --shots and --seed"
    shots = choose(
        "shots", "--shots", shots, sorted({c.shots for c in few_shot}) or [0], context, "shot counts"
    )
    seeds = sorted({c.seed for c in few_shot if c.shots == shots}) or [0]
    seed = choose("seed", "--seed", seed, seeds, f"{context} at {shots} shots")
    chosen: dict[str, CellRecord] = {}
    missing: list[str] = []
    for method in pool:
        mine = [c for c in selection.cells if c.method == method]
        zero_shot = [c for c in mine if not c.uses_support]
        at_point = [c for c in mine if c.uses_support and c.shots == shots and c.seed == seed]
        if zero_shot:
            chosen[method] = min(zero_shot, key=lambda c: c.seed)
        elif at_point:
            chosen[method] = at_point[0]
        else:
            missing.append(method)
    notes = list(selection.notes)
    if missing:
        where = f"target {target!r} at {shots_label(shots, seed)}"
        if methods is not None:
            stored = "; ".join(
                f"{m}: {_stored_points(c for c in selection.cells if c.method == m)}" for m in missing
            )
            raise BenchError(f"no cell of {', '.join(missing)} for {where} (stored: {stored})")
        notes.append(f"not shown (no cell for {where}): {', '.join(missing)}")
    return Point(selection, target, shots, seed, chosen, methods is not None, notes)


# --------------------------------------------------------------------------- drawing


@contextmanager
def figure_style() -> Iterator[None]:
    """The rc settings every figure is drawn and saved with (matplotlib imported lazily)."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A figure on the non-interactive Agg canvas (no pyplot: nothing global, nothing leaks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def setup_title(headline: str, selection: Selection, width_inches: float) -> str:
    """Figure title: the headline, then the backbone label (which says "random-init (NOT
    pretrained ...)" loudly for random weights), the support source and the eval size,
    wrapped to the figure's width."""
    characters = max(40, int(width_inches * 12))
    details = (
        f"{selection.identity.label}; support source: {selection.source}; "
        f"evaluated at {selection.eval_size}x{selection.eval_size}"
    )
    lines = [textwrap.wrap(text, characters, break_on_hyphens=False) for text in (headline, details)]
    return "\n".join(lines[0] + lines[1])


# --------------------------------------------------------------------------- saving


def check_output(out: Path | None, dpi: int = DEFAULT_DPI) -> None:
    """Fail before drawing when ``--out`` has no known figure suffix or ``dpi`` is not positive."""
    if out is not None and Path(out).suffix.lower() not in FIGURE_FORMATS:
        raise BenchError(
            f"--out {out}: unknown figure format {Path(out).suffix or '(no suffix)'!r}; "
            f"end the file name in {', '.join(FIGURE_FORMATS)}"
        )
    if dpi <= 0:
        raise BenchError(f"--dpi must be a positive number of dots per inch, got {dpi}")


def output_path(out: Path | None, results_dir: Path, name: str) -> Path:
    """``out``, or ``RESULTS_DIR/figures/<name>.png``."""
    check_output(out)
    return Path(out) if out is not None else Path(results_dir) / FIGURES_DIR / f"{name}.png"


def save_figure(figure: Figure, path: Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``figure`` to ``path`` atomically (the suffix picks PNG, PDF or SVG); returns ``path``."""
    check_output(path, dpi)
    fmt = FIGURE_FORMATS[path.suffix.lower()]
    buffer = io.BytesIO()
    with figure_style():
        figure.savefig(buffer, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise BenchError(
            f"cannot write the figure to {path} ({exc.strerror or exc}); choose another --out"
        ) from exc
    return path
