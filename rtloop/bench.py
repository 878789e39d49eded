"""`rtloop bench`: time predict_action, stage by stage, for each inference engine, side by side in one process.

    rtloop bench                                   # CPU: tiny random checkpoint, engines reference,eager
    rtloop bench --size 7b --device cuda --quant int8 --out profiles/bench-h100-7b

All engines share ONE model (the reference engine's transformers modules alias its tensors), so a 7B run
holds one copy of the weights. Quantised variants (`--quant int8` adds `<last listed engine>+int8`; names
like `compiled+int8` may also be listed) run last, on the model quantised in place (reloaded first if a
second format is asked for). Each engine: one call per distinct prompt (graph capture, compilation) plus `--warmup` calls,
excluded; then `--iters` timed `policy.act` calls on the recorded real LIBERO frames, round-robin over tasks.

Reported per engine: p50/p95/p99 of each stage (processor, generate, detokenize) and of the whole
predict_action (wall time around it: the official function's scope, a prepared 224x224 image in, the action
out), of `libero_image` (the LIBERO eval's frame preparation, which runs before predict_action; the runtime's
`processor` stage includes it), Hz (1000 / p50 predict_action), peak memory (CUDA: the allocator's
peak during the timed calls; CPU: null, see `peak_rss_gb`), and the greedy tokens' agreement with a baseline
engine (`eager`, or for `X+int8` the bf16 `X`) over `--agreement-frames` frames, with the largest logit error.

The bandwidth floor is measured in the same run: a large device-to-device copy (CPU: a large `copy_`)
gives GB/s counting bytes read plus written; floor_ms = bytes of Llama weights one forward reads x 7
forwards / that bandwidth. No engine can generate faster; `generate_over_floor` says how far each is.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import tempfile
from pathlib import Path

import numpy as np

from rtloop import clock
from rtloop.commands.device import resolve_device
from rtloop.errors import InputError
from rtloop.policy.base import LIBERO_IMAGE, STAGES
from rtloop.policy.kernel_options import add_kernel_arguments, kernel_options_from_args
from rtloop.sim.replay import Frame, default_recording, load_frames

DEFAULT_FRAMES = default_recording()
N_TOKENS = 7  # 1 prefill + 6 decode forwards: the floor counts 7 passes over the weights
DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: random weights of --size)")
    p.add_argument("--size", choices=["tiny", "7b"], default="tiny",
                   help="random weights without --checkpoint: tiny (a generated checkpoint) or 7b (built in device memory)")
    p.add_argument("--engines", help="comma-separated engine names (default: reference,eager on CPU; "
                                     "reference,eager,graphed,compiled on CUDA)")
    p.add_argument("--quant", default="none",
                   help="comma-separated weight formats (int8, fp8): also run the last listed engine with each")
    p.add_argument("--iters", type=int, default=20, help="timed calls per engine (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per engine after one per prompt (default 3)")
    p.add_argument("--agreement-frames", type=int, default=16, help="frames for the token-agreement check (default 16)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--frames", type=Path, default=DEFAULT_FRAMES, help="recorded LIBERO frames (.npz, rtloop.sim.record)")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md (e.g. profiles/bench-h100-7b)")
    p.add_argument("--batch", default=None, metavar="SIZES",
                   help="comma-separated frames per call, e.g. 1,2,4,8,16,32: time predict_action_batch at each "
                        "(latency, frames/s, peak memory, prefill TFLOP/s, tokens against batch 1) instead of "
                        "the per-stage batch-1 table")
    add_kernel_arguments(p)


def parse_engines(engines: str | None, quant: str, device: str) -> list[str]:
    """Engine names in run order: the listed ones, then `<engine>+<format>` for each --quant format."""
    from rtloop.policy.engines import check_engine_device, split_engine_name

    default = "reference,eager,graphed,compiled" if device.startswith("cuda") else "reference,eager"
    names = [e.strip() for e in (engines or default).split(",")]
    formats = [q.strip() for q in quant.split(",") if q.strip() and q.strip() != "none"]
    if formats and (names[-1] == "reference" or "+" in names[-1]):
        raise InputError("--quant applies to the last engine in --engines, which must be a bf16 engine other than reference")
    names += [f"{names[-1]}+{q}" for q in formats]
    for name in names:
        check_engine_device(name, device)  # unknown engine or format, or CUDA-only on a CPU: one line
    if len(set(names)) != len(names):
        raise InputError(f"--engines lists an engine twice: {','.join(names)}")
    return sorted(names, key=lambda n: split_engine_name(n)[1] != "none")  # bf16 first, stable otherwise


class PolicyFactory:
    """Builds the policy (and its one model) the same way each time: needed again only to reload the
    weights for a second quantised format."""

    def __init__(self, args: argparse.Namespace, device: str, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.tmp: tempfile.TemporaryDirectory | None = None  # made by the first build that needs it

    @property
    def label(self) -> str:
        return str(self.args.checkpoint) if self.args.checkpoint else f"random weights, {self.args.size}"

    def build(self):
        from rtloop.policy.checkpoint import build_random_model, make_checkpoint
        from rtloop.policy.openvla import OpenVLAPolicy
        from rtloop.policy.tokenizer import write_tokenizer_files

        args = self.args
        if args.checkpoint is not None:
            return OpenVLAPolicy(args.checkpoint, device=self.device, dtype=self.dtype)
        if self.tmp is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="rtloop-bench-")
        path = Path(self.tmp.name) / args.size
        if args.size == "tiny":  # the real on-disk path: a generated checkpoint, loaded
            if not path.exists():
                make_checkpoint("tiny", path, seed=0)
            return OpenVLAPolicy(path, device=self.device, dtype=self.dtype)
        # 7b: 15 GB of random weights straight into device memory; the directory holds the tokenizer only
        if not path.exists():
            path.mkdir()
            write_tokenizer_files(path)
        model = build_random_model("7b", self.device, self.dtype, seed=0)
        return OpenVLAPolicy(path, device=self.device, dtype=self.dtype, model=model)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}


def measure_bandwidth(device: str) -> tuple[float, str]:
    """GB/s of a large copy, counting bytes read plus bytes written (the floor's bytes are reads only, so
    this is the rate at which the memory system moves bytes either way)."""
    import torch

    if device.startswith("cuda"):
        n, repeats = 1 << 30, 20
        src = torch.empty(n, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
        method = "device-to-device copy_ of 1 GiB x 20, CUDA events, bytes read + written"
        del src, dst
    else:
        n, repeats = 1 << 28, 5
        src = torch.empty(n, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        t0 = clock.now()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = clock.now() - t0
        method = "CPU memcpy (torch copy_) of 256 MiB x 5, bytes read + written"
    return 2 * n * repeats / seconds / 1e9, method


def kernel_settings(options) -> dict:
    """How the compiled engine's kernels ran in this run (the resolved KernelOptions: autotuning, PDL, the
    prefill split, the architecture's code paths, and which prefill GEMMs the split won), so runs made with
    different settings are not compared as if alike. Call it after the engines ran: the split choices are
    made on first use. A CPU launches no kernel programmatically: PDL is off there."""
    from rtloop.policy import kernels

    return {"triton": kernels.triton.__version__ if kernels.triton else None, "autotune": options.autotune,
            "pdl": bool(options.pdl), "prefill_split": options.prefill_split,
            "arch": None if options.sm is None else f"sm{options.sm}", "forced_arch": options.arch is not None,
            "rowwise_fp8": options.rowwise_fp8, "prefill_splits": kernels.split_choices()}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_engine(policy, name: str, frames: list[Frame], args: argparse.Namespace, cuda: bool, options) -> dict:
    """Warm up, then time `--iters` calls of policy.predict_action with `name` as the engine, each on a frame
    just put through the LIBERO image path (timed apart: it is the eval's work, not the model's)."""
    import torch

    from rtloop.policy.engines import build_engine
    from rtloop.policy.processor import prepare_libero_image

    policy.engine = build_engine(name, policy.model, kernel_options=options)
    warm = {f.instruction: f for f in frames}  # one call per distinct prompt: every graph bucket captured
    t0 = clock.now()
    for frame in list(warm.values()) + [frames[i % len(frames)] for i in range(args.warmup)]:
        policy.act(frame.image, frame.instruction)
    warmup_s = clock.now() - t0  # compilation, autotuning and graph capture land here
    build_peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stages: dict[str, list[float]] = {s: [] for s in (LIBERO_IMAGE, *STAGES)}
    totals = []
    for i in range(args.iters):
        frame = frames[i % len(frames)]
        t0 = clock.now()
        image = prepare_libero_image(frame.image)
        t1 = clock.now()
        _, timings = policy.predict_action(image, frame.instruction)
        totals.append(clock.now() - t1)
        stages[LIBERO_IMAGE].append(t1 - t0)
        for s in STAGES:
            stages[s].append(timings.get(s, 0.0))
    result = {
        "stages": {s: percentiles(v) for s, v in stages.items()},
        "predict_action": percentiles(totals),
    }
    # raw per-call seconds, for latency models (rtloop/runtime/latency.py): percentiles cannot be replayed
    result["libero_image_samples_s"], result["predict_action_samples_s"] = stages[LIBERO_IMAGE], totals
    result["hz"] = round(1000.0 / result["predict_action"]["p50_ms"], 2)
    result["warmup_s"] = round(warmup_s, 1)
    result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None
    if cuda:
        result["build_peak_mem_gb"] = round(build_peak, 3)
    return result


def engine_tokens(policy, frames: list[Frame], batch: int = 1):
    """Greedy tokens [N, 7] and their logits [N, 7, vocab] (float32, on the CPU) of the current engine, its
    calls taking `batch` frames at a time (the last call the rest)."""
    import torch

    from rtloop.policy.processor import build_prompt, pixel_values, prepare_libero_image, tokenize_prompt

    tokens, logits = [], []
    on_host = getattr(policy.engine, "takes_host_inputs", False)  # as predict_action feeds it
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        ids = [tokenize_prompt(policy.tokenizer, build_prompt(f.instruction)) for f in chunk]
        images = [prepare_libero_image(f.image) for f in chunk]
        if not on_host:
            images = torch.cat([pixel_values(image, policy.device, policy.dtype) for image in images])
            ids = [i.to(policy.device) for i in ids]
        t, l = policy.engine.generate_batch_with_logits(images, ids)
        tokens.append(t.cpu())
        logits.append(l.cpu())
    return torch.cat(tokens), torch.cat(logits)


def agreement(tokens, logits, base_tokens, base_logits) -> dict:
    """Token agreement with a baseline engine; logit errors only where both saw the same prefix (a step's
    logits are comparable only while every earlier token agreed)."""
    import torch

    same = tokens == base_tokens  # [N, 7]
    prefix_same = torch.cumprod(torch.cat([torch.ones_like(same[:, :1]), same[:, :-1]], dim=1), dim=1).bool()
    err = (logits - base_logits).abs().amax(dim=-1)  # [N, 7]
    scale = base_logits.abs().amax(dim=-1)
    return {
        "frames": int(tokens.shape[0]),
        "token_agreement": round(float(same.float().mean()), 4),
        "sequence_agreement": round(float(same.all(dim=1).float().mean()), 4),
        "max_abs_logit_err": round(float(err[prefix_same].max()), 5),
        "max_rel_logit_err": round(float((err / scale)[prefix_same].max()), 5),
        "max_abs_logit_err_prefill": round(float(err[:, 0].max()), 5),
    }


def parse_batches(text: str | None) -> list[int]:
    """--batch 1,2,4 -> [1, 2, 4]: distinct sizes of 1..32 frames, in the order given."""
    from rtloop.policy.buckets import BATCH_BUCKETS

    if text is None:
        return []
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--batch {text!r}: expected comma-separated frame counts, e.g. 1,2,4,8") from None
    if not sizes or any(not 1 <= b <= BATCH_BUCKETS[-1] for b in sizes) or len(set(sizes)) != len(sizes):
        raise InputError(f"--batch {text!r}: distinct frame counts from 1 to {BATCH_BUCKETS[-1]}")
    return sizes


def check_batches_fit(model_config, dtype, batches: list[int], device: str) -> None:
    """Before any weight loads: the largest batch's KV cache and activations must fit in what the GPU has
    free beside the weights; otherwise one line saying how much it needs."""
    import torch

    from rtloop.policy.checkpoint import count_parameters
    from rtloop.policy.buckets import batch_bucket
    from rtloop.policy.engines import check_batch_fits, engine_seq_len
    from rtloop.policy.model import OpenVLA

    with torch.device("meta"):
        weights = count_parameters(OpenVLA(model_config)) * torch.tensor([], dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(torch.device(device))[0] - weights
    check_batch_fits(model_config, batch_bucket(max(batches)), engine_seq_len(model_config, N_TOKENS),
                     dtype, max(free, 0))


def prefill_flops(config, frames: int, positions: int) -> float:
    """FLOPs of the LLM prefill as rtloop runs it, for `frames` frames of `positions` positions each (padding
    included: what the GPU computes): 2 per multiply-add of every linear on every position, except the last
    layer's output projection and MLP and lm_head, which run on one row per frame; attention QK^T and PV
    causal (half the square). The ViTs are not counted."""
    a = config.llm
    D, I, L, V = a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.vocab_size
    qkv = D * (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
    rest = D * D + 3 * D * I  # o_proj, gate, up, down
    linear = 2 * (L * positions * qkv + (L - 1) * positions * rest + rest + D * V)
    attention = L * 2 * positions * positions * a.num_attention_heads * a.head_dim  # 4 N^2 D / 2 (causal)
    return float(frames * (linear + attention))


def run_batches(policy, name: str, frames: list[Frame], check_frames: list[Frame], args: argparse.Namespace,
                cuda: bool, options) -> dict:
    """Per batch size B of --batch: --iters timed predict_action_batch calls of B frames each (round-robin
    over the recorded frames, so the prompts differ within a call), after one call per distinct prompt
    bucket plus --warmup; the LLM prefill timed alone; frame b's tokens in batches against batch 1's."""
    import torch

    from rtloop.policy.buckets import batch_bucket
    from rtloop.policy.engines import PROMPT_BUCKET, build_engine
    from rtloop.policy.processor import build_prompt, prepare_libero_image, tokenize_prompt

    engine = policy.engine
    if getattr(engine, "name", None) != name or getattr(engine, "max_batch", 1) < batch_bucket(max(args.batch)):
        policy.engine = engine = build_engine(name, policy.model, max_batch=batch_bucket(max(args.batch)),
                                              kernel_options=options)
    images = [prepare_libero_image(f.image) for f in frames]  # the eval's work, before predict_action
    lengths = [tokenize_prompt(policy.tokenizer, build_prompt(f.instruction)).shape[1] for f in frames]
    base = engine_tokens(policy, check_frames, 1)
    out: dict[str, dict] = {}
    t_start = clock.now()
    for B in args.batch:
        calls = [[(i * B + j) % len(frames) for j in range(B)] for i in range(args.iters)]
        by_bucket = {-(-max(lengths[k] for k in c) // PROMPT_BUCKET): c for c in calls}
        for call in list(by_bucket.values()) + calls[: args.warmup]:
            policy.predict_action_batch([images[k] for k in call], [frames[k].instruction for k in call])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        totals = []
        for call in calls:
            t0 = clock.now()
            policy.predict_action_batch([images[k] for k in call], [frames[k].instruction for k in call])
            totals.append(clock.now() - t0)
        latency = percentiles(totals)
        result = {"predict_action": latency, "frames_per_s": round(B * 1000.0 / latency["p50_ms"], 2),
                  "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None}
        if hasattr(engine, "time_prefill"):
            seconds, computed, positions = engine.time_prefill(B, max(lengths))
            flops = prefill_flops(policy.config, computed, positions)
            result["prefill"] = {"ms": round(seconds * 1000, 3), "frames_computed": computed,
                                 "positions": positions, "flops": flops,
                                 "tflops_per_s": round(flops / seconds / 1e12, 6)}
        if B > 1:
            result["agreement_vs_batch1"] = agreement(*engine_tokens(policy, check_frames, B), *base)
        out[str(B)] = result
        print(f"[bench] {name} batch {B}: {latency['p50_ms']:.2f} ms p50, {result['frames_per_s']:.1f} frames/s",
              flush=True)
    return {"batches": out, "warmup_s": round(clock.now() - t_start, 1)}


def baseline_for(name: str, done: dict) -> str | None:
    from rtloop.policy.engines import split_engine_name

    base, quant = split_engine_name(name)
    if quant != "none" and base in done:
        return base  # a quantised engine against the same engine in bf16
    if name != "eager" and "eager" in done:
        return "eager"
    return None


def main(args: argparse.Namespace, policy=None) -> int:
    """`policy`: one already built (with its engine, its batch buckets perhaps captured) to time instead of
    building one, for the one engine --engines names; it is left as it is (scripts/fleet_study.py)."""
    import torch

    from rtloop.policy.cuda_wait import set_cuda_wait
    from rtloop.policy.engines import split_engine_name
    from rtloop.policy.quant import llama_bytes_per_token

    if args.iters < 1 or args.warmup < 0 or args.agreement_frames < 1:
        raise InputError("--iters and --agreement-frames must be >= 1, --warmup >= 0")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise InputError(f"--checkpoint {args.checkpoint}: no such directory")
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    if cuda:  # as the policy would, but before the device checks below make the CUDA context
        set_cuda_wait("blocking")
    dtype = getattr(torch, "bfloat16" if cuda else "float32") if args.dtype == "auto" else getattr(torch, args.dtype)
    names = parse_engines(args.engines, args.quant, device)
    given = policy is not None
    if given and names != [policy.engine.name]:
        raise InputError(f"a built policy times its own engine ({policy.engine.name}), not {', '.join(names)}")
    args.batch = parse_batches(args.batch)
    try:
        options = kernel_options_from_args(args).resolve(torch.device(device))
    except ValueError as e:
        raise InputError(str(e)) from None
    frames = load_frames(args.frames)
    check_frames = frames[: args.agreement_frames]
    if args.batch and cuda:
        check_batches_fit(_model_config(args), dtype, args.batch, device)

    bandwidth, method = measure_bandwidth(device)
    factory = PolicyFactory(args, device, dtype)
    policy = factory.build() if policy is None else policy
    floor_ms = llama_bytes_per_token(policy.model) * N_TOKENS / (bandwidth * 1e9) * 1000
    report = {
        "device": device_name(device),
        "floor_ms": round(floor_ms, 3),
        "bandwidth_gbps": round(bandwidth, 1),
        "bandwidth_method": method,
        "checkpoint": factory.label,
        "size": None if args.checkpoint else args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "iterations": args.iters,
        "warmup": args.warmup,
        "frames": f"{args.frames.name}: {len(frames)} recorded LIBERO frames, {len({f.instruction for f in frames})} tasks",
        "torch": torch.__version__,
        "kernels": kernel_settings(options),
        "peak_mem": "CUDA allocator peak during the timed calls" if cuda else "null on CPU: see peak_rss_gb",
        "engines": {},
    }
    outputs: dict[str, tuple] = {}
    fmt = "none"
    for name in names:
        _, quant = split_engine_name(name)
        if quant != fmt:
            if fmt != "none":  # a second format needs the bf16 weights again
                policy = _rebuild(policy, factory)
            fmt = quant  # build_engine quantises the model in place
        if args.batch:
            print(f"[bench] {name}: batches of {args.batch}, {args.iters} calls each ...", flush=True)
            report["engines"][name] = run_batches(policy, name, frames, check_frames, args, cuda, options)
        else:
            print(f"[bench] {name}: warm-up and {args.iters} calls ...", flush=True)
            result = run_engine(policy, name, frames, args, cuda, options)
            if quant != "none":
                result["floor_ms"] = round(llama_bytes_per_token(policy.model) * N_TOKENS / (bandwidth * 1e9) * 1000, 3)
            result["generate_over_floor"] = round(result["stages"]["generate"]["p50_ms"] / result.get("floor_ms", floor_ms), 2)
            outputs[name] = engine_tokens(policy, check_frames)
            report["engines"][name] = result
        report["kernels"] = kernel_settings(options)  # now with this engine's split choices
        if not given:
            policy.engine = None  # drop graphs, HF modules, compiled code before the next engine
            torch.compiler.reset()  # compiled code may hold the weights it was compiled for
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        finish(report, outputs, cuda)
        if args.out is not None:  # after every engine: a run cut short still leaves what it measured
            write(report, args.out)
    print(markdown(report))
    if args.out is not None:
        print(f"[bench] wrote {write(report, args.out)}.json and .md")
    return 0


def finish(report: dict, outputs: dict, cuda: bool) -> None:
    """The cross-engine numbers: agreement with each engine's baseline, speed-up over reference."""
    for name, result in report["engines"].items():
        base = baseline_for(name, outputs)
        if base is not None:
            result["agreement"] = {"baseline": base, **agreement(*outputs[name], *outputs[base])}
    if "reference" in report["engines"] and "predict_action" in report["engines"]["reference"]:
        ref = report["engines"]["reference"]["predict_action"]["p50_ms"]
        for result in report["engines"].values():
            result["speedup_vs_reference"] = round(ref / result["predict_action"]["p50_ms"], 2)
    if not cuda:
        report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # whole process


def _model_config(args: argparse.Namespace):
    """The model's config without its weights: the checkpoint's, or that of the random --size."""
    from rtloop.policy.checkpoint import make_config
    from rtloop.policy.config import OpenVLAConfig

    if args.checkpoint is not None:
        return OpenVLAConfig.from_dir(args.checkpoint)
    return OpenVLAConfig.from_dict(make_config(args.size))


def write(report: dict, out: Path) -> Path:
    out = out.with_suffix("") if out.suffix == ".json" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return out


def _rebuild(policy, factory: PolicyFactory):
    import torch

    del policy.model, policy.engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return factory.build()


def _kernels_text(k: dict | None) -> str:
    if not k:  # reports written before the field existed
        return "kernel settings not recorded"
    arch = f", {k['arch']} code paths{' (forced)' if k.get('forced_arch') else ''}" if k.get("arch") else ""
    return (f"Triton {k['triton']}, GEMV {'autotuned' if k['autotune'] else 'fixed tile (--no-autotune)'}, "
            f"PDL {'on' if k['pdl'] else 'off'}{arch}{_splits_text(k)}")


def _splits_text(k: dict) -> str:
    if "prefill_split" not in k:  # reports written before the field existed
        return ""
    if not k["prefill_split"]:
        return ", prefill GEMMs whole (--no-prefill-split)"
    split = [c for c in k["prefill_splits"] if c["split"]]
    shapes = "; ".join(f"{c['dtype']} {c['rows']}x{c['k']} -> {c['n']} at row {c['split']}" for c in split)
    return f", prefill GEMMs split: {shapes}" if split else ", prefill GEMMs whole"


def batch_markdown(report: dict) -> list[str]:
    lines = ["| engine | batch | predict_action_batch p50 / p99 | frames/s | peak mem GB | prefill ms | "
             "prefill TFLOP/s | tokens = batch 1 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["engines"].items():
        for B, b in r["batches"].items():
            pa, pre, agree = b["predict_action"], b.get("prefill"), b.get("agreement_vs_batch1")
            mem = "n/a" if b["peak_mem_gb"] is None else f"{b['peak_mem_gb']:.2f}"
            pre_text = f"{pre['ms']:.2f} | {pre['tflops_per_s']:.3g}" if pre else "n/a | n/a"
            agree_text = f"{agree['token_agreement']:.0%}" if agree else "(itself)"
            lines.append(f"| {name} | {B} | **{pa['p50_ms']:.2f}** / {pa['p99_ms']:.2f} | {b['frames_per_s']:.1f} | "
                         f"{mem} | {pre_text} | {agree_text} |")
    lines += ["", "All times in ms, for one call of B frames (each its own image and prompt, prepared 224x224 "
              "images in, B actions out). frames/s = B x 1000 / p50. The prefill is the LLM's alone, timed by "
              "itself on the batch and prompt as padded to their buckets; its FLOPs count those padded "
              "positions (bench.prefill_flops). tokens = batch 1: frame b's 7 tokens in batches of B against its "
              "tokens alone, same engine."]
    return lines


def markdown(report: dict) -> str:
    lines = [
        f"# rtloop bench: {report['device']}",
        "",
        f"Model: {report['checkpoint']} ({report['dtype']}); {report['iterations']} timed calls per engine after "
        f"warm-up; frames: {report['frames']}; torch {report['torch']}; {_kernels_text(report.get('kernels'))}.",
        f"Bandwidth {report['bandwidth_gbps']} GB/s ({report['bandwidth_method']}); "
        f"floor for 7 passes over the Llama weights: **{report['floor_ms']} ms**.",
        "",
    ]
    if any("batches" in r for r in report["engines"].values()):
        return "\n".join(lines + batch_markdown(report)) + "\n"
    lines += [
        "| engine | processor p50 | generate p50 / p95 / p99 | detokenize p50 | predict_action p50 / p95 / p99 "
        "| Hz | x reference | generate / floor | peak mem GB | tokens = baseline | libero_image p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["engines"].items():
        st, pa = r["stages"], r["predict_action"]
        gen = st["generate"]
        agree = r.get("agreement")
        agree_text = f"{agree['token_agreement']:.0%} vs {agree['baseline']}" if agree else "(baseline)"
        mem = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        speedup = f"{r['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in r else "n/a"  # no reference run
        lines.append(
            f"| {name} | {st['processor']['p50_ms']:.2f} | {gen['p50_ms']:.2f} / {gen['p95_ms']:.2f} / "
            f"{gen['p99_ms']:.2f} | {st['detokenize']['p50_ms']:.2f} | **{pa['p50_ms']:.2f}** / {pa['p95_ms']:.2f} / "
            f"{pa['p99_ms']:.2f} | {r['hz']:.1f} | {speedup} | "
            f"{r['generate_over_floor']:.2f} | {mem} | {agree_text} | {st[LIBERO_IMAGE]['p50_ms']:.2f} |"
        )
    lines += ["", "All times in ms. Hz = 1000 / predict_action p50. predict_action takes the prepared 224x224 "
              "image, as the official function does; libero_image (flip, JPEG round trip, Lanczos resize) is the "
              "eval's preparation before it, timed apart. The graphed engines (graphed, compiled) take the uint8 "
              "image: its copy to the GPU and normalisation run inside their graph, in generate, and their "
              "processor is the prompt only. generate / floor divides by each engine's own floor "
              "(1-byte weights have half the bytes)."]
    return "\n".join(lines) + "\n"
