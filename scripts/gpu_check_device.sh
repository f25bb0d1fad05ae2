#!/usr/bin/env bash
# Validate one GPU with `tessera bench gpu-check` on a fresh machine that has Python 3.12 and its own
# CUDA PyTorch but not all of Tessera's dependencies (docs/training.md, "Validating a GPU").
#
#   scripts/gpu_check_device.sh OUT_DIR [gpu-check options...]
#
# Run from the repository root. The wheels in $WHEELS (default .whl/: megatron-core, webdataset,
# vector-quantize-pytorch and their small pure-Python dependencies, downloaded with `pip download
# --no-deps`) are installed with --no-deps into a private directory, so the machine's torch is never
# touched; Tessera itself is imported from this checkout. Checkpoints and run directories go to
# $WORK (default: a temporary directory); OUT_DIR receives only the reports and logs (8 files at most).
# TESSERA_SKIP_WHEELS=1 skips the install (a machine that has the dependencies already).
set -euo pipefail

out=${1:?usage: scripts/gpu_check_device.sh OUT_DIR [gpu-check options...]}
shift
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
work=${WORK:-$(mktemp -d /tmp/tessera-gpu-check.XXXXXX)}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1

if [ "${TESSERA_SKIP_WHEELS:-0}" != 1 ]; then
    shopt -s nullglob
    whl=("$wheels"/*.whl)
    if [ ${#whl[@]} -eq 0 ]; then
        echo "gpu_check_device.sh: no wheels in $wheels (see docs/training.md, Validating a GPU)" >&2
        exit 2
    fi
    site="$work/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${whl[@]}"
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$py" - <<'PY'
import importlib, platform
mods = ["torch", "triton", "megatron.core", "einops", "webdataset", "vector_quantize_pytorch", "sentencepiece"]
found = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        found.append(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, let gpu-check say what it means
        found.append(f"{m} MISSING ({type(exc).__name__}: {exc})")
print(f"python {platform.python_version()}: " + "; ".join(found), flush=True)
PY

set +e
# python -m tessera.bench.gpu_check = `tessera bench gpu-check` without importing every other subcommand
"$py" -m tessera.bench.gpu_check --out "$work/report" "$@" 2>&1 | tee "$out/console.log"
rc=${PIPESTATUS[0]}
set -e
for f in gpu_check.json gpu_check.md aot.json train_a.log train_b.log train_c.log; do
    if [ -f "$work/report/$f" ]; then cp "$work/report/$f" "$out/"; fi
done
echo "gpu_check_device.sh: exit $rc; reports in $out, checkpoints and runs in $work"
exit "$rc"
