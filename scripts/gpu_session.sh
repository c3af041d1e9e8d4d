#!/usr/bin/env bash
# The checks the issues leave for a GPU, in phases that fit a lent `device` machine: one call of at
# most 10 minutes, 30 minutes of device time per session, a bare machine without package registries,
# and at most 8 files back from $OUT. Each phase writes $OUT/<phase>.log and $OUT/<phase>.tar.gz;
# every call writes $OUT/env.txt (GPU, driver, Python, torch, Triton, CUDA).
#
# Here first: scripts/stage_device_carry.sh. Then, back to back (the GGUF halves wait in /tmp, which the
# machine keeps only while warm, 30 s after a call), in priority order:
#   1. carry .carry/common .carry/gguf.part00   bash scripts/gpu_session.sh tests bench   (issues 2, 6, 3)
#   2. carry .carry/common .carry/gguf.part01   bash scripts/gpu_session.sh e2e wheel     (issues 3, 4)
#   3. carry .carry/common                      bash scripts/gpu_session.sh paper-taught  (issue 5)
#   4. carry .carry/common                      bash scripts/gpu_session.sh paper-rest    (issue 5)
#   5. carry .carry/common                      bash scripts/gpu_session.sh continual     (issue 15)
#   6. carry .carry/common                      bash scripts/gpu_session.sh deepspeed     (issue 23)
#   7. carry .carry/common                      bash scripts/gpu_session.sh methods       (issue 22; after 3)
#   8. carry .carry/common                      bash scripts/gpu_session.sh reference-map (issue 22; after 3)
# Sizes (estimates, not measurements): the paper phases follow docs/results.md section 1 with
# PAPER_LIMIT=400 questions and PAPER_EPOCHS=10; lower them if call 3 runs long. CALL_LIMIT (540 s)
# stops the phases' commands early so that the logs and partial results still come back.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/runs/gpu_session}
STASH=${STASH:-/tmp/cnl_gpu_session}  # outlives a call while the machine stays warm
CALL_LIMIT=${CALL_LIMIT:-540}
PAPER_LIMIT=${PAPER_LIMIT:-400}
PAPER_EPOCHS=${PAPER_EPOCHS:-10}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a line every 30 s, short logs
mkdir -p "$OUT" "$STASH"
deadline=$(($(date +%s) + CALL_LIMIT))

run() {  # a phase's command, stopped at the call's deadline; its failure is logged, not fatal
  local left=$((deadline - $(date +%s)))
  if ((left <= 5)); then echo "SKIPPED (CALL_LIMIT reached): $*"; return 0; fi
  echo "+ $*"
  timeout "$left" "$@" || echo "FAILED (exit $?): $*"
}

write_env() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| triton", triton.__version__, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
    "$PY" -c 'import cnl_ext.ops.native_backend as c; print("native:", c.unavailable_reason() or c.build_info())'
  } > "$OUT/env.txt" 2>&1
}

gguf_file() { echo "$STASH/$(awk '{print $2}' .carry/common/gguf.sha256)"; }  # its name as staged

setup() {  # once per machine: wheels carried in, the package with its CUDA extension, the GGUF
  if ! (cd / && "$PY" -c "import cnl_ext" 2>/dev/null); then
    if compgen -G ".carry/common/wheels/*.whl" >/dev/null; then
      "$PY" -m pip install --quiet --no-deps --no-index .carry/common/wheels/*.whl
    fi
    # the extension for this GPU only (the wheel phase builds the release architectures); if it
    # fails to build, the log says why and the Triton phases still run
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CNL_EXT_BUILD_CUDA=1 MAX_JOBS=$(nproc) \
      "$PY" -m pip install --no-deps --no-build-isolation -e . \
      || CNL_EXT_BUILD_CUDA=0 "$PY" -m pip install --no-deps --no-build-isolation -e .
  fi
  shopt -s nullglob
  for part in .carry/gguf.part*; do cp "$part" "$STASH/"; done
  if [[ ! -f $STASH/gguf.ok && -f $STASH/gguf.part00 && -f $STASH/gguf.part01 ]]; then
    cat "$STASH/gguf.part00" "$STASH/gguf.part01" > "$(gguf_file)"
    (cd "$STASH" && sha256sum --check "$ROOT/.carry/common/gguf.sha256") && touch "$STASH/gguf.ok"
  fi
  write_env
}

gguf_path() {  # the joined GGUF, once its checksum matched
  [[ -f $STASH/gguf.ok ]] || { echo "the SmolLM2 GGUF is not on this machine: carry both halves (calls 1 and 2)" >&2; return 1; }
  gguf_file
}

phase_tests() {  # the whole suite: on a GPU its CUDA tests run the compiled Triton kernels and _C
  run "$PY" -m pytest -n 8 -q -rfEs -p no:cacheprovider --junitxml="$1/junit.xml"
}

phase_bench() {  # issues 3 and 15: step times against torch's fused AdamW and the roofline, with the _C cases
  run "$PY" bench/optimizer_step.py --out "$1"
  run "$PY" bench/optimizer_step.py --params smollm2-135m --sweep-sizes --out "$1/smollm2-135m"
  # issue 15: KIF's fusion passes against the copy bandwidth, Triton and the native CUDA kernels
  run "$PY" bench/importance_fusion.py --device cuda --backend triton --out "$1/fusion-triton"
  run "$PY" bench/importance_fusion.py --device cuda --backend native --out "$1/fusion-native"
}

phase_e2e() {  # issue 3: a training step and a CNL epoch, Qwen2.5-1.5B architecture, random weights
  run "$PY" bench/end_to_end.py --out "$1"
}

phase_wheel() {  # issue 4: build the release wheel, install it apart from the source tree, test from it
  run env TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" CNL_EXT_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PY" -m build --wheel --no-isolation --outdir "$1"
  local wheel site=$STASH/wheel_site
  wheel=$(ls "$1"/cnl_ext-*.whl)
  "$PY" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1])
print(sys.argv[1], z.fp.seek(0, 2), "bytes"); print(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode())
print("\n".join(n for n in z.namelist() if n.endswith(".so")))' "$wheel"
  # A directory of its own on PYTHONPATH, not a venv: python3 there is itself a venv's, whose torch a
  # nested venv would not see. PYTHONPATH comes before site-packages and the editable install of
  # setup(); the check below makes sure that the wheel answers the imports.
  rm -rf "$site" "$STASH/wheel_tests"
  "$PY" -m pip install --quiet --no-deps --no-index --target "$site" "$wheel"
  mkdir "$STASH/wheel_tests" && cp -r tests "$STASH/wheel_tests/"
  (cd "$STASH/wheel_tests" && export PYTHONPATH=$site \
    && "$PY" -c 'import sys, cnl_ext, cnl_ext._C
print("testing", cnl_ext.__file__, cnl_ext._C.__file__); sys.exit(not cnl_ext._C.__file__.startswith(sys.argv[1]))' "$site" \
    && run "$PY" -m pytest -m cuda -n 8 -q -rfE -p no:cacheprovider \
         tests/ops/test_cuda_backend.py tests/ops/test_kernels.py tests/optim/test_optim_vs_torch.py tests/optim/test_wrapper.py)
}

ARC=(.carry/common/data/arc_c_{correct,wrong}_Qwen2.5-1.5B-Instruct.jsonl)
LR="sgd=1e-3 momentum=1e-4 adam=1e-4 adamw=1e-4"  # docs/results.md section 2d (the same protocol on CPU)

phase_paper-taught() {  # issue 5, docs/results.md section 1: teach half, then in-set FT vs CNL
  local model; model=$(gguf_path)
  run "$PY" -m cnl_ext teach --model "$model" --data "${ARC[@]}" --limit "$PAPER_LIMIT" --seed 0 \
    --teach-fraction 0.5 --teach-lr 2e-4 --teach-epochs 10 --teach-margin 1.0 --eval-batch-size 64 --out "$STASH/taught" --overwrite
  run "$PY" -m cnl_ext inject --model "$STASH/taught/model" --mastered "$STASH/taught/mastered.jsonl" \
    --injection "$STASH/taught/injection.jsonl" --optimizers sgd momentum adam adamw --methods ft cnl \
    --lr $LR --epochs "$PAPER_EPOCHS" --eval-batch-size 64 --reference-batch-size 32 --adaptive-reference off --out "$1/in_set"
  mkdir "$1/taught" && find "$STASH/taught" -maxdepth 1 -type f -exec cp {} "$1/taught/" \;  # weights stay here
}

phase_paper-rest() {  # issue 5: Table 2, out-of-set with replay, and the plain protocol beside it
  local model taught=$STASH/taught; model=$(gguf_path)
  run "$PY" -m cnl_ext table2 --model "$taught/model" --mastered "$taught/mastered.jsonl" \
    --injection "$taught/injection.jsonl" --reference-batch-size 32 --out "$1/table2"
  run "$PY" -m cnl_ext out-of-set --model "$taught/model" --mastered "$taught/mastered.jsonl" \
    --injection "$taught/injection.jsonl" --side mastered --methods ft cnl replay --optimizers adamw \
    --lr 1e-4 --epochs "$PAPER_EPOCHS" --eval-batch-size 64 --reference-batch-size 32 --adaptive-reference off \
    --out "$1/out_of_set"
  run "$PY" -m cnl_ext infer-and-split --model "$model" --data "${ARC[@]}" --limit "$PAPER_LIMIT" --seed 0 \
    --eval-batch-size 64 --out "$1/plain"
  run "$PY" -m cnl_ext inject --model "$model" --mastered "$1/plain/mastered.jsonl" \
    --injection "$1/plain/injection.jsonl" --optimizers adamw --methods ft cnl --lr 1e-4 \
    --epochs "$PAPER_EPOCHS" --eval-batch-size 64 --adaptive-reference off --out "$1/plain/in_set"
}

phase_methods() {  # issue 22: the eight inject methods and the CKL update task on paper-taught's split (AdamW)
  local taught=$STASH/taught
  local split=(--model "$taught/model" --mastered "$taught/mastered.jsonl" --injection "$taught/injection.jsonl")
  local all=(--optimizers adamw --methods ft cnl replay lora kore corda ewc agem --lr 1e-4 --epochs "$PAPER_EPOCHS"
             --eval-batch-size 64 --reference-batch-size 32 --adaptive-reference off)  # as docs/results.md 2f
  run "$PY" -m cnl_ext inject "${split[@]}" "${all[@]}" --out "$1/in_set_methods"
  run "$PY" -m cnl_ext ckl "${split[@]}" "${all[@]}" --out "$1/ckl"
}

phase_reference-map() {  # issue 22 part 5: per-epoch, adaptive and per-step references, forgetting and time
  # (docs/results.md 2g on a GPU): paper-taught's split at the rates where 2g's per-epoch CNL forgot, and a
  # taught split of long MMLU prompts (bench/long_prompts.py), Adam 1e-4, as in the issue
  local taught=$STASH/taught long=$STASH/long
  local split=(--model "$taught/model" --mastered "$taught/mastered.jsonl" --injection "$taught/injection.jsonl"
               --optimizers momentum adam --lr momentum=3e-4 adam=1e-4 --epochs 2 --eval-batch-size 64
               --reference-batch-size 32 --no-checkpoints)
  run "$PY" -m cnl_ext inject "${split[@]}" --methods ft cnl --adaptive-reference off --out "$1/taught_epoch"
  run "$PY" -m cnl_ext inject "${split[@]}" --methods cnl --adaptive-reference 0.02 --out "$1/taught_adaptive"
  run "$PY" -m cnl_ext inject "${split[@]}" --methods cnl --adaptive-reference off --reference-every 1 --out "$1/taught_step"
  run "$PY" bench/long_prompts.py --data .carry/common/data --out "$long/pool" --mastered 16 --injection 16
  run "$PY" -m cnl_ext teach --model "$(gguf_path)" --data "$long/pool/mastered.jsonl" "$long/pool/injection.jsonl" \
    --limit 32 --seed 0 --teach-fraction 0.5 --teach-lr 2e-4 --teach-epochs 6 --teach-margin 1.0 --out "$long/taught" --overwrite
  local long_split=(--model "$long/taught/model" --mastered "$long/taught/mastered.jsonl"
                    --injection "$long/taught/injection.jsonl" --optimizers adam --lr 1e-4 --epochs 2 --no-checkpoints)
  run "$PY" -m cnl_ext inject "${long_split[@]}" --methods ft cnl --adaptive-reference off --out "$1/long_epoch"
  run "$PY" -m cnl_ext inject "${long_split[@]}" --methods cnl --adaptive-reference 0.02 --out "$1/long_adaptive"
  run "$PY" -m cnl_ext inject "${long_split[@]}" --methods cnl --adaptive-reference off --reference-every 1 --out "$1/long_step"
}

phase_continual() {  # issues 15, 22: the continual protocol at paper scale (three tasks, all 11 methods, 2 orders)
  local model d=.carry/common/data; model=$(gguf_path)
  run "$PY" -m cnl_ext continual --model "$model" --device cuda \
    --task arc=$d/arc_c_correct_Qwen2.5-1.5B-Instruct.jsonl,$d/arc_c_wrong_Qwen2.5-1.5B-Instruct.jsonl \
    --task csqa=$d/csqa_correct_Qwen2.5-1.5B-Instruct.jsonl,$d/csqa_wrong_Qwen2.5-1.5B-Instruct.jsonl \
    --task mmlu=$d/mmlu_correct_Qwen2.5-1.5B-Instruct.jsonl,$d/mmlu_wrong_Qwen2.5-1.5B-Instruct.jsonl \
    --questions-per-task "${CONTINUAL_QUESTIONS:-200}" --epochs "${CONTINUAL_EPOCHS:-3}" \
    --orders arc,csqa,mmlu mmlu,csqa,arc --adaptive-reference off --out "$1/continual"  # as docs/results.md 2e, 2h
}

phase_deepspeed() {  # issue 23: a CNL optimizer as DeepSpeed's client optimizer on CUDA (NCCL; ZeRO 1-3, the
  # optimizer offloaded from CUDA, bf16), the gloo CPU scenarios and CNLTrainer under DeepSpeed; a few minutes
  "$PY" -m pip install --quiet --no-index --find-links .carry/common/deepspeed "deepspeed>=0.19.8,<0.20" \
    || echo "deepspeed did not install from .carry/common/deepspeed (scripts/stage_device_carry.sh)"
  run "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$1/junit.xml" tests/integrations/test_deepspeed.py
}

(($# > 0)) || { sed -n '2,17p' "$0"; exit 2; }
for phase in "$@"; do
  declare -F "phase_$phase" >/dev/null || { echo "unknown phase $phase" >&2; exit 2; }
done
setup 2>&1 | tee "$OUT/setup.log"
for phase in "$@"; do
  results=$STASH/results/$phase
  rm -rf "$results" && mkdir -p "$results"
  SECONDS=0
  "phase_$phase" "$results" 2>&1 | tee "$OUT/$phase.log" || echo "phase $phase stopped early" | tee -a "$OUT/$phase.log"
  echo "phase $phase: ${SECONDS} s" | tee -a "$OUT/$phase.log"
  tar -czf "$OUT/$phase.tar.gz" -C "$STASH/results" "$phase"
done
