#!/usr/bin/env bash
# PyTorch cBottle vs jaxguide at the released coarse config, side by side, ROUNDS rounds:
# ../shared/perf's torch_side.py and jax_side.py (same random weights and inputs, B=1,
# float32, CPU), the jax side twice per round: with XLA's default compiler options and
# with jaxguide's (jaxguide.model.xla_options, through XLA_FLAGS since jax_side.py jits itself).
# Needs ../shared/perf/setup_cbottle_env.sh first (see ../shared/perf/README.md).
#   bash benchmarks/torch_pair.sh 2>&1 | tee benchmarks/released_vs_torch.log
set -uo pipefail
PERF=$(cd "$(dirname "$0")/../../shared/perf" && pwd); PROJ=$(cd "$(dirname "$0")/.." && pwd)
SRC=${SRC:-${TMPDIR:-/tmp}/cbottle-src}; VENV_CB=${VENV_CB:-${TMPDIR:-/tmp}/cbottle-venv}
W=${WORK:-${TMPDIR:-/tmp}/jaxguide-perf}; mkdir -p "$W"
CB_PATH=$SRC/cbottle/src:$SRC/earth2grid:$PERF/shim:$PERF
CK=${CHECKPOINT:-$W/released.checkpoint}
[ -f "$CK" ] || (cd "$PERF" && PYTHONPATH=$CB_PATH PYTHONWARNINGS=ignore "$VENV_CB/bin/python" make_released.py "$CK")
MD="$W/$(basename "$CK" .checkpoint)_model"
[ -d "$MD" ] || PYTHONPATH=$PROJ "$PROJ/.venv/bin/python" -m jaxguide.cli convert "$CK" --out "$MD" >/dev/null
echo "# $(date -Is) $(uptime)"; echo "# jaxguide $(git -C "$PROJ" rev-parse --short HEAD)"
for r in $(seq "${ROUNDS:-2}"); do
  (cd "$PERF" && PYTHONPATH=$CB_PATH PYTHONWARNINGS=ignore "$VENV_CB/bin/python" torch_side.py "$CK" 2 "${REPEAT:-3}")
  echo -n "xla_default "; PYTHONPATH=$PROJ "$PROJ/.venv/bin/python" "$PERF/jax_side.py" "$MD" "${REPEAT:-3}" 2>/dev/null
  echo -n "xla_jaxguide "; XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_experimental_ynn_fusion_type=" PYTHONPATH=$PROJ \
    "$PROJ/.venv/bin/python" "$PERF/jax_side.py" "$MD" "${REPEAT:-3}" 2>/dev/null
  echo "# $(uptime)"
done
