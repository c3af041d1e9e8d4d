"""The ops contract: fused multi-tensor CNL kernels, which know nothing of optimizers.

Layers: ``cnl_ext.ops`` (this package: backends that take lists of tensors; :mod:`.contract` declares
the ops and the capabilities as data) → :mod:`cnl_ext.registry` (backend choice) and
:mod:`cnl_ext.planning` (buckets, launches) → :mod:`cnl_ext.functional` (the functional API, checks
before writes) and :mod:`cnl_ext.kif` → :mod:`cnl_ext.optim` (the ``torch.optim.Optimizer`` classes) →
experiments and integrations.

Backends
--------
One module per backend, registered in :data:`cnl_ext.registry.BACKEND_MODULES`:

========== ============================== =======================================================
name       module                         what
========== ============================== =======================================================
``torch``  :mod:`.torch_backend`          plain PyTorch, any device: the oracle and the definition
                                          of rounding
``triton`` :mod:`.triton_backend`         Triton kernels (:mod:`.triton_sgd`, :mod:`.triton_adam`,
                                          :mod:`.triton_masked_delta`; shared: :mod:`.triton_step`):
                                          CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
``native`` :mod:`.native_backend`         the compiled extension: C++ CPU kernels and, where built
                                          with a CUDA toolkit, CUDA kernels (old name ``cuda``)
========== ============================== =======================================================

Each backend module exposes ``NAME``, ``unavailable_reason() -> str`` (``""`` when it can run in
this process; else why: not installed, not built, failed to build), ``capabilities(device) ->``
:class:`.contract.Capabilities` (the ops it runs there; ``float64``: the steps take float64
parameters; ``capturable``; ``importance``: the steps take the importance keywords below; ``reason``:
why an op is missing, for error messages), the ops, and optionally ``prepare(op, *args, **kwargs)``
(compile what the call would launch, writing nothing). Only an import or build failure, which happens
before anything is written, may move ``backend="auto"`` to the next backend; an error inside an op
propagates and is never retried. The backend is resolved once per step, before anything is written.

Ops (in place)
--------------
Each declared once in :mod:`.contract` (:class:`.contract.OpSpec`: the tensor lists it writes and
reads, in order, its other arguments and keyword options), which :mod:`cnl_ext.planning` builds every
call from, and once as a C++ schema (``csrc/cnl_binding.h``), which the tests check against it::

    sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format, lr,
              weight_decay, momentum, dampening, nesterov, maximize, first_step,
              importance=None, importance_kind="first", importance_betas=(0.85, 0.85))
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
               amsgrad, maximize, bias_correction1=None, bias_correction2=None, device_steps=None,
               importance=None, importance_kind="first", importance_betas=(0.85, 0.85))
    masked_delta_(params, befores, references, stats, *, reference_format, inv_lr)

Importance (KIF's EMAs, issue 15): a step given ``importance=(sensitivities, uncertainties)``
(contiguous float32 tensors shaped like the params) also updates them in the same pass, from the new
parameter as stored and the gradient as passed, with ``importance_kind`` (``"first"`` or
``"param_mix"``) and ``importance_betas``, exactly as :func:`.importance.importance_update_` after the
step (its docstring defines the rounding). Only a backend whose ``capabilities(device).importance`` is
True gets these keywords; for the others :mod:`cnl_ext.planning` runs ``importance_update_`` after the
step. Params, states and statistics are the same bits with or without importance. The native ops take
them as the optional keyword lists ``sensitivities`` and ``uncertainties`` of the same op.

KIF's fusion passes (:mod:`cnl_ext.kif` validates them and launches them through
:mod:`cnl_ext.planning`, bucketed by (param dtype, anchor dtype); not step ops: no importance, no
statistics; math, rounding and arguments:
:mod:`.kif_fusion_torch`, the oracle)::

    kif_task_vector_fuse_(params, anchors, coefficients, unit_maps)
    kif_recurrent_fuse_(params, anchors, inner_ends, inner_sensitivities, inner_uncertainties,
                        outer_sensitivities, outer_uncertainties, *, delta_in, delta_out, rule,
                        update_anchors)

``masked_delta_`` is the write-back of :class:`cnl_ext.CNL`: ``params`` hold θ after any optimizer's
step and ``befores`` θ before it; where ``u = −(θ_after − θ_before)`` conflicts with the reference,
θ_before is put back (the statistics use ``u·inv_lr``).

Conventions (:mod:`cnl_ext.functional` and :mod:`cnl_ext.planning` guarantee them; the Python backends do not re-check, the C++
binding does, since a wrong pointer there corrupts memory):

- ``params``: a non-empty list of **contiguous** tensors on one device, of one dtype (float32,
  bfloat16, float16, or float64 where ``capabilities(device).float64``); ``grads``: the same shapes and
  dtype, contiguous. (functional hands a
  non-contiguous parameter, state or reference over as a contiguous copy and copies written ones back.)
- Optimizer states (``momentum_buffers``, ``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs``):
  contiguous tensors shaped like the params, float32 (float64 for float64 params:
  :func:`cnl_ext.functional.state_dtype`); a list the options do not use is ``None``.
- ``references``: ``None`` (plain optimizer, no mask) or one contiguous tensor per param in
  ``reference_format`` (:mod:`cnl_ext.reference_format`: float32, bfloat16, int8 signs, or sign2:
  a flat uint8 tensor of 2-bit codes).
- ``stats``: ``None`` or a float64 ``[len(params), 3]`` tensor; the op *adds* to row ``i``
  (collaborative count, Σ s over collaborative, Σ s over conflicting), ``s = r·u``. Only with references.
- Arithmetic in float32 for float32, bfloat16 and float16 params, in float64 for float64 params
  (hyper-parameters, reference values, mask and ``s = r·u`` included: no downcast), in the order of
  :mod:`.torch_backend`, each operation rounded on its own (no FMA contraction); the new parameter is
  rounded once, to nearest even, on store. KIF's importance EMAs stay float32 (they read a float64
  parameter and gradient rounded to float32). An element is frozen where ``sign(r)·sign(u) < 0`` (an exact 0 is collaborative);
  the states are updated everywhere.
- Capturable steps (CUDA graphs): ``lr`` may be a 0-d float32 tensor on the params' device, and
  ``adam_step_`` may get ``device_steps`` (one 0-d float32 device tensor per param, already
  incremented) instead of the bias corrections; ``capabilities(device).capturable`` says whether a
  backend can.
- An op writes ``params``, the state lists, ``stats`` and the importance EMAs, never ``grads``,
  ``references`` or ``befores``.
"""
