"""The KIF / Recurrent-KIF Triton kernels compile for sm_80 and sm_90 on a machine without a GPU,
keep their values in registers, and use vector accesses when every tensor is 16-byte aligned.

The specializations the host code launches are harvested with cnl_ext/testing/triton_compile.py's recorder
and compiled with its compile_for (Triton's bundled ptxas), in a process without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

HARVEST_AND_COMPILE = r'''
import json
from unittest import mock
import torch
from cnl_ext.testing import triton_compile as kr
from cnl_ext.ops import kif_fusion_triton as kt

recorders = [kr._Recorder(n, getattr(kt, n)) for n in ("_task_vector_kernel", "_recurrent_kernel")]
with mock.patch.multiple(kt, _task_vector_kernel=recorders[0], _recurrent_kernel=recorders[1]):
    for pd, ad in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                   (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        for unaligned in (False, True):
            params, anchors = kr._tensors(pd, unaligned), kr._tensors(ad, unaligned)
            kt.task_vector_fuse_(params, anchors, torch.ones(2), [(0, 5000, 1), (1, 7, 1)])
            scores = [kr._tensors(torch.float32, unaligned) for _ in range(4)]
            for rule in ("code", "paper"):
                for update in (True, False):
                    kt.recurrent_fuse_(params, anchors, anchors, *scores, delta_in=0.5, delta_out=0.5, rule=rule,
                                       update_anchors=update)
rows = []
for spec in dict.fromkeys(s for r in recorders for s in r.specializations()):
    row = {"kernel": spec.kernel, "aligned": dict(spec.constexprs)["ALIGNED"],
           "constexprs": {k: str(v) for k, v in spec.constexprs}}
    for arch in kr.ARCHS:
        row[f"sm_{arch}"] = kr.resources(*kr.compile_for(spec, arch))
    rows.append(row)
print(json.dumps(rows))
'''


@pytest.mark.slow
def test_fusion_kernels_compile_without_spills_and_vectorize_when_aligned():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces the compiler
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", HARVEST_AND_COMPILE], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    # 4 dtype pairs x aligned or not: 8 task-vector and 8 x 2 rules x 2 anchor updates recurrent variants
    assert len(rows) == 8 + 32
    failures = []
    for row in rows:
        for arch in (80, 90):
            r = row[f"sm_{arch}"]
            vectorized = r["vector_loads"] > 0 and r["vector_stores"] > 0
            unvectorized = r["vector_loads"] == 0 and r["vector_stores"] == 0
            if (r["spill_bytes"] or 0) > 0 or not (vectorized if row["aligned"] else unvectorized):
                failures.append(f"{row['kernel']} {row['constexprs']} sm_{arch}: {r}")
    assert not failures, "\n".join(failures)
