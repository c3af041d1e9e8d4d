"""Quick speed check of the native CPU kernels against torch's fused CPU optimizers (not the benchmark:
see bench/). SmolLM2-135M's 272 parameter tensors (134,515,008 float32 elements), cases interleaved,
median and range of REPS steps each.

    python scripts/quick_cpu_step_speed.py [REPS] [THREADS]

On a machine shared with other jobs, torch's fused optimizers (one OpenMP region per tensor, 272
here) slow down far more than the native kernels (one region per step); THREADS=1 compares
single-threaded, without that effect.
"""
import statistics
import sys
import time

import torch

from cnl_ext import reference_format
from cnl_ext.ops import native_backend


def smollm2_135m_shapes():
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)]
    return [(49152, 576)] + layer * 30 + [(576,)]


def main(reps):
    reason = native_backend.unavailable_reason()
    if reason:
        raise SystemExit(f"native backend unavailable: {reason}")
    torch.manual_seed(0)
    shapes = smollm2_135m_shapes()
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    m, v, buf = ([torch.zeros(s) for s in shapes] for _ in range(3))
    refs = {fmt: [reference_format.encode(torch.randn(s), fmt) for s in shapes] for fmt in ("float32", "sign2")}
    stats = torch.zeros(len(shapes), 3, dtype=torch.float64)

    def torch_fused(cls, **options):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return cls(ps, fused=True, **options).step

    def adam(fmt=None, with_stats=False):
        return lambda: native_backend.adam_step_(
            params, grads, m, v, None, None if fmt is None else refs[fmt], stats if with_stats else None,
            reference_format=fmt or "float32", lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=True, amsgrad=False, maximize=False, bias_correction1=0.1, bias_correction2=0.001)

    def sgd(fmt=None):
        return lambda: native_backend.sgd_step_(
            params, grads, buf, None if fmt is None else refs[fmt], None, reference_format=fmt or "float32",
            lr=1e-3, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False, first_step=False)

    cases = {
        "torch AdamW(fused=True)": torch_fused(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        "native adam_step_, no reference": adam(),
        "native adam_step_, float32 ref": adam("float32"),
        "native adam_step_, sign2 ref": adam("sign2"),
        "native adam_step_, sign2 + stats": adam("sign2", True),
        "torch SGD(momentum, fused=True)": torch_fused(torch.optim.SGD, lr=1e-3, momentum=0.9),
        "native sgd_step_ momentum, no ref": sgd(),
        "native sgd_step_ momentum, fp32 ref": sgd("float32"),
    }
    times = {name: [] for name in cases}
    for step in cases.values():  # warm-up (torch's fused optimizers create their state here)
        step()
    for _ in range(reps):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            times[name].append(1e3 * (time.perf_counter() - start))
    info = native_backend.build_info()
    print(f"{sum(p.numel() for p in params):,} elements in {len(params)} tensors, {torch.get_num_threads()} threads, "
          f"native {info['cpu_capability']} ({info['cpu_build']}), torch {torch.__version__}")
    baselines = {"adam": statistics.median(times["torch AdamW(fused=True)"]),
                 "sgd": statistics.median(times["torch SGD(momentum, fused=True)"])}
    for name, ts in times.items():
        median = statistics.median(ts)
        base = baselines["sgd" if "sgd" in name.lower() else "adam"]
        print(f"{name:38s} {median:7.1f} ms (range {min(ts):.1f}-{max(ts):.1f})  x{median / base:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
