"""The progress bar on stderr: episodes done / total, success so far, ETA (tqdm's, from this run's pace)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, title: str, total: int, done: list[dict]) -> None:
        self.successes = sum(bool(r["success"]) for r in done)
        self.outcomes = len(done)
        self.bar = tqdm(total=total, initial=len(done), desc=title, unit="ep", file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"success {self.successes}/{self.outcomes}", refresh=False)

    def update(self, row: dict) -> None:
        if not row.get("error"):
            self.successes += bool(row["success"])
            self.outcomes += 1
        self._postfix()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
