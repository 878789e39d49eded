#!/usr/bin/env bash
# A GPU study longer than one call of our lent machine allows (10 min a call; the machine stays warm, and
# /tmp with it, ~30 s after each): start `gpu_bench.sh` detached in one call, then wait on it in the next
# calls, each made within those 30 s, and collect it in the last. What the 2026-12-02 third run used
# (profiles/fleet-h200-prepare-ahead/). From the repository root on the GPU machine:
#   call 1  bash .gpu-libero/a/setup_a.sh                         (carry .gpu-libero/a: ../shared/gpu-libero)
#   call 2  STUDY_ENGINE=compiled+fp8 FLEET_NS=1,2,4 ... bash scripts/gpu_detached.sh start 480 checkpoint study
#           (carry .gpu-libero/b and .gpu-libero/gl; the variables are gpu_bench.sh's)
#   then    bash scripts/gpu_detached.sh wait 560                 (as often as needed, one call each)
#   last    bash scripts/gpu_detached.sh collect 560
# Each waits up to its seconds (less once the study ends), then prints the log's end, the study's steps so
# far and the eval's episodes so far, and leaves under $OUT the log and a tarball of the results (traces
# only in collect's). CPU dry run: OUT=/tmp/out STUDY_DEVICE=cpu ... (gpu_bench.sh's), without .gpu-libero.
set -u
HERE=/tmp/rtloop-detached
mode=${1:?start|wait|collect}
seconds=${2:-0}
shift 2 2>/dev/null || shift $#
OUT=${OUT:?OUT: where the results go}
mkdir -p "$OUT"

report() {
  local end=$(( $(date +%s) + seconds ))
  while [ ! -e "$HERE/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  date
  [ -e "$HERE/done" ] && echo "the study has ended: exit $(cat "$HERE/done")"
  tail -c 3000 "$HERE/log.txt"
  for f in "$HERE"/out/study-*.json; do
    [ -e "$f" ] && python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print('warm-up', d.get('warmup_s'), 's;',
      [(s['step'].strip(), s['exit'], s['seconds']) for s in d['steps']])" "$f"
  done
  for f in "$HERE"/out/evalrate-*/results.jsonl; do [ -e "$f" ] && echo "$f: $(( $(wc -l < "$f") - 1 )) episodes"; done
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  cp "$HERE/log.txt" "$OUT/"
  tar -C "$HERE" -czf "$OUT/results.tgz" --exclude=trace.jsonl out
}

case $mode in
  start)
    rm -rf "$HERE" && mkdir -p "$HERE/out"
    if [ -d .gpu-libero/b ]; then bash .gpu-libero/b/setup_b.sh .gpu-libero/gl || exit 3; fi
    # a copy: the next call re-sends the working tree under the running study
    tar --exclude=./.gpu-libero --exclude=./.git -cf - . | (mkdir -p "$HERE/repo" && tar -C "$HERE/repo" -xf -)
    steps=$*
    { echo 'cd "$(dirname "$0")/repo"'
      echo '[ -e /opt/libero-site/env.sh ] && . /opt/libero-site/env.sh'
      echo "OUT=$HERE/out bash scripts/gpu_bench.sh $steps"
      echo 'echo $? > ../done'
    } > "$HERE/job.sh"
    setsid nohup bash "$HERE/job.sh" > "$HERE/log.txt" 2>&1 < /dev/null &
    report ;;
  wait)
    report ;;
  collect)
    report
    tar -C "$HERE" -czf "$OUT/all.tgz" out ;;
  *)
    echo "gpu_detached.sh: start|wait|collect, not $mode" >&2; exit 2 ;;
esac
