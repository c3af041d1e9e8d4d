#!/usr/bin/env bash
# Build cnl_ext wheels with the compiled kernels, one per (Python, torch, CUDA or cpu) entry of a
# matrix (docs/wheels.md explains the matrix and how to publish and install the wheels). Every wheel
# holds the native CPU kernels (cnl_ext._cpu_default/_avx2/_avx512, one per instruction set); CUDA
# entries add the CUDA extension cnl_ext._C.
#
# Runs on a Linux x86-64 build host; CUDA entries need the CUDA toolkits of the matrix installed
# side by side (/usr/local/cuda-X.Y), e.g. inside pytorch/manylinux2_28-builder:cudaX.Y, whose
# Pythons live in /opt/python. No GPU is needed to build; with one, each wheel's CUDA tests also run.
#
#   scripts/build_wheels.sh                  # the whole default (CUDA) matrix
#   scripts/build_wheels.sh 3.11:2.5.1:12.4  # selected entries, PYTHON:TORCH:CUDA
#   scripts/build_wheels.sh 3.11:2.13.0:cpu  # a CPU wheel (torch from the cpu index): the CPU mode
#   DRY_RUN=1 scripts/build_wheels.sh        # print the plan only
#
# Environment:
#   TORCH_CUDA_ARCH_LIST  GPU architectures (default 8.0;9.0+PTX: A100/A800, H100/H200, PTX for newer)
#   WHEEL_DIR             where the wheels go (default dist/)
#   WORK_DIR              virtual environments and logs (default build/wheels/)
#   CUDA_ROOT_PATTERN     toolkit location, {cuda} replaced (default /usr/local/cuda-{cuda})
#   TORCH_INDEX_PATTERN   pip index of torch builds, {cu} replaced by e.g. cu124
#                         (default https://download.pytorch.org/whl/{cu})
#   PIP_EXTRA             extra pip arguments (a local mirror, --no-index --find-links ...)
#   MAX_JOBS              parallel compile jobs (default: CPU count)
#   RUN_TESTS             1 (default): run the kernel tests (tests/ops/test_kernels.py, the native CPU
#                         kernels required) and tests/ops/test_cuda_backend.py (GPU tests with a GPU)
#   SYSTEM_SITE_PACKAGES  1: the venvs see this Python's packages (python -m venv --system-site-packages),
#                         and an installed torch of the entry's version is used as it is (offline hosts)
#   REUSE_VENV            1: keep an existing venv of the entry (no --clear) and its torch when that is
#                         the entry's version and CUDA (scripts/check_cuda_wheel.sh: no second download
#                         of several GB)
#
# Each wheel gets a local version label, 0.1.0+cu124.torch2.5 or 0.1.0+cpu.torch2.13: the extension
# is tied to the torch minor version (C++ ABI) and the CUDA major version it was built with. The wheels are tagged
# linux_x86_64 and meant for a find-links/extra index beside PyTorch's own (they rely on the libtorch
# and CUDA runtime that the torch wheel ships, so auditwheel must not vendor those; see docs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

# PYTHON:TORCH:CUDA. Each torch is paired with CUDA versions it is published for on
# download.pytorch.org; one Python per torch is built by default, add more as needed.
DEFAULT_MATRIX=(
  3.10:2.4.1:12.1
  3.11:2.5.1:12.4
  3.12:2.6.0:12.4
  3.12:2.6.0:12.6
  3.12:2.7.1:12.6
  3.12:2.7.1:12.8
  3.12:2.8.0:12.8
  3.12:2.8.0:12.9
)
if [[ $# -gt 0 ]]; then
  MATRIX=("$@")
else
  MATRIX=("${DEFAULT_MATRIX[@]}")
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
WHEEL_DIR=$(realpath -m "${WHEEL_DIR:-dist}")
WORK_DIR=$(realpath -m "${WORK_DIR:-build/wheels}")
CUDA_ROOT_PATTERN=${CUDA_ROOT_PATTERN:-/usr/local/cuda-{cuda\}}
TORCH_INDEX_PATTERN=${TORCH_INDEX_PATTERN:-https://download.pytorch.org/whl/{cu\}}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
RUN_TESTS=${RUN_TESTS:-1}
DRY_RUN=${DRY_RUN:-0}

find_python() {  # python executable for version $1 (manylinux layout first)
  local version=$1 tag=cp${1/./}
  for candidate in "/opt/python/${tag}-${tag}/bin/python" "$(command -v "python${version}" || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

run() {  # echo, then run unless DRY_RUN
  echo "+ $*"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

[[ "$DRY_RUN" == 1 ]] || mkdir -p "$WHEEL_DIR" "$WORK_DIR"
built=()
failed=()
for entry in "${MATRIX[@]}"; do
  IFS=: read -r py torch_version cuda <<<"$entry"
  if [[ -z "$py" || -z "$torch_version" || -z "$cuda" ]]; then
    echo "build_wheels: bad matrix entry '$entry' (want PYTHON:TORCH:CUDA, e.g. 3.11:2.5.1:12.4)" >&2
    exit 2
  fi
  if [[ "$cuda" == cpu ]]; then cu=cpu; else cu=cu${cuda/./}; fi
  torch_minor=$(echo "$torch_version" | cut -d. -f1,2)
  label="${cu}.torch${torch_minor}"
  cuda_home=${CUDA_ROOT_PATTERN//\{cuda\}/$cuda}
  index=${TORCH_INDEX_PATTERN//\{cu\}/$cu}
  venv="$WORK_DIR/py${py}-torch${torch_version}-${cu}"
  log="$WORK_DIR/py${py}-torch${torch_version}-${cu}.log"
  [[ "$DRY_RUN" != 1 ]] || log=/dev/null
  echo "=== cnl_ext wheel: Python $py, torch $torch_version, CUDA $cuda ($label), archs $TORCH_CUDA_ARCH_LIST"

  if [[ "$DRY_RUN" != 1 ]]; then
    if ! python_bin=$(find_python "$py"); then
      echo "build_wheels: no Python $py on this host; skipped" >&2
      failed+=("$entry (no python)")
      continue
    fi
    if [[ "$cuda" != cpu && ! -x "$cuda_home/bin/nvcc" ]]; then
      echo "build_wheels: no CUDA toolkit at $cuda_home; skipped" >&2
      failed+=("$entry (no CUDA $cuda)")
      continue
    fi
  else
    python_bin="python$py"
  fi

  (
    set -euo pipefail
    venv_options=()
    [[ "${REUSE_VENV:-0}" == 1 ]] || venv_options+=(--clear)
    [[ "${SYSTEM_SITE_PACKAGES:-0}" != 1 ]] || venv_options+=(--system-site-packages)
    run "$python_bin" -m venv "${venv_options[@]}" "$venv"
    pip=("$venv/bin/python" -m pip)
    # shellcheck disable=SC2086
    run "${pip[@]}" install -q ${PIP_EXTRA:-} --upgrade pip setuptools wheel build ninja
    if [[ ("${SYSTEM_SITE_PACKAGES:-0}" == 1 || "${REUSE_VENV:-0}" == 1) && "$DRY_RUN" != 1 ]] &&
       "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version'
                                                  or (torch.version.cuda or 'cpu') != '$cuda')" 2>/dev/null; then
      echo "build_wheels: using the installed torch $torch_version (CUDA $cuda)"
    else
      # shellcheck disable=SC2086
      run "${pip[@]}" install -q ${PIP_EXTRA:-} "torch==${torch_version}" --index-url "$index"
    fi
    if [[ "$DRY_RUN" != 1 ]]; then
      got=$("$venv/bin/python" -c "import torch; print(torch.version.cuda or 'cpu')")
      [[ "$got" == "$cuda" ]] || { echo "build_wheels: torch reports CUDA $got, expected $cuda" >&2; exit 1; }
    fi
    run rm -rf "$ROOT/build/lib."* "$ROOT/build/temp."*  # objects of another torch must not be reused
    if [[ "$cuda" == cpu ]]; then
      run env CNL_EXT_BUILD_CPU=1 CNL_EXT_BUILD_CUDA=0 CNL_EXT_LOCAL_VERSION="$label" \
        "$venv/bin/python" -m build --wheel --no-isolation --outdir "$WHEEL_DIR" "$ROOT"
    else
      run env CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$PATH" CNL_EXT_BUILD_CPU=1 CNL_EXT_BUILD_CUDA=1 \
        CNL_EXT_LOCAL_VERSION="$label" "$venv/bin/python" -m build --wheel --no-isolation --outdir "$WHEEL_DIR" "$ROOT"
    fi
    wheel="$WHEEL_DIR/cnl_ext-0.1.0+${label}-cp${py/./}-cp${py/./}-linux_x86_64.whl"
    # Check the wheel in its own environment: the libraries load (prebuilt, nothing compiled) and
    # register their ops.
    run "${pip[@]}" install -q --no-deps --force-reinstall "$wheel"
    # shellcheck disable=SC2086
    run "${pip[@]}" install -q ${PIP_EXTRA:-} tqdm pytest numpy  # numpy: tests/ops/test_kernels.py
    run env -C "$WORK_DIR" CNL_EXT_REQUIRE_NATIVE=1 "$venv/bin/python" -c "
import torch
from cnl_ext.ops import native_backend as n
assert n.unavailable_reason() == ''
info = n.build_info()
assert info['cpu_build'] == 'prebuilt', info
assert '$cuda' == 'cpu' or 'cuda_arch_list' in info, n.cuda_unavailable_reason()
print('cnl_ext native', info, 'CUDA:', n.cuda_unavailable_reason() or 'available')"
    if [[ "$RUN_TESTS" == 1 ]]; then
      # Against the installed wheel, not the source tree: from a copy of the tests and of the files
      # they read (csrc/, scripts/).
      copy="$WORK_DIR/test-tree"
      run rm -rf "$copy"
      run mkdir -p "$copy"
      run cp -r "$ROOT/tests" "$ROOT/csrc" "$ROOT/scripts" "$copy/"
      selection=()  # a CPU host runs the native kernels' cases (Triton's interpreter is the source tree's CI)
      [[ "$cuda" != cpu ]] || selection=(-k "(native or instruction_set or build) and not setup")  # setup.py is not in the copy
      run env -C "$copy" CNL_EXT_REQUIRE_NATIVE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/ops/test_kernels.py tests/ops/test_cuda_backend.py "${selection[@]}"
    fi
  ) 2>&1 | tee "$log" && built+=("$entry") || failed+=("$entry (see $log)")
done

echo "=== built: ${#built[@]}; failed or skipped: ${#failed[@]}"
for entry in "${failed[@]}"; do echo "  $entry"; done
[[ ${#failed[@]} == 0 ]]
