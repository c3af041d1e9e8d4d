"""A/B of CNL(torch.optim.RMSprop) on SmolLM2-135M shapes: θ copied into buffers kept between steps
(the wrapper) against a fresh clone per step, beside plain RMSprop, interleaved. Run: PYTHONPATH=. python bench/rmsprop_wrapper_ab.py"""
import time, statistics, torch, cnl_ext
from bench.shapes import param_shapes
from cnl_ext.optim import wrapper
shapes = [s for _, s in param_shapes("smollm2-135m")]
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
for p in params: p.grad = torch.randn_like(p)
refs = [torch.randn_like(p) for p in params]
persistent = wrapper.CNL._copy_before_step
def clone_variant(self, ps):
    return [wrapper.local_tensor(p).clone(memory_format=torch.contiguous_format) for p in ps]
def make(variant):
    wrapper.CNL._copy_before_step = variant
    opt = cnl_ext.CNL(torch.optim.RMSprop(params, lr=1e-7))
    opt.set_reference(refs)
    return opt
plain = torch.optim.RMSprop(params, lr=1e-7)
res = {"plain": [], "persistent": [], "clone": []}
opts = {"persistent": make(persistent), "clone": None}
for rnd in range(4):
    for name in ("plain", "persistent", "clone"):
        if name == "plain": opt = plain
        else:
            wrapper.CNL._copy_before_step = persistent if name == "persistent" else clone_variant
            opt = opts["persistent"]
        opt.step()
        t = []
        for _ in range(3):
            t0 = time.perf_counter(); opt.step(); t.append(time.perf_counter() - t0)
        res[name].append(statistics.median(t) * 1000)
for k, v in res.items(): print(k, [round(x, 1) for x in v], "median", round(statistics.median(v), 1))
