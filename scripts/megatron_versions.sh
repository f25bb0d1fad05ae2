#!/usr/bin/env bash
# Run Tessera's megatron-facing tests against other megatron-core releases, without installing them:
#   scripts/megatron_versions.sh 0.16.0 0.17.1 ...      (from the repository root, in the venv that runs the tests)
# Each release's wheel is unpacked into a scratch directory put first on PYTHONPATH. Releases published
# only for a newer Python (0.17+: Python >= 3.12) are unpacked from their cp312 wheel, and their one C++
# extension (GPTDataset's index builder, datasets/helpers.cpp) is compiled for this interpreter (g++ and
# pybind11), so the same Python code runs here. TESSERA_SKIP_VERSION_CHECK=1 lets releases outside the
# supported range through. Needs the package registry.
set -euo pipefail
PY="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
DEFAULT_TESTS="tests/test_model.py tests/test_model_fastpath.py tests/test_model_parallel.py tests/test_rope_patch.py
  tests/test_train_config.py tests/test_train_nan.py tests/test_train_obs.py tests/test_train_parallel.py
  tests/test_train_resume.py tests/test_data_batches.py"
# shellcheck disable=SC2206  # TESTS="tests/x.py ..." narrows the run
TESTS=(${TESTS:-$DEFAULT_TESTS})
"$PY" -m pip install -q --target "$WORK/pybind11" pybind11
TAG="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
for v in "$@"; do
  dest="$WORK/megatron-core-$v"
  mkdir -p "$dest/wheel"
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$dest/wheel" "megatron-core==$v" 2>/dev/null; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
      -d "$dest/wheel" "megatron-core==$v"
  fi
  "$PY" -m zipfile -e "$dest"/wheel/*.whl "$dest/site"
  helpers="$dest/site/megatron/core/datasets"
  if ! ls "$helpers"/helpers_cpp*"$SUFFIX" >/dev/null 2>&1; then
    echo "megatron-core $v: compiling datasets/helpers.cpp for Python $TAG"
    g++ -O3 -shared -std=c++17 -fPIC $(PYTHONPATH="$WORK/pybind11" "$PY" -m pybind11 --includes) \
      "$helpers/helpers.cpp" -o "$helpers/helpers_cpp$SUFFIX"
  fi
  echo "=== megatron-core $v"
  PYTHONPATH="$dest/site:$PWD" TESSERA_SKIP_VERSION_CHECK=1 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
    | tail -n 30 || true
done
