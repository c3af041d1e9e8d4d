"""Benchmarks of the fused CNL optimizers (GitHub issue 3, "Speed at the memory roofline").

Entry points: ``python bench/optimizer_step.py`` (one optimizer step, case by case, against the
memory roofline), ``python bench/end_to_end.py`` (training steps and a whole CNL epoch of a
Qwen2.5-1.5B-architecture model) and the pytest-benchmark module ``bench/test_bench_optimizer.py``.
See ``bench/README.md``.
"""
