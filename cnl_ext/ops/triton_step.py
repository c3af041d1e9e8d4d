"""Multi-tensor CNL steps in Triton: one launch, one memory pass over all tensors of a bucket.

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


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, r_ptr, s_ptr, u_ptr, offs, mask, lr, weight_decay, momentum,
               one_minus_dampening, imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
               acc_count, acc_collab, acc_conflict,
               P_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
               MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr, COMPUTE: tl.constexpr):
    p, g = _load_param_and_grad(p_ptr, g_ptr, offs, mask, MAXIMIZE, COMPUTE)
    g_passed = -g if MAXIMIZE else g
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    u = g
    if HAS_MOMENTUM:
        if FIRST_STEP:  # torch.optim.SGD starts the buffer at the first gradient, undamped
            b = g
        else:
            b = momentum * _load(b_ptr, offs, mask) + one_minus_dampening * g
        tl.store(b_ptr + offs, b, mask=mask)
        if NESTEROV:
            u = g + momentum * b
        else:
            u = b
    new_p, acc_count, acc_collab, acc_conflict = _masked_update(
        p, p - lr * u, u, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict, REF_KIND, STATS, COMPUTE)
    stored_p = _round_to(new_p, P_DTYPE)
    tl.store(p_ptr + offs, stored_p, mask=mask)
    _importance_update(stored_p, g_passed, s_ptr, u_ptr, offs, mask, imp_beta1, imp_one_minus_beta1, imp_beta2,
                       imp_one_minus_beta2, IMPORTANCE)
    return acc_count, acc_collab, acc_conflict


@triton.jit
def _sgd_kernel(
    ptr_table, chunk_tensor, chunk_start, numels, partials,
    lr, weight_decay, momentum, one_minus_dampening, imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
    P_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr, REF_KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # pointer table columns: param, grad, momentum buffer, reference, sensitivity, uncertainty.
    # COMPUTE: the arithmetic's, the momentum buffer's and the sums' dtype (float64 for float64 params).
    pid = tl.program_id(0)
    lr = _scalar(lr, LR_ON_DEVICE, COMPUTE)
    weight_decay = _scalar(weight_decay, False, COMPUTE)
    momentum = _scalar(momentum, False, COMPUTE)
    one_minus_dampening = _scalar(one_minus_dampening, False, COMPUTE)
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 6, P_DTYPE, ALIGNED)
    g_ptr = _pointer(ptr_table, t, 1, 6, P_DTYPE, ALIGNED)
    b_ptr = _pointer(ptr_table, t, 2, 6, COMPUTE, ALIGNED)
    r_ptr = _pointer(ptr_table, t, 3, 6, R_DTYPE, ALIGNED)
    s_ptr = _pointer(ptr_table, t, 4, 6, tl.float32, ALIGNED)
    u_ptr = _pointer(ptr_table, t, 5, 6, tl.float32, ALIGNED)
    acc_count = tl.zeros((), COMPUTE)
    acc_collab = tl.zeros((), COMPUTE)
    acc_conflict = tl.zeros((), COMPUTE)
    for block_start in range(start, full_end, BLOCK):
        acc_count, acc_collab, acc_conflict = _sgd_block(
            p_ptr, g_ptr, b_ptr, r_ptr, s_ptr, u_ptr, _block_offsets(block_start, BLOCK), None,
            lr, weight_decay, momentum, one_minus_dampening, imp_beta1, imp_one_minus_beta1, imp_beta2,
            imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, HAS_MOMENTUM, FIRST_STEP, NESTEROV, WEIGHT_DECAY, MAXIMIZE, STATS, IMPORTANCE,
            COMPUTE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        acc_count, acc_collab, acc_conflict = _sgd_block(
            p_ptr, g_ptr, b_ptr, r_ptr, s_ptr, u_ptr, offs, offs < end,
            lr, weight_decay, momentum, one_minus_dampening, imp_beta1, imp_one_minus_beta1, imp_beta2,
            imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, HAS_MOMENTUM, FIRST_STEP, NESTEROV, WEIGHT_DECAY, MAXIMIZE, STATS, IMPORTANCE,
            COMPUTE)
    _store_partials(partials, pid, acc_count, acc_collab, acc_conflict, STATS)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, offs, mask,
                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
                lr_weight_decay, step_size, bias_correction2_sqrt,
                imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
                acc_count, acc_collab, acc_conflict,
                P_DTYPE: tl.constexpr, REF_KIND: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STATS: tl.constexpr,
                IMPORTANCE: tl.constexpr, COMPUTE: tl.constexpr):
    p, g = _load_param_and_grad(p_ptr, g_ptr, offs, mask, MAXIMIZE, COMPUTE)
    g_passed = -g if MAXIMIZE else g
    if WEIGHT_DECAY and not DECOUPLED:
        g = g + weight_decay * p
    m = beta1 * _load(m_ptr, offs, mask) + one_minus_beta1 * g
    v = beta2 * _load(v_ptr, offs, mask) + one_minus_beta2 * (g * g)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(_load(vmax_ptr, offs, mask), v)
        tl.store(vmax_ptr + offs, v, mask=mask)
    # torch.optim's order: step = (step_size·m) / denom; the mask and the statistics see lr·u
    denom = _div(_sqrt(v, COMPUTE), bias_correction2_sqrt, COMPUTE) + eps
    step = _div(step_size * m, denom, COMPUTE)
    if WEIGHT_DECAY and DECOUPLED:
        lr_u = step + lr_weight_decay * p
        new_p = p * one_minus_lr_wd - step  # torch.optim.AdamW's order
    else:
        lr_u = step
        new_p = p - step
    new_p, acc_count, acc_collab, acc_conflict = _masked_update(
        p, new_p, lr_u, r_ptr, offs, mask, acc_count, acc_collab, acc_conflict, REF_KIND, STATS, COMPUTE)
    stored_p = _round_to(new_p, P_DTYPE)
    tl.store(p_ptr + offs, stored_p, mask=mask)
    _importance_update(stored_p, g_passed, s_ptr, u_ptr, offs, mask, imp_beta1, imp_one_minus_beta1, imp_beta2,
                       imp_one_minus_beta2, IMPORTANCE)
    return acc_count, acc_collab, acc_conflict


@triton.jit
def _adam_kernel(
    ptr_table, chunk_tensor, chunk_start, numels, partials,
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
    lr_weight_decay, step_size, bias_correction2_sqrt, imp_beta1, imp_one_minus_beta1, imp_beta2, imp_one_minus_beta2,
    P_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr, REF_KIND: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, STATS: tl.constexpr, IMPORTANCE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr, COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # pointer table columns: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, reference, (unused),
    # sensitivity, uncertainty. COMPUTE: the arithmetic's, the moments' and the sums' dtype (float64
    # for float64 params).
    pid = tl.program_id(0)
    lr = _scalar(lr, LR_ON_DEVICE, COMPUTE)
    beta1 = _scalar(beta1, False, COMPUTE)
    one_minus_beta1 = _scalar(one_minus_beta1, False, COMPUTE)
    beta2 = _scalar(beta2, False, COMPUTE)
    one_minus_beta2 = _scalar(one_minus_beta2, False, COMPUTE)
    eps = _scalar(eps, False, COMPUTE)
    weight_decay = _scalar(weight_decay, False, COMPUTE)
    one_minus_lr_wd = _scalar(one_minus_lr_wd, False, COMPUTE)
    lr_weight_decay = _scalar(lr_weight_decay, False, COMPUTE)
    if LR_ON_DEVICE:  # the host computed lr·λ and 1 − lr·λ for a float lr; with a device lr, as the torch backend does
        lr_weight_decay = lr * weight_decay
        one_minus_lr_wd = 1 - lr_weight_decay
    t, start, full_end, end = _chunk_bounds(chunk_tensor, chunk_start, numels, pid, CHUNK, BLOCK)
    p_ptr = _pointer(ptr_table, t, 0, 9, P_DTYPE, ALIGNED)
    g_ptr = _pointer(ptr_table, t, 1, 9, P_DTYPE, ALIGNED)
    m_ptr = _pointer(ptr_table, t, 2, 9, COMPUTE, ALIGNED)
    v_ptr = _pointer(ptr_table, t, 3, 9, COMPUTE, ALIGNED)
    vmax_ptr = _pointer(ptr_table, t, 4, 9, COMPUTE, ALIGNED)
    r_ptr = _pointer(ptr_table, t, 5, 9, R_DTYPE, ALIGNED)
    s_ptr = _pointer(ptr_table, t, 7, 9, tl.float32, ALIGNED)
    u_ptr = _pointer(ptr_table, t, 8, 9, tl.float32, ALIGNED)
    if STEP_ON_DEVICE:  # this tensor's step size and sqrt(bc2), which the host computed on the device
        step_size = tl.load(step_size + t)
        bias_correction2_sqrt = tl.load(bias_correction2_sqrt + t)
    else:
        step_size = _scalar(step_size, False, COMPUTE)
        bias_correction2_sqrt = _scalar(bias_correction2_sqrt, False, COMPUTE)
    acc_count = tl.zeros((), COMPUTE)
    acc_collab = tl.zeros((), COMPUTE)
    acc_conflict = tl.zeros((), COMPUTE)
    for block_start in range(start, full_end, BLOCK):
        acc_count, acc_collab, acc_conflict = _adam_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, _block_offsets(block_start, BLOCK), None,
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
            lr_weight_decay, step_size, bias_correction2_sqrt, imp_beta1, imp_one_minus_beta1, imp_beta2,
            imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, STATS, IMPORTANCE, COMPUTE)
    if full_end < end:
        offs = _block_offsets(full_end, BLOCK)
        acc_count, acc_collab, acc_conflict = _adam_block(
            p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, r_ptr, s_ptr, u_ptr, offs, offs < end,
            lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, one_minus_lr_wd,
            lr_weight_decay, step_size, bias_correction2_sqrt, imp_beta1, imp_one_minus_beta1, imp_beta2,
            imp_one_minus_beta2, acc_count, acc_collab, acc_conflict,
            P_DTYPE, REF_KIND, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, STATS, IMPORTANCE, COMPUTE)
    # the sums of lr·u, scaled by 1/lr (0 at lr = 0, where nothing moves)
    inv_lr = tl.where(lr == 0, 0.0, _div(tl.full((), 1.0, COMPUTE), tl.where(lr == 0, 1.0, lr), COMPUTE))
    _store_partials(partials, pid, acc_count, acc_collab * inv_lr, acc_conflict * inv_lr, STATS)


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


def _importance_args(importance, importance_kind, importance_betas):
    """(sensitivity column, uncertainty column, the four EMA scalars, IMPORTANCE constexpr)."""
    if importance is None:
        return None, None, (0.0, 0.0, 0.0, 0.0), 0
    b1, b2 = (float(b) for b in importance_betas)
    sensitivities, uncertainties = importance
    # 1 − β rounded once from the double, as the torch backend's Python scalars are
    return sensitivities, uncertainties, (b1, 1.0 - b1, b2, 1.0 - b2), _IMPORTANCE_KINDS[importance_kind]


def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool, importance=None, importance_kind: str = "first",
              importance_betas=(0.85, 0.85)) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.ops.torch_backend.sgd_step_` for the math."""
    sensitivities, uncertainties, importance_scalars, importance_code = _importance_args(
        importance, importance_kind, importance_betas)
    _launch(
        _sgd_kernel, (params, grads, momentum_buffers, references, sensitivities, uncertainties), params,
        references, stats, reference_format, (lr, weight_decay, momentum, 1.0 - dampening), weight_decay,
        importance_scalars, HAS_MOMENTUM=momentum_buffers is not None, FIRST_STEP=first_step, NESTEROV=nesterov,
        MAXIMIZE=maximize, IMPORTANCE=importance_code,
    )


def _adam_step_scalars(params, lr, beta1, beta2, bias_correction1, bias_correction2, device_steps):
    """(step size, sqrt(bc2)) of the step: floats (the kernel rounds them once), or with a device lr or
    device step counts, one of each per tensor in device arrays, from the definition's torch ops
    (:mod:`cnl_ext.optim.adam`: Triton's interpreter has no pow)."""
    from ..optim.adam import capturable_bias_corrections, step_size_of

    if device_steps is None and not isinstance(lr, torch.Tensor):
        return lr / bias_correction1, bias_correction2**0.5
    dtype, device, n = compute_dtype(params[0].dtype), params[0].device, len(params)
    if device_steps is None:
        step_size = step_size_of(lr, bias_correction1, dtype).expand(n).contiguous()
        return step_size, torch.full((n,), bias_correction2**0.5, dtype=dtype, device=device)
    corrections = [capturable_bias_corrections(beta1, beta2, step, dtype) for step in device_steps]
    return (torch.stack([step_size_of(lr, bc1, dtype) for bc1, _ in corrections]),
            torch.stack([bc2_sqrt for _, bc2_sqrt in corrections]))


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85)) -> None:
    """See :mod:`cnl_ext.ops` for the contract and :func:`cnl_ext.ops.torch_backend.adam_step_` for the math."""
    sensitivities, uncertainties, importance_scalars, importance_code = _importance_args(
        importance, importance_kind, importance_betas)
    # derived constants in double, rounded once (as torch's Python-float hyper-parameters are)
    host_lr = not isinstance(lr, torch.Tensor)
    one_minus_lr_wd, lr_weight_decay = (1.0 - lr * weight_decay, lr * weight_decay) if host_lr else (0.0, 0.0)
    step_size, bias_correction2_sqrt = _adam_step_scalars(params, lr, beta1, beta2, bias_correction1,
                                                          bias_correction2, device_steps)
    on_device = isinstance(step_size, torch.Tensor)
    _launch(
        _adam_kernel,
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, references, None,
         sensitivities, uncertainties),
        params, references, stats, reference_format,
        (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, one_minus_lr_wd, lr_weight_decay,
         step_size, bias_correction2_sqrt),
        weight_decay, importance_scalars, DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        STEP_ON_DEVICE=on_device, IMPORTANCE=importance_code,
    )


assert _rf.SIGN2_POSITIVE == 1 and _rf.SIGN2_NEGATIVE == 2  # the kernels decode these codes
