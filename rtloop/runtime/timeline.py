"""`rtloop timeline TRACE`: one episode's window drawn as a PNG and written as a Perfetto / Chrome trace
(open the JSON in https://ui.perfetto.dev or chrome://tracing).

Three tracks, one time axis (seconds from the episode's first frame):
- frames (the mailbox): each frame from its capture to the moment the inference task took it, or to the
  capture that overwrote it unread (dropped); an instant event at each capture;
- inference: each call, split into its stages (processor, generate, detokenize, injected delay);
- sim ticks: each tick, named and coloured by the action it applied: fresh (first use), held (reused),
  dummy (before the first answer);
with arrows from a frame to the inference that used it and from the inference to the tick that first
applied its action, and a counter of the action age at each tick.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from rtloop.errors import InputError

DEFAULT_WINDOW_S = 3.0
COLOURS = {"fresh": "#2ca02c", "held": "#ff7f0e", "dummy": "#9a9a9a", "stop": "#d62728", "chunk": "#1f77b4"}
CHROME_COLOURS = {"fresh": "good", "held": "bad", "dummy": "grey", "stop": "terrible", "chunk": "rail_response"}  # chrome://tracing reserved names
STAGE_COLOURS = {"processor": "#9467bd", "generate": "#1f77b4", "detokenize": "#17becf", "injected_delay": "#d62728"}
TRACKS = {"frames": 1, "inference": 2, "sim ticks": 3}  # Perfetto thread ids, top to bottom
# One category for every event: viewers that bind a flow to a slice by (cat, pid, tid, ts) find them
CAT = "rtloop"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", type=Path, metavar="TRACE", help="a JSONL trace (rtloop run --trace, rtloop sweep --traces)")
    p.add_argument("--episode", type=int, default=None, help="episode to draw (default: the trace's first)")
    p.add_argument("--start", type=float, default=0.0, help="window start, seconds from the episode's first frame")
    p.add_argument("--end", type=float, default=None,
                   help=f"window end, seconds from the episode's first frame (default start + {DEFAULT_WINDOW_S:g})")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix: PREFIX.png and PREFIX.json (default: the trace's path without .jsonl, "
                        "plus -timeline)")


@dataclass
class Frame:
    seq: int
    captured: float  # seconds from t0
    left: float  # taken by an inference, or overwritten
    used_by: int | None  # inference seq


@dataclass
class Episode:
    """One episode's records on a common time axis (seconds from its first frame)."""

    episode: int
    ticks: list[dict]
    inferences: list[dict]
    frames: list[Frame]
    t0: float
    info: dict

    def applied_at(self, seq: int) -> dict | None:
        """The tick that first applied inference `seq`'s action (its env.step took it)."""
        return next((t for t in self.ticks if t["action_seq"] == seq and t["action_source"] == "fresh"), None)


def load_episode(records: list[dict], episode: int | None) -> Episode:
    ticks_all = [r for r in records if r.get("kind") == "tick"]
    episodes = list(dict.fromkeys(r["episode"] for r in ticks_all))
    if not episodes:
        raise InputError("the trace has no tick records")
    if episode is None:
        episode = episodes[0]
    if episode not in episodes:
        raise InputError(f"episode {episode} is not in the trace; its episodes: {', '.join(map(str, episodes))}")
    ticks = [r for r in ticks_all if r["episode"] == episode]
    infs = [r for r in records if r.get("kind") == "inference" and r["episode"] == episode]
    captured = {t["frame_seq"]: t["t_end"] for t in ticks}  # a tick publishes its frame as it ends
    captured.update({r["frame_seq"]: r["frame_time"] for r in infs})  # exact, and frame 0 (the reset's)
    used = {r["frame_seq"]: r for r in infs}
    t0 = min(min(captured.values()), ticks[0]["t_start"])
    seqs = sorted(captured)
    frames = []
    for i, seq in enumerate(seqs):
        nxt = captured[seqs[i + 1]] if i + 1 < len(seqs) else None
        inf = used.get(seq)
        left = inf["t_start"] if inf is not None else (nxt if nxt is not None else ticks[-1]["t_end"])
        frames.append(Frame(seq, captured[seq] - t0, left - t0, None if inf is None else inf["seq"]))
    info = next((r for r in records if r.get("kind") == "run"), {})
    period = 1.0 / info["rate"] if info.get("rate") else 0.0
    # a tick's action is in force until the next tick starts: its slot
    slot_ends = [nxt["t_start"] for nxt in ticks[1:]] + [max(ticks[-1]["t_end"], ticks[-1]["t_start"] + period)]
    # env.step ends the tick; in sync mode the inference runs before it, inside the same tick
    ticks = [{**t, "t_start": t["t_start"] - t0, "t_end": t["t_end"] - t0, "slot_end": end - t0,
              "step_start": t["t_end"] - t["step_s"] - t0} for t, end in zip(ticks, slot_ends)]
    infs = [{**r, **{k: r[k] - t0 for k in ("t_start", "t_end", "frame_time")}} for r in infs]
    return Episode(episode, ticks, infs, frames, t0, info)


def in_window(start: float, end: float, lo: float, hi: float) -> bool:
    return start <= hi and end >= lo


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def stage_spans(inf: dict) -> list[tuple[str, float, float]]:
    """(stage, start, end) laid end to end from the call's start, in the order they ran, clipped to it."""
    spans, t = [], inf["t_start"]
    for name, seconds in inf["stages"].items():
        end = min(t + seconds, inf["t_end"])
        spans.append((name, t, end))
        t = end
    return spans


def chrome_trace(ep: Episode, lo: float, hi: float) -> dict:
    pid = 1
    ev: list[dict] = [{"ph": "M", "pid": pid, "name": "process_name",
                       "args": {"name": f"rtloop episode {ep.episode} ({ep.info.get('policy', '?')})"}}]
    for name, tid in TRACKS.items():
        ev.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
        ev.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    frames_tid, inf_tid, tick_tid = TRACKS["frames"], TRACKS["inference"], TRACKS["sim ticks"]
    shown = {r["seq"] for r in ep.inferences if in_window(r["t_start"], r["t_end"], lo, hi)}  # arrows need both ends
    for f in ep.frames:
        if not in_window(f.captured, f.left, lo, hi):
            continue
        name = f"frame {f.seq}" + (" (dropped)" if f.used_by is None else "")
        ev.append({"ph": "X", "pid": pid, "tid": frames_tid, "name": name, "cat": CAT, "ts": _us(f.captured),
                   "dur": max(1.0, _us(f.left - f.captured)), "args": {"frame_seq": f.seq, "used_by": f.used_by}})
        ev.append({"ph": "i", "s": "t", "pid": pid, "tid": frames_tid, "name": "capture", "cat": CAT,
                   "ts": _us(f.captured), "args": {"frame_seq": f.seq}})
        if f.used_by in shown:  # arrow: frame -> the inference that read it
            ev.append({"ph": "s", "pid": pid, "tid": frames_tid, "name": "frame -> inference", "cat": CAT,
                       "id": f"frame{f.seq}", "ts": _us(f.captured)})
            ev.append({"ph": "f", "bp": "e", "pid": pid, "tid": inf_tid, "name": "frame -> inference", "cat": CAT,
                       "id": f"frame{f.seq}", "ts": _us(f.left)})
    for inf in ep.inferences:
        if inf["seq"] not in shown:
            continue
        dur = max(1.0, _us(inf["t_end"] - inf["t_start"]))
        ev.append({"ph": "X", "pid": pid, "tid": inf_tid, "name": f"inference {inf['seq']}", "cat": CAT,
                   "ts": _us(inf["t_start"]), "dur": dur,
                   "args": {"frame_seq": inf["frame_seq"], "frame_age_ms": 1e3 * inf["frame_age_s"],
                            "queue_wait_ms": 1e3 * inf["queue_wait_s"]}})
        spans = stage_spans(inf)
        for name, s, e in spans:
            ev.append({"ph": "X", "pid": pid, "tid": inf_tid, "name": name, "cat": CAT, "ts": _us(s),
                       "dur": max(0.0, _us(e - s))})
        tick = ep.applied_at(inf["seq"])
        if tick is not None and in_window(tick["t_start"], tick["slot_end"], lo, hi):
            # arrow: from the call's last stage to the tick that first applied its action
            last_start = spans[-1][1] if spans else inf["t_start"]
            ev.append({"ph": "s", "pid": pid, "tid": inf_tid, "name": "action -> tick", "cat": CAT,
                       "id": f"action{inf['seq']}", "ts": _us(last_start)})
            ev.append({"ph": "f", "bp": "e", "pid": pid, "tid": tick_tid, "name": "action -> tick", "cat": CAT,
                       "id": f"action{inf['seq']}", "ts": _us(tick["t_start"])})
    for t in ep.ticks:
        if not in_window(t["t_start"], t["slot_end"], lo, hi):
            continue
        source = t["action_source"]
        age = None if t["action_age_s"] is None else 1e3 * t["action_age_s"]
        ev.append({"ph": "X", "pid": pid, "tid": tick_tid, "name": source, "cat": CAT, "cname": CHROME_COLOURS[source],
                   "ts": _us(t["t_start"]), "dur": max(1.0, _us(t["slot_end"] - t["t_start"])),
                   "args": {"step": t["step"], "action_seq": t["action_seq"], "action_age_ms": age,
                            "published_frame": t["frame_seq"], "overrun_ms": 1e3 * t["overrun_s"],
                            "lateness_ms": 1e3 * t["lateness_s"]}})
        ev.append({"ph": "X", "pid": pid, "tid": tick_tid, "name": "env.step", "cat": CAT,
                   "ts": _us(t["step_start"]), "dur": max(0.0, _us(t["t_end"] - t["step_start"]))})
        if age is not None:
            ev.append({"ph": "C", "pid": pid, "name": "action age (ms)", "ts": _us(t["step_start"]), "args": {"age": age}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"episode": ep.episode, "window_s": [lo, hi], "policy": ep.info.get("policy"),
                          "sim": ep.info.get("sim"), "sync": ep.info.get("sync"), "rate": ep.info.get("rate")}}


def plot(ep: Episode, lo: float, hi: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lanes = {"sim ticks": 0, "inference": 1, "frames\n(mailbox)": 2}
    fig, (ax, ax_age) = plt.subplots(2, 1, figsize=(14, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    h = 0.6
    ticks = [t for t in ep.ticks if in_window(t["t_start"], t["slot_end"], lo, hi)]
    for t in ticks:  # the slot in the action's colour, the env.step inside it in black along the bottom
        ax.broken_barh([(t["t_start"], t["slot_end"] - t["t_start"])], (-h / 2, h), color=COLOURS[t["action_source"]],
                       edgecolor="black", linewidth=0.4)
        ax.broken_barh([(t["step_start"], t["t_end"] - t["step_start"])], (-h / 2, h / 5), color="black", linewidth=0)
        if t["action_seq"] is not None and len(ticks) <= 80:
            ax.text((t["t_start"] + t["slot_end"]) / 2, 0.05, str(t["action_seq"]), ha="center", va="center",
                    fontsize=6, clip_on=True)
    for inf in ep.inferences:
        if not in_window(inf["t_start"], inf["t_end"], lo, hi):
            continue
        for name, s, e in stage_spans(inf):
            ax.broken_barh([(s, e - s)], (1 - h / 2, h), color=STAGE_COLOURS.get(name, "#bcbd22"), linewidth=0)
        ax.broken_barh([(inf["t_start"], inf["t_end"] - inf["t_start"])], (1 - h / 2, h), facecolor="none",
                       edgecolor="black", linewidth=0.5)
        tick = ep.applied_at(inf["seq"])
        if tick is not None and tick["step_start"] <= hi:
            ax.annotate("", xy=(tick["step_start"], h / 2), xytext=(inf["t_end"], 1 - h / 2),
                        arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.7})
    for f in ep.frames:
        if not in_window(f.captured, f.left, lo, hi):
            continue
        dropped = f.used_by is None
        ax.broken_barh([(f.captured, max(f.left - f.captured, 1e-4))], (2 - h / 2, h),
                       color="#f4b6b6" if dropped else "#aec7e8", hatch="//" if dropped else None,
                       edgecolor="#b22222" if dropped else "#1f77b4", linewidth=0.5)
        ax.plot([f.captured], [2], marker="|", color="black", markersize=12)
        if not dropped:
            ax.annotate("", xy=(f.left, 1 + h / 2), xytext=(f.captured, 2 - h / 2),
                        arrowprops={"arrowstyle": "->", "color": "#1f77b4", "lw": 0.7})
    ax.set_yticks(list(lanes.values()), list(lanes))
    ax.set_ylim(-0.6, 2.6)
    legend = [Patch(color=c, label=f"tick: {k} action") for k, c in COLOURS.items()]
    legend.append(Patch(color="black", label="env.step"))
    legend += [Patch(color=c, label=k.replace("_", " ")) for k, c in STAGE_COLOURS.items()
               if any(k in r["stages"] for r in ep.inferences)]
    legend += [Patch(facecolor="#aec7e8", edgecolor="#1f77b4", label="frame waiting, then read"),
               Patch(facecolor="#f4b6b6", edgecolor="#b22222", hatch="//", label="frame overwritten unread")]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=7, frameon=False)
    mode = "sync" if ep.info.get("sync") else "async"
    labels = textwrap.fill(f"{ep.info.get('policy', '')} | {ep.info.get('sim', '')}", 160)
    ax.set_title(f"episode {ep.episode}, {mode} at {ep.info.get('rate', '?')} Hz, window {lo:g}-{hi:g} s "
                 f"(numbers on ticks: the inference whose action they apply)\n{labels}", fontsize=8)
    aged = [t for t in ticks if t["action_age_s"] is not None]  # the age when env.step took the action
    ax_age.step([t["step_start"] for t in aged], [1e3 * t["action_age_s"] for t in aged], where="post", color="black")
    ax_age.scatter([t["step_start"] for t in aged], [1e3 * t["action_age_s"] for t in aged],
                   c=[COLOURS[t["action_source"]] for t in aged], s=12, zorder=3)
    ax_age.set_ylabel("action age (ms)", fontsize=8)
    ax_age.set_xlabel("seconds from the episode's first frame")
    ax_age.set_xlim(lo, hi)
    ax_age.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from rtloop.runtime.trace import read_trace

    if not args.trace.is_file():
        raise InputError(f"{args.trace}: no such trace file")
    end = args.start + DEFAULT_WINDOW_S if args.end is None else args.end
    if not end > args.start:
        raise InputError(f"--end must be after --start (got {args.start:g} to {end:g})")
    try:
        records = read_trace(args.trace)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{args.trace} is not a JSONL trace ({e})") from None
    ep = load_episode(records, args.episode)
    if not any(in_window(t["t_start"], t["t_end"], args.start, end) for t in ep.ticks):
        raise InputError(f"no tick of episode {ep.episode} falls in {args.start:g}-{end:g} s "
                         f"(the episode spans 0-{ep.ticks[-1]['t_end']:.2f} s)")
    prefix = args.out or args.trace.with_name(args.trace.name.removesuffix(".jsonl") + "-timeline")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    png, js = Path(f"{prefix}.png"), Path(f"{prefix}.json")
    js.write_text(json.dumps(chrome_trace(ep, args.start, end)) + "\n", encoding="utf-8")
    plot(ep, args.start, end, png)
    print(f"timeline of episode {ep.episode}, {args.start:g}-{end:g} s: {png} {js} (open the JSON in ui.perfetto.dev)")
    return 0
