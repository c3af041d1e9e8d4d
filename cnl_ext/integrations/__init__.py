"""Integrations with other libraries, imported on demand (each needs its library installed):

- :mod:`cnl_ext.integrations.transformers`: ``CNLTrainer``, a Hugging Face ``Trainer`` with CNL.
- :mod:`cnl_ext.integrations.deepspeed`: the CNL optimizers as DeepSpeed's client optimizer (ZeRO 0-3,
  ZeRO-Offload), ``capture_reference(engine)`` and ``cnl_stats(engine)``.
"""
