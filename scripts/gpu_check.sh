#!/bin/bash
# make gpu-check: the GPU checks on a machine with one H100/H200, in under 8 minutes.
#   1. installs what the GPU machine's Python lacks from wheels in .whl/ (ignored by git; see below)
#   2. pytest -m gpu tests/test_gpu.py   greedy parity vs transformers (fp32, bf16), one bf16 training
#                                         step, NCCL collectives on one rank, KV budget after a step
#   3. bench/sft.py --shape 1b --dtype bf16 --megagsm-only          (MFU)
#   4. bench/generate.py --dtype bf16 --batch 32 256                 (decode vs the HBM roofline)
#   5. bench/gspo_step.py --shape qwen2.5-0.5b --dtype bf16         (one GSPO step)
# prints one JSON line per step and appends them to bench/RESULTS.md with the date and the device.
# Without an NVIDIA GPU it prints one line and exits 0 having run nothing.
#
# Wheels: the GPU machine (Python 3.12, CUDA torch) lacks megatron-core and omegaconf. From the repo
# root, on any machine with the package registry:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl megatron-core==0.16.1 omegaconf==2.4.0
# (2.9 MB together; megatron-core needs torch, numpy, packaging and omegaconf PyYAML, all present there.)
#
# Environment: GPU_PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: the whole run's limit),
# GPU_CHECK_SITE (where wheels are installed, default /tmp/megagsm-gpu-site), GPU_CHECK_STEPS (a
# subset of: gpu_tests sft_mfu decode_roofline gspo_step).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [[ -z $gpu_name ]]; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi lists none); nothing was run"
  exit 0
fi

PY=${GPU_PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/megagsm-gpu-site}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
STEPS=" ${GPU_CHECK_STEPS:-gpu_tests sft_mfu decode_roofline gspo_step} "
START=$(date +%s)
LOGS=$(mktemp -d /tmp/megagsm-gpu-check.XXXXXX)
NEEDED="megatron.core omegaconf transformers safetensors tokenizers yaml tqdm einops pytest psutil"

missing_modules() {
  "$PY" -c '
import importlib.util, sys
for name in sys.argv[1:]:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        print(name)' $NEEDED
}

missing=$(missing_modules)
if [[ -n $missing ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu-check: installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  missing=$(missing_modules)
fi
if [[ -n $missing ]]; then
  echo "gpu-check: missing Python modules: $(echo $missing | tr '\n' ' ')- bring wheels in .whl/ (see scripts/gpu_check.sh)"
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

results=()
failed=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run NAME CAP CMD...: at most CAP seconds (and never past the budget); keeps the last JSON line
run_step() {
  local name=$1 cap=$2 limit json
  shift 2
  [[ $STEPS == *" $name "* ]] || return 0
  limit=$(left)
  (( limit > cap )) && limit=$cap
  if (( limit < 20 )); then
    json="{\"check\": \"$name\", \"error\": \"skipped: the ${BUDGET}s budget is spent\"}"
    failed=1
  else
    timeout "$limit" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
    local rc=$?
    json=$(grep '^{' "$LOGS/$name.out" | tail -n 1)
    if [[ $rc -ne 0 || -z $json ]]; then
      local why="exit status $rc"; (( rc == 124 )) && why="timed out after ${limit}s"
      local tail_line
      tail_line=$(tail -n 1 "$LOGS/$name.err" | tr -d '"\\\t' | cut -c1-200)
      json="{\"check\": \"$name\", \"error\": \"$why\", \"stderr\": \"$tail_line\"${json:+, \"last\": $json}}"
      failed=1
    fi
  fi
  echo "$json"
  results+=("$json")
}

gpu_tests() {
  "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$LOGS/gpu.xml" >&2
  local rc=$?
  "$PY" - "$LOGS/gpu.xml" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
print(json.dumps({"check": "gpu_tests", **n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                  "failed_tests": failed, "seconds": float(suite.get("time", 0))}))
EOF
  return $rc
}

export -f gpu_tests
export PY LOGS
run_step gpu_tests 150 bash -c gpu_tests
run_step sft_mfu 120 "$PY" bench/sft.py --shape 1b --dtype bf16 --megagsm-only --batch 4 --seq 2048 --repeats 3 --no-memory
run_step decode_roofline 90 "$PY" bench/generate.py --dtype bf16 --batch 32 256 --repeats 2
run_step gspo_step 90 "$PY" bench/gspo_step.py --shape qwen2.5-0.5b --dtype bf16 --steps 1

torch_version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
{
  echo
  echo "## make gpu-check: ${gpu_name}, torch ${torch_version}, $(date -u +%Y-%m-%d) ($(( $(date +%s) - START )) s)"
  echo
  echo '```'
  printf '%s\n' "${results[@]}"
  echo '```'
} >> bench/RESULTS.md
echo "gpu-check: $(( $(date +%s) - START )) s; results appended to bench/RESULTS.md; logs in $LOGS"
exit $failed
