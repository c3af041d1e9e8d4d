"""Storage formats of the reference gradient.

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
    if fmt == "float32" and gradient.dtype != torch.float64:
        return gradient.to(torch.float32, memory_format=dense, copy=True)
    if fmt in ("float32", "bfloat16"):
        target = storage_dtype(fmt)
        stored = gradient.to(target, memory_format=dense, copy=True)
        # keep the sign of values that round to 0 (float64 ones, in float32 too): the smallest normal of
        # that sign (a normal, not a subnormal, so that no flush-to-zero on the way to float32 can lose it)
        underflow = (stored == 0) & (gradient != 0)
        wide = torch.float64 if gradient.dtype == torch.float64 else torch.float32
        tiny = torch.full((), torch.finfo(target).smallest_normal, dtype=wide, device=stored.device)
        return torch.where(underflow, torch.copysign(tiny, gradient.to(wide)).to(target), stored)
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


def stored_slice(stored: torch.Tensor, fmt: str, start: int, end: int) -> torch.Tensor:
    """The stored values of elements ``start:end`` of a reference (flattened); for ``sign2``, whose
    bytes hold 4 elements each, ``start`` must be a multiple of 4."""
    flat = stored.view(-1)
    if fmt != "sign2":
        return flat[start:end]
    if start % 4:
        raise ValueError(f"a slice of a sign2 reference must start at a multiple of 4, got {start}")
    return flat[start // 4:(end + 3) // 4]


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
