#!/usr/bin/env bash
# What produced profiles/bench-{h100,h200}-7b.{json,md}: run from the repository root on a CUDA machine that
# has torch and transformers (no install needed: PYTHONPATH). Writes everything under ${OUT:-out/gpu}, files
# named for ${GPU:-h100} (the machine's label).
#   GPU=h200 bash scripts/gpu_bench.sh [kernels|prefill|split|bench|batch|profile|tests|parity|run|checkpoint|physics|libero|fleet|evalrate|study|serve ...]
#   `physics`, `libero`, `fleet`, `evalrate`, `study` and `serve` need real LIBERO on the machine (on ours:
#   ../shared/gpu-libero, set up before this script).
#   (default: kernels bench profile tests parity)
set -u
OUT=${OUT:-out/gpu}
GPU=${GPU:-h100}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYSPY=${PYSPY:-$(command -v py-spy || echo py-spy)}
LOG="$OUT/log.txt"
steps=${*:-kernels bench profile tests parity}

say() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import rtloop.cli as c; c.build_parser(); print('rtloop.cli imports without LIBERO/py-spy')"
} 2>&1 | tee -a "$LOG"

checkpoint7b() {
  say "write a 7b random checkpoint"
  [ -f /tmp/ck7b/config.json ] || timeout 200 python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rtloop.policy.checkpoint import build_random_model, make_config
from rtloop.policy.tokenizer import write_tokenizer_files

out = Path("/tmp/ck7b")
out.mkdir(exist_ok=True)
model = build_random_model("7b", "cuda", torch.bfloat16, seed=0)
save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "model.safetensors"), {"format": "pt"})
write_tokenizer_files(out)
(out / "config.json").write_text(json.dumps(make_config("7b", 0), indent=2) + "\n")
print("wrote", out)
EOF
}

for step in $steps; do
  case $step in
  kernels)
    say "gemv microbenchmark"
    timeout ${KERNELS_TIMEOUT:-420} python3 scripts/gemv_bench.py --out "$OUT/gemv-$GPU.json" 2>&1 | tee -a "$LOG" ;;
  bench)
    say "rtloop bench 7b"
    timeout ${BENCH_TIMEOUT:-360} python3 -m rtloop bench --size 7b --device cuda \
      --engines "${ENGINES:-reference,eager,graphed,compiled}" --quant "${QUANT:-int8,fp8}" --iters "${ITERS:-50}" \
      --warmup 5 --agreement-frames "${AGREEMENT_FRAMES:-32}" ${KERNEL_FLAGS:-} --out "$OUT/${BENCH_NAME:-bench-$GPU-7b}" \
      2>&1 | tee -a "$LOG" ;;
  prefill)
    say "prefill matmuls: cublas vs inductor max-autotune"
    timeout ${PREFILL_TIMEOUT:-150} python3 scripts/prefill_gemm_bench.py --rows 288 --out "$OUT/prefill-gemm-$GPU.json" \
      2>&1 | grep -v Warning | tail -12 | tee -a "$LOG" ;;
  split)
    say "prefill GEMMs: whole vs last rows on a side stream"
    timeout ${SPLIT_TIMEOUT:-120} python3 scripts/prefill_split_bench.py --rows 288 --splits 256 --formats bf16,fp8 \
      --out "$OUT/prefill-split-$GPU.json" 2>&1 | grep -v Warning | tee -a "$LOG"
    for s in 1 0; do
      say "rtloop bench compiled+fp8, prefill split $s"
      timeout ${BENCH_TIMEOUT:-360} python3 -m rtloop bench --size 7b --device cuda $([ $s = 0 ] && echo --no-prefill-split) \
        --engines compiled --quant fp8 --iters 40 --warmup 5 --agreement-frames 4 --out "$OUT/bench-$GPU-split$s" \
        2>&1 | grep "^| comp" | tee -a "$LOG"
    done ;;
  batch)
    # batched predict_action: per batch size latency, frames/s, peak memory, prefill TFLOP/s, tokens vs batch 1;
    # one process per engine (each compiles and captures 6 batch buckets); KERNEL_FLAGS e.g. "--kernel-arch sm89"
    for engine in ${BATCH_ENGINES:-compiled compiled+fp8 compiled+int8 eager}; do
      say "rtloop bench --batch, $engine ${KERNEL_FLAGS:-}"
      timeout ${BATCH_TIMEOUT:-580} python3 -m rtloop bench --size 7b --device cuda --engines "$engine" \
        --batch "${BATCHES:-1,2,4,8,16,32}" --iters "${ITERS:-20}" --warmup 3 --agreement-frames 32 ${KERNEL_FLAGS:-} \
        --out "$OUT/batch-$GPU-${engine//+/_}${KERNEL_FLAGS:+-${KERNEL_FLAGS//[ -]/}}" 2>&1 | grep -v Warning | tee -a "$LOG"
    done ;;
  tests)
    say "pytest -m gpu"
    # the engines (batched, sm89 forced) and the model first, then the kernel tests the 12-02 runs did not reach,
    # then the rest: each Triton variant compiles for ~10-20 s there, and the ~50 GEMV variants took > 290 s of
    # the H200 on their own (2026-12-02)
    # the whole output to $OUT/tests.txt (a timeout cuts the pipeline: `| tail` kept no failure, 2026-12-02)
    k=tests/policy/test_kernels.py
    timeout ${TESTS_TIMEOUT:-580} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -o log_level=WARNING \
      tests/policy/test_engines.py tests/policy/test_model.py $k::test_the_sm89_code_paths_can_be_forced_on_hopper \
      $k::test_decode_attention_is_rope_cache_write_and_masked_sdpa $k::test_8bit_prefill_matmuls_approximate_the_float_product \
      $k::test_fp8_prefill_matmul_whole_is_scaled_mm $k::test_split_fp8_prefill_matmul_equals_the_whole_one_also_in_a_graph \
      $k::test_llama_on_the_kernels_picks_the_same_tokens $k \
      > "$OUT/tests.txt" 2>&1
    echo "pytest exit $? (124: stopped at TESTS_TIMEOUT)" >> "$OUT/tests.txt"
    grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests.txt" | tee -a "$LOG" ;;
  parity)
    say "vit timm parity"
    timeout 60 python3 scripts/vit_timm_parity.py --device cuda > "$OUT/vit_timm_parity-$GPU.json" 2>>"$LOG"
    echo "exit $?" | tee -a "$LOG" ;;
  profile)
    for engine in ${PROFILE_ENGINES:-graphed}; do
      say "torch profile, 7b $engine"
      timeout ${PROFILE_TIMEOUT:-150} python3 -m rtloop.profiling.torch_trace --size 7b --device cuda --engine "$engine" \
        --calls 5 --out "/tmp/torch-profile-$engine" 2>&1 | tail -5 | tee -a "$LOG"
      gzip -c "/tmp/torch-profile-$engine/torch_trace.json" > "$OUT/torch_trace-7b-${engine//+/_}.json.gz"
      cp "/tmp/torch-profile-$engine/torch_summary.json" "$OUT/torch_summary-7b-${engine//+/_}.json"
      python3 scripts/trace_kernels.py "/tmp/torch-profile-$engine/torch_trace.json" --top 40 \
        > "$OUT/kernels-7b-${engine//+/_}.md" && head -30 "$OUT/kernels-7b-${engine//+/_}.md" | tee -a "$LOG"
    done ;;
  run)
    # the runtime on recorded real LIBERO frames (--sim replay: no LIBERO on this machine), 7b random
    # weights from a real on-disk checkpoint, one run per engine
    # (`rtloop checkpoint make --size 7b` draws 7.5e9 numbers on the CPU: >200 s there; this builds the same
    # kind of random model on the GPU and writes it as one model.safetensors in ~30 s)
    checkpoint7b
    for engine in ${RUN_ENGINES:-graphed reference}; do
      say "rtloop run --engine $engine"
      timeout ${RUN_TIMEOUT:-300} python3 -m rtloop run --rate 20 --sim replay --engine "$engine" --device cuda \
        --checkpoint /tmp/ck7b --max-steps "${STEPS:-240}" --quiet --metrics-port 0 \
        --trace "/tmp/runs/run-$engine/trace.jsonl" 2>&1 | tee -a "$LOG"
      mkdir -p "$OUT/run-$engine" && cp "/tmp/runs/run-$engine/summary.json" "$OUT/run-$engine/"
    done
    tar -C /tmp/runs -czf "$OUT/runs.tar.gz" . ;;
  physics)
    # What slows LIBERO's physics beside a GPU policy (issue 18): LIBERO alone, then beside one load at a time,
    # each in a fresh process (scripts/libero_alone.py: its docstring names the loads). Pinned rows put the sim
    # and the load on chosen CPUs, to tell a shared physical core from other causes.
    mkdir -p "$OUT/physics"
    { lscpu | grep -i -E "model name|^CPU\(s\)|thread|core|socket|numa|mhz"
      for c in 0 1 2 3; do echo "cpu$c siblings: $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list 2>&1)"; done
      echo "cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>&1)"; } 2>&1 | tee -a "$LOG"
    for row in ${PHYSICS_ROWS:-none torch-import cuda-idle spin-process gpu-busy-process cuda-blocking \
               cuda-process cuda-process:2:9 spin-process:2:3 spin-process:2:9 none}; do
      IFS=: read -r load sim_cpu load_cpu <<< "$row"
      i=$((${i:-0} + 1))
      say "LIBERO physics, load: $row"
      timeout 120 python3 scripts/libero_alone.py --steps ${ALONE_STEPS:-120} --load "$load" \
        ${sim_cpu:+--pin-sim $sim_cpu} ${load_cpu:+--pin-load $load_cpu} --out "$OUT/physics/$(printf %02d $i)-${row//:/_}.json" \
        2>&1 | grep '^{' | tee -a "$LOG"
    done
    python3 - "$OUT/physics" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

print("| load (sim cpu _ load cpu) | physics p50 / p95 ms | sim thread on-CPU p50 ms | render p50 ms | cpu MHz (mean) |")
print("|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    mhz = r.get("cpu_mhz") or [0]
    print(f"| {path.stem} | {r['physics_ms']['p50']} / {r['physics_ms']['p95']} | {r['step_cpu_ms']['p50']} | "
          f"{r['render_ms']['p50']} | {sum(mhz) / len(mhz):.0f} |")
EOF
    ;;
  libero)
    # Real LIBERO beside the 7b (random weights). First LIBERO alone and beside host loads that imitate a GPU
    # policy (scripts/libero_alone.py), then per engine one `rtloop sweep` of async and --sync episodes at the
    # full horizon: one process builds (compiles) the engine once for both modes. GPU memory is sampled
    # throughout; py-spy samples the PROFILE_ENGINE's sweep for 20 s once its first episode runs.
    checkpoint7b
    mkdir -p "$OUT/alone"
    for variant in ${ALONE_LOADS:-none cuda cuda-blocking}; do
      say "LIBERO alone, load: $variant"
      timeout 120 python3 scripts/libero_alone.py --steps ${ALONE_STEPS:-120} --load $variant \
        --out "$OUT/alone/$variant.json" 2>&1 | grep '^{' | tee -a "$LOG"
    done
    for engine in ${LIBERO_ENGINES:-compiled+fp8 compiled reference}; do
      name="libero-${engine//+/_}"
      dir="/tmp/libero-runs/$name"
      mkdir -p "$dir"
      say "rtloop sweep real LIBERO --engine $engine: async and sync, ${EPISODES:-3} episodes each"
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$dir/gpu-memory-mib.csv" &
      smi=$!
      timeout -s INT ${SWEEP_TIMEOUT:-560} python3 -m rtloop sweep --mode async,sync --tasks "${TASKS:-0}" \
        --episodes "${EPISODES:-3}" --workers 1 --traces --engine "$engine" --device cuda --checkpoint /tmp/ck7b \
        --out "$dir" ${RUN_EXTRA:-} 2>&1 | grep -v -i warn | tail -14 | tee -a "$LOG" &
      sweep=$!
      if [ "$engine" = "${PROFILE_ENGINE:-compiled}" ]; then
        # native frames too: the sim's step is MuJoCo and numpy C code under a few Python lines
        (for _ in $(seq 400); do [ -e "$dir/traces/async_0ms/task${TASKS:-0}-ep0.jsonl" ] && break; sleep 1; done
         sleep 3; pid=$(pgrep -f -o '^python3 -m rtloop sweep')
         "$PYSPY" record --pid "$pid" --subprocesses --threads --native --rate 100 --duration 20 --format speedscope \
           -o "$OUT/pyspy-$name.json" || "$PYSPY" record --pid "$pid" --subprocesses --threads --rate 100 \
           --duration 20 --format speedscope -o "$OUT/pyspy-$name.json"
         echo "py-spy: $(ls -la "$OUT/pyspy-$name.json" 2>&1)") >> "$LOG" 2>&1 &
      fi
      wait $sweep
      kill $smi
      echo "$name peak GPU memory: $(sort -n "$dir/gpu-memory-mib.csv" | tail -1) MiB" | tee -a "$LOG"
      tar -C /tmp/libero-runs -czf "$OUT/$name.tgz" "$name"
    done ;;
  checkpoint)
    checkpoint7b ;;
  fleet|evalrate|study)
    # issue 16 on real LIBERO (set up first: ../shared/gpu-libero, then `. /opt/libero-site/env.sh`), one
    # process per engine (scripts/fleet_study.py: the engine compiles and captures its batch buckets once, then
    # rtloop's own commands run on it). fleet: `rtloop run --envs N` for N of FLEET_NS, N episodes of
    # FLEET_STEPS ticks at 20 Hz; an env holds 20 Hz at >= 19.5 Hz sim, >= 95% fresh, action age p99 <= 100 ms
    # (scripts/fleet_summary.py). evalrate: `rtloop eval --envs N --clock C`, EVAL_TOTAL episodes (default
    # max(N, 2): one round of the fleet) over the first tasks of libero_object, EVAL_STEPS policy steps each
    # (280, the official limit; random weights run every episode to it); scripts/evalrate_summary.py projects
    # the 500-episode protocol from the rate after setup (a PROJECTION). study: everything for STUDY_ENGINE in
    # one process (bench --batch BATCHES, STUDY_INPROCESS in-process episodes, fleet, evalrate), after
    # STUDY_GO exists when set (the warm-up may overlap another measurement; the timed part must not).
    # CPU dry run: STUDY_DEVICE=cpu STUDY_SIZE=tiny STUDY_ENGINE=eager STUDY_CHECKPOINT=DIR BATCHES=1,2 FLEET_NS=2 ...
    [ -n "${STUDY_CHECKPOINT:-}" ] || checkpoint7b
    case $step in
      fleet) engines=${FLEET_ENGINES:-compiled compiled+fp8}
             what=(--batches "" --fleet-ns "${FLEET_NS:-1,2,4,8,16}" --eval-ns "") ;;
      evalrate) engines=${EVAL_ENGINE:-compiled+fp8}
                what=(--batches "" --fleet-ns "" --eval-ns "${EVAL_NS:-1,4,8,16}" --eval-clocks "${EVAL_CLOCKS:-wall,virtual}") ;;
      study) engines=${STUDY_ENGINE:-compiled+fp8}
             what=(--batches "${BATCHES-1,2,4,8,16,32}" --inprocess-episodes "${STUDY_INPROCESS:-0}"
                   --fleet-ns "${FLEET_NS-1,2,4,8,16}" --serial-image-ns "${SERIAL_IMAGE_NS:-}"
                   --eval-ns "${EVAL_NS:-}" --eval-clocks "${EVAL_CLOCKS:-wall,virtual}"
                   ${STUDY_GO:+--go "$STUDY_GO"} ${STUDY_DONE:+--done "$STUDY_DONE"}) ;;
    esac
    for engine in $engines; do
      say "scripts/fleet_study.py $step --engine $engine ${what[*]}"
      timeout -s INT -k 60 ${STUDY_TIMEOUT:-3000} python3 scripts/fleet_study.py --engine "$engine" --gpu "$GPU" \
        --device "${STUDY_DEVICE:-cuda}" --size "${STUDY_SIZE:-7b}" \
        --checkpoint "${STUDY_CHECKPOINT:-/tmp/ck7b}" --out "$OUT" --fleet-steps "${FLEET_STEPS:-200}" \
        --eval-steps "${EVAL_STEPS:-280}" --eval-total "${EVAL_TOTAL:-0}" --kernel-flags "${KERNEL_FLAGS:-}" "${what[@]}" \
        2>&1 | grep -v -E "^SILENT|ep/s|it/s" | tee -a "$LOG"
    done
    python3 scripts/fleet_summary.py "$OUT" --json "$OUT/fleet-$GPU.json" 2>&1 | tee -a "$LOG"
    python3 scripts/evalrate_summary.py "$OUT" --json "$OUT/evalrate-$GPU.json" 2>&1 | tee -a "$LOG" ;;
  serve)
    # issue 17 on the GPU: `rtloop serve` (the 7b, random weights) and `rtloop run --policy ws://` driving real
    # LIBERO, two processes on one host. One client asks one frame at a time, so the server runs --max-batch 1
    # by default here: it then compiles one batch bucket, not four, before it listens. The whole step ends in
    # ~7 min at most: server up within SERVE_WAIT s (the compile takes ~2 min), the run within SERVE_RUN_TIMEOUT s.
    # CPU dry run: SERVE_CHECKPOINT=<tiny checkpoint> SERVE_ENGINE=eager SERVE_DEVICE=cpu.
    # our GPU machine has no `websockets` (2026-12-02): carry its wheel (the device README's .whl recipe) and
    # put it on PYTHONPATH first
    python3 -c "import websockets" 2>/dev/null || { echo "serve: no websockets package here: skipped" | tee -a "$LOG"; continue; }
    engine=${SERVE_ENGINE:-compiled+fp8}
    port=${SERVE_PORT:-8765}
    metrics_port=${SERVE_METRICS_PORT:-9465}
    checkpoint=${SERVE_CHECKPOINT:-/tmp/ck7b}
    [ "$checkpoint" = /tmp/ck7b ] && checkpoint7b
    name="serve-${engine//+/_}"
    dir="/tmp/serve-runs/$name"
    rm -rf "$dir" && mkdir -p "$dir"
    say "rtloop serve --engine $engine on :$port, then rtloop run --policy ws:// on real LIBERO"
    python3 -m rtloop serve --checkpoint "$checkpoint" --engine "$engine" --device "${SERVE_DEVICE:-cuda}" \
      --port "$port" --metrics-port "$metrics_port" --max-batch "${SERVE_MAX_BATCH:-1}" > "$dir/serve.log" 2>&1 &
    server=$!  # the server itself (no timeout wrapper): this step stops it below, whatever happened
    up=0
    for _ in $(seq $((${SERVE_WAIT:-300} / 2))); do
      kill -0 $server 2>/dev/null || break
      python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/healthz" 2>/dev/null && { up=1; break; }
      sleep 2
    done
    grep -v "^SILENT" "$dir/serve.log" | tail -4 | tee -a "$LOG"
    if [ $up = 1 ]; then
      # SERVE_GO: the server may compile while another measurement runs; the client starts once the file exists
      [ -n "${SERVE_GO:-}" ] && { say "server up; waiting for $SERVE_GO"; while [ ! -e "$SERVE_GO" ]; do sleep 1; done; }
      timeout -s INT ${SERVE_RUN_TIMEOUT:-100} python3 -m rtloop run --policy "ws://127.0.0.1:$port" --rate 20 \
        --suite libero_object --task "${TASKS:-0}" --episodes "${SERVE_EPISODES:-2}" --max-steps "${SERVE_STEPS:-280}" \
        --quiet --metrics-port 0 --trace "$dir/trace.jsonl" ${SERVE_RUN_EXTRA:-} > "$dir/run.log" 2>&1
      echo "rtloop run exit $?" | tee -a "$LOG"
      grep -v "^SILENT" "$dir/run.log" | tail -25 | tee -a "$LOG"
      python3 -c "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())" \
        "http://127.0.0.1:$metrics_port/metrics" > "$dir/server-metrics.txt" 2>>"$LOG"
      grep -E "^rtloop_server_(requests_total|batch_size_(count|sum)|errors_total)" "$dir/server-metrics.txt" \
        | grep -v " 0.0$" | tee -a "$LOG"
    elif kill -0 $server 2>/dev/null; then
      echo "rtloop serve did not answer http://127.0.0.1:$port/healthz within ${SERVE_WAIT:-300} s" | tee -a "$LOG"
    else
      echo "rtloop serve exited before it answered (its log: $name/serve.log)" | tee -a "$LOG"
    fi
    kill -TERM $server 2>/dev/null
    for _ in $(seq 30); do kill -0 $server 2>/dev/null || break; sleep 1; done
    kill -0 $server 2>/dev/null && { echo "rtloop serve ignored SIGTERM for 30 s: killed" | tee -a "$LOG"; kill -KILL $server; }
    wait $server
    echo "rtloop serve exit $? (0: a clean SIGTERM stop)" | tee -a "$LOG"
    mkdir -p "$OUT/$name" && cp "$dir"/* "$OUT/$name/" ;;
  esac
done
say "done"
