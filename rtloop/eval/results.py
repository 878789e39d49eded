"""The results file: one JSONL per sweep or eval, appended as each episode ends, fsync'd per episode.

Line 1 is the grid: {"kind": "grid", "grid": {...}} (the cells and the options each episode depends on).
Every other line is one episode's row, keyed by (cell, task, episode). Reopening the file resumes: a key
with a row that has no error is done and is not run again; a row with an error is run again, and the last
row of a key is the one that counts. A file whose grid differs from this one's is refused with one line,
so two grids never mix in one file. The tasks and episodes asked for may differ from run to run (extend a
sweep with more episodes); the tables cover the keys asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rtloop.errors import InputError
from rtloop.eval.grid import Key


def row_key(row: dict) -> Key:
    return (row["cell"], row["task"], row["episode"])


def grid_difference(old: dict, new: dict) -> str | None:
    """A short description of how two grids differ, or None when they are the same."""
    if old == new:
        return None
    old_cells, new_cells = old.get("cells", {}), new.get("cells", {})
    if set(old_cells) != set(new_cells):
        return f"its cells are {', '.join(old_cells)}; this run's are {', '.join(new_cells)}"
    for name in new_cells:
        before, after = old_cells[name].get("run", {}), new_cells[name].get("run", {})
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            k = changed[0]
            return f"cell {name!r} has {k}={before.get(k)!r} there, {after.get(k)!r} here"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"{changed[0]} differs" if changed else "it differs"


class ResultsFile:
    def __init__(self, path: Path, grid: dict) -> None:
        """Open (or create) `path` for `grid`; InputError if it belongs to another grid."""
        self.path = Path(path)
        self.rows: dict[Key, dict] = {}
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            self._load(grid)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if fresh:
            self._append({"kind": "grid", "grid": grid})

    def _load(self, grid: dict) -> None:
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # killed mid-line: drop the torn tail before appending after it
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(data))
        lines = data.decode("utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
            rows = [json.loads(line) for line in lines[1:] if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{self.path} is not a results file (line {e.doc[:40]!r} is not JSON)") from None
        if header.get("kind") != "grid":
            raise InputError(f"{self.path} is not a results file (its first line is not a grid)")
        difference = grid_difference(header["grid"], grid)
        if difference:
            raise InputError(f"{self.path} belongs to a different grid ({difference}); use another --out or remove it")
        for row in rows:
            self.rows[row_key(row)] = row

    def _append(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def done(self) -> set[Key]:
        return {key for key, row in self.rows.items() if not row.get("error")}

    def append(self, row: dict) -> None:
        self._append(row)
        self.rows[row_key(row)] = row

    def close(self) -> None:
        self._file.close()
