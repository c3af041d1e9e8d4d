"""Fused multi-tensor CNL kernels. They know nothing of optimizers: they take lists of tensors.

Every backend module (``cnl_ext.ops.triton_step`` in Triton, ``cnl_ext.ops.cuda_step`` for the
C++/CUDA extension) exposes the same two in-place functions::

    sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format, lr,
              weight_decay, momentum, dampening, nesterov, maximize, first_step)
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
               amsgrad, maximize, bias_correction1, bias_correction2, device_steps=None)

Conventions (the caller, ``cnl_ext.functional``, guarantees them; the ops do not re-check):

- ``params``: non-empty list of contiguous tensors on one device, all of one dtype
  (float32, bfloat16 or float16); ``grads`` has the same shapes and dtype.
- Optimizer states (``momentum_buffers``, ``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs``) are
  contiguous float32 tensors shaped like the params; a list not used by the options is ``None``.
- ``references``: ``None`` (plain optimizer, no mask) or one tensor per param in
  ``reference_format`` (see :mod:`cnl_ext.reference_format`).
- ``stats``: ``None`` or a float64 tensor of shape ``[len(params), 3]``; the op *adds* to row ``i``
  (count of collaborative elements, sum of s = r*u over collaborative, sum of s over conflicting).
  Only given together with ``references``.
- Arithmetic in float32 whatever the parameter dtype; the new parameter is rounded once on store.
- Capturable steps (CUDA graphs): ``lr`` may be a 0-d float32 tensor on the params' device, and
  ``adam_step_`` may get ``device_steps`` (one 0-d float32 device tensor per param, already
  incremented) instead of the two bias corrections. A backend that does not support this raises.
"""
