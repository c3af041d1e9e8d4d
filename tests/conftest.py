"""Shared test setup.

Without CUDA, Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen
before triton is imported. With CUDA, the same tests run the compiled kernels on the GPU.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"

from cnl_ext.ops.native_backend import cuda_device_reason  # noqa: E402 (after TRITON_INTERPRET; imports no triton)

# the reason names the cause: a CPU-only torch, or CUDA's own error (e.g. no NVIDIA driver)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=f"needs a CUDA GPU: {cuda_device_reason()}")


def backend_devices(backends=("torch", "triton", "native"), devices=("cpu", "cuda")):
    """The tests' one backend matrix: pytest params ``(backend, device)``, device by device, with ids
    ``"<backend>-<device>"``. CUDA ones are marked ``cuda`` and skip without a GPU; Triton's CPU one skips
    without the interpreter; a native one skips where its kernels cannot load (``_native_loads``)."""
    params = []
    for device in devices:
        for backend in backends:
            marks = [pytest.mark.cuda, requires_cuda] if device == "cuda" else []
            if (backend, device) == ("triton", "cpu"):
                marks = [pytest.mark.skipif(not TRITON_ON_CPU,
                                            reason="Triton runs CPU tensors only under TRITON_INTERPRET=1")]
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


# Where each backend runs in this session.
BACKEND_DEVICES = backend_devices(("torch", "triton"))
TRITON_DEVICES = backend_devices(("triton",))
# The native backend where it runs: the C++ CPU kernels, and the CUDA ones of cnl_ext._C.
NATIVE_DEVICES = backend_devices(("native",))
# The backends with kernels of their own, checked against the torch backend.
KERNEL_BACKEND_DEVICES = backend_devices(("triton", "native"))
ALL_BACKEND_DEVICES = backend_devices()


def skip_unless_native_runs(device) -> None:
    """Skip a native-backend case whose kernels cannot load, or build, on ``device`` here."""
    from cnl_ext.ops import native_backend

    reason = native_backend.unavailable_reason()
    if not reason and torch.device(device).type == "cuda":
        reason = native_backend.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")


@pytest.fixture(scope="session")
def native_built():
    """The native CPU kernels built (or loaded) in this extension cache by the test process, before a
    test starts subprocesses that would otherwise compile them inside their timeouts (a first-use build
    takes minutes on a slow machine). Under pytest-xdist one worker builds; the others wait for it."""
    from cnl_ext.ops import native_backend

    native_backend.unavailable_reason()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _native_loads(request):
    """Skip a native case of the matrix where the native CPU kernels cannot load or build (they fail
    instead under CNL_EXT_REQUIRE_NATIVE=1); tests that need the CUDA ones check with skip_unless_native_runs."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "native":
        from cnl_ext.ops import native_backend

        reason = native_backend.unavailable_reason()
        if reason:
            pytest.skip(f"native backend unavailable: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
