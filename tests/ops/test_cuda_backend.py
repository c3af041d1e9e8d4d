"""The C++/CUDA backend (``csrc/``, ``cnl_ext.ops.cuda_step``).

On a GPU with ``cnl_ext._C`` built (tests marked ``cuda``): the ops against the PyTorch reference
(:mod:`cnl_ext.ops.torch_backend`) element by element, over many shapes (scalars, empty, odd sizes, 1-D to
4-D, more than one chunk), parameter dtypes, reference formats, with and without statistics, for
several steps; KIF's importance EMAs in the step (the same checks also run here on the CPU kernels);
unaligned tensors (the scalar path), lists longer than one launch's table, input validation,
``torch.compile`` and CUDA-graph capture. (KIF's fusion passes on ``cnl_ext._C``: tests/ops/test_kif.py.)

Everywhere: the module imports and reports why it is unavailable, the operator schemas in
``csrc/cnl_binding.h`` parse, match the ops contract and work under ``torch.compile`` (checked with a
stand-in CPU implementation), and ``scripts/check_cuda_compile.sh`` passes where nvcc exists.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnl_ext import reference_format
from cnl_ext.functional import state_dtype
from cnl_ext.ops.contract import OPS as CONTRACT_OPS
from cnl_ext.ops import torch_backend as reference
from cnl_ext.ops import cuda_step, native_backend

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS_H = ROOT / "csrc" / "cnl_binding.h"  # the schemas, registered by the CPU library (csrc/cpu/)

# the steps' optional importance arguments, after lr_tensor (csrc/cnl_binding.h)
IMPORTANCE_ARGUMENTS = ["sensitivities", "uncertainties", "importance_kind", "importance_beta1", "importance_beta2"]
# issue 22's terms, after the importance arguments (cnl_ext.ops.contract.RULE_KEYWORDS in the ops' own form)
RULE_ARGUMENTS = ["ewc_fishers", "ewc_anchors", "ewc_lambda", "agem_coefficient"]
CHUNK = 65536  # cnl::kChunkSize in csrc/cnl_common.h
SHAPES = [(), (0,), (1,), (3,), (7,), (1023,), (1025,), (3, 5), (2, 3, 4), (2, 3, 5, 7), (CHUNK + 3,),
          (2 * CHUNK + 1,)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FORMATS = [None, *reference_format.FORMATS]
LR = 0.1  # large, so that a wrongly masked element moves far beyond the bf16/fp16 tolerance

_needs_cuda_ops = pytest.mark.skipif(
    not cuda_step.is_available(), reason=f"CUDA backend unavailable: {cuda_step.unavailable_reason()}"
)


def on_gpu(test):
    """Marked ``cuda``; skipped, with the backend's own reason, without a GPU or ``cnl_ext._C``."""
    return pytest.mark.cuda(_needs_cuda_ops(test))


# ----------------------------------------------------------------------------- helpers


def _random_reference(shape, device):
    r = torch.randn(shape, device=device)
    r[torch.rand(shape, device=device) < 0.1] = 0.0  # exact zeros are collaborative by definition
    return r


def _make_inputs(shapes, dtype, fmt, n_state, steps, device, unaligned=False, n_ema=0):
    """Parameters, per-step gradients, ``n_state`` optimizer states (float64 for float64 parameters,
    else float32), then ``n_ema`` float32 ones (KIF's EMAs) and encoded references for ``shapes``.

    With ``unaligned``, every tensor is a contiguous view one element into a larger buffer, so no
    base pointer is 16-byte aligned and the kernels must take their scalar path.
    """

    def tensor(shape, dt, fill):
        if not unaligned:
            return fill(shape).to(dt)
        numel = 1
        for d in shape:
            numel *= d
        buffer = torch.empty(numel + 1, dtype=dt, device=device)
        view = buffer[1:].view(shape)
        view.copy_(fill(shape).to(dt))
        return view

    randn = lambda s: torch.randn(s, device=device)  # noqa: E731
    positive = lambda s: torch.rand(s, device=device) + 0.01  # noqa: E731 (second moments are >= 0)
    params = [tensor(s, dtype, randn) for s in shapes]
    grads = [[tensor(s, dtype, randn) for s in shapes] for _ in range(steps)]
    state_dtypes = [state_dtype(dtype)] * n_state + [torch.float32] * n_ema
    states = [[tensor(s, dt, randn if k == 0 else positive) for s in shapes] for k, dt in enumerate(state_dtypes)]
    refs = None
    if fmt is not None:
        refs = [reference_format.encode(_random_reference(s, device), fmt) for s in shapes]
        if unaligned and fmt != "sign2":
            refs = [tensor(r.shape, r.dtype, lambda s, r=r: r) for r in refs]
    return params, grads, states, refs


def _clone(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def _run(module, step_name, params, grads, states, refs, fmt, stats, kwargs, importance=None, importance_kind=None):
    """Run ``module.<step_name>`` for every step on copies; return (params, states, stats, EMAs). With
    ``importance`` (sensitivities, uncertainties), copies of KIF's EMAs are updated in the step too."""
    p = _clone(params)
    s = [_clone(x) for x in states]
    st = None if stats is None else stats.clone()
    emas = None if importance is None else tuple(_clone(x) for x in importance)
    extra = {} if emas is None else dict(importance=emas, importance_kind=importance_kind,
                                         importance_betas=(0.85, 0.7))
    for k, g in enumerate(grads):
        getattr(module, step_name)(p, g, *s, refs, st, reference_format=fmt or "float32", **kwargs(k), **extra)
    return p, s, st, emas


def _assert_same(got, want, dtype):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        elif dtype == torch.float64:  # tests/ops/test_kernels.py's policy: a float32 step anywhere is ~1e-7 off
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
        else:  # rounded once per step: about an ulp at the values' scale (~1), tests/ops/test_kernels.py's
            # policy (a wrongly masked element moves by ~LR, far beyond it)
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(g.float(), w.float(), rtol=eps, atol=2 * eps)


def _assert_stats_close(got, want):
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=0, atol=0.5)  # counts: exact
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-3)


def _adam_kwargs(decoupled, weight_decay, amsgrad, maximize, beta1=0.8, beta2=0.95):
    def kwargs(k):
        t = k + 1
        return dict(lr=LR, beta1=beta1, beta2=beta2, eps=1e-6, weight_decay=weight_decay,
                    decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize,
                    bias_correction1=1 - beta1**t, bias_correction2=1 - beta2**t)

    return kwargs


def _sgd_kwargs(momentum, dampening, nesterov, weight_decay, maximize):
    def kwargs(k):
        return dict(lr=LR, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                    nesterov=nesterov, maximize=maximize, first_step=(k == 0))

    return kwargs


def check_adam(module, device, shapes, dtype, fmt, with_stats, options, steps=3, unaligned=False):
    """``module.adam_step_`` against the reference; ``options`` = (decoupled, wd, amsgrad, maximize)."""
    params, grads, states, refs = _make_inputs(shapes, dtype, fmt, 3, steps, device, unaligned)
    stats = torch.zeros(len(shapes), 3, dtype=torch.float64, device=device) if fmt and with_stats else None
    kwargs = _adam_kwargs(*options)
    got = _run(module, "adam_step_", params, grads, states, refs, fmt, stats, kwargs)
    want = _run(reference, "adam_step_", params, grads, states, refs, fmt, stats, kwargs)
    _assert_same(got[0], want[0], dtype)
    amsgrad = options[2]
    for k in range(3 if amsgrad else 2):  # max_exp_avg_sqs is untouched without amsgrad
        _assert_same(got[1][k], want[1][k], state_dtype(dtype))
    if stats is not None:
        _assert_stats_close(got[2], want[2])


def check_sgd(module, device, shapes, dtype, fmt, with_stats, options, steps=3, unaligned=False):
    """``module.sgd_step_`` against the reference; ``options`` = (momentum, dampening, nesterov, wd, maximize)."""
    momentum = options[0]
    params, grads, states, refs = _make_inputs(shapes, dtype, fmt, 1 if momentum else 0, steps, device, unaligned)
    if not momentum:
        states = [None]  # the momentum_buffers argument
    stats = torch.zeros(len(shapes), 3, dtype=torch.float64, device=device) if fmt and with_stats else None
    kwargs = _sgd_kwargs(*options)
    got = _run(module, "sgd_step_", params, grads, states, refs, fmt, stats, kwargs)
    want = _run(reference, "sgd_step_", params, grads, states, refs, fmt, stats, kwargs)
    _assert_same(got[0], want[0], dtype)
    if momentum:
        _assert_same(got[1][0], want[1][0], state_dtype(dtype))
    if stats is not None:
        _assert_stats_close(got[2], want[2])


ADAM_OPTIONS = [  # decoupled, weight_decay, amsgrad, maximize
    pytest.param((True, 0.1, False, False), id="adamw"),
    pytest.param((False, 0.0, False, False), id="adam"),
    pytest.param((False, 0.05, True, True), id="adam-l2-amsgrad-maximize"),
    pytest.param((True, 0.0, True, False), id="adamw-nodecay-amsgrad"),
]
SGD_OPTIONS = [  # momentum, dampening, nesterov, weight_decay, maximize
    pytest.param((0.0, 0.0, False, 0.0, False), id="sgd"),
    pytest.param((0.9, 0.0, False, 0.0, False), id="momentum"),
    pytest.param((0.9, 0.0, True, 0.01, False), id="nesterov-l2"),
    pytest.param((0.5, 0.3, False, 0.0, True), id="dampening-maximize"),
    pytest.param((0.0, 0.0, False, 0.02, True), id="sgd-l2-maximize"),
]


# ----------------------------------------------------------------------------- everywhere (CPU)


def test_cuda_side_imports_and_explains_unavailability():
    """Without a GPU or cnl_ext._C the CUDA side says why (and compiles nothing to say so)."""
    from cnl_ext.ops import native_backend

    assert isinstance(cuda_step.is_available(), bool)
    reason = cuda_step.unavailable_reason()
    assert isinstance(reason, str) and reason == native_backend.cuda_unavailable_reason()
    if cuda_step.is_available():
        assert reason == ""
        assert cuda_step.build_info()["chunk_size"] == CHUNK
        return
    assert reason, "an unavailable backend must say why"
    if importlib.util.find_spec("cnl_ext._C") is None:
        assert not native_backend.capabilities("cuda").runs("adam_step_")
        if torch.cuda.is_available():
            assert "cnl_ext._C" in reason


def test_dispatcher_kernels_match_the_contract():
    """Everywhere: the CPU library registers a CPU and a Meta kernel for every op, and nothing else
    registers CUDA kernels unless cnl_ext._C is loaded."""
    table = native_backend.kernel_table()
    assert set(table) == set(native_backend.OPS) == set(CONTRACT_OPS)
    assert all(kernels["CPU"] and kernels["Meta"] for kernels in table.values()), table
    assert native_backend.kernel_mismatches() == []


@pytest.mark.skipif(torch.version.cuda is None,
                    reason=f"needs a CUDA build of torch (torch {torch.__version__} is CPU-only): cnl_ext._C "
                           "links against it")
def test_every_op_has_its_cpu_and_cuda_kernels():
    """With a CUDA build of torch, no GPU needed: cnl_ext._C loads, was built with torch's CUDA major
    release, and the dispatcher holds a CUDA kernel for every op but masked_delta_ (CPU only), next to
    the CPU and Meta kernels (scripts/check_cuda_wheel.sh runs this against a built wheel)."""
    if importlib.util.find_spec("cnl_ext._C") is None:
        pytest.skip("cnl_ext._C is not built in this install (build it with CNL_EXT_BUILD_CUDA=1 "
                    "pip install --no-build-isolation .)")
    assert native_backend.cuda_library_reason() == ""
    info = native_backend.build_info()
    assert info["cuda_runtime"].split(".")[0] == torch.version.cuda.split(".")[0], info
    assert info["cuda_arch_list"], info
    table = native_backend.kernel_table()
    assert table["adam_step_"]["CUDA"] and not table["masked_delta_"]["CUDA"], table
    assert native_backend.kernel_mismatches() == []


def test_build_info_arch_list_round_trip():
    assert cuda_step._arch_list("80_90PTX") == "8.0;9.0+PTX"
    assert cuda_step._arch_list("75_80_86_90a_120PTX") == "7.5;8.0;8.6;9.0a;12.0+PTX"
    assert cuda_step._arch_list("unknown") == "unknown"


def _schemas(names=("kSgdSchema", "kAdamSchema")):
    """The schema strings that csrc/cnl_binding.h defines, joined from their C++ string literals."""
    source = SCHEMAS_H.read_text()
    out = {}
    for name in names:
        match = re.search(r"constexpr const char\* %s =\s*((?:\"[^\"]*\"\s*)+);" % name, source)
        assert match, f"{name} not found in {SCHEMAS_H}"
        schema = "".join(re.findall(r'"([^"]*)"', match.group(1)))
        out[schema.split("(", 1)[0]] = schema
    return out


def test_schemas_parse_and_match_the_ops_contract():
    """Same arguments as the contract (names, order, keyword-only part; cnl_ext.ops.contract declares
    them), plus ``lr_tensor`` and the importance EMAs (below); every written list is declared mutable,
    and nothing else is."""
    mutated = {
        "sgd_step_": {"params", "momentum_buffers", "stats"},
        "adam_step_": {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "stats"},
    }
    schemas = _schemas()
    assert set(schemas) == set(mutated)
    for name, text in schemas.items():
        schema = torch._C.parse_schema(text)
        names = [a.name for a in schema.arguments][:-len(IMPORTANCE_ARGUMENTS) - len(RULE_ARGUMENTS)]
        assert names[-1] == "lr_tensor"
        names = names[:-1]
        spec = CONTRACT_OPS[name]
        assert names == [*spec.tensor_lists, *spec.arguments, *spec.keywords], name
        # the contract's arguments; the importance EMAs are optional arguments of the same ops (below)
        full_contract = list(inspect.signature(getattr(reference, name)).parameters)
        assert list(inspect.signature(getattr(cuda_step, name)).parameters) == full_contract, name
        contract = {n: p for n, p in inspect.signature(getattr(reference, name)).parameters.items()
                    if not n.startswith("importance") and n not in ("ewc", "ewc_lambda", "agem_coefficient")}
        assert names == list(contract), name
        keyword_only = [n for n, p in contract.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        kwarg_only = [a.name for a in schema.arguments if a.kwarg_only]
        assert kwarg_only == keyword_only + ["lr_tensor"] + IMPORTANCE_ARGUMENTS + RULE_ARGUMENTS, name
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == mutated[name] | {"sensitivities", "uncertainties"}, name
        assert spec.written | {"stats"} == mutated[name], name
        assert len(schema.returns) == 0


def test_masked_delta_schema_matches_the_ops_contract():
    """masked_delta_ (CPU only for now): the contract's arguments; it writes params and stats only."""
    from cnl_ext.ops import native_backend
    from cnl_ext.ops import torch_backend as masked_delta_reference

    schema = torch._C.parse_schema(_schemas(("kMaskedDeltaSchema",))["masked_delta_"])
    contract = inspect.signature(masked_delta_reference.masked_delta_).parameters
    assert [a.name for a in schema.arguments] == list(contract)
    assert list(inspect.signature(native_backend.masked_delta_).parameters) == list(contract)
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"params", "stats"}


def test_step_schemas_take_the_importance_emas_as_optional_lists():
    """KIF's EMAs in the step: optional keyword lists (written) of the step ops themselves, after
    ``lr_tensor``, with their options; none given runs the step without them."""
    def arguments(schema):
        return [(a.name, str(a.type), a.kwarg_only, a.default_value, a.alias_info is not None and a.alias_info.is_write)
                for a in schema.arguments]

    for name, text in _schemas().items():
        schema = torch._C.parse_schema(text)
        assert arguments(schema)[-len(RULE_ARGUMENTS):] == [
            *((n, "Optional[List[Tensor]]", True, None, False) for n in ("ewc_fishers", "ewc_anchors")),
            ("ewc_lambda", "float", True, 0.0, False), ("agem_coefficient", "Optional[float]", True, None, False)]
        assert arguments(schema)[-len(IMPORTANCE_ARGUMENTS) - len(RULE_ARGUMENTS):-len(RULE_ARGUMENTS)] == [
            *((n, "Optional[List[Tensor]]", True, None, True) for n in ("sensitivities", "uncertainties")),
            ("importance_kind", "str", True, "first", False),
            *((f"importance_beta{i}", "float", True, 0.85, False) for i in (1, 2))], name
        assert len(schema.returns) == 0


def _reference_with_lr_tensor(name):
    """The reference behind the op's signature: ``lr_tensor`` (when given) is the learning rate."""
    def kernel(*args, lr_tensor=None, **kwargs):
        if lr_tensor is not None:
            kwargs["lr"] = lr_tensor
        getattr(reference, name)(*args, **kwargs)

    return kernel


@pytest.fixture
def stand_in_ops():
    """The real schemas, in a scratch namespace, with the reference as CPU kernel and no-op Meta
    kernels (as csrc/cpu/cnl_cpu_ops.cpp registers): checks the schemas' aliasing under torch.compile."""
    namespace = "cnl_ext_schema_check"
    lib = torch.library.Library(namespace, "FRAGMENT")
    for name, schema in _schemas().items():
        lib.define(schema)
        lib.impl(name, _reference_with_lr_tensor(name), "CPU")
        lib.impl(name, lambda *args, **kwargs: None, "Meta")
    yield getattr(torch.ops, namespace)
    lib._destroy()


def _compiled_step_inputs():
    torch.manual_seed(1)
    shapes = [(3,), (2, 5), (0,)]
    fresh = lambda f: [f(s) for s in shapes]  # noqa: E731
    return (fresh(torch.randn), fresh(torch.randn), fresh(torch.randn), fresh(torch.rand), fresh(torch.rand),
            [reference_format.encode(torch.randn(s), "sign2") for s in shapes],
            torch.zeros(len(shapes), 3, dtype=torch.float64))


def test_schemas_work_under_torch_compile(stand_in_ops):
    """Mutations declared in the schemas survive functionalization (fullgraph, no graph break)."""
    ops = stand_in_ops

    def step(p, g, m, v, vmax, refs, stats):
        ops.adam_step_(p, g, m, v, vmax, refs, stats, reference_format="sign2", lr=0.1, beta1=0.9, beta2=0.99,
                       eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=False,
                       bias_correction1=0.1, bias_correction2=0.01)
        ops.sgd_step_(p, g, m, refs, stats, reference_format="sign2", lr=0.1, weight_decay=0.0, momentum=0.9,
                      dampening=0.0, nesterov=True, maximize=False, first_step=False)
        # capturable form: device learning rate and step counts
        ops.adam_step_(p, g, m, v, None, refs, stats, reference_format="sign2", lr=0.0, beta1=0.9, beta2=0.99,
                       eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=False,
                       device_steps=[torch.tensor(3.0) for _ in p], lr_tensor=torch.tensor(0.05))

    eager = _compiled_step_inputs()
    step(*eager)
    compiled = _compiled_step_inputs()
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    assert not torch.equal(compiled[0][0], _compiled_step_inputs()[0][0])  # it did step


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a CPU-only torch")
def test_setup_says_why_it_builds_no_extension():
    env = {k: v for k, v in os.environ.items() if k != "CNL_EXT_BUILD_CUDA"}
    run = lambda extra: subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT,  # noqa: E731
                                       env={**env, **extra}, capture_output=True, text=True, timeout=120)
    auto = run({})
    assert auto.returncode == 0 and auto.stdout.strip() == "0.1.0"
    assert auto.stderr.count("not building the CUDA extension") == 1 and "CPU-only" in auto.stderr
    forced = run({"CNL_EXT_BUILD_CUDA": "1"})
    assert forced.returncode != 0 and "CNL_EXT_BUILD_CUDA=1" in forced.stderr and "CPU-only" in forced.stderr
    skipped = run({"CNL_EXT_BUILD_CUDA": "0"})
    assert skipped.returncode == 0 and "CNL_EXT_BUILD_CUDA=0" in skipped.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
def test_cuda_sources_compile_for_sm80_and_sm90():
    """scripts/check_cuda_compile.sh: about 25 s on 2 CPU cores."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_compile.sh")], cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_cuda_compile: nvcc OK" in result.stdout


# ----------------------------------------------------------------------------- on a GPU


@on_gpu
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_stats", [False, True], ids=["nostats", "stats"])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_adam_matches_reference(dtype, fmt, with_stats, options):
    if fmt is None and with_stats:
        pytest.skip("statistics need a reference")
    check_adam(cuda_step, "cuda", SHAPES, dtype, fmt, with_stats, options)


@on_gpu
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_stats", [False, True], ids=["nostats", "stats"])
@pytest.mark.parametrize("options", SGD_OPTIONS)
def test_sgd_matches_reference(dtype, fmt, with_stats, options):
    if fmt is None and with_stats:
        pytest.skip("statistics need a reference")
    check_sgd(cuda_step, "cuda", SHAPES, dtype, fmt, with_stats, options)


@on_gpu
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [None, "float32", "bfloat16", "int8"])
def test_unaligned_tensors_take_the_scalar_path(dtype, fmt):
    check_adam(cuda_step, "cuda", SHAPES, dtype, fmt, True, (True, 0.1, True, False), unaligned=True)
    check_sgd(cuda_step, "cuda", SHAPES, dtype, fmt, True, (0.9, 0.1, True, 0.01, False), unaligned=True)


@on_gpu
@pytest.mark.parametrize("fmt", [None, "sign2"])
def test_more_tensors_than_one_launch_holds(fmt):
    """Hundreds of tensors (several kernel launches of ~60 tensors each), statistics per tensor."""
    shapes = [((i * 37) % 300,) if i % 5 else (3, (i % 7) + 1, 5) for i in range(200)]
    shapes[17] = (CHUNK * 3 + 5,)
    check_adam(cuda_step, "cuda", shapes, torch.float32, fmt, True, (True, 0.1, False, False), steps=2)
    check_sgd(cuda_step, "cuda", shapes, torch.bfloat16, fmt, True, (0.9, 0.0, False, 0.0, False), steps=2)


@on_gpu
def test_frozen_elements_keep_their_bits():
    shape = (4099,)
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.randn(shape, device="cuda").to(dtype)
        g = torch.randn(shape, device="cuda").to(dtype)
        r = _random_reference(shape, "cuda")
        before = p.clone()
        cuda_step.sgd_step_([p], [g], None, [reference_format.encode(r, "sign2")], None, reference_format="sign2",
                            lr=LR, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                            first_step=True)
        conflict = reference.conflicting(r, g.float())
        assert conflict.any() and not conflict.all()
        assert torch.equal(p[conflict], before[conflict])
        moved = (before.float() - LR * g.float()).to(dtype)
        assert torch.equal(p[~conflict], moved[~conflict])


@on_gpu
def test_statistics_are_deterministic():
    shapes = [(CHUNK * 5 + 11,), (1000,)]
    params, grads, states, refs = _make_inputs(shapes, torch.float32, "float32", 3, 1, "cuda")
    results = []
    for _ in range(2):
        stats = torch.zeros(len(shapes), 3, dtype=torch.float64, device="cuda")
        # _run steps copies: its third result is the statistics the op wrote
        results.append(_run(cuda_step, "adam_step_", params, grads, states, refs, "float32", stats,
                            _adam_kwargs(True, 0.1, False, False))[2])
    assert results[0][:, 0].sum() > 0 and torch.equal(results[0], results[1])


@on_gpu
def test_runs_on_the_current_device_and_stream():
    stream = torch.cuda.Stream()
    shapes = [(CHUNK + 1,), (5, 5)]
    params, grads, states, refs = _make_inputs(shapes, torch.float32, "int8", 3, 1, "cuda")
    want = _run(reference, "adam_step_", params, grads, states, refs, "int8", None,
                _adam_kwargs(True, 0.1, False, False))
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        got = _run(cuda_step, "adam_step_", params, grads, states, refs, "int8", None,
                   _adam_kwargs(True, 0.1, False, False))
    stream.synchronize()
    _assert_same(got[0], want[0], torch.float32)


@on_gpu
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [None, "int8", "sign2"])
def test_capturable_adam_with_device_lr_and_steps(dtype, fmt):
    params, grads, states, refs = _make_inputs(SHAPES, dtype, fmt, 3, 3, "cuda")
    stats = None if fmt is None else torch.zeros(len(SHAPES), 3, dtype=torch.float64, device="cuda")
    base = _adam_kwargs(True, 0.1, True, False)

    def kwargs(k):
        options = base(k)
        del options["bias_correction1"], options["bias_correction2"]
        options["lr"] = torch.tensor(LR / (k + 1), device="cuda")
        options["device_steps"] = [torch.tensor(float(k + 1), device="cuda") for _ in SHAPES]
        return options

    got = _run(cuda_step, "adam_step_", params, grads, states, refs, fmt, stats, kwargs)
    want = _run(reference, "adam_step_", params, grads, states, refs, fmt, stats, kwargs)
    _assert_same(got[0], want[0], dtype)
    for a, b in zip(got[1], want[1]):
        _assert_same(a, b, state_dtype(dtype))
    if stats is not None:
        _assert_stats_close(got[2], want[2])


@on_gpu
def test_sgd_with_device_lr():
    params, grads, states, refs = _make_inputs(SHAPES, torch.float32, "float32", 1, 2, "cuda")
    kwargs = lambda k: dict(_sgd_kwargs(0.9, 0.0, True, 0.01, False)(k), lr=torch.tensor(0.3, device="cuda"))  # noqa: E731
    got = _run(cuda_step, "sgd_step_", params, grads, states, refs, "float32", None, kwargs)
    want = _run(reference, "sgd_step_", params, grads, states, refs, "float32", None, kwargs)
    _assert_same(got[0], want[0], torch.float32)
    _assert_same(got[1][0], want[1][0], torch.float32)


@on_gpu
def test_cuda_graph_capture_and_replay():
    """Kernel-argument tables need no host copies, and lr and the step counts are read on the
    device, so one captured step replays correctly while they change."""
    shapes = [(CHUNK + 7,), (33,), (2, 3, 4)]
    params, grads, states, refs = _make_inputs(shapes, torch.bfloat16, "sign2", 3, 1, "cuda")
    stats = torch.zeros(len(shapes), 3, dtype=torch.float64, device="cuda")
    lr = torch.tensor(LR, device="cuda")
    steps = [torch.tensor(0.0, device="cuda") for _ in shapes]
    options = dict(lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                   amsgrad=True, maximize=False, device_steps=steps)

    def advance(k):  # what a capturable optimizer does on the device before each step
        lr.fill_(LR / (k + 1))
        for t in steps:
            t.add_(1)

    eager = (_clone(params), [_clone(x) for x in states], stats.clone())
    for k in range(3):
        advance(k)
        reference.adam_step_(eager[0], grads[0], *eager[1], refs, eager[2], reference_format="sign2", **options)

    captured = (_clone(params), [_clone(x) for x in states], stats.clone())
    for t in steps:
        t.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_step.adam_step_(captured[0], grads[0], *captured[1], refs, captured[2], reference_format="sign2",
                             **options)
    for k in range(3):
        advance(k)
        graph.replay()
    torch.cuda.synchronize()
    _assert_same(captured[0], eager[0], torch.bfloat16)
    for a, b in zip(captured[1], eager[1]):
        _assert_same(a, b, torch.float32)
    _assert_stats_close(captured[2], eager[2])


@on_gpu
def test_torch_compile_calls_the_op():
    shapes = [(CHUNK + 2,), (3, 3)]
    params, grads, states, refs = _make_inputs(shapes, torch.float32, "bfloat16", 1, 1, "cuda")
    stats = torch.zeros(len(shapes), 3, dtype=torch.float64, device="cuda")
    kwargs = _sgd_kwargs(0.9, 0.0, False, 0.0, False)(0)

    def step(p, g, b, st):
        torch.ops.cnl_ext.sgd_step_(p, g, b, refs, st, reference_format="bfloat16", **kwargs)

    eager = (_clone(params), _clone(states[0]), stats.clone())
    step(eager[0], grads[0], eager[1], eager[2])
    compiled = (_clone(params), _clone(states[0]), stats.clone())
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(compiled[0], grads[0], compiled[1], compiled[2])
    for a, b in zip(compiled[0] + compiled[1], eager[0] + eager[1]):
        assert torch.equal(a, b)
    assert torch.equal(compiled[2], eager[2])


def _adam_call(params, grads, m, v, refs=None, stats=None, fmt="float32", vmax=None, amsgrad=False):
    cuda_step.adam_step_(params, grads, m, v, vmax, refs, stats, reference_format=fmt, lr=0.1, beta1=0.9,
                         beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=amsgrad,
                         maximize=False, bias_correction1=0.1, bias_correction2=0.01)


IMPORTANCE_STEPS = [  # step, float32 states, kwargs
    pytest.param("adam_step_", 3, _adam_kwargs(True, 0.1, False, True), id="adamw-maximize"),
    pytest.param("adam_step_", 3, _adam_kwargs(False, 0.05, True, False), id="adam-l2-amsgrad"),
    pytest.param("sgd_step_", 1, _sgd_kwargs(0.9, 0.0, True, 0.01, False), id="nesterov-l2"),
    pytest.param("sgd_step_", 0, _sgd_kwargs(0.0, 0.0, False, 0.0, True), id="sgd-maximize"),
]


def check_importance(module, device, dtype, fmt, kind, unaligned, step_name, n_state, kwargs, shapes=SHAPES):
    """KIF's EMAs updated inside ``module``'s step (one pass) equal the reference's step followed by its
    importance update; with them on, params and moments are bit-identical to the step without them."""
    params, grads, states, refs = _make_inputs(shapes, dtype, fmt, n_state, 3, device, unaligned, n_ema=2)
    importance = tuple(states[-2:])  # float32, contiguous, shaped like the params (unaligned when asked)
    states = states[:-2] if n_state else [None]
    got = _run(module, step_name, params, grads, states, refs, fmt, None, kwargs, importance, kind)
    want = _run(reference, step_name, params, grads, states, refs, fmt, None, kwargs, importance, kind)
    _assert_same(got[0], want[0], dtype)
    for got_ema, want_ema in zip(got[3], want[3]):  # float32, read from params that may differ by an ulp
        _assert_same(got_ema, want_ema, torch.float32 if dtype == torch.float64 else dtype)
    without = _run(module, step_name, params, grads, states, refs, fmt, None, kwargs)
    for a, b in zip(got[0] + [t for x in got[1] if x is not None for t in x],
                    without[0] + [t for x in without[1] if x is not None for t in x]):
        assert torch.equal(a, b), "importance changed the step"


def check_importance_errors(device, other_device):
    """The steps name a bad EMA list and change nothing."""
    p, g = [torch.zeros(8, device=device)], [torch.zeros(8, device=device)]
    kwargs = dict(reference_format="float32", lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
                  nesterov=False, maximize=False, first_step=True, importance_kind="first", importance_beta1=0.85,
                  importance_beta2=0.85)
    ema = lambda *shape, **kw: torch.zeros(*shape, **{"device": device, **kw})  # noqa: E731

    def op(params, grads, momentum_buffers, references, stats, sensitivities, uncertainties, **options):
        torch.ops.cnl_ext.sgd_step_(params, grads, momentum_buffers, references, stats, sensitivities=sensitivities,
                                    uncertainties=uncertainties, **options)

    with pytest.raises(RuntimeError, match="give both sensitivities and uncertainties"):
        op(p, g, None, None, None, [ema(8)], None, **kwargs)
    with pytest.raises(RuntimeError, match=r"sensitivities\[0\] has dtype BFloat16, expected Float"):
        op(p, g, None, None, None, [ema(8, dtype=torch.bfloat16)], [ema(8)], **kwargs)
    if other_device is not None:
        with pytest.raises(RuntimeError, match=rf"uncertainties\[0\] is on {other_device}"):
            op(p, g, None, None, None, [ema(8)], [ema(8, device=other_device)], **kwargs)
    with pytest.raises(RuntimeError, match=r"sensitivities\[0\] has shape \[2, 4\]"):
        op(p, g, None, None, None, [ema(2, 4)], [ema(8)], **kwargs)
    with pytest.raises(RuntimeError, match="importance_kind must be 'first' or 'param_mix'"):
        op(p, g, None, None, None, [ema(8)], [ema(8)], **dict(kwargs, importance_kind="fisher"))
    with pytest.raises(RuntimeError, match=r"importance betas must lie in \[0, 1\)"):
        op(p, g, None, None, None, [ema(8)], [ema(8)], **dict(kwargs, importance_beta2=1.0))
    assert torch.equal(p[0], torch.zeros(8, device=device))  # nothing ran


def _require_native_cpu():
    reason = native_backend.unavailable_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["first", "param_mix"])
@pytest.mark.parametrize("step_name, n_state, kwargs", IMPORTANCE_STEPS)
def test_importance_checks_hold_for_the_cpu_kernels(dtype, kind, step_name, n_state, kwargs):
    """The GPU checks below, run on the native CPU kernels (which fuse the same EMAs): so the checks
    themselves are known to pass on a correct implementation before a GPU runs them."""
    _require_native_cpu()
    check_importance(native_backend, "cpu", dtype, "sign2", kind, True, step_name, n_state, kwargs,
                     shapes=SHAPES[:-1])
    check_importance_errors("cpu", None)  # (a meta tensor among CPU ones would take the Meta kernel)


@on_gpu
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [None, "float32", "sign2"])
@pytest.mark.parametrize("kind", ["first", "param_mix"])
@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("step_name, n_state, kwargs", IMPORTANCE_STEPS)
def test_importance_in_the_step_matches_reference(dtype, fmt, kind, unaligned, step_name, n_state, kwargs):
    check_importance(cuda_step, "cuda", dtype, fmt, kind, unaligned, step_name, n_state, kwargs)


@on_gpu
def test_importance_lists_longer_than_one_launch_holds():
    """200 tensors: several launches of the 9-column Adam table (44 tensors each)."""
    shapes = [((i * 37) % 300 + 1,) for i in range(200)]
    check_importance(cuda_step, "cuda", torch.float32, "sign2", "first", False, "adam_step_", 3,
                     _adam_kwargs(True, 0.1, False, False), shapes=shapes)


@on_gpu
def test_importance_bad_inputs_are_clear_errors():
    check_importance_errors("cuda", "cpu")


@on_gpu
def test_bad_inputs_are_clear_errors():
    f = lambda *s, dtype=torch.float32, device="cuda": torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    p, g, m, v = [f(4)], [f(4)], [f(4)], [f(4)]
    cases = [
        (lambda: _adam_call(p, [f(4), f(4)], m, v), "2 grads"),
        (lambda: _adam_call(p, g, m, [f(5)]), "exp_avg_sqs\\[0\\] has 5 elements"),
        (lambda: _adam_call([f(4, dtype=torch.int32)], [f(4, dtype=torch.int32)], m, v),
         "float32, bfloat16, float16 or float64"),
        (lambda: _adam_call([f(4, dtype=torch.float64)], [f(4, dtype=torch.float64)], m, v),
         "exp_avgs\\[0\\] has dtype Float, expected Double"),  # float64 parameters keep float64 states
        (lambda: _adam_call(p, [f(4, dtype=torch.bfloat16)], m, v), "grads\\[0\\] has dtype"),
        (lambda: _adam_call(p, g, [f(4, dtype=torch.bfloat16)], v), "exp_avgs\\[0\\] has dtype"),
        (lambda: _adam_call(p, [f(4, device="cpu")], m, v), "grads\\[0\\] is on cpu"),
        (lambda: _adam_call(p, g, m, v, refs=[f(4)], fmt="sign3"), "reference_format"),
        (lambda: _adam_call(p, g, m, v, refs=[f(4, dtype=torch.int8)], fmt="float32"), "references\\[0\\] has dtype"),
        (lambda: _adam_call(p, g, m, v, refs=[f(4, dtype=torch.uint8)], fmt="sign2"), "references\\[0\\] has 4 elements, expected 1"),
        (lambda: _adam_call(p, g, m, v, refs=[f(4)], stats=f(1, 3)), "stats must be float64"),
        (lambda: _adam_call(p, g, m, v, refs=[f(4)], stats=f(2, 3, dtype=torch.float64)), "shape \\[1, 3\\]"),
        (lambda: _adam_call([f(4, 2).t()], [f(2, 4)], m, v), "must be contiguous"),
        (lambda: cuda_step.adam_step_(p, g, m, v, None, None, None, reference_format="float32",
                                      lr=torch.tensor([0.1, 0.2], device="cuda"), beta1=0.9, beta2=0.99, eps=1e-8,
                                      weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False, maximize=False,
                                      bias_correction1=0.1, bias_correction2=0.01), "lr_tensor must have one element"),
        (lambda: cuda_step.adam_step_(p, g, m, v, None, None, None, reference_format="float32", lr=0.1, beta1=0.9,
                                      beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True,
                                      amsgrad=False, maximize=False,
                                      device_steps=[torch.tensor(1, device="cuda")]), "device_steps\\[0\\] must be float32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    _adam_call([], [], [], [])  # empty lists: nothing to do, as in the other backends
    with pytest.raises(RuntimeError, match="params must be CUDA tensors"):
        cuda_step.sgd_step_([f(4, device="cpu")], [f(4, device="cpu")], None, None, None, reference_format="float32",
                            lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                            first_step=True)


@on_gpu
@pytest.mark.slow
def test_tensor_larger_than_2_pow_31_elements():
    """64-bit offsets: a bf16 SGD step over 2**31 + 5 elements (about 8.6 GB of GPU memory)."""
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n + (1 << 30):
        pytest.skip(f"needs {4 * n / 2**30:.1f} GiB of free GPU memory")
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-3:] = -2.0
    cuda_step.sgd_step_([p], [g], None, None, None, reference_format="float32", lr=0.5, weight_decay=0.0,
                        momentum=0.0, dampening=0.0, nesterov=False, maximize=False, first_step=True)
    assert p[-3:].tolist() == [1.0, 1.0, 1.0]
    assert p[-4].item() == -0.5 and p[0].item() == -0.5 and p[2**31 - 1].item() == -0.5
    assert bool((p == -0.5).sum() == n - 3)



@on_gpu
def test_float64_is_stepped_by_the_gpu_kernels_in_float64():
    """float64 parameters run on the GPU kernels (auto picks Triton or native, not the torch backend),
    in float64 with float64 states: an AdamW step through functional's dispatch equals the torch
    backend's to float64 precision (a float32 step would be ~1e-7 off)."""
    from cnl_ext import functional

    cuda = torch.device("cuda")
    assert native_backend.capabilities(cuda).float64
    assert functional.resolve("auto", cuda, "adam_step_", torch.float64).NAME in ("triton", "native")
    p = torch.randn(CHUNK + 3, dtype=torch.float64, device="cuda")
    g = torch.randn_like(p)
    results = {}
    for backend in ("native", "torch"):
        params, m, v, steps = [p.clone()], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros(())]
        for _ in range(3):
            functional.cnl_adam(params, [g], m, v, [], steps, lr=0.1, weight_decay=0.01, backend=backend)
        assert m[0].dtype == v[0].dtype == torch.float64 and float(steps[0]) == 3.0
        results[backend] = (params[0], m[0], v[0])
    for got, want in zip(results["native"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert not torch.equal(results["native"][0], p)
