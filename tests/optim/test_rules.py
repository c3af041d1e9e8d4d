"""Issue 22: rule="agem" (A-GEM's projection) and EWC (ewc_lambda, ewc_decay, capture_fisher) through the
public API: hand computations with SGD at lr 1 on every backend, the order of the terms, errors,
checkpoints (state_dict, deepcopy, pickle) of the Fisher estimate and the anchor."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from cnl_ext import FusedCNLAdam, FusedCNLAdamW, FusedCNLSGD

from ..conftest import ALL_BACKEND_DEVICES
from . import reliability_helpers as rh

BACKENDS = ALL_BACKEND_DEVICES
CLASSES = {"sgd": FusedCNLSGD, "adam": FusedCNLAdam, "adamw": FusedCNLAdamW}


def _params(device, values):
    return [torch.nn.Parameter(torch.tensor(v, device=device)) for v in values]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, device=p.device)


def _values(params):
    return [p.detach().cpu().tolist() for p in params]


# ----------------------------------------------------------------------------- A-GEM by hand

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_agem_projects_a_conflicting_gradient_over_all_groups(backend, device):
    """g·r = −2·1 + 1·0 + 0·1 + (−1)·2 = −4 over two groups, r·r = 1 + 0 + 1 + 4 = 6:
    g ← g + (4/6)·r, then θ ← θ − g (SGD, lr 1), no mask."""
    a, b = _params(device, [[1.0, 2.0], [3.0, 4.0]])
    opt = FusedCNLSGD([{"params": [a]}, {"params": [b]}], lr=1.0, rule="agem", backend=backend)
    opt.set_reference([torch.tensor([1.0, 0.0], device=device), torch.tensor([1.0, 2.0], device=device)])
    _set_grads([a, b], [[-2.0, 1.0], [0.0, -1.0]])
    opt.step()
    c = -4.0 / 6.0
    want_a = [1.0 - (-2.0 - c * 1.0), 2.0 - (1.0 - c * 0.0)]
    want_b = [3.0 - (0.0 - c * 1.0), 4.0 - (-1.0 - c * 2.0)]
    torch.testing.assert_close(_values([a, b]), [want_a, want_b], rtol=1e-6, atol=1e-6)
    # the projected gradient is orthogonal to r
    g = torch.tensor([1.0 - want_a[0], 2.0 - want_a[1], 3.0 - want_b[0], 4.0 - want_b[1]])
    assert abs(float(g @ torch.tensor([1.0, 0.0, 1.0, 2.0]))) < 1e-6
    assert opt.cnl_stats() is None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_agem_leaves_an_agreeing_gradient_alone_and_does_not_mask(backend, device):
    """g·r ≥ 0: the plain SGD step, also on the elements where sign(g) ≠ sign(r) (which CNL would freeze)."""
    a, b = _params(device, [[1.0, 2.0], [3.0]])
    opt = FusedCNLSGD([{"params": [a]}, {"params": [b]}], lr=1.0, rule="agem", backend=backend)
    opt.set_reference([torch.tensor([1.0, -1.0], device=device), torch.tensor([2.0], device=device)])
    _set_grads([a, b], [[3.0, 1.0], [0.5]])  # g·r = 3 − 1 + 1 = 3 > 0
    opt.step()
    assert _values([a, b]) == [[-2.0, 1.0], [2.5]]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("conflicting", [True, False])
def test_agem_step_reads_the_reference_only_to_project(backend, device, conflicting):
    """g·r ≥ 0 with the coefficient on the CPU: the step gets no reference (it would subtract 0·r);
    g·r < 0, or a coefficient on a GPU (reading it would sync): the references, to project."""
    a, b = _params(device, [[1.0, 2.0], [3.0]])
    opt = FusedCNLAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, rule="agem", backend=backend)
    opt.set_reference([torch.tensor([1.0, -1.0], device=device), torch.tensor([2.0], device=device)])
    _set_grads([a, b], [[-3.0, 1.0], [0.5]] if conflicting else [[3.0, 1.0], [0.5]])  # g·r = −3 or 3
    handed = []
    references_for = opt._references_for
    opt._references_for = lambda params: handed.append(references_for(params)) or handed[-1]
    twins = [p.detach().clone() for p in (a, b)]
    opt.step()
    reads = conflicting or torch.device(device).type != "cpu"
    assert [all(r is not None for r in refs) if reads else refs == [None] for refs in handed] == [True, True]
    if not conflicting:  # and the step is plain AdamW's
        plain = [torch.nn.Parameter(t) for t in twins]
        _set_grads(plain, [[3.0, 1.0], [0.5]])
        torch.optim.AdamW(plain, lr=0.1).step()
        torch.testing.assert_close(_values([a, b]), _values(plain), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_agem_with_maximize_projects_the_ascent_direction(backend, device):
    """maximize: the step follows −g, so A-GEM tests (−g)·r: g = [1, 0], r = [1, 1] conflict."""
    (a,) = _params(device, [[0.0, 0.0]])
    opt = FusedCNLSGD([a], lr=1.0, rule="agem", maximize=True, backend=backend)
    opt.set_reference([torch.tensor([1.0, 1.0], device=device)])
    _set_grads([a], [[1.0, 0.0]])
    opt.step()  # d = −g = [−1, 0]; d·r = −1, r·r = 2: d ← d + r/2 = [−0.5, 0.5]; θ ← θ − d
    assert _values([a]) == [[0.5, -0.5]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_agem_without_a_reference_is_the_plain_optimizer(backend, device):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, 3, device=device)), torch.nn.Parameter(torch.randn(4, device=device))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedCNLAdamW(params, lr=0.1, rule="agem", backend=backend)
    ref = torch.optim.AdamW(twins, lr=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_agem_computes_r_dot_r_once_per_reference():
    (a,) = _params("cpu", [[1.0, 2.0]])
    opt = FusedCNLSGD([a], lr=1.0, rule="agem", backend="torch")
    opt.set_reference([torch.tensor([1.0, 1.0])])
    norms = opt._reference.squared_norms()
    _set_grads([a], [[-1.0, 0.0]])
    opt.step()
    assert opt._reference.squared_norms() is norms and float(norms[a]) == 2.0
    opt.set_reference([torch.tensor([3.0, 0.0])])
    assert float(opt._reference.squared_norms()[a]) == 9.0


# ----------------------------------------------------------------------------- EWC by hand

def _capture(opt, params, batches):
    with opt.capture_fisher() as f:
        for weights in batches:
            f.backward(sum((p * torch.tensor(w, device=p.device)).sum() for p, w in zip(params, weights)))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ewc_fisher_is_the_mean_squared_gradient_and_pulls_toward_the_anchor(backend, device):
    a, b = _params(device, [[1.0, 2.0], [3.0]])
    opt = FusedCNLSGD([{"params": [a]}, {"params": [b], "weight_decay": 0.5}], lr=1.0, ewc_lambda=0.25,
                      backend=backend)
    _capture(opt, [a, b], [([1.0, 2.0], [3.0]), ([3.0, 0.0], [1.0])])
    assert opt.state[a]["ewc_fisher"].tolist() == [5.0, 2.0] and opt.state[b]["ewc_fisher"].tolist() == [5.0]
    assert opt.state[a]["ewc_anchor"].tolist() == [1.0, 2.0] and a.grad is None
    with torch.no_grad():
        a.add_(1.0)
        b.sub_(2.0)
    _set_grads([a, b], [[1.0, 0.0], [0.0]])
    opt.step()
    # g + 2λ·F·(θ − θ*) (+ weight decay λ_wd·θ for b, added after): a: [1 + 0.5·5·1, 0.5·2·1]; b: 0.5·5·(−2) + 0.5·1
    assert _values([a, b]) == [[2.0 - 3.5, 3.0 - 1.0], [1.0 - (-5.0 + 0.5)]]


@pytest.mark.parametrize("decay", [1.0, 0.5, 0.0])
def test_ewc_decay_adds_up_the_captures(decay):
    (a,) = _params("cpu", [[1.0, 2.0]])
    opt = FusedCNLSGD([a], lr=1.0, ewc_lambda=1.0, ewc_decay=decay, backend="torch")
    _capture(opt, [a], [([2.0, 1.0],)])
    with torch.no_grad():
        a.add_(1.0)
    _capture(opt, [a], [([1.0, 1.0],), ([3.0, 1.0],)])
    assert opt.state[a]["ewc_fisher"].tolist() == [decay * 4.0 + 5.0, decay * 1.0 + 1.0]
    assert opt.state[a]["ewc_anchor"].tolist() == [2.0, 3.0]


def test_capture_fisher_weights_calls():
    """``weight=w`` scales the loss (w·g) and weighs the call: F = Σ w·g² / Σ w."""
    (a,) = _params("cpu", [[1.0]])
    opt = FusedCNLSGD([a], lr=1.0, ewc_lambda=1.0, backend="torch")
    with opt.capture_fisher() as f:
        f.backward(a.sum() * 2.0, weight=3.0)  # g = 2
        f.backward(a.sum() * 4.0, weight=1.0)  # g = 4
    assert opt.state[a]["ewc_fisher"].tolist() == [(3 * 4 + 1 * 16) / 4]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ewc_with_cnl_masks_the_update_of_the_augmented_gradient(backend, device):
    (a,) = _params(device, [[0.0, 0.0, 0.0]])
    opt = FusedCNLSGD([a], lr=1.0, ewc_lambda=0.5, backend=backend)
    _capture(opt, [a], [([1.0, 1.0, 2.0],)])  # F = [1, 1, 4], θ* = 0
    with torch.no_grad():
        a.copy_(torch.tensor([1.0, 1.0, 1.0]))
    opt.set_reference([torch.tensor([1.0, -1.0, -1.0], device=device)])
    _set_grads([a], [[-0.5, -0.5, -5.0]])
    opt.step()  # u = g + F·(θ−θ*) = [0.5, 0.5, −1]: signs vs r [+, −, −] → [move, frozen, move]
    assert _values([a]) == [[0.5, 1.0, 2.0]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_agem_projects_the_loss_gradient_then_ewc_adds_its_penalty(backend, device):
    """The documented order: c from g·r alone (the EWC term does not enter the dot), then + 2λF(θ−θ*)."""
    (a,) = _params(device, [[0.0, 0.0]])
    opt = FusedCNLSGD([a], lr=1.0, rule="agem", ewc_lambda=0.5, backend=backend)
    _capture(opt, [a], [([1.0, 2.0],)])  # F = [1, 4], θ* = 0
    with torch.no_grad():
        a.copy_(torch.tensor([1.0, 1.0]))
    opt.set_reference([torch.tensor([1.0, 0.0], device=device)])
    _set_grads([a], [[-1.0, 0.0]])  # g·r = −1 < 0 (with the EWC term [1, 4] added first it would be 0 ≥ 0)
    opt.step()  # g' = g − (−1/1)·r = [0, 0]; + F·(θ−θ*) = [1, 4]
    assert _values([a]) == [[0.0, -3.0]]


@pytest.mark.parametrize("name", list(CLASSES))
def test_ewc_lambda_zero_keeps_fisher_but_steps_plainly(name):
    (a,) = _params("cpu", [[1.0, 2.0]])
    (b,) = _params("cpu", [[1.0, 2.0]])
    opt = CLASSES[name]([a], lr=0.1, backend="torch")
    plain = CLASSES[name]([b], lr=0.1, backend="torch")
    _capture(opt, [a], [([1.0, 2.0],)])
    _set_grads([a, b], [[1.0, -1.0], [1.0, -1.0]])
    opt.step()
    plain.step()
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(ewc_lambda=-1.0), "ewc_lambda"), (dict(ewc_lambda=float("nan")), "ewc_lambda"),
    (dict(ewc_decay=1.5), "ewc_decay"), (dict(ewc_decay=-0.1), "ewc_decay"), (dict(rule="gem"), "rule"),
    (dict(rule="agem", reference_dtype="sign2"), "reference_dtype"),
    (dict(rule="agem", reference_dtype="int8"), "reference_dtype"),
])
@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_options_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLASSES[name]([torch.nn.Parameter(torch.zeros(2))], lr=0.1, **kwargs)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_agem_takes_the_magnitude_formats(fmt):
    (a,) = _params("cpu", [[0.0, 0.0]])
    opt = FusedCNLSGD([a], lr=1.0, rule="agem", reference_dtype=fmt, backend="torch")
    opt.set_reference([torch.tensor([1.0, 1.0])])
    _set_grads([a], [[-1.0, 0.0]])
    opt.step()
    assert _values([a]) == [[0.5, -0.5]]


def test_capture_fisher_without_backward_changes_nothing():
    (a,) = _params("cpu", [[1.0, 2.0]])
    opt = FusedCNLSGD([a], lr=1.0, ewc_lambda=1.0, backend="torch")
    _capture(opt, [a], [([1.0, 2.0],)])
    a.grad = torch.ones(2)

    def empty():
        with opt.capture_fisher():
            pass

    rh.assert_fails_atomically(opt, empty, RuntimeError, "without any f.backward")


def test_capture_fisher_refuses_inf_and_keeps_the_previous_estimate():
    (a,) = _params("cpu", [[1.0, 2.0]])
    opt = FusedCNLSGD([a], lr=1.0, ewc_lambda=1.0, backend="torch")
    _capture(opt, [a], [([1.0, 2.0],)])

    def overflow():
        _capture(opt, [a], [([1e30, 1.0],)])

    rh.assert_fails_atomically(opt, overflow, FloatingPointError, "capture_fisher")


def test_capture_fisher_block_that_raises_changes_nothing():
    (a,) = _params("cpu", [[1.0, 2.0]])
    opt = FusedCNLSGD([a], lr=1.0, ewc_lambda=1.0, backend="torch")

    def failing():
        with opt.capture_fisher() as f:
            f.backward(a.sum())
            raise KeyError("user error")

    rh.assert_fails_atomically(opt, failing, KeyError)
    assert "ewc_fisher" not in opt.state.get(a, {})


# ----------------------------------------------------------------------------- checkpoints

def _trained(name, dtype=torch.float32, **kwargs):
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(4, 3).to(dtype)), torch.nn.Parameter(torch.randn(5).to(dtype))]
    opt = CLASSES[name](params, lr=0.05, ewc_lambda=0.3, backend="torch", **kwargs)
    with opt.capture_fisher() as f:
        for _ in range(2):
            f.backward(sum((p.float() * torch.randn(p.shape)).sum() for p in params))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def _step_both(pairs):
    grads = None
    for params, opt in pairs:
        torch.manual_seed(5)
        grads = grads or [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CLASSES))
def test_fisher_and_anchor_survive_state_dict(name, dtype):
    params, opt = _trained(name, dtype)
    saved = copy.deepcopy(opt.state_dict())
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = CLASSES[name](twins, lr=0.05, ewc_lambda=0.3, backend="torch")
    other.load_state_dict(saved)
    for p, q in zip(params, twins):
        assert torch.equal(other.state[q]["ewc_fisher"], opt.state[p]["ewc_fisher"])
        assert other.state[q]["ewc_fisher"].dtype == torch.float32
        assert other.state[q]["ewc_anchor"].dtype == dtype
        assert torch.equal(other.state[q]["ewc_anchor"], opt.state[p]["ewc_anchor"])
    _step_both([(params, opt), (twins, other)])
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_fisher_anchor_and_options_survive_deepcopy_and_pickle(name, how):
    params, opt = _trained(name, rule="agem")
    opt.set_reference([torch.randn_like(p) for p in params])
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert (opt2.rule, opt2.ewc_lambda, opt2.ewc_decay) == ("agem", 0.3, 1.0)
    for p, q in zip(params, params2):
        assert torch.equal(opt.state[p]["ewc_fisher"], opt2.state[q]["ewc_fisher"])
        assert torch.equal(opt.state[p]["ewc_anchor"], opt2.state[q]["ewc_anchor"])
    _step_both([(params, opt), (params2, opt2)])
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_a_fisher_of_the_wrong_shape():
    params, opt = _trained("adamw")
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["ewc_fisher"] = torch.zeros(7)
    rh.assert_fails_atomically(opt, lambda: opt.load_state_dict(saved), ValueError, "ewc_fisher")


def test_clear_fisher():
    params, opt = _trained("sgd")
    opt.clear_fisher()
    assert not any(key.startswith("ewc_") for state in opt.state.values() for key in state)
