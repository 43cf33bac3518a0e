#!/usr/bin/env bash
# session 13: same as s12_call.sh
# session 12: SPLITAB=1: split_ab.py on SPLITAB_MODELS; session 11: PREP=1: pytest ${PYT_ARGS:-tests} -m cuda beside the prewarm of PW ("cfg=models ...") and kernel tables KT
# ("model:dtype ..."; KTENV: environment for them); PROBE=1: row_probe.py time PROBE_CASES; then timed sweeps of SW
# ("cfg=models[@VAR=VAL] ...") in order while TOTAL s are left
set -u
mkdir -p "$OUT"; S="$OUT/session.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; echo "tree: $(cat scratch/HEAD.txt)"; } 2>&1 | tee -a "$S"
if [ "${PREP:-0}" = 1 ]; then
  if [ -n "${PYT_ARGS:-x}" ]; then
  ( timeout ${PYT:-300} python3 -m pytest ${PYT_ARGS:-tests} -m cuda -v --tb=short -p no:cacheprovider > "$OUT/pytest.log" 2>&1 ) &
  fi
  for spec in ${PW:-}; do cfg=${spec%%=*}; models=${spec#*=}
    ( timeout ${PWT:-200} python3 benchmarks/sweep_models.py --configs $cfg --models $models --model-timeout-s 170 \
        --prewarm-jobs ${PWJ:-3} --prewarm-budget-s $(( ${PWT:-200} - 40 )) --prewarm-only --out /tmp/pw_$cfg > /tmp/pw_$cfg.log 2>&1 ) &
  done
  ( for spec in ${KT:-}; do m=${spec%%:*}; dt=${spec#*:}
      env ${KTENV:-} timeout ${KTT:-70} python3 benchmarks/kernel_table.py $m --dtype $dt --systems eager,compile,fxopt --calls 5 --by-op \
        > "$OUT/kt_$(echo $m | tr '/' '_')_$dt${KTTAG:-}.txt" 2>&1; done ) &
  wait
  echo "== pytest -m cuda, prewarm ($(el) s)" | tee -a "$S"
  [ -f "$OUT/pytest.log" ] && grep -E " FAILED| ERROR|^(FAILED|ERROR)|Falsifying| passed| failed" "$OUT/pytest.log" | tail -25 | tee -a "$S"
  grep -h prewarm /tmp/pw_*.log | tail -6 | tee -a "$S"
fi
if [ "${CONVP:-0}" = 1 ]; then
  timeout ${CONVP_S:-90} python3 scratch/conv_probe.py > "$OUT/conv_probe.txt" 2>&1; echo "== conv probe ($(el) s)" | tee -a "$S"
  grep -v Warning "$OUT/conv_probe.txt" | tail -16 | cut -c1-300 | tee -a "$S"
fi
if [ "${SPLITAB:-0}" = 1 ]; then
  timeout ${SPLITAB_S:-200} python3 scratch/split_ab13.py ${SPLITAB_ARGS:---enable=gemm_weight_layouts,split_k_linears} ${SPLITAB_MODELS} > "$OUT/split_ab.txt" 2>&1
  echo "== split_ab ($(el) s)" | tee -a "$S"; grep -v Warning "$OUT/split_ab.txt" | tail -40 | cut -c1-300 | tee -a "$S"
fi
if [ "${ATTN:-0}" = 1 ]; then
  timeout ${ATTN_S:-90} python3 scratch/attn_probe.py ${ATTN_CASES:-} > "$OUT/attn_probe.txt" 2>&1; echo "== attn probe ($(el) s)" | tee -a "$S"
  grep -v Warning "$OUT/attn_probe.txt" | tail -20 | cut -c1-300 | tee -a "$S"
fi
if [ "${GEMM:-0}" = 1 ]; then
  timeout ${GEMM_S:-90} python3 scratch/gemm_probe.py ${GEMM_CASES:-} > "$OUT/gemm_probe.txt" 2>&1; echo "== gemm probe ($(el) s)" | tee -a "$S"
  grep -v Warning "$OUT/gemm_probe.txt" | cut -c1-900 | tee -a "$S"
fi
if [ "${PROBE:-0}" = 1 ]; then
  timeout ${PROBE_S:-120} python3 scratch/row_probe.py time ${PROBE_CASES:-} > "$OUT/probe.txt" 2>&1; echo "== probe ($(el) s)" | tee -a "$S"
fi
for spec in ${SW:-}; do
  envs=""; case "$spec" in *@*) envs=${spec#*@}; spec=${spec%%@*};; esac
  cfg=${spec%%=*}; models=${spec#*=}; tag=$cfg${envs:+_$(echo $envs | tr '=' '-')}
  LEFT=$(( ${TOTAL:-585} - $(el) ))
  [ $LEFT -gt 60 ] || break
  echo "== sweep $cfg $envs ($LEFT s)" | tee -a "$S"
  env $envs timeout $LEFT python3 benchmarks/sweep_models.py --configs $cfg --models $models --budget-s $(( LEFT - 50 )) \
    --model-timeout-s ${MT:-48} --out /tmp/s_$tag > /tmp/s_$tag.log 2>&1
  cp /tmp/s_$tag/sweep_models.json "$OUT/sweep_$tag.json"
  grep "^| " /tmp/s_$tag/sweep_models.md | cut -c1-420 | tee -a "$S"
  grep -v "^|" /tmp/s_$tag.log | tail -3 >> "$S"
done
echo "== done $(date -u) ($(el) s)" | tee -a "$S"
