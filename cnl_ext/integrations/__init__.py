"""Integrations with other libraries, imported on demand (each needs its library installed):

- :mod:`cnl_ext.integrations.transformers`: ``CNLTrainer``, a Hugging Face ``Trainer`` with CNL.
"""
