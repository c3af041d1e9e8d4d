"""CNL(torch.optim.RMSprop) on SmolLM2-135M shapes: θ copied into buffers kept between steps (what
the wrapper does) against a fresh clone per step, beside plain RMSprop, interleaved round by round.

    PYTHONPATH=. python bench/rmsprop_wrapper_ab.py
"""
import statistics
import time

import torch

import cnl_ext
from bench.shapes import param_shapes
from cnl_ext.optim import wrapper

ROUNDS, STEPS = 4, 3


def _clone_before_step(self, params):
    """The wrapper's θ copy as it was before the kept buffers: a fresh contiguous clone each step."""
    return [wrapper.local_tensor(p).clone(memory_format=torch.contiguous_format) for p in params]


def main():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for _, shape in param_shapes("smollm2-135m")]
    for p in params:
        p.grad = torch.randn_like(p)
    plain = torch.optim.RMSprop(params, lr=1e-7)
    masked = cnl_ext.CNL(torch.optim.RMSprop(params, lr=1e-7))
    masked.set_reference([torch.randn_like(p) for p in params])
    kept = wrapper.CNL._copy_before_step
    variants = {"plain": (plain, kept), "kept buffers": (masked, kept), "clone per step": (masked, _clone_before_step)}
    medians = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, (opt, copy_before_step) in variants.items():
            wrapper.CNL._copy_before_step = copy_before_step
            opt.step()  # warm up
            times = []
            for _ in range(STEPS):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            medians[name].append(1000 * statistics.median(times))
    wrapper.CNL._copy_before_step = kept
    for name, values in medians.items():
        print(f"{name}: round medians {[round(v, 1) for v in values]} ms, median {statistics.median(values):.1f} ms")


if __name__ == "__main__":
    main()
