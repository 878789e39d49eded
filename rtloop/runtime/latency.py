"""Latency models: how long one inference takes, for either clock.

A model answers `sample(index, measured_s=None) -> seconds` for the index-th inference. The same model
(same seed) gives the same number for the same index on any machine, so a virtual-clock run reproduces
exactly. `measured_s` is the duration of the real call that just ran; only the measured model uses it
(the virtual clock passes it so that "measured" means "as long as this machine took").

Kinds:
- `FixedLatency`: always the same delay (`--inject-delay SECONDS`).
- `EmpiricalLatency`: per-call seconds recorded on some machine (a trace JSONL, a bench JSON, or a latency
  profile JSON: `--latency-profile FILE[:ENGINE]`), drawn iid with a seeded RNG (the default) or replayed
  in recorded order, cycled.
- `MeasuredLatency`: the policy's own call time (the default when no latency is asked for).
- `ScaledLatency`: any measured or recorded model times a factor (`--latency-scale`), labelled a
  PROJECTION: nobody measured it.

On the wall clock (`SlowPolicy`, rtloop/runtime/slow.py) a sample is the inference's total latency: the call
is padded up to it, never shortened. On the virtual clock it is the latency itself.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rtloop.errors import InputError

PROFILE_FORMAT = "rtloop latency profile v1"
ORDERS = ("iid", "recorded")
TRACE_QUANTITY = ("closed-loop inference seconds: t_end - t_start of each inference record (frame taken -> "
                  "action out: LIBERO image preparation, predict_action, thread hand-off)")
BENCH_QUANTITY = ("rtloop bench per-call seconds: libero_image + predict_action (the LIBERO frame preparation and "
                  "the model call; no thread hand-off)")
BENCH_KEYS = ("libero_image_samples_s", "predict_action_samples_s")


class LatencyModel(Protocol):
    label: str

    def sample(self, index: int, measured_s: float | None = None) -> float: ...

    def describe(self) -> dict: ...


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


@dataclass(frozen=True)
class FixedLatency:
    seconds: float

    @property
    def label(self) -> str:
        return f"fixed {_ms(self.seconds)}"

    def sample(self, index: int, measured_s: float | None = None) -> float:
        return self.seconds

    def describe(self) -> dict:
        return {"kind": "fixed", "label": self.label, "seconds": self.seconds}


class MeasuredLatency:
    """The policy's own call time: sample returns measured_s, the duration of the call that just ran."""

    label = "measured: the policy's own call time"

    def sample(self, index: int, measured_s: float | None = None) -> float:
        if measured_s is None:
            raise ValueError("MeasuredLatency.sample needs measured_s, the duration of the call that just ran")
        return measured_s

    def describe(self) -> dict:
        return {"kind": "measured", "label": self.label}


@dataclass(frozen=True)
class Samples:
    """Per-call seconds read from a file, with where they came from."""

    seconds: tuple[float, ...]
    engine: str
    machine: str
    quantity: str  # what one number is
    source: str  # the measurement they were taken from (a trace, a bench report)
    path: str  # the file they were read from
    notes: str = ""


class EmpiricalLatency:
    """Recorded per-call latencies, replayed. iid (default): sample(index) is the sample at a position drawn
    from a generator seeded with (seed, index), so any index can be asked for in any order and the answer
    never depends on what was asked before. recorded: samples[index % n], the recorded sequence cycled
    (keeps the recording's run-to-run correlation, but every run that starts at index 0 sees the same
    sequence)."""

    def __init__(self, samples: Samples, order: str = "iid", seed: int = 0) -> None:
        if order not in ORDERS:
            raise ValueError(f"latency order {order!r}: expected one of {', '.join(ORDERS)}")
        if order == "iid" and seed < 0:
            raise InputError(f"--seed must be >= 0 to draw latencies (got {seed})")
        self.samples, self.order, self.seed = samples, order, seed
        self._seconds = np.asarray(samples.seconds, dtype=np.float64)

    @property
    def label(self) -> str:
        order = "" if self.order == "iid" else ", recorded order"
        return (f"empirical: {self.samples.engine} on {self.samples.machine} "
                f"({self.samples.path}, {len(self._seconds)} samples{order})")

    def sample(self, index: int, measured_s: float | None = None) -> float:
        if index < 0:
            raise ValueError(f"latency sample index must be >= 0 (got {index})")
        if self.order == "recorded":
            return float(self._seconds[index % len(self._seconds)])
        position = np.random.default_rng((self.seed, index)).integers(len(self._seconds))
        return float(self._seconds[position])

    def describe(self) -> dict:
        s = self.samples
        return {"kind": "empirical", "label": self.label, "path": s.path, "engine": s.engine, "machine": s.machine,
                "quantity": s.quantity, "source": s.source, "notes": s.notes, "samples": len(self._seconds),
                "order": self.order, "seed": self.seed if self.order == "iid" else None,
                **{f"p{q}_s": float(np.percentile(self._seconds, q)) for q in (50, 95, 99)}}


class ScaledLatency:
    """Another model's latency times a factor: what a slower (or faster) machine might do. Not a measurement."""

    def __init__(self, inner: LatencyModel, scale: float) -> None:
        self.inner, self.scale = inner, scale

    @property
    def label(self) -> str:
        return f"{self.inner.label} x{float(self.scale)} (PROJECTION)"

    def sample(self, index: int, measured_s: float | None = None) -> float:
        return self.inner.sample(index, measured_s) * self.scale

    def describe(self) -> dict:
        return {"kind": "projection", "label": self.label, "scale": self.scale, "of": self.inner.describe()}


# --- files ---------------------------------------------------------------------------------------------------

def split_profile_spec(spec: str) -> tuple[Path, str | None]:
    """FILE[:ENGINE]. A spec that names an existing file is FILE whole (a file name may hold a colon)."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), None
    path, engine = spec.rsplit(":", 1)
    return Path(path), engine or None


def load_samples(spec: str) -> Samples:
    """The per-call seconds in a latency profile JSON, a bench JSON or a trace JSONL (told apart by content)."""
    path, engine = split_profile_spec(spec)
    where = f"latency profile {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        first = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        first = None
    if isinstance(first, dict) and first.get("kind") == "run":
        samples = _trace_samples(path, lines, first, engine)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON or a JSONL trace ({e})") from None
        if isinstance(doc, dict) and doc.get("format") == PROFILE_FORMAT:
            samples = _profile_samples(path, doc, engine)
        elif isinstance(doc, dict) and isinstance(doc.get("engines"), dict):
            samples = _bench_samples(path, doc, engine)
        else:
            raise InputError(f"{where}: no latency samples: looked for a latency profile (\"format\": "
                             f"\"{PROFILE_FORMAT}\"), a bench report (\"engines\") or a trace JSONL (a \"run\" "
                             "header line, then \"inference\" records)")
    for i, s in enumerate(samples.seconds):
        if not (math.isfinite(s) and s >= 0):
            raise InputError(f"{where}: sample {i} is {s!r}: a latency must be a finite number of seconds >= 0")
    return samples


def _machine(header: dict) -> str:
    m = header.get("machine") or {}
    if m.get("gpu"):
        return m["gpu"]
    return f"{m.get('device', 'unknown device')}, {m.get('cpu_count', '?')} cores ({m.get('host', 'unknown host')})"


def _trace_samples(path: Path, lines: list[str], header: dict, engine: str | None) -> Samples:
    where = f"latency profile {path}"
    if engine is not None and engine != header.get("engine"):
        raise InputError(f"{where}: a trace of engine {header.get('engine')}, not {engine}")
    seconds = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{where}: line {n} is not JSON") from None
        if rec.get("kind") == "inference":
            seconds.append(rec["t_end"] - rec["t_start"])
    if not seconds:
        raise InputError(f"{where}: a trace with no samples (no \"inference\" records)")
    notes = f"policy: {header.get('policy')}; sim: {header.get('sim')}; {'sync' if header.get('sync') else 'async'} " \
            f"at {header.get('rate')} Hz; started {header.get('started')}"
    return Samples(tuple(seconds), str(header.get("engine")), _machine(header), TRACE_QUANTITY, str(path), str(path),
                   notes)


def _bench_samples(path: Path, doc: dict, engine: str | None) -> Samples:
    where = f"latency profile {path}"
    engines = doc["engines"]
    with_samples = [name for name, e in engines.items() if all(k in e for k in BENCH_KEYS)]
    if not with_samples:
        raise InputError(f"{where}: a bench report with no raw per-call samples (no engine has {BENCH_KEYS[1]}; "
                         "reports written before rtloop kept them hold percentiles only: re-run rtloop bench)")
    if engine is None:
        if len(with_samples) > 1:
            raise InputError(f"{where}: a bench report of several engines: name one, {path}:ENGINE "
                             f"(with samples: {', '.join(with_samples)})")
        engine = with_samples[0]
    if engine not in with_samples:
        raise InputError(f"{where}: no samples for engine {engine!r} (with samples: {', '.join(with_samples)})")
    prep, calls = (engines[engine][k] for k in BENCH_KEYS)
    if len(prep) != len(calls):
        raise InputError(f"{where}: engine {engine}: {len(prep)} {BENCH_KEYS[0]} but {len(calls)} {BENCH_KEYS[1]}")
    if not calls:
        raise InputError(f"{where}: engine {engine}: an empty {BENCH_KEYS[1]}")
    notes = f"checkpoint: {doc.get('checkpoint')}; {doc.get('dtype')}; torch {doc.get('torch')}; frames: {doc.get('frames')}"
    return Samples(tuple(a + b for a, b in zip(prep, calls)), engine, str(doc.get("device", "unknown device")),
                   BENCH_QUANTITY, str(path), str(path), notes)


def _profile_samples(path: Path, doc: dict, engine: str | None) -> Samples:
    where = f"latency profile {path}"
    missing = [k for k in ("engine", "machine", "quantity", "source", "samples_s") if k not in doc]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}")
    if engine is not None and engine != doc["engine"]:
        raise InputError(f"{where}: a profile of engine {doc['engine']}, not {engine}")
    seconds = doc["samples_s"]
    if not isinstance(seconds, list) or not seconds:
        raise InputError(f"{where}: no samples (samples_s must be a non-empty list of seconds)")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in seconds):
        raise InputError(f"{where}: samples_s must hold numbers (seconds)")
    return Samples(tuple(float(s) for s in seconds), str(doc["engine"]), str(doc["machine"]), str(doc["quantity"]),
                   str(doc["source"]), str(path), str(doc.get("notes", "")))


def profile_document(samples: Samples, notes: str | None = None) -> dict:
    """The latency profile JSON for samples read from any file (docs-latency.md describes the format)."""
    return {"format": PROFILE_FORMAT, "engine": samples.engine, "machine": samples.machine,
            "quantity": samples.quantity, "source": samples.source,
            "notes": samples.notes if notes is None else notes, "samples_s": list(samples.seconds)}


# --- options -------------------------------------------------------------------------------------------------

def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    """The latency options of `rtloop run` and `rtloop sweep`; parse them with latency_model_from_args."""
    p.add_argument("--inject-delay", type=float, default=None, metavar="SECONDS",
                   help="every inference takes SECONDS (a fixed latency; on the wall clock the call is padded up "
                        "to it, never shortened)")
    p.add_argument("--inject-mode", choices=("sleep", "spin-gil", "spin-nogil"), default="sleep",
                   help="wall clock: how the padding is spent: sleeping (default), burning CPU in Python holding the "
                        "GIL, or burning CPU in native code without it")
    p.add_argument("--latency-profile", default=None, metavar="FILE[:ENGINE]",
                   help="every inference takes a latency recorded in FILE: a latency profile JSON (profiles/latency/), "
                        "an `rtloop bench` JSON (ENGINE names one of its engines) or an `rtloop run` trace JSONL")
    p.add_argument("--latency-scale", type=float, default=None, metavar="FACTOR",
                   help="multiply the profile's (or, without one, the policy's own measured) latency by FACTOR: a "
                        "PROJECTION, labelled so")
    p.add_argument("--latency-order", choices=ORDERS, default="iid",
                   help="how --latency-profile samples are drawn: iid with a generator seeded by --seed (default) "
                        "or in recorded order, cycled")


def latency_model_from_args(inject_delay: float | None, latency_profile: str | None, latency_scale: float | None,
                            seed: int, order: str = "iid") -> LatencyModel:
    """The model the options ask for; with none of them, the policy's own measured time. One-line InputErrors."""
    if inject_delay is not None and latency_profile is not None:
        raise InputError("--inject-delay and --latency-profile are two latency models: give one")
    if latency_scale is not None and not (math.isfinite(latency_scale) and latency_scale > 0):
        raise InputError(f"--latency-scale must be a finite number > 0 (got {latency_scale:g})")
    if inject_delay is not None:
        if not (math.isfinite(inject_delay) and inject_delay >= 0):
            raise InputError(f"--inject-delay must be a finite number of seconds >= 0 (got {inject_delay:g})")
        if latency_scale is not None:
            raise InputError("--latency-scale projects a measured or recorded latency (--latency-profile, or the "
                             "policy's own): with --inject-delay give the delay you mean")
        return FixedLatency(inject_delay)
    model = EmpiricalLatency(load_samples(latency_profile), order, seed) if latency_profile else MeasuredLatency()
    if latency_scale is not None and latency_scale != 1.0:
        return ScaledLatency(model, latency_scale)
    return model
