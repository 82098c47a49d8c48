#!/usr/bin/env bash
# One prepared GPU check of synthkd (a machine without network): install the carried wheels
# and the checkout without network, show the GPU and torch, then run benchmarks/gpu_check.py,
# which drives the CLI end to end on scikit-learn digits with bf16/fp16 autocast and times a
# plain-torch resnet20 micro-benchmark. Everything is time-limited and a failing step does not
# stop the ones after it; the whole thing ends within GPU_CHECK_TOTAL seconds (default 300).
#
#   bash benchmarks/gpu_check.sh            # GPU sizes (about 2-3 minutes on an H200)
#   bash benchmarks/gpu_check.sh --quick    # tiny sizes (a CPU smoke run)
#
# Extra arguments go to gpu_check.py. Writes into ${OUT:-/tmp}: gpu_check.json (every step),
# gpu_check_setup.jsonl (the install steps) and gpu_check_logs.tar.gz (every step's log).
# Wheels: .whl/*.whl (cp312, manylinux x86_64) of the dependencies that machine lacks; they go to
# ${GPU_CHECK_SITE:-/tmp/site} with the checkout, which is then first on PYTHONPATH.
# GPU_CHECK_NO_WHEELS=1 / GPU_CHECK_NO_INSTALL=1 skip installing the wheels / the checkout.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUTDIR=${OUT:-/tmp}
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_TOTAL:-300}
WORK=${GPU_CHECK_WORKDIR:-$(mktemp -d /tmp/synthkd-gpu-check.XXXXXX)}
SETUP="$OUTDIR/gpu_check_setup.jsonl"
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
mkdir -p "$OUTDIR" "$WORK" || exit 2
: > "$SETUP"
T0=$SECONDS

# step NAME TIMEOUT CMD...: run with a time limit, print and record rc and seconds; never exits.
LAST_RC=0
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout -k 5 "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "!!! $name: timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "!!! $name: exit code $rc"
    printf '{"name": "%s", "rc": %d, "seconds": %d, "note": "%s"}\n' "$name" "$rc" "$((SECONDS - start))" "${NOTE:-}" >> "$SETUP"
    NOTE=
    LAST_RC=$rc
    return 0
}
note() { printf '{"name": "%s", "rc": 0, "seconds": 0, "note": "%s"}\n' "$1" "$2" >> "$SETUP"; echo "=== $1: $2"; }

# 1. the carried wheels (cp312): diffusers, kornia, kornia_rs, zuko, importlib_metadata, lazy-importer
if [ -n "${GPU_CHECK_NO_WHEELS:-}" ]; then
    note "install wheels" "skipped (GPU_CHECK_NO_WHEELS)"
elif ! ls .whl/*.whl >/dev/null 2>&1; then
    note "install wheels" "skipped: no .whl/*.whl (carry .whl)"
elif ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    note "install wheels" "skipped: $("$PY" -V 2>&1), the wheels are for 3.12"
else
    step "install wheels" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    [ $LAST_RC -eq 0 ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. the checkout itself, without network, built from a copy so the checkout stays clean
#    (setuptools' package-dir mapping puts generators/ and pipelines/ under synthkd/)
if [ -n "${GPU_CHECK_NO_INSTALL:-}" ]; then
    note "install synthkd" "skipped (GPU_CHECK_NO_INSTALL)"
else
    SRC="$WORK/src"
    mkdir -p "$SRC" "$SITE"
    tar -C "$REPO" --exclude=./.git --exclude=./.whl --exclude=./runs --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -
    NOTE="pip install --no-index --no-deps --no-build-isolation --target $SITE"
    step "install synthkd" 90 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "$SRC"
    if [ $LAST_RC -ne 0 ]; then
        # fallback: lay the package out by hand as pyproject.toml's package-dir does
        FB="$WORK/fallback-site"
        mkdir -p "$FB" && cp -r "$SRC/synthkd" "$FB/synthkd"
        for sub in generators pipelines; do [ -d "$SRC/$sub" ] && cp -r "$SRC/$sub" "$FB/synthkd/$sub"; done
        export PYTHONPATH="$FB${PYTHONPATH:+:$PYTHONPATH}"
        note "install synthkd" "pip failed; fallback: copied synthkd/, generators/, pipelines/ to $FB"
    fi
    case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ;; esac
fi
(cd "$WORK" && step "import synthkd" 60 "$PY" -c \
    'import synthkd, synthkd.cli, synthkd.generators, synthkd.pipelines; print("synthkd", synthkd.__file__)')

# 3. the machine
step "nvidia-smi" 20 nvidia-smi
[ $LAST_RC -ne 0 ] && echo "(no nvidia-smi: the check runs on CPU)"
step "torch" 60 "$PY" -c '
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          "| bf16", torch.cuda.is_bf16_supported())'

# 4. the check itself, within what is left of TOTAL
LEFT=$((TOTAL - (SECONDS - T0) - 20))
[ $LEFT -lt 60 ] && LEFT=60
echo "=== gpu_check.py (deadline ${LEFT}s; ${SECONDS}s spent on setup)"
(cd "$WORK" && timeout -k 10 $((LEFT + 10)) "$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUTDIR/gpu_check.json" \
    --workdir "$WORK/run" --deadline "$LEFT" --setup "$SETUP" "$@")
RC=$?
[ $RC -eq 124 ] && echo "!!! gpu_check.py killed after $((LEFT + 10))s"
timeout 20 tar -C "$WORK/run" -czf "$OUTDIR/gpu_check_logs.tar.gz" logs 2>/dev/null
echo "=== done in $((SECONDS - T0))s, gpu_check.py exit code $RC; files in $OUTDIR: gpu_check.json gpu_check_setup.jsonl gpu_check_logs.tar.gz"
exit $RC
