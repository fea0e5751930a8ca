#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (H100/H200, Ubuntu 24.04, Python 3.12, 16 cores,
# no network): builds lotus_rt's StarPU binding from gpu_bundle/, checks that StarPU has CUDA
# workers, runs the GPU tests and the heterogeneous benchmark, and leaves its results in $OUT.
#
#   OUT=$OUT bash benchmarks/gpu_run.sh         # from the repository root, gpu_bundle/ carried along
#   GPU_RUN_DRY=1 bash benchmarks/gpu_run.sh    # the flow only, on a CPU machine (see below)
#
# Steps, each with its own timeout, logged with timestamps to $OUT/gpu_run.log, its status in
# $OUT/summary.txt; a failed step never stops the script (exit status 1 if any failed or timed out):
#   facts    date, host, CPUs, memory, Python and package versions, nvidia-smi
#   bundle   check gpu_bundle/ (saying what is missing), source gpu_bundle/env.sh
#   build    install the checkout into $GPU_RUN_WORK/site with setup.py (its package_dir mapping makes
#            kernels/ lotus_rt.kernels; the binding is compiled there for this Python), StarPU version;
#            every later step imports that copy (PYTHONPATH=site:checkout, PYTHONSAFEPATH=1)
#   info     python3 -m lotus_rt.cli info; "cuda" fails, loudly, where it lists no CUDA worker
#   tests    python3 -m pytest -q -m gpu -rs tests/test_gpu.py (if present), junit XML
#   hetero   python3 -m benchmarks hetero --budget-s $HETERO_BUDGET_S (starts nothing after that)
#   model    python3 -m benchmarks model --device cuda --no-compile: the demo CNN and a ResNet-8, dense
#            and tensorized, offloaded whole onto the CPU + CUDA workers vs torch eager on the card
#   collect  results to $OUT, everything else (per-step logs, StarPU perf models and bus
#            calibration, Chrome traces, Gantt charts) in $OUT/artifacts.tar.gz
# The device tool brings back only a few files, so $OUT gets at most 9: gpu_run.log, summary.txt,
# hetero.json, hetero.png, hetero_gantt.png, test_gpu.xml, model.json, mps.json, artifacts.tar.gz. Scratch
# goes to $GPU_RUN_WORK (default /tmp/lotus_gpu_run).
#
# Time: the timeouts add up to 9.75 minutes (15+40+40+30+150+150+90+60+10 s); expected about 6 minutes
# (hetero about 2.5 of them: see benchmarks/README.md for the estimate). Needs no network.
#
# Dry run (GPU_RUN_DRY=1, or no nvidia-smi on PATH): checks the bundle without sourcing it, installs
# the checkout against the machine's own StarPU, runs info and the tests, and `hetero --quick`.
# It checks the script's flow, not the GPU parts.
#
# Environment: OUT (default ./gpu_out), GPU_BUNDLE (default gpu_bundle), PYTHON (python3),
# GPU_RUN_DRY, GPU_RUN_WORK, HETERO_ARGS (more benchmark options, e.g. "--policies dmda,eager"),
# HETERO_BUDGET_S (default 120), T_FACTS T_BUNDLE T_BUILD T_INFO T_TESTS T_HETERO T_MODEL T_MPS T_COLLECT
# (seconds per step).
#
# Status: checked with bash -n, shellcheck and a dry run on a CPU machine (2026-11-27); it has
# NOT yet run on a GPU machine.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUT=${OUT:-./gpu_out}
if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then
  echo "gpu_run: cannot create OUT=$OUT" >&2
  exit 2
fi
WORK=${GPU_RUN_WORK:-/tmp/lotus_gpu_run}
GPU_BUNDLE=${GPU_BUNDLE:-gpu_bundle}
PY=${PYTHON:-python3}
HETERO_BUDGET_S=${HETERO_BUDGET_S:-120}
HETERO_ARGS=${HETERO_ARGS:-}
T_FACTS=${T_FACTS:-15} T_BUNDLE=${T_BUNDLE:-40} T_BUILD=${T_BUILD:-40} T_INFO=${T_INFO:-30}
T_TESTS=${T_TESTS:-150} T_HETERO=${T_HETERO:-150} T_MODEL=${T_MODEL:-90} T_MPS=${T_MPS:-60}
T_COLLECT=${T_COLLECT:-10}
LOG=$OUT/gpu_run.log
SUMMARY=$OUT/summary.txt

# the work folder is emptied first: only one this script made (it holds the marker file)
if [ -e "$WORK" ] && [ ! -f "$WORK/.lotus_gpu_run" ]; then
  echo "gpu_run: GPU_RUN_WORK=$WORK exists and was not made by this script; choose another" >&2
  exit 2
fi
rm -rf "$WORK"
if ! mkdir -p "$WORK/logs" || ! touch "$WORK/.lotus_gpu_run"; then
  echo "gpu_run: cannot create GPU_RUN_WORK=$WORK" >&2
  exit 2
fi
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export STARPU_HOME=$WORK/starpu_home   # info and the tests: models and bus calibration kept here
export OUT WORK GPU_BUNDLE PY REPO SUMMARY
mkdir -p "$STARPU_HOME"
START=$SECONDS

log() { printf '%s [%4ss] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - START))" "$*" | tee -a "$LOG"; }

record() {  # record STEP STATUS RC SECONDS NOTE
  printf '%-8s %-9s rc=%-4s %4ss  %s\n' "$1" "$2" "$3" "$4" "$5" >>"$SUMMARY"
}

run_step() {  # run_step NAME TIMEOUT_S COMMAND...: output to the log (and stdout), status recorded
  local name=$1 limit=$2 rc status begin=$SECONDS
  shift 2
  log "== $name: start (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$WORK/logs/$name.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status=FAILED ;;
  esac
  log "== $name: $status (exit $rc) after $((SECONDS - begin)) s"
  record "$name" "$status" "$rc" "$((SECONDS - begin))" "${NOTE:-}"
  return "$rc"
}

skip_step() {  # skip_step NAME REASON
  log "== $1: skipped: $2"
  record "$1" skipped - 0 "$2"
}

DRY=${GPU_RUN_DRY:-0}
DRY_REASON="GPU_RUN_DRY=$DRY"
if [ "$DRY" != 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  DRY=1
  DRY_REASON="no nvidia-smi on PATH"
fi
export DRY
if [ "$DRY" = 1 ]; then
  log "DRY RUN ($DRY_REASON): no binding build, hetero --quick; the GPU parts are not exercised"
else
  log "GPU run: OUT=$OUT, work folder $WORK"
fi

# ------------------------------------------------------------------------------ steps

facts() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  kernel: $(uname -r)  cores: $(nproc)"
  free -g | head -n 2
  df -h . | tail -n 1
  if command -v git >/dev/null 2>&1 && git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD) ($(git status --short | wc -l) changed paths)"
  else
    echo "commit: unknown (no git checkout here)"
  fi
  "$PY" - <<'EOF'
import importlib, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
for name in ("numpy", "torch", "cupy", "opt_einsum", "cffi", "threadpoolctl", "matplotlib", "pytest"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name}: not importable ({type(exc).__name__}: {exc})")
EOF
  [ -f "$GPU_BUNDLE/BUILD-INFO.txt" ] && sed 's/^/bundle: /' "$GPU_BUNDLE/BUILD-INFO.txt"
  if [ "$DRY" = 1 ]; then
    echo "nvidia-smi: not run (dry run)"
    return 0
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,mig.mode.current,clocks.max.sm \
    --format=csv || echo "nvidia-smi --query-gpu failed"
  nvidia-smi
}

check_bundle() {  # what the bundle must hold; prints each missing piece
  local missing=()
  if [ ! -d "$GPU_BUNDLE" ]; then
    echo "gpu_bundle is missing: no folder $GPU_BUNDLE (run scripts/build-starpu-cuda.sh, then"
    echo "scripts/gpu-bundle.sh on the CPU machine, and carry gpu_bundle)"
    return 1
  fi
  [ -f "$GPU_BUNDLE/env.sh" ] || missing+=("$GPU_BUNDLE/env.sh")
  compgen -G "$GPU_BUNDLE/starpu/lib/libstarpu-*.so*" >/dev/null || missing+=("$GPU_BUNDLE/starpu/lib/libstarpu-*.so")
  compgen -G "$GPU_BUNDLE/starpu/lib/pkgconfig/starpu-*.pc" >/dev/null || missing+=("$GPU_BUNDLE/starpu/lib/pkgconfig/starpu-*.pc")
  [ -d "$GPU_BUNDLE/starpu/include" ] || missing+=("$GPU_BUNDLE/starpu/include")
  compgen -G "$GPU_BUNDLE/wheels/cffi-*.whl" >/dev/null || missing+=("$GPU_BUNDLE/wheels/cffi-*.whl")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_bundle is missing or incomplete; missing: ${missing[*]}"
    echo "make it on the CPU machine (scripts/build-starpu-cuda.sh, then scripts/gpu-bundle.sh) and carry gpu_bundle"
    return 1
  fi
  echo "bundle: complete ($(du -sh "$GPU_BUNDLE" | cut -f1))"
}

install_bundle() {  # the slow part of env.sh (installing the wheels once), bounded by a timeout
  check_bundle || return 1
  # shellcheck disable=SC1091
  source "$GPU_BUNDLE/env.sh"
}

build_binding() {  # a real install (no pip needed): setup.py build puts the packages and the binding in site/
  rm -rf "$WORK/site" "$WORK/build"
  "$PY" setup.py -q build --build-base "$WORK/build" --build-lib "$WORK/site" || return 1
  PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 "$PY" -c '
import lotus_rt, lotus_rt.kernels
from lotus_rt import starpu
print(f"installed: {lotus_rt.__file__}, kernels at {lotus_rt.kernels.__file__}")
print(f"binding: StarPU {starpu.version()}, CUDA support compiled in: {starpu.built_with_cuda()}")'
}

run_tests() {
  "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/test_gpu.xml"
}

collect() {
  local f
  for f in "$WORK"/hetero/hetero*.json "$WORK"/hetero/hetero*.png "$WORK"/model/model*.json "$WORK"/mps/mps*.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  cp "$SUMMARY" "$WORK/summary.txt"
  # perf models, bus calibration, traces, step logs; the results themselves are in $OUT already
  tar -czf "$OUT/artifacts.tar.gz" -C "$WORK" . || return 1
  if [ "$(stat -c %s "$OUT/artifacts.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    echo "artifacts over 15 MiB: leaving the traces out"
    tar -czf "$OUT/artifacts.tar.gz" -C "$WORK" --exclude='./hetero/*_traces' . || return 1
  fi
  ls -l "$OUT"
}
export -f facts check_bundle install_bundle build_binding run_tests collect

run_step facts "$T_FACTS" bash -c facts

if [ "$DRY" = 1 ]; then
  NOTE="dry run: checked, not sourced" run_step bundle "$T_BUNDLE" bash -c check_bundle
else
  if NOTE="wheels installed, env.sh sourced" run_step bundle "$T_BUNDLE" bash -c install_bundle; then
    # shellcheck disable=SC1091
    source "$GPU_BUNDLE/env.sh" >>"$LOG" 2>&1   # fast now: sets the variables in this shell
  fi
fi
run_step build "$T_BUILD" bash -c build_binding
# from here on every step imports the installed copy, never the checkout's lotus_rt (no kernels)
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1

run_step info "$T_INFO" "$PY" -m lotus_rt.cli info
NCUDA=$(grep -c '(cuda)$' "$WORK/logs/info.log" 2>/dev/null)
if [ "$DRY" = 1 ]; then
  skip_step cuda "dry run (${NCUDA:-0} CUDA workers listed)"
elif [ "${NCUDA:-0}" -gt 0 ]; then
  log "cuda: lotus-rt info lists $NCUDA CUDA worker(s)"
  record cuda ok - 0 "$NCUDA CUDA worker(s) in lotus-rt info"
else
  log "!!!!!!!!!! NO CUDA WORKER: lotus-rt info lists none: the gpu and hybrid mixes and the GPU tests cannot run"
  log "!!!!!!!!!! (see the bundle/build/info steps above); continuing with what can run"
  record cuda FAILED - 0 "NO CUDA WORKER in lotus-rt info"
fi

if [ -f tests/test_gpu.py ]; then
  run_step tests "$T_TESTS" bash -c run_tests
else
  skip_step tests "tests/test_gpu.py not present"
fi

if [ "$DRY" = 1 ]; then
  # shellcheck disable=SC2086
  NOTE="--quick (dry run)" run_step hetero "$T_HETERO" "$PY" -m benchmarks hetero --quick --out "$WORK/hetero" \
    --budget-s "$HETERO_BUDGET_S" $HETERO_ARGS
else
  # shellcheck disable=SC2086
  run_step hetero "$T_HETERO" "$PY" -m benchmarks hetero --out "$WORK/hetero" --budget-s "$HETERO_BUDGET_S" $HETERO_ARGS
fi

if [ "$DRY" = 1 ]; then
  NOTE="--quick (dry run, CPU)" run_step model "$T_MODEL" "$PY" -m benchmarks model --quick --out "$WORK/model"
else
  run_step model "$T_MODEL" "$PY" -m benchmarks model --device cuda --no-compile --repeats 5 --out "$WORK/model"
fi

# one DMRG sweep per variant (serial, real-space parallel, batch parallel) at bond dimension 20, on
# a runtime with the CUDA worker: the MPS codelets have CuPy bodies, StarPU places them
if [ "$DRY" = 1 ]; then
  NOTE="--quick (dry run, CPU)" run_step mps "$T_MPS" "$PY" -m benchmarks mps --quick --sections timing --out "$WORK/mps"
else
  run_step mps "$T_MPS" "$PY" -m benchmarks mps --sections timing --sweep-dim 20 --time-sweeps 1 --repeats 1 \
    --out "$WORK/mps"
fi

run_step collect "$T_COLLECT" bash -c collect

log "== summary ($((SECONDS - START)) s in all)"
tee -a "$LOG" <"$SUMMARY"
if grep -qE '^[a-z]+ +(FAILED|TIMEOUT)' "$SUMMARY"; then
  log "gpu_run: some steps FAILED or timed out (see above)"
  exit 1
fi
log "gpu_run: every step ok or skipped"
