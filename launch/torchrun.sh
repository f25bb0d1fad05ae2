#!/usr/bin/env bash
# Single node, N processes (GPUs): launch/torchrun.sh [--dry-run] [--nproc N] -- --config configs/X.yaml [overrides...]
# The environment torchrun needs for this config (shutdown timeout, CUDA_DEVICE_MAX_CONNECTIONS) comes from
# `python -m tessera.pretrain.launch` (docs/training.md); PYTHON picks the interpreter (default: python).
set -euo pipefail
DRY=0; NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}"
[ "$NPROC" -gt 0 ] 2>/dev/null || NPROC=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
LAUNCH_ENV="$("${PYTHON:-python}" -m tessera.pretrain.launch "$@")"
eval "$LAUNCH_ENV"
CMD=(torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" -m tessera.pretrain "$@")
echo "$LAUNCH_ENV"
echo "${CMD[*]}"
[ "$DRY" = 1 ] && exit 0
exec "${CMD[@]}"
