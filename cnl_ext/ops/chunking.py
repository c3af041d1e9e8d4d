"""Cache blocking for the plain-PyTorch ops (:mod:`.torch_backend`, :mod:`.importance`).

Run over whole tensors, an op makes one pass over memory per operation and allocates a fresh
full-size temporary per intermediate result. Instead, the ops run their whole sequence of operations
on one :class:`Chunk` at a time: a slice of a large tensor, or several small tensors packed
together, at most :func:`chunk_size` elements, with its temporaries (float32; float64 for the steps of
float64 parameters) in a few buffers reused from chunk to chunk. The chunk's data then stays in cache from one operation to the next and
nothing large is allocated. Every operation is elementwise, so chunking changes no result; only
float64 sums (statistics) are added chunk by chunk.
"""
from __future__ import annotations

import torch

from .. import reference_format as rf

__all__ = ["CPU_CHUNK", "DEVICE_CHUNK", "chunk_size", "compute_dtype", "Chunk", "chunks"]

CPU_CHUNK = 1 << 16  # elements: the few float32 arrays of one chunk (256 KiB each) stay in a core's L2
DEVICE_CHUNK = 1 << 24  # other devices (GPUs): kernel launches, not cache, make small chunks slow


def chunk_size(device: torch.device) -> int:
    """Elements per chunk on ``device``: a multiple of 4, so that a chunk starts on a byte of sign2."""
    return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the steps compute in for parameters of ``param_dtype``: float64 for float64, float32
    for the others (float32, bfloat16, float16)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class Chunk:
    """Elements ``start:end`` of (flattened) tensor ``i`` for each ``(i, start, end)`` in ``pieces``.

    The op reads each list of tensors it needs as one 1-D tensor of :attr:`numel` elements in
    :attr:`dtype` (:meth:`read`), computes in place and in :meth:`scratch` buffers, and stores what it
    changed (:meth:`write`).
    """

    def __init__(self, pieces, buffers: list, size: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.pieces = pieces
        self.sizes = [end - start for _, start, end in pieces]
        self.numel = sum(self.sizes)
        self.dtype = dtype
        self._buffers, self._size, self._device, self._used = buffers, size, device, 0

    @property
    def tensor(self) -> int:
        """The index of the one tensor this chunk lies in (chunks of ``chunks(..., pack=False)``)."""
        ((i, _, _),) = self.pieces
        return i

    def scratch(self) -> torch.Tensor:
        """A buffer of :attr:`numel` elements in :attr:`dtype`, this chunk's own (contents undefined)."""
        if self._used == len(self._buffers):
            self._buffers.append(torch.empty(self._size, dtype=self.dtype, device=self._device))
        self._used += 1
        return self._buffers[self._used - 1][: self.numel]

    def read(self, tensors, *, copy: bool = False) -> torch.Tensor:
        """This chunk of ``tensors`` in :attr:`dtype`: a view of the tensor itself when that is one
        slice of that dtype (unless ``copy``, for a copy the op may overwrite), else a copy (rounded to
        nearest where it narrows) in a scratch buffer."""
        pieces = self._slices(tensors)
        if len(pieces) == 1 and pieces[0].dtype == self.dtype and not copy:
            return pieces[0]
        return self._gather(pieces)

    def read_reference(self, references, fmt: str) -> torch.Tensor:
        """This chunk of the stored ``references`` decoded (:func:`cnl_ext.reference_format.decode`), in
        :attr:`dtype` (float32 values, exact in float64 too)."""
        values = [rf.decode(rf.stored_slice(references[i], fmt, start, end), fmt, (end - start,))
                  for i, start, end in self.pieces]
        return values[0] if len(values) == 1 and values[0].dtype == self.dtype else self._gather(values)

    def write(self, tensors, values: torch.Tensor) -> None:
        """Store ``values`` into this chunk of ``tensors``, rounded to their dtype; nothing to do when
        ``values`` is the view :meth:`read` returned (computed in place)."""
        pieces = self._slices(tensors)
        if len(pieces) == 1:
            if values.data_ptr() != pieces[0].data_ptr():
                pieces[0].copy_(values)
        else:
            torch._foreach_copy_(pieces, list(values.split(self.sizes)))

    def add_sums(self, rows: torch.Tensor, values) -> None:
        """``rows[i, k] += Σ values[k]`` over the elements of tensor ``i`` in this chunk, in float64."""
        parts = [v.split(self.sizes) for v in values]
        for piece, (i, _, _) in enumerate(self.pieces):
            rows[i] += torch.stack([part[piece].sum(dtype=torch.float64) for part in parts])

    def _slices(self, tensors):
        return [tensors[i].view(-1)[start:end] for i, start, end in self.pieces]

    def _gather(self, pieces) -> torch.Tensor:
        out = self.scratch()
        if len(pieces) == 1:
            out.copy_(pieces[0])
        else:
            torch._foreach_copy_(list(out.split(self.sizes)), pieces)
        return out


def chunks(tensors, *, pack: bool = True, dtype: torch.dtype = torch.float32):
    """The chunks that cover ``tensors`` (a non-empty list of contiguous tensors on one device), one
    after the other, computing in ``dtype``; their scratch buffers are shared, so use each before
    taking the next.

    A tensor of more than :func:`chunk_size` elements is cut into chunks of that size; smaller ones
    are packed together up to that size, or with ``pack=False`` (per-tensor scalars, such as the
    device step counts of a capturable step) each make their own chunk. Empty tensors are skipped.
    """
    device = tensors[0].device
    size = chunk_size(device)
    if size % 4:
        raise ValueError(f"the chunk size must be a multiple of 4 (sign2 references), got {size}")
    buffers, group, group_numel = [], [], 0
    for i, t in enumerate(tensors):
        numel = t.numel()
        if numel > size or not pack:
            for start in range(0, numel, size):
                yield Chunk([(i, start, min(start + size, numel))], buffers, size, device, dtype)
        elif numel:
            if group_numel + numel > size:
                yield Chunk(group, buffers, size, device, dtype)
                group, group_numel = [], 0
            group.append((i, 0, numel))
            group_numel += numel
    if group:
        yield Chunk(group, buffers, size, device, dtype)
