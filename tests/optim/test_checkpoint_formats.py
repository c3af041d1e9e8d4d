"""Checkpoints written by torch.optim of torch 2.4 .. 2.13 load into the CNL optimizers (issue 13, defect 8).

tests/optim/fixtures/torch_optim_checkpoint_formats.json records, per release, the param-group keys and
the state layout torch.optim.Adam/AdamW/SGD write. Each test trains with torch.optim (torch 2.13,
the one installed), rewrites its state_dict into one release's format, saves and loads it
(torch.save / torch.load), loads it into a fresh CNL optimizer and a fresh torch.optim optimizer
(both built with other hyper-parameters, so the checkpoint's must win), and steps both: the
parameters and states must agree. Releases with identical formats share one test.
"""
import io
import json
import pathlib

import pytest
import torch

import cnl_ext

from . import reliability_helpers as rh

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "torch_optim_checkpoint_formats.json"
FORMATS = json.loads(FIXTURE.read_text())["formats"]

TORCH_OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}
CNL_OPTIMIZERS = {"Adam": cnl_ext.FusedCNLAdam, "AdamW": cnl_ext.FusedCNLAdamW, "SGD": cnl_ext.FusedCNLSGD}
TRAINED_WITH = {  # the options of the run that writes the checkpoint
    "Adam": [dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.01),
             dict(lr=0.05, amsgrad=True, maximize=True, eps=1e-6)],
    "AdamW": [dict(lr=0.05, weight_decay=0.1), dict(lr=0.02, amsgrad=True, weight_decay=0.05)],
    "SGD": [dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.1, dampening=0.5, maximize=True),
            dict(lr=0.1, momentum=0.5, dampening=0.2)],
}
FRESH = {"Adam": dict(lr=1.0), "AdamW": dict(lr=1.0, weight_decay=0.0), "SGD": dict(lr=1.0)}


def _format_cases():
    """(optimizer, format, releases, variant) for every distinct format in the fixture and each variant:
    as written, with the 'initial_lr' of an LR scheduler, and (SGD) with a None momentum buffer."""
    cases = {}
    for version, per_optimizer in FORMATS.items():
        for name, fmt in per_optimizer.items():
            key = (name, json.dumps(fmt, sort_keys=True))
            cases.setdefault(key, []).append(version)
    return [pytest.param(name, json.loads(fmt), versions, variant,
                         id=f"{name}-torch{versions[0]}-{versions[-1]}-{variant}")
            for (name, fmt), versions in cases.items()
            for variant in ("plain", "initial_lr") + (("none_momentum_buffer",) if name == "SGD" else ())]


def _in_format(state_dict, fmt, *, initial_lr=False, none_momentum_buffer=False):
    """``state_dict`` (written by this torch) rewritten as ``fmt`` records it."""
    groups = []
    for group in state_dict["param_groups"]:
        missing = [k for k in fmt["param_group_keys"] if k not in group and k not in fmt["param_group_values"]]
        assert not missing, f"the fixture names keys this torch does not write: {missing}"
        rewritten = {k: fmt["param_group_values"].get(k, group.get(k)) for k in fmt["param_group_keys"]}
        if initial_lr:
            rewritten["initial_lr"] = group["lr"]
        rewritten["params"] = group["params"]
        groups.append(rewritten)
    state = {}
    for index, entry in state_dict["state"].items():
        entry = {k: v for k, v in entry.items() if k in fmt["state"]}
        if "step" in entry:
            assert entry["step"].dtype == torch.float32 and entry["step"].dim() == 0
        state[index] = entry
    if none_momentum_buffer:
        all_indices = [i for g in groups for i in g["params"]]
        state = {i: state.get(i) or {"momentum_buffer": None} for i in all_indices}
    buffer = io.BytesIO()
    torch.save({"state": state, "param_groups": groups}, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only, as a user loads a checkpoint


def _params(device):
    torch.manual_seed(4)
    return [torch.nn.Parameter(torch.randn(5, 4, device=device)), torch.nn.Parameter(torch.randn(4, device=device))]


def _train(params, opt, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.device)
        opt.step()


@pytest.mark.parametrize("backend,device", rh.BACKEND_DEVICES)
@pytest.mark.parametrize("name,fmt,versions,variant", _format_cases())
def test_checkpoint_of_each_torch_release_loads_and_steps_like_torch_optim(backend, device, name, fmt, versions,
                                                                           variant):
    for options in TRAINED_WITH[name]:
        source_params = _params(device)
        source = TORCH_OPTIMIZERS[name](source_params, **options)
        _train(source_params, source, 2, seed=1)
        saved = _in_format(source.state_dict(), fmt, initial_lr=variant == "initial_lr",
                           none_momentum_buffer=variant == "none_momentum_buffer")
        cnl_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
        torch_params = [torch.nn.Parameter(p.detach().clone()) for p in source_params]
        cnl_opt = CNL_OPTIMIZERS[name](cnl_params, backend=backend, **FRESH[name])
        torch_opt = TORCH_OPTIMIZERS[name](torch_params, **FRESH[name])
        torch_opt.load_state_dict(saved)
        cnl_opt.load_state_dict(saved)
        for key, value in options.items():  # the checkpoint's options, not the constructor's
            assert cnl_opt.param_groups[0][key] == value, f"{key} after loading torch {versions} format"
        _train(cnl_params, cnl_opt, 2, seed=2)
        _train(torch_params, torch_opt, 2, seed=2)
        for i, (p, q) in enumerate(zip(cnl_params, torch_params)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"torch {versions} format, {options}, parameter {i}: {m}")
        torch_state, cnl_state = torch_opt.state_dict()["state"], cnl_opt.state_dict()["state"]
        for index, entry in torch_state.items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(cnl_state[index][key].float(), value.float(), rtol=1e-5, atol=1e-6)
