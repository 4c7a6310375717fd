#!/usr/bin/env bash
# pipegrid's GPU check: one command for a single-GPU machine with torch and CuPy installed
# and no network. It runs tests/gpu, the kernel benchmark (and what kernels.backend=auto
# picks), the engine at pipe=1 (fp32 and bf16, ZeRO-1 on and off, against a plain-torch CPU
# reference, and its per-step host overhead against a plain loop), transformers GPT-2 124M
# and a Llama-shaped 1.1B side by side (plain bf16 loop eager and compiled, pipegrid eager,
# compiled, compiled+fp8: tokens/s, MFU, peak memory, the fp8 loss gap; issue 27's table)
# and the GPT example (model=gpt_small precision=bf16) for tokens/s and MFU; then what a new
# user on a one-GPU host meets first: the README's first command as written (pipe=2 on one
# GPU: the CPU fallback over gloo) and the unit tests; then writes one table to
# $OUT/gpu_check.md (and .json) and prints it.
#
# Time budget on an H200, estimated before any run (limits in brackets; steps.tsv records the
# real seconds; the models step starts no new work after 240 s):
# environment 10 s [60], gpu_tests 30 [150], kernels 55 [120] (bandwidth, then host time per
# call of 1000 small tensors: benchmarks/kernel_host_cost.py), engine 20 [90],
# models ~240 [300], gpt 30 [90], readme 30 [90], unit_tests 60 [120]: ~7.5 minutes.
# GPU_CHECK_SET="key=value ..." passes pipegrid config overrides to the models step
# (e.g. a fused-loss key), which skips a system whose key this pipegrid does not know.
# GPU_CHECK_OFFLOAD=1 adds gpu_offload [240 s]: the largest Llama (8B class first) that trains
# on the one GPU with zero.offload_optimizer=cpu; past the 8 minutes, so only when time allows.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh        # on the GPU machine: ~7 minutes, at most 8
#   OUT=/tmp/cpu bash benchmarks/gpu_check.sh --cpu  # every step, tiny, on the CPU (its test does this)
#   bash benchmarks/gpu_check.sh --download          # here, with a network: fill .whl/ for the GPU machine
#
# What pipegrid needs beyond torch, CuPy and NumPy (hydra-core, omegaconf, antlr4) travels
# as wheels in .whl/ (git-ignored): carry that folder; the script installs from it, offline.
# Every step has a time limit, a failed step does not stop the others, and the exit status
# is non-zero when any step failed. Set PIPEGRID_COMMIT to name the commit in the table.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --download) MODE=download ;;
  "") ;;
  *) echo "usage: OUT=dir bash benchmarks/gpu_check.sh [--cpu | --download]" >&2; exit 2 ;;
esac

version_of() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }

if [ "$MODE" = download ]; then
  rm -rf .whl && mkdir -p .whl
  "$PY" -m pip download --quiet --no-deps -d .whl "hydra-core==$(version_of hydra-core)" \
      "omegaconf==$(version_of omegaconf)" || exit 1
  # torchao for precision.fp8 (the models step's fp8 system; skipped without it)
  "$PY" -m pip download --quiet --no-deps -d .whl "torchao==${TORCHAO_VERSION:-$(version_of torchao)}" \
      || echo "gpu_check: no torchao wheel: the fp8 system will be skipped" >&2
  # antlr4-python3-runtime 4.9.3 (what omegaconf pins) ships as source only: build its wheel here
  "$PY" -m pip wheel --quiet --no-deps -w .whl "antlr4-python3-runtime==4.9.3" || exit 1
  ls .whl
  exit 0
fi

OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
rm -f "$OUT/steps.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import hydra, omegaconf, torchao" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  NEED_WHEELS=1
elif ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  NEED_WHEELS=1
fi
if [ -n "${NEED_WHEELS:-}" ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: hydra-core is missing and .whl/ holds no wheels; run 'bash benchmarks/gpu_check.sh --download'" \
         "where there is a network and carry .whl" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pipegrid-site \
      .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/pipegrid-site"
fi

# step NAME SECONDS COMMAND...: run it under a limit, log to $OUT/NAME.log, record the outcome
step() {
  local name=$1 limit=$2 start rc status
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout
  elif { [ $rc -eq 0 ] || [ $rc -eq 5 ]; } && grep -qE "[0-9]+ skipped" "$OUT/$name.log" \
       && ! grep -qE "[0-9]+ passed" "$OUT/$name.log"; then status=skip  # pytest: nothing could run here
  elif [ $rc -ne 0 ]; then status=fail
  else status=pass
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$name.log" >>"$OUT/steps.tsv"
  echo "gpu_check: $name: $status ($(( $(date +%s) - start )) s)"
}

MODELS_SET=()
for pair in ${GPU_CHECK_SET:-}; do MODELS_SET+=(--set "$pair"); done
if [ "$MODE" = gpu ]; then
  DEVICE=cuda; QUICK=(); KERNEL_ARGS=(--device cuda --repeats 10); GPT_STEPS=60
  MODELS_ARGS=(--budget-s 240)
  GPT_ARGS=(model=gpt_small precision=bf16 "train.steps=$GPT_STEPS" eval.interval=0 sample.length=0)
  README_ARGS=(train.steps=30); UNIT_TESTS=(tests/unit)
  # pytest-xdist spreads the unit tests over the GPU host's cores when it is there
  "$PY" -c "import xdist" 2>/dev/null && UNIT_TESTS+=(-n auto)
else
  DEVICE=cpu; QUICK=(--quick); KERNEL_ARGS=(--device cpu --quick --repeats 1); MODELS_ARGS=(--cpu --budget-s 150)
  GPT_ARGS=(model=gpt_tiny precision=fp32 train.steps=3 eval.interval=0 eval.batches=1 sample.length=0
            data.micro_batch_size=4)
  README_ARGS=(train.steps=3 eval.interval=0 eval.batches=1 sample.length=0)
  UNIT_TESTS=(tests/unit/test_grid.py)  # the step's plumbing; CI runs the whole unit tier itself
fi

step environment 60 "$PY" - "$OUT/env.json" <<'EOF'
import json, os, subprocess, sys
import torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": os.environ.get("PIPEGRID_COMMIT", "?"),
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"}
if torch.cuda.is_available():
    env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
try:
    import cupy
    env["cupy"] = cupy.__version__
except Exception as error:  # absent or broken: the kernels fall back to torch, say why
    env["cupy"] = f"none ({type(error).__name__})"
try:
    import torchao
    env["torchao"] = torchao.__version__
except Exception as error:  # absent: precision.fp8 is refused, and the fp8 system skipped
    env["torchao"] = f"none ({type(error).__name__})"
from pipegrid.kernels.backend import cupy_unavailable_reason, select_backend
env["kernels_backend"] = select_backend("auto", "cuda" if torch.cuda.is_available() else "cpu")
env["cupy_reason"] = cupy_unavailable_reason()
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
EOF
step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu
step kernels 120 "$PY" benchmarks/kernel_bandwidth.py "${KERNEL_ARGS[@]}" --out "$OUT/kernels_$DEVICE.json"
step engine 90 "$PY" benchmarks/gpu_engine.py --device "$DEVICE" "${QUICK[@]}" --out "$OUT/engine_$DEVICE.json"
step models 300 "$PY" benchmarks/gpu_models.py "${MODELS_ARGS[@]}" "${MODELS_SET[@]}" --out "$OUT/models_$DEVICE.json"
step gpt 90 "$PY" examples/train_gpt.py topology=single "${GPT_ARGS[@]}" "hydra.run.dir=$OUT/gpt"
# the README's first command, as written but for its length (pipe=2: on one GPU, the CPU fallback)
step readme 90 "$PY" examples/train_gpt.py "${README_ARGS[@]}" "hydra.run.dir=$OUT/readme"
step unit_tests 120 "$PY" -m pytest -q -p no:cacheprovider "${UNIT_TESTS[@]}"
# issue 25's largest Llama that trains on one GPU with optimizer offload: optional (about 4 minutes),
# run with GPU_CHECK_OFFLOAD=1 when the device time allows it
if [ "${GPU_CHECK_OFFLOAD:-0}" = 1 ]; then
  OFFLOAD_ARGS=(); [ "$MODE" = cpu ] && OFFLOAD_ARGS=(--cpu)
  step gpu_offload 240 "$PY" benchmarks/gpu_offload.py "${OFFLOAD_ARGS[@]}" --out "$OUT/gpu_offload_$DEVICE.json"
fi

GPU_CHECK_GPT="${GPT_ARGS[*]}" "$PY" benchmarks/gpu_report.py "$OUT"
