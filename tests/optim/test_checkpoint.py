"""Checkpoints: torch.optim.AdamW <-> FusedCNLAdamW, exact resume, the reference saved or recomputed."""
import io

import pytest
import torch

import cnl_ext
from cnl_ext.optim._base import REFERENCE_KEY

from ..conftest import BACKEND_DEVICES


def _model(device):
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(device)


def _loss(model, x):
    return (model(x) - 0.5).pow(2).mean()


def _groups(model):  # the Trainer's split: decay on weights, none on biases
    return [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
            {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]


def _train(model, opt, inputs):
    for x in inputs:
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()


def _capture(opt, model, mastered):
    with opt.capture_reference() as ref:
        for x in mastered:
            ref.backward(_loss(model, x))


def _roundtrip(state_dict):
    """Through torch.save / torch.load (weights_only, torch's default), as a real checkpoint."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _assert_same_params(a, b, exact=True):
    for p, q in zip(a.parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_torch_adamw_checkpoint_loads_into_fused_cnl_adamw_and_back(backend, device):
    inputs = [torch.randn(4, 6, device=device) for _ in range(6)]
    plain = _model(device)
    plain_opt = torch.optim.AdamW(_groups(plain), lr=0.01)
    _train(plain, plain_opt, inputs[:3])

    # torch -> CNL: the fused optimizer (no reference) continues the torch run
    fused = _model(device)
    fused.load_state_dict(plain.state_dict())
    fused_opt = cnl_ext.FusedCNLAdamW(_groups(fused), lr=0.01, backend=backend)
    fused_opt.load_state_dict(_roundtrip(plain_opt.state_dict()))
    _train(plain, plain_opt, inputs[3:5])
    _train(fused, fused_opt, inputs[3:5])
    _assert_same_params(plain, fused, exact=False)

    # CNL -> torch: torch.optim.AdamW continues the fused run, reference key or not
    fused_opt.set_reference({p: torch.ones_like(p) for p in fused.parameters()})
    saved = _roundtrip(fused_opt.state_dict(include_reference=True))
    assert REFERENCE_KEY in saved
    back = _model(device)
    back.load_state_dict(fused.state_dict())
    back_opt = torch.optim.AdamW(_groups(back), lr=0.01)
    back_opt.load_state_dict(saved)
    fused_opt.clear_reference()
    _train(back, back_opt, inputs[5:])
    _train(fused, fused_opt, inputs[5:])
    _assert_same_params(back, fused, exact=False)
    assert back_opt.state[back[0].weight]["step"].item() == 6


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reference_saved", [True, False], ids=["reference-saved", "reference-recomputed"])
def test_resumed_run_equals_uninterrupted_run(backend, device, reference_saved):
    inputs = [torch.randn(4, 6, device=device) for _ in range(6)]
    mastered = [torch.randn(5, 6, device=device) for _ in range(2)]
    make_opt = lambda model: cnl_ext.FusedCNLAdamW(_groups(model), lr=0.02, backend=backend)  # noqa: E731

    whole = _model(device)
    whole_opt = make_opt(whole)
    _capture(whole_opt, whole, mastered)
    _train(whole, whole_opt, inputs)

    first = _model(device)
    first_opt = make_opt(first)
    first_opt.save_reference = reference_saved
    _capture(first_opt, first, mastered)
    _train(first, first_opt, inputs[:3])
    checkpoint = _roundtrip({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    assert (REFERENCE_KEY in checkpoint["optimizer"]) == reference_saved

    resumed = _model(device)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make_opt(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.has_reference == reference_saved
    if not reference_saved:
        # the reference of the uninterrupted run was taken at the start: recompute it with those weights
        start = _model(device)
        start_opt = make_opt(start)
        _capture(start_opt, start, mastered)
        resumed_opt.set_reference({p: r for p, r in zip(resumed.parameters(), (
            start_opt._references[q] for q in start.parameters()))})
    _train(resumed, resumed_opt, inputs[3:])
    _assert_same_params(whole, resumed)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(whole_opt.state[p][key], resumed_opt.state[q][key])


@pytest.mark.parametrize("saved_format,loaded_format", [("float32", "sign2"), ("sign2", "float32"), ("int8", "bfloat16")])
def test_a_saved_reference_loads_into_another_format_with_the_same_mask(saved_format, loaded_format):
    inputs = [torch.randn(4, 6) for _ in range(3)]
    mastered = [torch.randn(5, 6)]
    make_opt = lambda model, fmt: cnl_ext.FusedCNLSGD(  # noqa: E731
        model.parameters(), lr=0.1, momentum=0.9, backend="torch", reference_dtype=fmt)
    results = []
    for fmt in (saved_format, loaded_format):
        model = _model("cpu")
        opt = make_opt(model, fmt)
        if fmt == saved_format:
            _capture(opt, model, mastered)
        else:  # the reference comes from a checkpoint saved in the other format
            source = _model("cpu")
            saver = make_opt(source, saved_format)
            _capture(saver, source, mastered)
            opt.load_state_dict(_roundtrip(saver.state_dict(include_reference=True)))
            assert opt.has_reference and opt.reference_format == loaded_format
        _train(model, opt, inputs)
        results.append(model)
    _assert_same_params(*results)


def test_the_cnl_wrapper_saves_and_restores_its_reference():
    model = _model("cpu")
    opt = cnl_ext.CNL(torch.optim.RMSprop(model.parameters(), lr=0.01), save_reference=True)
    _capture(opt, model, [torch.randn(5, 6)])
    _train(model, opt, [torch.randn(4, 6)])
    saved = _roundtrip(opt.state_dict())
    restored = cnl_ext.CNL(torch.optim.RMSprop(model.parameters(), lr=0.01))
    restored.load_state_dict(saved)
    for p in model.parameters():
        assert torch.equal(restored._references[p], opt._references[p])
    plain = torch.optim.RMSprop(model.parameters(), lr=0.01)
    plain.load_state_dict(saved)  # the extra key does not bother torch.optim
    assert torch.equal(plain.state[model[0].weight]["square_avg"], opt.state[model[0].weight]["square_avg"])


def test_a_reference_that_does_not_fit_is_rejected_by_name():
    model = _model("cpu")
    opt = cnl_ext.FusedCNLAdamW(model.parameters(), backend="torch")
    opt.set_reference([torch.ones_like(p) for p in model.parameters()])
    saved = opt.state_dict(include_reference=True)
    saved[REFERENCE_KEY]["tensors"][1] = torch.ones(3)
    with pytest.raises(ValueError, match="parameter 1 has 3 elements"):
        cnl_ext.FusedCNLAdamW(model.parameters(), backend="torch").load_state_dict(saved)
    saved[REFERENCE_KEY]["tensors"] = {9: torch.ones(3)}
    with pytest.raises(ValueError, match="names parameter 9"):
        cnl_ext.FusedCNLAdamW(model.parameters(), backend="torch").load_state_dict(saved)
