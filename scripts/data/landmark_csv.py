"""Landmark CSV files of the inference contract: a header, columns x,y,z in physical mm (ITK/LPS), other columns kept.

Own code on the standard ``csv`` module because pandas is not a dependency of the bundle.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scripts.utils.atomic_write import atomic_write_text

POINT_COLUMNS = ("x", "y", "z")


@dataclass
class LandmarkTable:
    """Rows of a landmark CSV: ``columns`` in file order and one list of strings per column (values as read)."""

    columns: list[str]
    values: dict[str, list[str]] = field(default_factory=dict)
    source: str = "landmarks"

    def __len__(self) -> int:
        return len(self.values[self.columns[0]]) if self.columns else 0

    def points(self) -> np.ndarray:
        """The ``[N, 3]`` float64 physical points (x, y, z in mm, LPS)."""
        return self.float_columns(POINT_COLUMNS)

    def float_columns(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """Columns ``names`` as a ``[N, len(names)]`` float64 array; a clear error names the file and the column."""
        require_columns(self, names)
        out = np.empty((len(self), len(names)), dtype=np.float64)
        for j, name in enumerate(names):
            for i, text in enumerate(self.values[name]):
                try:
                    out[i, j] = float(text)
                except ValueError:
                    raise ValueError(f"{self.source}: row {i + 2}, column {name!r}: {text!r} is not a number") from None
                if not np.isfinite(out[i, j]):
                    raise ValueError(f"{self.source}: row {i + 2}, column {name!r}: {text!r} is not a finite number")
        return out

    def rows(self, keep: np.ndarray) -> "LandmarkTable":
        """A copy with only the rows where ``keep`` (bool ``[N]``) is true."""
        index = np.flatnonzero(np.asarray(keep, dtype=bool))
        return LandmarkTable(
            list(self.columns), {k: [v[i] for i in index] for k, v in self.values.items()}, self.source
        )

    def with_column(self, name: str, column: list | np.ndarray, fmt: str = "{:.4f}") -> "LandmarkTable":
        """A copy with column ``name`` added (or replaced); numbers are written with ``fmt``.

        Args:
            name: column name.
            column: one value per row; strings are kept as they are, numbers formatted with ``fmt``.
            fmt: ``str.format`` pattern of the numbers.

        Returns:
            A new ``LandmarkTable`` (the column appended at the end if new).

        Raises:
            ValueError: when ``column`` does not have one value per row.
        """
        if len(column) != len(self):
            raise ValueError(f"{self.source}: column {name!r} has {len(column)} values for {len(self)} landmarks")
        texts = [v if isinstance(v, str) else fmt.format(v) for v in column]
        columns = self.columns + ([name] if name not in self.columns else [])
        values = dict(self.values)
        values[name] = texts
        return LandmarkTable(columns, values, self.source)


def require_columns(table: LandmarkTable, names: tuple[str, ...] | list[str]) -> None:
    """Raise ValueError naming the file and every missing column.

    Args:
        table: landmark table.
        names: column names that must be present.

    Raises:
        ValueError: when a column is missing.
    """
    missing = [n for n in names if n not in table.values]
    if missing:
        raise ValueError(f"{table.source}: missing column(s) {missing}; the file has {table.columns}")


def read_landmarks(path: str | Path, required: tuple[str, ...] = POINT_COLUMNS) -> LandmarkTable:
    """Read a landmark CSV (header row, comma separated, UTF-8 with or without a BOM, any line ends); checks the
    ``required`` columns, the row lengths and that the points are finite numbers. Every problem is a ValueError
    that names the file, the row and the column.

    Args:
        path: landmark CSV file.
        required: columns that must be present (default x, y, z; the points are checked when x is required).

    Returns:
        The ``LandmarkTable`` (values as stripped strings, ``source`` = the path).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: for a non-UTF-8, unreadable, empty or not comma-separated file, duplicate column names, rows of the
            wrong length, missing columns or non-finite point coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: landmark file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f, strict=True) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not a text file in UTF-8 (byte {error.start}); expected a CSV with columns x,y,z"
        ) from None
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable CSV ({error}); expected a header with columns x,y,z") from None
    if not rows:
        raise ValueError(f"{path}: empty landmark file (expected a header with columns x,y,z)")
    columns = [c.strip() for c in rows[0]]
    if len(columns) == 1 and any(separator in columns[0] for separator in ";\t"):
        separator = "';'" if ";" in columns[0] else "a tab"
        raise ValueError(
            f"{path}: the columns are separated by {separator}; the landmark CSV must be comma-separated "
            "(header x,y,z)"
        )
    if len(set(columns)) != len(columns):
        raise ValueError(f"{path}: duplicate column names in header {columns}")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns):
            raise ValueError(f"{path}: row {i} has {len(row)} columns, the header has {len(columns)} ({columns})")
    values = {c: [row[j].strip() for row in rows[1:]] for j, c in enumerate(columns)}
    table = LandmarkTable(columns, values, str(path))
    require_columns(table, required)
    if POINT_COLUMNS[0] in required and len(table):
        table.points()  # validates the numbers now, with the file name in the message
    return table


def table_from_points(points: np.ndarray, extra: dict[str, list | np.ndarray] | None = None) -> LandmarkTable:
    """A table with an ``id`` column (0-based), x,y,z from ``[N, 3]`` ``points`` and optional extra columns.

    Args:
        points: ``[N, 3]`` physical points, LPS mm (x-y-z order).
        extra: optional column name -> ``[N]`` values.

    Returns:
        A ``LandmarkTable`` with columns id, x, y, z and the extra ones.

    Raises:
        ValueError: when ``points`` is not ``[N, 3]`` or an extra column has the wrong length.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected [N, 3] points, got shape {points.shape}")
    table = LandmarkTable(["id"], {"id": [str(i) for i in range(len(points))]})
    for j, name in enumerate(POINT_COLUMNS):
        table = table.with_column(name, points[:, j])
    for name, column in (extra or {}).items():
        table = table.with_column(name, column)
    return table


def write_landmarks(table: LandmarkTable, path: str | Path) -> Path:
    """Write ``table`` as CSV atomically.

    Args:
        table: table to write (header and rows in column order).
        path: output CSV file.

    Returns:
        The written path.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    for i in range(len(table)):
        writer.writerow([table.values[c][i] for c in table.columns])
    return atomic_write_text(path, buffer.getvalue())
