#!/usr/bin/env bash
# What a GPU session runs, in calls of at most 10 minutes each (the device tool's limit), each writing under $OUT.
#
#   bash benchmarks/gpu_session.sh suite     # pytest -m cuda, all of it (about 3 min on an H100), and launch_paths.py
#   bash benchmarks/gpu_session.sh sweep     # sweep_models.py, b1-fp32 first, its children prewarmed 8 at a time
#                                            # (NOTE [Prewarmed compiler caches]); rerun with RESUME=<json> to go on
#   bash benchmarks/gpu_session.sh decode    # the 12-layer step's kernel table; bench_decode.py, the four configs of
#                                            # issue 19, with and without programmatic edges;
#                                            # ENABLE=keep_faster_regions (say) for opt-in passes
#   bash benchmarks/gpu_session.sh overhead  # host_overhead.py and bench_cudagraphs.py (reduce-overhead interleaved)
#
# fxopt is not installed on the GPU machine: everything runs from the repository root with PYTHONPATH set. The
# device's copy of .git is the session's starting commit, not HEAD: write the tree's commit into the run's README
# yourself (the environment block of every JSON says what `git describe` saw). At most 8 files come back from $OUT,
# two folders deep: the logs folders of the sweep and the decode runs are packed into one .tgz each.
set -u
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
S="$OUT/session.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  python3 -c "import cuda.bindings as b; print('cuda-bindings', b.__version__)" 2>&1 | tail -1; } 2>&1 | tee -a "$S"

pack() {  # pack a logs folder into one file
  [ -d "$1" ] && tar czf "$1.tgz" -C "$(dirname "$1")" "$(basename "$1")" && rm -rf "$1"
}

case "${1:-}" in
  suite)
    echo "== pytest -m cuda" | tee -a "$S"
    # the whole log: a failing hypothesis property prints its falsifying example at the top of its failure
    timeout 420 python3 -m pytest tests -m cuda -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1
    grep -E "^(FAILED|ERROR)|Falsifying| passed| failed" "$OUT/pytest.log" | tail -20 | tee -a "$S"
    echo "== launch_paths" | tee -a "$S"
    timeout 90 python3 benchmarks/launch_paths.py 2>&1 | tail -40 | tee -a "$S"
    ;;
  sweep)
    timeout 560 python3 benchmarks/sweep_models.py --configs "${CONFIGS:-b1-fp32,b1-fp16,b32-fp32}" \
      --budget-s 530 --model-timeout-s "${MODEL_TIMEOUT:-150}" ${RESUME:+--resume "$RESUME"} --prewarm-jobs 8 \
      --out "$OUT/sweep" > "$OUT/sweep.log" 2>&1
    tail -30 "$OUT/sweep/sweep_models.md" | tee -a "$S"
    pack "$OUT/sweep/sweep_models_logs"
    ;;
  decode)
    timeout 90 python3 benchmarks/kernel_table.py decode/plain/gpt2_small_size/bfloat16 --systems eager,compile,fxopt \
      --calls 10 > "$OUT/kt_decode12_bf16.txt" 2>&1
    tail -3 "$OUT/kt_decode12_bf16.txt" | tee -a "$S"
    timeout 460 python3 benchmarks/bench_decode.py --models "${MODELS:-plain,transformers}" \
      --presets small,gpt2_small_size --dtypes bfloat16,float32 --budget-s 360 --timeout-s 150 \
      --systems eager,compile,fxopt_graphs,fxopt_graphs_nopdl ${ENABLE:+--enable "$ENABLE"} \
      --out "$OUT/decode" > "$OUT/decode.log" 2>&1
    tail -20 "$OUT/decode.log" | tee -a "$S"
    pack "$OUT/decode/bench_decode_logs"
    ;;
  overhead)
    timeout 120 python3 benchmarks/host_overhead.py --device cuda > "$OUT/host_overhead.txt" 2>&1
    timeout 420 python3 benchmarks/bench_cudagraphs.py --iters 200 --rounds 7 --out "$OUT" 2>&1 | grep -v Warning \
      | tail -16 | tee -a "$S"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh suite|sweep|decode|overhead" >&2
    exit 2
    ;;
esac
echo "== done $(date -u)" | tee -a "$S"
