"""Storage formats of the reference gradient, and the CNL mask against it (:func:`conflicting`, the
one definition of the sign test, and :func:`apply_mask`, the masked write of one tensor and its
statistics, which the optimizers' definitions share).

The CNL mask depends only on the signs of the reference (spec: ``sign(r)*sign(u) >= 0``), so the
reference can be stored compactly:

=========== ============================ ===================================================
format      storage                      bytes per element
=========== ============================ ===================================================
float32     the mean gradient            4
bfloat16    the mean gradient, rounded   2
int8        its sign: -1, 0 or +1        1
sign2       its sign packed 4 per byte   0.25 (code 0: zero, 1: positive, 2: negative;
                                         element ``i`` at bits ``2*(i % 4)`` of byte ``i // 4``)
=========== ============================ ===================================================

The sign formats keep every sign exactly; bfloat16 keeps it too, since a nonzero value that would
round to 0 (0 counts as collaborative) is stored as the smallest normal bfloat16 of its sign. So every format gives the same mask as float32. The statistics ``s = r*u`` use the stored value (``±1`` for the
sign formats).

float64 parameters use the same formats: the format names the storage, so ``"float32"`` stores a
float64 mean gradient rounded to float32 (a nonzero value below float32's range as the smallest normal
float32 of its sign, a finite value beyond it as the largest finite float32 of its sign, so that the
sign is kept and the stored value stays finite). The kernels decode the stored value exactly into
float64 and compute the mask and ``s = r*u`` (in float64) against the float64 update, so the mask of a
float64 step is that of its float64 mean gradient in every format.
"""
from __future__ import annotations

import torch

FORMATS = ("float32", "bfloat16", "int8", "sign2")

_ALIASES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.int8: "int8",
    "fp32": "float32",
    "bf16": "bfloat16",
    "sign": "int8",
}

SIGN2_ZERO, SIGN2_POSITIVE, SIGN2_NEGATIVE = 0, 1, 2


def canonical_format(reference_dtype) -> str:
    """Normalize a user's ``reference_dtype`` (a name or a torch dtype) to one of :data:`FORMATS`."""
    name = _ALIASES.get(reference_dtype, reference_dtype)
    if name not in FORMATS:
        raise ValueError(
            f"reference_dtype must be one of {FORMATS} (or torch.float32/bfloat16/int8), "
            f"got {reference_dtype!r}"
        )
    return name


def storage_dtype(fmt: str) -> torch.dtype:
    """The dtype of a stored reference in format ``fmt``."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8, "sign2": torch.uint8}[fmt]


def storage_numel(numel: int, fmt: str) -> int:
    """Number of stored elements for a reference of ``numel`` values."""
    return (numel + 3) // 4 if fmt == "sign2" else numel


def encode(gradient: torch.Tensor, fmt: str) -> torch.Tensor:
    """Return a new contiguous tensor holding ``gradient`` in format ``fmt`` (flat for ``sign2``)."""
    dense = torch.contiguous_format
    if fmt == "float32":
        stored = gradient.to(torch.float32, memory_format=dense, copy=True)
        # a float64 gradient may lie beyond float32's range (a float32 one always lies within it)
        return _keep_signs(stored, gradient) if gradient.dtype == torch.float64 else stored
    if fmt == "bfloat16":
        return _keep_signs(gradient.to(torch.bfloat16, memory_format=dense, copy=True), gradient)
    if fmt == "int8":
        return torch.sign(gradient).to(torch.int8, memory_format=dense)
    # sign2: per element code (1 positive, 2 negative, 0 zero), four codes per byte.
    flat = gradient.reshape(-1)
    codes = (flat > 0).to(torch.uint8) | ((flat < 0).to(torch.uint8) << 1)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def _keep_signs(stored: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``stored`` (``gradient`` rounded to a narrower dtype) with the sign of every value kept and every
    finite value finite: a nonzero value that rounded to 0 (0 counts as collaborative) becomes the
    smallest normal of its sign (a normal, not a subnormal, so that no flush-to-zero on the way to
    float32 can lose it either), a finite one that rounded to ±inf the largest finite of its sign."""
    info = torch.finfo(stored.dtype)
    wide = torch.float64 if gradient.dtype == torch.float64 else torch.float32
    signs = gradient.to(wide)
    underflow = (stored == 0) & (gradient != 0)
    overflow = torch.isinf(stored) & torch.isfinite(gradient)
    tiny = torch.full((), info.smallest_normal, dtype=wide, device=stored.device)
    largest = torch.full((), info.max, dtype=wide, device=stored.device)
    stored = torch.where(underflow, torch.copysign(tiny, signs).to(stored.dtype), stored)
    return torch.where(overflow, torch.copysign(largest, signs).to(stored.dtype), stored)


def stored_slice(stored: torch.Tensor, fmt: str, start: int, end: int) -> torch.Tensor:
    """The stored values of elements ``start:end`` of a reference (flattened); for ``sign2``, whose
    bytes hold 4 elements each, ``start`` must be a multiple of 4."""
    flat = stored.view(-1)
    if fmt != "sign2":
        return flat[start:end]
    if start % 4:
        raise ValueError(f"a slice of a sign2 reference must start at a multiple of 4, got {start}")
    return flat[start // 4:(end + 3) // 4]


def conflicting(reference: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The CNL sign test, the one definition of the mask: True where ``sign(r)·sign(u) < 0``.

    Defined by signs, so an element whose reference or update is exactly 0 (or NaN) is collaborative
    (``r·u`` itself could underflow to 0); ``u`` may be any positive multiple of the update direction
    (``lr·u``), which has its signs.
    """
    return torch.sign(reference) * torch.sign(update) < 0


def apply_mask(param: torch.Tensor, old: torch.Tensor, new: torch.Tensor, update: torch.Tensor,
               stored, fmt: str):
    """The CNL write of one tensor: ``param ← old`` where :func:`conflicting` (``r``, ``update``), else
    ``new`` (everywhere without a reference, ``stored`` None), rounded once to ``param``'s dtype.

    Returns None without a reference, else the statistics, float64 ``[3]``: (collaborative count, Σ s
    over the collaborative elements, Σ s over the conflicting ones), ``s = r·update`` in the compute
    dtype (that of ``update``; ``r`` decoded, :func:`decode`) summed in float64.
    """
    if stored is None:
        param.copy_(new)
        return None
    r = decode(stored, fmt, param.shape).to(update.dtype)
    conflict = conflicting(r, update)
    param.copy_(torch.where(conflict, old, new))
    s = (r * update).flatten()
    collaborative = ~conflict.flatten()
    return torch.stack([collaborative.sum(dtype=torch.float64), s[collaborative].sum(dtype=torch.float64),
                        s[~collaborative].sum(dtype=torch.float64)])


def decode(stored: torch.Tensor, fmt: str, shape: torch.Size) -> torch.Tensor:
    """Float32 values of a stored reference (signs as ``-1, 0, +1`` for the sign formats)."""
    if fmt != "sign2":
        return stored.to(torch.float32).reshape(shape)
    numel = 1
    for d in shape:
        numel *= d
    shifts = torch.arange(0, 8, 2, device=stored.device, dtype=torch.uint8)
    codes = ((stored.unsqueeze(1) >> shifts) & 3).reshape(-1)[:numel]
    values = (codes == SIGN2_POSITIVE).to(torch.float32) - (codes == SIGN2_NEGATIVE).to(torch.float32)
    return values.reshape(shape)
