"""From OpenVLA's 7 generated token ids to a robot action, exactly as the official `predict_action` does it,
plus the choice of normalisation statistics (`unnorm_key`) and LIBERO's gripper convention.

OpenVLA writes each action dimension as one of 256 bins, using the last 256 ids of Llama-2's vocabulary
(31744..31999; id 31999 is the lowest bin). The detokenizer maps a token to a bin centre in (-1, 1) and
then, for the dimensions the dataset's `mask` marks, from [-1, 1] to the dataset's [q01, q99] range.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtloop.errors import ActionError, CheckpointError, UnnormKeyError

ACTION_DIM = 7
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


def check_action_stats(stats: Any, where: str) -> None:
    """One dataset's statistics must give q01 and q99 (and mask, where present) for each of OpenVLA's 7
    action dimensions; `where` names them in the one-line CheckpointError (file and key)."""
    action = stats.get("action") if isinstance(stats, dict) else None
    if not isinstance(action, dict) or not {"q01", "q99"} <= action.keys():
        raise CheckpointError(f"{where}: no action q01/q99 statistics")
    for name in ("q01", "q99", "mask"):
        if name not in action:
            continue
        values = action[name]
        n = len(values) if isinstance(values, list) else None
        if n != ACTION_DIM:
            raise CheckpointError(f"{where}: the action statistics have the wrong dimension ({name} has "
                                  f"{n if n is not None else 'no list of'} entries; OpenVLA's actions have {ACTION_DIM})")
        if name != "mask" and not all(isinstance(v, (int, float)) for v in values):
            raise CheckpointError(f"{where}: action {name} holds a non-number")


class ActionDetokenizer:
    """token ids -> unnormalised action, for one checkpoint (vocabulary) and one dataset (statistics).
    `where` names the statistics (file and key) in the error for malformed ones."""

    def __init__(self, text_vocab_size: int, pad_to_multiple_of: int, n_action_bins: int, stats: dict[str, Any],
                 where: str = "the action statistics"):
        check_action_stats(stats, where)
        # text_vocab_size (32064) is Llama's 32000 + <PAD>, padded to a multiple of 64: the official code
        # subtracts the padding to get back to 32000, the id just past the last action token.
        self.vocab_size = text_vocab_size - pad_to_multiple_of
        self.n_bins = n_action_bins
        bins = np.linspace(-1, 1, n_action_bins)
        self.centers = (bins[:-1] + bins[1:]) / 2  # n_bins - 1 centres: the official code's quirk, kept
        action = stats["action"]
        self.q01 = np.asarray(action["q01"], dtype=np.float64)
        self.q99 = np.asarray(action["q99"], dtype=np.float64)
        self.mask = np.asarray(action.get("mask", np.ones_like(self.q01, dtype=bool)), dtype=bool)

    @property
    def token_range(self) -> tuple[int, int]:
        """The first and last action token id (inclusive): 31744..31999 for OpenVLA-7B."""
        return self.vocab_size - self.n_bins, self.vocab_size - 1

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.shape[0] != self.q01.shape[0]:
            raise ActionError(f"expected {self.q01.shape[0]} action tokens, got {tokens.shape[0]}")
        lo, hi = self.token_range
        bad = tokens[(tokens < lo) | (tokens > hi)]
        if bad.size:
            raise ActionError(
                f"the model generated token {int(bad[0])}, which is not an action token ({lo}..{hi}); "
                f"all tokens: {tokens.tolist()}"
            )
        idx = np.clip(self.vocab_size - tokens - 1, 0, self.centers.shape[0] - 1)
        normalized = self.centers[idx]
        action = np.where(self.mask, 0.5 * (normalized + 1) * (self.q99 - self.q01) + self.q01, normalized)
        if not np.all(np.isfinite(action)):
            raise ActionError(f"non-finite action {action.tolist()} from tokens {tokens.tolist()} "
                              f"(check the q01/q99 statistics)")
        return action


FINETUNED_HINT = ("LIBERO keys exist only in the fine-tuned checkpoints (openvla-7b-finetuned-libero-*, "
                  "each with its own suite's), not in the base openvla-7b.")


def resolve_unnorm_key(norm_stats: dict[str, Any], key: str | None, suite: str | None = None) -> str:
    """The official `_check_unnorm_key`, as one-line errors instead of asserts. With no key, a LIBERO `suite`
    picks `<suite>` or `<suite>_no_noops` (default_unnorm_key), as the official eval passes the suite's name;
    a checkpoint with neither is an error, not a fall-back to whatever single dataset it has."""
    keys = sorted(norm_stats)
    if not keys:
        raise UnnormKeyError("the checkpoint has no normalisation statistics (norm_stats is empty)")
    if key is None and suite is not None:
        key = default_unnorm_key(norm_stats, suite)
        if key is None:
            raise UnnormKeyError(f"this checkpoint has no statistics for {suite} ({suite} or {suite}_no_noops); "
                                 f"it has: {', '.join(keys)}. {FINETUNED_HINT} Choose one with --unnorm-key "
                                 "to use another dataset's.")
    if key is None:
        if len(keys) > 1:
            raise UnnormKeyError(f"the checkpoint has statistics for {len(keys)} datasets; choose one with "
                                 f"--unnorm-key: {', '.join(keys)}")
        return keys[0]
    if key not in norm_stats:
        hint = f" {FINETUNED_HINT}" if _suite_of(key) is not None else ""
        raise UnnormKeyError(f"unknown unnorm_key {key!r}; this checkpoint has: {', '.join(keys)}.{hint}")
    return key


def default_unnorm_key(norm_stats: dict[str, Any], suite: str) -> str | None:
    """The key a LIBERO suite's fine-tuned checkpoint uses: `<suite>` or `<suite>_no_noops`, whichever exists.
    None when neither does (resolve_unnorm_key then explains)."""
    for key in (suite, f"{suite}_no_noops"):
        if key in norm_stats:
            return key
    return None


def _suite_of(key: str) -> str | None:
    base = key.removesuffix("_no_noops")
    return base if base in LIBERO_SUITES else None


def libero_gripper(action: np.ndarray) -> np.ndarray:
    """OpenVLA's gripper (last dim, 0 = close .. 1 = open) -> LIBERO's (-1 = open, +1 = close).

    The official eval first binarises g -> sign(2g - 1) (+1 open, -1 close; g = 0.5 exactly gives 0), then
    negates it, because LIBERO's Panda controller closes the fingers on positive commands."""
    out = np.array(action, dtype=np.float64, copy=True)
    out[-1] = -np.sign(2 * out[-1] - 1)
    return out
