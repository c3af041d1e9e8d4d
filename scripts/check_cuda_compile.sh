#!/usr/bin/env bash
# Compile-only check of the CUDA extension sources (csrc/), for CI machines without a GPU or a CUDA
# build of torch. Needs nvcc (CUDA >= 11.8) and nothing else; with torch installed (a CPU wheel is
# enough) it also syntax-checks the C++ bindings with g++.
#
#   scripts/check_cuda_compile.sh            # sm_80 + sm_90 (+ compute_90 PTX), as the wheels
#   CNL_CHECK_ARCHS="90" scripts/check_cuda_compile.sh
#   NVCC=/usr/local/cuda-12.4/bin/nvcc CXX=g++-11 scripts/check_cuda_compile.sh
#
# What it checks:
#  1. csrc/*.cu compile for each architecture with the flags torch's CUDAExtension adds (no implicit
#     half/bf16 conversions, --expt-relaxed-constexpr), every nvcc/host warning an error, and no
#     register spills (-warn-spills, as errors).
#  2. The kept PTX uses 128-bit vector loads of the float32 and the float64 streams (the kernels'
#     bandwidth relies on it).
#  3. csrc/cnl_ops.cpp passes `g++ -fsyntax-only` against torch's headers (skipped, with a notice,
#     when torch is not importable). The CPU wheel lacks one generated CUDA config header
#     (c10/cuda/impl/cuda_cmake_macros.h); a one-line stand-in is provided for the check.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python}
ARCHS=${CNL_CHECK_ARCHS:-"80 90"}
CUDA_STD=${CNL_CHECK_CUDA_STD:-c++17}  # the oldest standard the wheels are built with

if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

gencode=()
last=""
for arch in $ARCHS; do
  gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
  last=$arch
done
gencode+=(-gencode "arch=compute_${last},code=compute_${last}")  # PTX for newer GPUs ("+PTX")

nvcc_flags=(
  -std="$CUDA_STD" -O3 -lineinfo -c
  "${gencode[@]}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
  -Xptxas -warn-spills,-warn-lmem-usage
  -Icsrc --keep --keep-dir "$WORK"
)

echo "check_cuda_compile: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda_compile: nvcc ${ARCHS// /,} (+PTX ${last}), -std=${CUDA_STD}: csrc/*.cu"
pids=()
for src in csrc/*.cu; do
  name=$(basename "$src" .cu)
  "$NVCC" "${nvcc_flags[@]}" "$src" -o "$WORK/$name.o" >"$WORK/$name.log" 2>&1 &
  pids+=("$!:$name")
done
failed=0
for entry in "${pids[@]}"; do
  pid=${entry%%:*}
  name=${entry#*:}
  if ! wait "$pid"; then
    echo "check_cuda_compile: FAILED csrc/$name.cu" >&2
    cat "$WORK/$name.log" >&2
    failed=1
  fi
done
[[ $failed == 0 ]] || exit 1

# 128-bit loads of the float32 and the float64 streams (ld.global.v4.f32, .v2.f64 in PTX) in both kernels.
for name in cnl_sgd cnl_adam; do
  ptx=$(ls "$WORK"/"$name"*compute_"$last"*.ptx 2>/dev/null | head -n 1 || true)
  if [[ -z "$ptx" ]]; then
    ptx=$(ls "$WORK"/"$name"*.ptx | head -n 1)
  fi
  if ! grep -q "ld.global.v4.f32\|ld.global.nc.v4.f32" "$ptx"; then
    echo "check_cuda_compile: FAILED no 128-bit vector loads in the PTX of csrc/$name.cu" >&2
    exit 1
  fi
  if ! grep -q "ld.global.v2.f64\|ld.global.nc.v2.f64" "$ptx"; then
    echo "check_cuda_compile: FAILED no 128-bit float64 vector loads in the PTX of csrc/$name.cu" >&2
    exit 1
  fi
done
echo "check_cuda_compile: nvcc OK, vector loads present ($(( $(date +%s) - start )) s)"

# C++ bindings against torch's headers.
if ! includes=$("$PYTHON" - <<'EOF' 2>/dev/null
import sysconfig
import torch
from torch.utils import cpp_extension
paths = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
std = "c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "c++17"
print(std, " ".join(paths))
EOF
); then
  echo "check_cuda_compile: torch is not importable with $PYTHON: skipped the g++ check of csrc/cnl_ops.cpp"
  exit 0
fi
read -r cxx_std include_paths <<<"$includes"
isystem=()
for path in $include_paths; do
  isystem+=(-isystem "$path")
  if [[ -f "$path/c10/cuda/CUDAMacros.h" && ! -f "$path/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    mkdir -p "$WORK/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
    isystem+=(-isystem "$WORK/stub")
  fi
done
# The toolkit's headers: from CUDA_HOME, else from where nvcc says its toolkit is (it may be a wrapper).
cuda_home=${CUDA_HOME:-$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)}
cuda_include=${cuda_home:-/usr/local/cuda}/include
echo "check_cuda_compile: $CXX -fsyntax-only -std=$cxx_std: csrc/cnl_ops.cpp"
"$CXX" -std="$cxx_std" -fsyntax-only -Wall -Wextra -Werror -Icsrc "${isystem[@]}" -isystem "$cuda_include" \
  -DCNL_EXT_CUDA_ARCHS=80_90PTX csrc/cnl_ops.cpp
echo "check_cuda_compile: OK ($(( $(date +%s) - start )) s)"
