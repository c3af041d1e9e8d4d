#!/usr/bin/env bash
# Build a CUDA wheel of cnl_ext as a user would and check it without a GPU (docs/wheels.md, "Checking
# a CUDA wheel without a GPU"): linked, loaded and registered against a CUDA build of torch.
#
#   scripts/check_cuda_wheel.sh                    # Python 3.11, torch 2.13.0, CUDA 13.0
#   scripts/check_cuda_wheel.sh 3.11:2.13.0:13.0   # PYTHON:TORCH:CUDA, as scripts/build_wheels.sh
#
# Several GB of downloads and disk (torch and its nvidia-* packages): a developer's check, never
# part of CI's per-submission run (it refuses to run where CI is set).
#
# torch comes from PyPI, explicitly: pip runs with PIP_CONFIG_FILE=/dev/null (no pip.conf: no
# find-links to a local CPU wheel, no extra index, no constraints file), PIP_FIND_LINKS,
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX and PIP_CONSTRAINT unset, and
# --index-url https://pypi.org/simple. PyPI's Linux torch==2.13.0 is 2.13.0+cu130, built for CUDA
# 13.0, with its CUDA libraries as nvidia-* packages; scripts/build_wheels.sh checks that the
# installed torch reports the entry's CUDA release.
#
# Steps: scripts/build_wheels.sh builds the wheel in its venv CHECK_DIR/pyPY-torchTORCH-cuXY (kept
# between runs, REUSE_VENV=1: torch is downloaded once), installs it there, then this script checks
#   1. the wheel's contents and size;
#   2. the NEEDED libraries of cnl_ext._C: each found inside torch's or the nvidia packages' folders
#      (or the C/C++ runtime), and after `import cnl_ext._C` every library the process mapped is
#      from there: nothing from a system CUDA (/usr/local/cuda*);
#   3. the cubins and PTX in cnl_ext._C (cuobjdump --list-elf / --list-ptx) against
#      TORCH_CUDA_ARCH_LIST, and registers, stack and local memory per kernel (--dump-resource-usage);
#   4. `import cnl_ext._C`, the dispatcher's CPU/Meta/CUDA kernels of every op (against
#      cnl_ext.ops.native_backend.expected_kernels), `python -m cnl_ext info`;
#   5. tests/ops/test_cuda_backend.py against the installed wheel: the dispatcher test passes, and every
#      test marked cuda (there and in tests/ops/test_kernels.py) skips with the driver's reason.
# It prints each step and exits non-zero if any check fails.
#
# Environment: CHECK_DIR (default ${XDG_CACHE_HOME:-~/.cache}/cnl_ext/cuda-wheel: venvs, wheels, and
# per entry check-pyPY-torchTORCH-cuXY/ with the logs and the test tree), CHECK_ONLY=1 (check the
# wheel a previous run built and installed, without building), TORCH_CUDA_ARCH_LIST (default
# 8.0;9.0+PTX), MAX_JOBS (default 1: the build shares the machine), PYPI_INDEX (default
# https://pypi.org/simple), CUDA_ROOT_PATTERN (as build_wheels.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
if [[ -n "${CI:-}" ]]; then
  echo "check_cuda_wheel: CI is set; this check downloads several GB and is not for CI's run" >&2
  exit 2
fi

ENTRY=${1:-3.11:2.13.0:13.0}
IFS=: read -r PY TORCH_VERSION CUDA <<<"$ENTRY"
if [[ -z "$PY" || -z "$TORCH_VERSION" || -z "$CUDA" || "$CUDA" == cpu ]]; then
  echo "check_cuda_wheel: bad entry '$ENTRY' (want PYTHON:TORCH:CUDA with a CUDA release, e.g. 3.11:2.13.0:13.0)" >&2
  exit 2
fi
CU=cu${CUDA/./}
LABEL="$CU.torch$(echo "$TORCH_VERSION" | cut -d. -f1,2)"
CHECK_DIR=$(realpath -m "${CHECK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cnl_ext/cuda-wheel}")
VENV="$CHECK_DIR/py$PY-torch$TORCH_VERSION-$CU"
PYTHON="$VENV/bin/python"
WHEEL_DIR="$CHECK_DIR/dist"
RUN_DIR="$CHECK_DIR/check-py$PY-torch$TORCH_VERSION-$CU"  # this entry's logs, resource usage, test tree
WHEEL="$WHEEL_DIR/cnl_ext-0.1.0+$LABEL-cp${PY/./}-cp${PY/./}-linux_x86_64.whl"
CUDA_ROOT_PATTERN=${CUDA_ROOT_PATTERN:-/usr/local/cuda-{cuda\}}
CUDA_HOME_OF_ENTRY=${CUDA_ROOT_PATTERN//\{cuda\}/$CUDA}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
export MAX_JOBS=${MAX_JOBS:-1}
PYPI_INDEX=${PYPI_INDEX:-https://pypi.org/simple}
# PyPI, explicitly, whatever this machine's pip configuration says (see the top of this file)
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_NO_INDEX PIP_CONSTRAINT
unset PYTHONPATH  # the checks import the installed wheel, never this checkout

failures=()
fail() { echo "FAIL: $*"; failures+=("$*"); }
section() { echo; echo "=== $*"; }
mkdir -p "$RUN_DIR"
start=$SECONDS

section "build: scripts/build_wheels.sh $ENTRY (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, torch from $PYPI_INDEX)"
build_start=$SECONDS
if [[ "${CHECK_ONLY:-0}" == 1 ]]; then
  echo "  CHECK_ONLY=1: checking the wheel of a previous run, as installed in $VENV"
elif ! rm -f "$WHEEL" || ! REUSE_VENV=1 RUN_TESTS=0 WORK_DIR="$CHECK_DIR" WHEEL_DIR="$WHEEL_DIR" \
     PIP_EXTRA="--index-url $PYPI_INDEX" TORCH_INDEX_PATTERN="$PYPI_INDEX" CUDA_ROOT_PATTERN="$CUDA_ROOT_PATTERN" \
     scripts/build_wheels.sh "$ENTRY" > "$RUN_DIR/build.log" 2>&1; then
  tail -40 "$RUN_DIR/build.log"
  echo "check_cuda_wheel: scripts/build_wheels.sh $ENTRY failed (log: $RUN_DIR/build.log)" >&2
  exit 1
fi
build_seconds=$((SECONDS - build_start))
# build_wheels.sh's output (the compilers': thousands of lines) is in the log; its own lines are shown
[[ "${CHECK_ONLY:-0}" == 1 ]] || grep -E "^(\+ |=== |build_wheels|cnl_ext native|cnl_ext setup)" "$RUN_DIR/build.log" | cut -c1-240 | sed 's/^/  /'
[[ -f "$WHEEL" ]] || { echo "check_cuda_wheel: no wheel at $WHEEL" >&2; exit 1; }
echo "build_wheels.sh took ${build_seconds} s (venv, torch check, build, install)"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null

section "1. the wheel: $(basename "$WHEEL"), $(du -k "$WHEEL" | cut -f1) KB"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    infos = wheel.infolist()
    for info in infos:
        if info.filename.endswith((".so", ".py")) and "/" in info.filename.split("cnl_ext/", 1)[-1]:
            continue  # the package's subfolders: counted below, not listed one by one
        print(f"  {info.file_size:>10}  {info.filename}")
    print(f"  {len(infos)} files, {sum(i.file_size for i in infos)} bytes unpacked "
          f"({sum(i.compress_size for i in infos)} compressed)")
EOF
SITE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
EXT=$(ls "$SITE"/cnl_ext/_C*.so 2>/dev/null | head -1 || true)
if [[ -z "$EXT" ]]; then
  fail "the installed wheel has no cnl_ext/_C*.so in $SITE"
else
  unzip -l "$WHEEL" | grep -q "cnl_ext/$(basename "$EXT")" || fail "$(basename "$EXT") is installed but not in the wheel"
  echo "  cnl_ext._C: $EXT ($(du -k "$EXT" | cut -f1) KB)"
fi

section "2. the libraries cnl_ext._C needs, and where they load from"
if [[ -n "$EXT" ]]; then
  # Statically: every NEEDED library is a file in torch/lib or nvidia/*/lib of this venv, or the
  # C/C++ runtime. Then at run time (/proc/self/maps after the import): where each one was mapped
  # from, and that the process mapped nothing from a system CUDA.
  (cd "$CHECK_DIR" && "$PYTHON" - "$EXT" "$SITE" <<'EOF'
import glob, os, re, subprocess, sys
ext, site = sys.argv[1:]
needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", subprocess.run(
    ["readelf", "-d", ext], capture_output=True, text=True, check=True).stdout)
runpath = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[([^\]]+)\]",
                     subprocess.run(["readelf", "-d", ext], capture_output=True, text=True).stdout)
print(f"  RPATH/RUNPATH: {runpath or 'none (the libraries torch loaded first serve it)'}")
folders = [os.path.join(site, "torch", "lib")] + sorted(glob.glob(os.path.join(site, "nvidia", "**", "lib"), recursive=True))
c_runtime = re.compile(r"lib(c|m|dl|pthread|rt|gcc_s|stdc\+\+)\.so(\.\d+)*$|ld-linux.*")
bad = []
static = {}
for name in needed:
    found = [f for f in folders if os.path.exists(os.path.join(f, name))]
    static[name] = found[0] if found else ("C/C++ runtime" if c_runtime.match(name) else None)
    if static[name] is None:
        bad.append(f"{name} is in neither torch's nor the nvidia packages' folders")

import torch  # noqa: E402  (as cnl_ext does: torch first, which loads its CUDA libraries)
import cnl_ext._C  # noqa: E402,F401
with open("/proc/self/maps") as maps:
    mapped = {line.split()[-1] for line in maps if "/" in line and ".so" in line}
by_name = {}
for path in mapped:
    by_name.setdefault(os.path.basename(path), path)
print(f"  {'NEEDED':<26} {'found in (static)':<58} loaded from")
for name in needed:
    where = static[name] or "NOT FOUND"
    loaded = by_name.get(name) or next((p for p in mapped if os.path.basename(p).startswith(name)), "not mapped")
    print(f"  {name:<26} {os.path.relpath(where, site) if where.startswith(site) else where:<58} {loaded}")
    if static[name] not in (None, "C/C++ runtime") and not loaded.startswith(site):
        bad.append(f"{name} was loaded from {loaded}, not from the venv's torch/nvidia folders")
system_cuda = sorted(p for p in mapped if re.match(r"/usr/local/cuda|/usr/lib/x86_64-linux-gnu/libcud", p))
for path in system_cuda:
    bad.append(f"the process mapped a system CUDA library: {path}")
print(f"  libraries mapped from a system CUDA: {system_cuda or 'none'}")
for line in bad:
    print(f"FAIL: {line}")
sys.exit(1 if bad else 0)
EOF
  ) || fail "the libraries of cnl_ext._C (above)"
fi

section "3. GPU code in cnl_ext._C (cuobjdump)"
CUOBJDUMP=""
for candidate in "$CUDA_HOME_OF_ENTRY/bin/cuobjdump" "$(command -v cuobjdump || true)" \
                 "$SITE/triton/backends/nvidia/bin/cuobjdump"; do  # triton (a torch dependency) ships one
  if [[ -n "$candidate" && -x "$candidate" ]]; then CUOBJDUMP=$candidate; break; fi
done
if [[ -z "$CUOBJDUMP" ]]; then
  fail "no cuobjdump (neither in $CUDA_HOME_OF_ENTRY/bin, on PATH, nor triton's)"
elif [[ -n "$EXT" ]]; then
  echo "  $CUOBJDUMP ($("$CUOBJDUMP" --version | grep -o 'release [0-9.]*'))"
  "$CUOBJDUMP" --list-elf "$EXT" | sed 's/^/  /'
  "$CUOBJDUMP" --list-ptx "$EXT" | sed 's/^/  /'
  "$CUOBJDUMP" --dump-resource-usage "$EXT" > "$RUN_DIR/resource-usage.txt"
  "$PYTHON" - "$EXT" "$CUOBJDUMP" "$RUN_DIR/resource-usage.txt" <<'EOF' || fail "the GPU code of cnl_ext._C (above)"
import os, re, subprocess, sys
ext, cuobjdump, usage_file = sys.argv[1:]
wanted_sass, wanted_ptx = set(), set()
for entry in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
    if not entry:
        continue
    arch = entry.replace("+PTX", "").replace(".", "")
    wanted_sass.add(f"sm_{arch}")
    if entry.endswith("+PTX"):
        wanted_ptx.add(f"sm_{arch}")
listing = lambda flag: set(re.findall(r"\.(sm_\w+?)\.(?:cubin|ptx)", subprocess.run(  # noqa: E731
    [cuobjdump, flag, ext], capture_output=True, text=True, check=True).stdout))
sass, ptx = listing("--list-elf"), listing("--list-ptx")
bad = [f"no {a} cubin" for a in sorted(wanted_sass - sass)] + [f"no {a} PTX" for a in sorted(wanted_ptx - ptx)]
bad += [f"an unexpected {a} cubin" for a in sorted(sass - wanted_sass)]
print(f"  cubins {sorted(sass)}, PTX {sorted(ptx)} (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")

# Resource usage per kernel and architecture: "Function <mangled>:" then "REG:n STACK:n SHARED:n LOCAL:n ..."
rows, arch, function = [], None, None
for line in open(usage_file):
    match = re.match(r"\s*arch = (sm_\w+)", line)
    if match:
        arch = match.group(1)
    match = re.match(r"\s*Function (\S+):", line)
    if match:
        function = match.group(1)
    elif function and "REG:" in line:
        rows.append((function, arch, {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}))
        function = None
demangled = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.split("\n")


def family(name):
    """cnl::adam_kernel from 'void cnl::(anonymous namespace)::adam_kernel<__half, ...>(...)'."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    return re.split(r"[<(]", name, 1)[0]


# one row per kernel template and architecture (its instantiations: dtypes, reference formats, flags)
groups = {}
for (mangled, arch, fields), name in zip(rows, demangled):
    groups.setdefault((family(name or mangled), arch), []).append(fields)
print(f"  {len(rows)} kernels (instantiations x architectures); registers per thread, and the most stack, local")
print("  (register spills land there) and static shared memory in bytes per thread/block; per kernel: "
      + os.path.basename(usage_file))
print(f"  {'kernel':<34} {'arch':<6} {'inst.':>5} {'REG':>7} {'STACK':>5} {'LOCAL':>5} {'SHARED':>6}")
for (name, arch), entries in sorted(groups.items()):
    regs = sorted(e.get("REG", 0) for e in entries)
    worst = {k: max(e.get(k, 0) for e in entries) for k in ("STACK", "LOCAL", "SHARED")}
    print(f"  {name:<34} {arch:<6} {len(entries):>5} {f'{regs[0]}-{regs[-1]}':>7} {worst['STACK']:>5} "
          f"{worst['LOCAL']:>5} {worst['SHARED']:>6}")
    if worst["STACK"] or worst["LOCAL"]:
        bad.append(f"{name} uses stack or local memory on {arch} (a register spill?)")
if not rows:
    bad.append("cuobjdump --dump-resource-usage lists no kernel")
for line in bad:
    print(f"FAIL: {line}")
sys.exit(1 if bad else 0)
EOF
fi

section "4. the installed wheel: import, dispatcher, python -m cnl_ext info"
(cd "$CHECK_DIR" && CNL_EXT_REQUIRE_NATIVE=1 "$PYTHON" - <<'EOF') || fail "import or dispatcher (above)"
import importlib, os, sys
import torch
import cnl_ext._C as C
import cnl_ext
from cnl_ext.ops import native_backend as n
print(f"  import cnl_ext._C: ok ({C.__file__})")
if not cnl_ext.__file__.startswith(sys.prefix):
    sys.exit(f"FAIL: cnl_ext was imported from {cnl_ext.__file__}, not from the venv's installed wheel")
info = n.build_info()
print(f"  build_info: {info}")
bad = []
if info.get("cpu_build") != "prebuilt":
    bad.append(f"the CPU library is not the wheel's prebuilt one: {info.get('cpu_build')!r}")
if info.get("cuda_runtime", "").split(".")[0] != (torch.version.cuda or "").split(".")[0]:
    bad.append(f"cnl_ext._C was built with CUDA {info.get('cuda_runtime')}, torch with {torch.version.cuda}")
if info.get("cuda_arch_list") != os.environ["TORCH_CUDA_ARCH_LIST"]:
    bad.append(f"cnl_ext._C reports architectures {info.get('cuda_arch_list')!r}")
table = n.kernel_table()
print(f"  {'op':<24} " + " ".join(f"{k:>5}" for k in n.DISPATCH_KEYS) + "   expected")
for op, kernels in table.items():
    print(f"  {op:<24} " + " ".join(f"{'yes' if kernels[k] else '-':>5}" for k in n.DISPATCH_KEYS)
          + "   " + ", ".join(n.expected_kernels(op)))
bad += n.kernel_mismatches()
print(f"  CUDA kernels usable here: {n.cuda_unavailable_reason() or 'yes'}")
for line in bad:
    print(f"FAIL: {line}")
sys.exit(1 if bad else 0)
EOF
info=$(cd "$CHECK_DIR" && "$PYTHON" -m cnl_ext info 2>&1) || fail "python -m cnl_ext info exited non-zero"
echo "$info" | sed 's/^/  /'
grep -q "CUDA $CUDA" <<<"$info" || fail "python -m cnl_ext info does not name CUDA $CUDA"
grep -qF "CUDA kernels (cnl_ext._C): built for CUDA $CUDA, architectures $TORCH_CUDA_ARCH_LIST" <<<"$info" ||
  fail "python -m cnl_ext info does not name cnl_ext._C's CUDA build and architectures"

section "5. the tests against the installed wheel (from a copy of tests/, csrc/, scripts/)"
tree="$RUN_DIR/test-tree"
rm -rf "$tree" && mkdir -p "$tree" && cp -r "$ROOT/tests" "$ROOT/csrc" "$ROOT/scripts" "$tree/"
pytest=(env -C "$tree" CNL_EXT_REQUIRE_NATIVE=1 "$PYTHON" -m pytest -q -p no:cacheprovider)
# everything of test_cuda_backend.py but CI's nvcc compile check (it checks the sources, not the wheel)
"${pytest[@]}" -rA tests/ops/test_cuda_backend.py -m "not cuda" -k "not compile" > "$RUN_DIR/tests-not-cuda.log" 2>&1 ||
  fail "tests/ops/test_cuda_backend.py -m 'not cuda' (log: $RUN_DIR/tests-not-cuda.log)"
grep -E "^(FAILED|ERROR|SKIPPED)|^PASSED .*::test_(every_op|dispatcher|cuda_side)" "$RUN_DIR/tests-not-cuda.log" | sed 's/^/  /' || true
tail -1 "$RUN_DIR/tests-not-cuda.log" | sed 's/^/  /'
grep -q "^PASSED .*::test_every_op_has_its_cpu_and_cuda_kernels$" "$RUN_DIR/tests-not-cuda.log" ||
  fail "the dispatcher test did not pass against the wheel"
"${pytest[@]}" tests/ops/test_cuda_backend.py tests/ops/test_kernels.py -m cuda --junitxml="$RUN_DIR/tests-cuda.xml" \
  > "$RUN_DIR/tests-cuda.log" 2>&1 || true  # all skipped: pytest's exit code says nothing more
"$PYTHON" - "$RUN_DIR/tests-cuda.xml" <<'EOF' || fail "the tests marked cuda (above; log: $RUN_DIR/tests-cuda.log)"
import collections, sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
reasons = collections.Counter()
bad = []
for case in cases:
    skipped = case.find("skipped")
    outcome = [c.tag for c in case if c.tag in ("failure", "error")]
    if skipped is None or outcome:
        bad.append(f"{case.get('classname')}.{case.get('name')}: {'/'.join(outcome) or 'ran'} instead of a skip")
        continue
    reasons[skipped.get("message", "")] += 1
for reason, count in reasons.items():
    print(f"  {count:>4} skipped: {reason}")
    if "NVIDIA driver" not in reason:
        bad.append(f"{count} tests skip with a reason that does not name the missing driver: {reason}")
if not cases:
    bad.append("no test marked cuda was collected (an import error?)")
for line in bad:
    print(f"FAIL: {line}")
sys.exit(1 if bad else 0)
EOF

section "done in $((SECONDS - start)) s (build_wheels.sh ${build_seconds} s)"
if [[ ${#failures[@]} -gt 0 ]]; then
  echo "check_cuda_wheel: ${#failures[@]} check(s) failed:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "check_cuda_wheel: all checks passed ($(basename "$WHEEL"))"
