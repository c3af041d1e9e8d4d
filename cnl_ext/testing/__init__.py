"""What the tests and the benchmarks share, as ``torch.testing`` is for torch's.

- :mod:`cnl_ext.testing.authors_oracle`: the authors' CNL loops, per tensor and unfused: the oracle the
  tests hold the fused optimizers to, and the baseline the benchmarks time them against.
- :mod:`cnl_ext.testing.triton_compile`: every Triton kernel specialization the host code launches,
  compiled for sm_80 / sm_90 without a GPU, with the resources ptxas gave it (a test asserts them,
  ``bench/kernel_resources.py`` reports them).

Nothing here is imported by the optimizers; ``tests/`` and ``bench/`` import it, never each other.
"""
