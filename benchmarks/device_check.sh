#!/usr/bin/env bash
# The GPU check, ready to run on a machine with an NVIDIA GPU (from the repository root or anywhere):
#
#   benchmarks/device_check.sh [OUT_DIR]        (default OUT_DIR: device_check_<UTC time>)
#
# 1. the GPU: if JAX does not see one but nvidia-smi does, installs the GPU extra
#    (pip install -e '.[cuda12]': JAX's CUDA 12 plugin of the pinned jax);
# 2. the fixture CLI assimilation, cold (empty compilation cache) and warm (benchmarks/first_run.py);
# 3. the released-config performance table (benchmarks/perf.py): unguided call, regression,
#    MMPS k = 1 and 3, vmap of 8 members vs 8 calls, bf16 vs float32, compiled peak memory
#    of the DPS step without and with --remat;
# 4. the released video config's unguided call (benchmarks/video_step.py);
# then OUT_DIR/device_check.json (every row; benchmarks/device_check_summary.py) and the log
# OUT_DIR/device_check.log. Exit status 0 when every row has its numbers.
#
# DEVICE_CHECK_SIZE=tiny runs the same steps at tiny sizes (the CPU path, every row, ~10 min on
# 2 cores); DEVICE_CHECK_SIZE=smoke also cuts the performance table to two rows (what
# tests/test_device_check.py runs in CI, so that no step can rot). DEVICE_CHECK_BUDGET_S (default 450) bounds the three benchmark steps together:
# each gets what is left, and a step cut short leaves its rows missing. PYTHON picks the
# interpreter (default .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
size=${DEVICE_CHECK_SIZE:-full}
budget=${DEVICE_CHECK_BUDGET_S:-450}
out=${1:-device_check_$(date -u +%Y%m%dT%H%M%SZ)}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
case "$size" in
  full) run_opts="--members 2 --steps 4 --cg-iters 1"
        perf_opts="--config released --repeats 3"
        video_opts="--config released --repeats 2" ;;
  tiny|smoke) run_opts="--members 2 --steps 2 --method replacement --interpolation nearest --prior-members 0"
        perf_opts="--config tiny --repeats 1 --n-obs 64"
        video_opts="--config tiny --repeats 1 --n-obs 64" ;;
  *) echo "DEVICE_CHECK_SIZE must be full, tiny or smoke, got $size" >&2; exit 2 ;;
esac
# smoke: every step at tiny sizes, the performance table cut to its unguided and MMPS k=1 rows
# (the CPU path CI runs in minutes; tiny computes every row, ~10 min on 2 cores)
perf_sections="--members 8 --sections forward,bf16,guided,memory,ensemble --guided regression,mmps1,mmps3"
rows_opt=""
if [ "$size" = smoke ]; then
  perf_sections="--sections forward,guided --guided mmps1"
  rows_opt="--rows cli_cold,cli_warm,unguided,mmps1,video_unguided"
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

main() {
t_start=$(date +%s)
echo "# jaxguide device check ($size) into $out, $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PY"

sees_gpu() { "$PY" -c "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)" 2>/dev/null; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  nvidia-smi -L
  if ! sees_gpu; then
    echo "## JAX sees no GPU: installing the GPU extra (pip install -e '.[cuda12]')"
    "$PY" -m pip install -e ".[cuda12]" || { echo "could not install the GPU extra"; return 1; }
    sees_gpu || { echo "JAX still sees no GPU after installing the extra"; return 1; }
  fi
else
  echo "## no NVIDIA GPU (nvidia-smi): the CPU path"
fi
"$PY" -c "import jax; print('jax', jax.__version__, 'devices', jax.devices())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME COMMAND...: run with the budget that is left
  local name=$1; shift
  local left=$(( budget - ($(date +%s) - t_start) ))
  if [ "$left" -le 10 ]; then echo "## $name: skipped, the budget of ${budget}s is spent"; return; fi
  echo "## $name (at most ${left}s): $*"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$left" "$@"
  echo "## $name: exit $?, $(( $(date +%s) - t0 ))s"
}
step "fixture CLI assimilation, cold and warm" "$PY" benchmarks/first_run.py --workdir "$out/first_run" \
  --runs first_run,second_run_warm_cache --options "$run_opts" --json "$out/first_run.json"
step "performance table" "$PY" benchmarks/perf.py $perf_opts $perf_sections --json "$out/perf.json"
step "video unguided call" "$PY" benchmarks/video_step.py $video_opts --sections time --methods unguided --remat "" \
  --json "$out/video.json"
"$PY" benchmarks/device_check_summary.py "$out" $rows_opt
local rc=$?
echo "# done in $(( $(date +%s) - t_start ))s: $out/device_check.json, $out/device_check.log"
return $rc
}

main 2>&1 | tee -a "$out/device_check.log"
exit "${PIPESTATUS[0]}"
