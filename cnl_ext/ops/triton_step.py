"""Multi-tensor CNL steps in Triton: what the step kernels share (:mod:`.triton_sgd`,
:mod:`.triton_adam`, :mod:`.triton_masked_delta`, :mod:`.kif_fusion_triton`): one launch, one memory
pass over all tensors of a bucket.

Layout (Apex's multi_tensor_apply, with Triton pointers): the tensors are cut into chunks of
``CHUNK`` elements; program ``i`` of the grid handles chunk ``i``, whose tensor index and start
offset come from a chunk table. A pointer table holds, per tensor, the addresses of the parameter,
the gradient, the optimizer states and the reference (0 where unused). Offsets are 64-bit, so a
tensor may exceed 2**31 elements. The CNL mask lives in registers and is never stored.

Full blocks run unmasked and, when the host found every address 16-byte aligned (``ALIGNED``), with
alignment hints, so that they move data in 16-byte vector accesses; a tensor's last, partial block is
masked. ``bench/kernel_resources.py`` shows the compiled result per specialization.

With statistics, each program writes its chunk's partial sums to a ``[num_chunks, 3]`` buffer that
one ``index_add_`` folds into the per-tensor rows: deterministic, and no host synchronization.

The kernels compute in ``COMPUTE`` (a constexpr): float32 for float32, bfloat16 and float16
parameters, float64 for float64 ones, whose optimizer states, reference values, statistics sums and
hyper-parameters (float64 device scalars: Triton would pass a float as float32) are float64 too.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools

import torch
import triton
import triton.language as tl

from .. import reference_format as _rf
from .chunking import compute_dtype

# Elements per program (loop of BLOCK-sized steps inside it) and per loop step.
CHUNK = 65536
BLOCK = 1024
# No contraction of a*b+c into FMA: the kernels then round exactly as the PyTorch reference's
# separate ops, on every Triton version (3.9 warns that its default, fusion on, will change).
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)

_REF_NONE, _REF_FLOAT, _REF_SIGN2 = 0, 1, 2
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int8: tl.int8,
    torch.uint8: tl.uint8,
}


@triton.jit
def _pointer(table, tensor, column: tl.constexpr, NCOLS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    # pointer_type of Triton 3.0/3.1 refuses a constexpr; the interpreter passes the bare dtype: unwrap both
    ptr = tl.load(table + tensor * NCOLS + column).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    if ALIGNED:  # the host checked that every address is 16-byte aligned: lets full blocks use vector loads
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _scalar(value, ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr):
    """A hyper-parameter given as a float (Triton passes it as float32), or as a pointer to a device
    scalar: a capturable lr (``ON_DEVICE``), or any hyper-parameter of a float64 step (the host passes
    them as float64 device scalars: a float argument would reach the kernel rounded to float32)."""
    if ON_DEVICE or COMPUTE == tl.float64:
        return tl.load(value).to(COMPUTE)
    else:
        return value


@triton.jit
def _div(x, y, COMPUTE: tl.constexpr):
    """x / y correctly rounded: div_rn in float32 (plain ``/`` is approximate there); in float64
    plain ``/`` is IEEE division (div.rn.f64), which div_rn does not take."""
    if COMPUTE == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sqrt(x, COMPUTE: tl.constexpr):
    """sqrt(x) correctly rounded, as :func:`_div`: sqrt_rn in float32, sqrt (sqrt.rn.f64) in float64."""
    if COMPUTE == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _load(ptr, offs, mask):
    """``ptr[offs]``; ``mask`` is None in full blocks, so that nothing stops vectorization."""
    if mask is None:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=mask, other=0)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Round the computed value (float32, or float64 for float64 parameters: then nothing to round)
    to the parameter dtype, to nearest even as torch does.

    bfloat16 is rounded with torch's own bit trick (c10::round_to_nearest_even) before the cast:
    compiled Triton rounds to nearest even too, but Triton's interpreter truncates, and the CPU
    tests must see the same numbers as the GPU.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        return rounded.to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def _load_reference(ref_ptr, offs, mask, REF_KIND: tl.constexpr, COMPUTE: tl.constexpr):
    """Reference values in the compute dtype: the stored value, or -1/0/+1 for the packed 2-bit signs."""
    if REF_KIND == 2:
        byte = _load(ref_ptr, offs // 4, mask)
        code = (byte >> ((offs % 4) * 2).to(tl.uint8)) & 3
        return (code == 1).to(COMPUTE) - (code == 2).to(COMPUTE)
    else:
        return _load(ref_ptr, offs, mask).to(COMPUTE)


@triton.jit
def _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, first element, end of the full blocks, end) of this program's chunk.

    Blocks before the third bound are full and run unmasked; one masked block covers the rest.
    """
    t = tl.load(chunk_tensor + pid).to(tl.int64)
    start = tl.load(chunk_start + pid)  # a multiple of CHUNK, hence of BLOCK
    end = tl.minimum(start + CHUNK, tl.load(numels + t))
    return t, start, end - (end - start) % BLOCK, end


@triton.jit
def _block_offsets(block_start, BLOCK: tl.constexpr):
    offs = block_start + tl.arange(0, BLOCK).to(tl.int64)
    return tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)  # block_start is a multiple of BLOCK


@triton.jit
def _load_param_and_grad(p_ptr, g_ptr, offs, mask, MAXIMIZE: tl.constexpr, COMPUTE: tl.constexpr):
    p = _load(p_ptr, offs, mask).to(COMPUTE)
    g = _load(g_ptr, offs, mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    return p, g


@triton.jit
def _rule_gradient(g, p, r_ptr, f_ptr, a_ptr, offs, mask, two_lambda, agem_coefficient, REF_KIND: tl.constexpr,
                   PROJECT: tl.constexpr, EWC: tl.constexpr, COMPUTE: tl.constexpr):
    """Issue 22's terms (cnl_ext/ops/rules.py), after maximize's sign: g − c·r (A-GEM), then
    + 2λ·(F·(p − θ*)) (EWC), each operation rounded on its own."""
    if PROJECT:
        g = g - agem_coefficient * _load_reference(r_ptr, offs, mask, REF_KIND, COMPUTE)
    if EWC:
        f = _load(f_ptr, offs, mask).to(COMPUTE)
        a = _load(a_ptr, offs, mask).to(COMPUTE)
        g = g + two_lambda * (f * (p - a))
    return g


@triton.jit
def _masked_update(p, new_p, u, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict,
                   REF_KIND: tl.constexpr, STATS: tl.constexpr, COMPUTE: tl.constexpr):
    """Keep ``p`` where ``u`` conflicts with the reference in sign; fold this block's statistics
    (sums in the compute dtype)."""
    if REF_KIND == 0:
        return new_p, acc_count, acc_collab, acc_conflict
    else:
        r = _load_reference(r_ptr, offs, mask, REF_KIND, COMPUTE)
        conflict = ((r > 0) & (u < 0)) | ((r < 0) & (u > 0))  # 0 outside the mask, where r = 0
        if STATS:
            s = r * u
            collaborative = conflict == 0
            if mask is not None:
                collaborative = collaborative & mask
            acc_count += tl.sum(collaborative.to(COMPUTE), axis=0)
            acc_collab += tl.sum(tl.where(collaborative, s, 0.0), axis=0)
            acc_conflict += tl.sum(tl.where(conflict, s, 0.0), axis=0)
        return tl.where(conflict, p, new_p), acc_count, acc_collab, acc_conflict


@triton.jit
def _store_partials(partials, pid, acc_count, acc_collab, acc_conflict, STATS: tl.constexpr):
    if STATS:
        tl.store(partials + pid * 3 + 0, acc_count)
        tl.store(partials + pid * 3 + 1, acc_collab)
        tl.store(partials + pid * 3 + 2, acc_conflict)


@triton.jit
def _importance_update(stored_p, g, s_ptr, u_ptr, offs, mask, imp_beta1, imp_one_minus_beta1, imp_beta2,
                       imp_one_minus_beta2, IMPORTANCE: tl.constexpr):
    """KIF's sensitivity and uncertainty EMAs (cnl_ext.ops.importance, in its order of operations)
    from the stored parameter and the gradient as passed; IMPORTANCE 1: |w·g|, 2: |w·g − ½(w·g)²|.
    float32 EMAs of float32 values, float64 parameters and gradients included (rounded, as the torch
    backend reads them)."""
    if IMPORTANCE != 0:
        x = stored_p.to(tl.float32) * g.to(tl.float32)
        if IMPORTANCE == 1:
            importance = tl.abs(x)
        else:
            importance = tl.abs(x - (x * x) * 0.5)
        sensitivity = _load(s_ptr, offs, mask) * imp_beta1 + importance * imp_one_minus_beta1
        uncertainty = _load(u_ptr, offs, mask) * imp_beta2 + tl.abs(importance - sensitivity) * imp_one_minus_beta2
        tl.store(s_ptr + offs, sensitivity, mask=mask)
        tl.store(u_ptr + offs, uncertainty, mask=mask)


# ----------------------------------------------------------------------------- host side

_chunk_tables: dict = {}
_pointer_tables: dict = {}
_scalar_tables: dict = {}
_TABLE_CACHE_SIZE = 16


def _cached(cache: dict, key, build):
    """A small FIFO cache: tables depend only on sizes and addresses, which rarely change."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= _TABLE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        value = cache[key] = build()
    return value


def _chunk_table(numels: tuple, device: torch.device):
    """(tensor index per chunk, start offset per chunk, numel per tensor) on ``device``."""

    def build():
        if CHUNK % BLOCK:
            raise ValueError(f"CHUNK ({CHUNK}) must be a multiple of BLOCK ({BLOCK}): the kernels align blocks to it")
        n = torch.tensor(numels, dtype=torch.int64)
        chunks_per_tensor = (n + CHUNK - 1) // CHUNK
        tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), chunks_per_tensor)
        first_chunk = torch.cumsum(chunks_per_tensor, 0) - chunks_per_tensor
        start = (torch.arange(tensor_of_chunk.numel()) - first_chunk[tensor_of_chunk]) * CHUNK
        return (tensor_of_chunk.to(torch.int32).to(device), start.to(device), n.to(device))

    return _cached(_chunk_tables, (device, numels, CHUNK), build)


def _pointer_table(columns, device: torch.device):
    """(int64 ``[num_tensors, len(columns)]`` of data pointers, whether all are 16-byte aligned).

    A ``None`` column holds 0. Alignment lets the kernels' full blocks use 16-byte vector accesses;
    views at odd offsets (a flat buffer's slices) take the scalar path instead.
    """
    n = len(columns[0])
    # column by column: one list comprehension per column is the cheapest way to read many pointers
    pointers = tuple(itertools.chain.from_iterable(
        itertools.repeat(0, n) if col is None else [t.data_ptr() for t in col] for col in columns))

    def build():  # on every new set of addresses, e.g. each step when gradients are set to None
        host = torch.tensor(pointers, dtype=torch.int64)
        aligned = not bool((host & 15).any())  # in one vectorized pass: a Python loop costs ~1 ms per 30k pointers
        return host.view(len(columns), n).t().contiguous().to(device), aligned

    return _cached(_pointer_tables, (device, n, pointers), build)


def _device_scalars(scalars, device: torch.device) -> tuple:
    """A float64 step's hyper-parameters for the kernel: each float as a float64 device scalar (a view
    into one tensor; a float argument would reach the kernel rounded to float32), a tensor (a
    capturable lr) as it is. Cached by value, like the tables: a step whose values do not change (a
    CUDA graph's replays) copies nothing to the device."""
    values = tuple(float(s) for s in scalars if not isinstance(s, torch.Tensor))

    def build():
        host = torch.tensor(values, dtype=torch.float64)
        if device.type == "cuda":  # from pinned memory, asynchronously: a pageable copy would wait for the stream
            return host.pin_memory().to(device, non_blocking=True).unbind()
        return host.to(device).unbind()

    on_device = iter(_cached(_scalar_tables, (device, values), build))
    return tuple(s if isinstance(s, torch.Tensor) else next(on_device) for s in scalars)


def _reference_kind(references, fmt):
    if references is None:
        return _REF_NONE, tl.float32
    if fmt == "sign2":
        return _REF_SIGN2, tl.uint8
    return _REF_FLOAT, _TL_DTYPES[references[0].dtype]


# While set (by compile_only), _launch compiles the kernel it would launch and launches nothing.
_compile_only = contextvars.ContextVar("cnl_ext_triton_compile_only", default=False)
_compiled: set = set()  # specializations compiled by compile_only (Triton keeps the binaries)


@contextlib.contextmanager
def compile_only():
    """Within the block, the ops compile the kernels they would launch and write nothing: a multi-bucket
    step compiles every bucket's kernel before the first one writes."""
    token = _compile_only.set(True)
    try:
        yield
    finally:
        _compile_only.reset(token)


def _launch(kernel, columns, params, references, stats, fmt, scalars, weight_decay, float_scalars=(), **constexprs):
    """One launch over ``params``. ``scalars``: the step's hyper-parameters, in the compute dtype
    (float64 device scalars for float64 parameters), starting with ``lr`` (a float or a device scalar);
    ``float_scalars``: float32 ones in every dtype (KIF's EMA betas), after them."""
    device = params[0].device
    if params[0].dtype not in _PARAM_DTYPES:
        raise TypeError(f"the Triton kernels step float32, bfloat16, float16 and float64 parameters, "
                        f"got {params[0].dtype}")
    compute = compute_dtype(params[0].dtype)
    numels = tuple(p.numel() for p in params)
    tensor_of_chunk, chunk_start, numel_table = _chunk_table(numels, device)
    num_chunks = tensor_of_chunk.numel()
    if num_chunks == 0:  # only empty tensors
        return
    ref_kind, r_dtype = _reference_kind(references, fmt)
    track = stats is not None and ref_kind != _REF_NONE
    partials = torch.empty((num_chunks, 3) if track else (1,), dtype=compute, device=device)
    pointer_table, aligned = _pointer_table(columns, device)
    constexprs.update(
        P_DTYPE=_TL_DTYPES[params[0].dtype], R_DTYPE=r_dtype, REF_KIND=ref_kind, STATS=track,
        WEIGHT_DECAY=weight_decay != 0, LR_ON_DEVICE=isinstance(scalars[0], torch.Tensor),
        COMPUTE=_TL_DTYPES[compute], ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK)
    if compute == torch.float64:
        scalars = _device_scalars(scalars, device)
    scalars = (*scalars, *float_scalars)
    args = (pointer_table, tensor_of_chunk, chunk_start, numel_table, partials, *scalars)
    if _compile_only.get():
        key = (kernel, device, tuple(sorted(constexprs.items(), key=lambda item: item[0])),
               tuple(type(a) for a in scalars))
        if key not in _compiled:  # (under the interpreter warmup only checks the arguments)
            kernel.warmup(*args, grid=(num_chunks,), **LAUNCH_OPTIONS, **constexprs)
            _compiled.add(key)
        return
    kernel[(num_chunks,)](*args, **LAUNCH_OPTIONS, **constexprs)
    if track:
        stats.index_add_(0, tensor_of_chunk.to(torch.int64), partials.to(torch.float64))


_IMPORTANCE_KINDS = {"first": 1, "param_mix": 2}


def _rule_args(references, ewc, ewc_lambda, agem_coefficient):
    """(fisher column, anchor column, (2λ, c) as floats, constexprs EWC and PROJECT) of issue 22's
    terms (:mod:`.rules`): c read once to the host (a 0-d tensor)."""
    use_ewc = ewc is not None and ewc_lambda != 0
    project = agem_coefficient is not None and references is not None
    fishers, anchors = ewc if use_ewc else (None, None)
    c = float(agem_coefficient) if project else 0.0
    return fishers, anchors, (2.0 * float(ewc_lambda) if use_ewc else 0.0, c), dict(EWC=use_ewc, PROJECT=project)


def _importance_args(importance, importance_kind, importance_betas):
    """(sensitivity column, uncertainty column, the four EMA scalars, IMPORTANCE constexpr)."""
    if importance is None:
        return None, None, (0.0, 0.0, 0.0, 0.0), 0
    b1, b2 = (float(b) for b in importance_betas)
    sensitivities, uncertainties = importance
    # 1 − β rounded once from the double, as the torch backend's Python scalars are
    return sensitivities, uncertainties, (b1, 1.0 - b1, b2, 1.0 - b2), _IMPORTANCE_KINDS[importance_kind]


assert _rf.SIGN2_POSITIVE == 1 and _rf.SIGN2_NEGATIVE == 2  # the kernels decode these codes
