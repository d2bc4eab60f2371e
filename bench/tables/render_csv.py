"""CSV output.

**CSV is long/tidy**: one row per block x table x row x column x metric with ``mean``,
``std``, ``n`` (numbers in percent) plus ``status`` and the displayed ``text``; the row group
(:data:`~bench.method.TABLE_GROUPS`) is the ``group`` column, not a heading row; structurally
empty cells are left out, and zero-shot rows appear once with ``shots = 0`` (not once per
shots column) so that a consumer never counts them twice. CSV output carries no legend and
no warning lines (they would break parsers): :func:`~bench.tables.render_tables` passes the
warnings to ``on_warning``, or to :func:`warnings.warn` when none is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from bench.tables.model import STATUS_BLANK, TableBlock

#: Columns of the CSV output, in order.
CSV_COLUMNS: tuple[str, ...] = (
    "backbone",
    "model",
    "weights",
    "random_init",
    "input_size",
    "layers",
    "source",
    "eval_size",
    "table",
    "metric",
    "group",
    "row",
    "method",
    "kind",
    "zero_shot",
    "column",
    "target",
    "paper_dataset",
    "shots",
    "status",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "n",
    "seeds",
    "text",
)


def to_csv_frame(blocks: Sequence[TableBlock]) -> pd.DataFrame:
    """The long/tidy frame behind the CSV output (see :data:`CSV_COLUMNS`)."""
    frames = []
    for block in blocks:
        ident = block.identity
        for table in block.tables:
            d = table.data[table.data["status"] != STATUS_BLANK].copy()
            # Zero-shot rows: one observation per target, not one per shots column.
            zs = d["zero_shot"].astype(bool)
            d.loc[zs, "shots"] = 0
            d = d.drop_duplicates(subset=["row", "column", "shots", "metric"])
            d.insert(0, "table", table.spec.key)
            d.insert(0, "eval_size", block.eval_size)
            d.insert(0, "source", block.source)
            d.insert(0, "layers", " ".join(str(x) for x in ident.layers))
            d.insert(0, "input_size", ident.input_size)
            d.insert(0, "random_init", ident.random_init)
            d.insert(0, "weights", ident.weights)
            d.insert(0, "model", ident.model)
            d.insert(0, "backbone", ident.label)
            frames.append(d)
    if not frames:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    frame["n"] = frame["n"].astype("Int64")
    return frame[list(CSV_COLUMNS)]


def to_csv(blocks: Sequence[TableBlock]) -> str:
    """Long/tidy CSV text: one row per block x table x row x column x metric."""
    return to_csv_frame(blocks).to_csv(index=False)
