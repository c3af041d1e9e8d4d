"""The mechanism: CNL keeps the mastered loss from rising where the plain optimizer raises it."""
import pytest
import torch

import cnl_ext
from cnl_ext.ops.torch_backend import conflicting

from ..conftest import BACKEND_DEVICES


def _conflicting_tasks(device):
    """A model that fits M, and an injection set I that pulls the shared weights elsewhere."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    x_m = torch.randn(64, 8, device=device)
    with torch.no_grad():
        y_m = model(x_m) + 0.01 * torch.randn(64, 1, device=device)  # M is mastered: near-zero loss
    x_i = x_m[:16] + 0.1 * torch.randn(16, 8, device=device)
    y_i = -y_m[:16] + 1.0  # I contradicts M on nearby inputs
    loss_m = lambda: torch.nn.functional.mse_loss(model(x_m), y_m)
    loss_i = lambda: torch.nn.functional.mse_loss(model(x_i), y_i)
    return model, loss_m, loss_i


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mastered_loss_rises_under_adamw_and_not_under_cnl(backend, device):
    steps, lr = 20, 1e-4
    curves = {}
    for name in ("adamw", "cnl"):
        model, loss_m, loss_i = _conflicting_tasks(device)
        cls = torch.optim.AdamW if name == "adamw" else cnl_ext.FusedCNLAdamW
        extra = {} if name == "adamw" else {"backend": backend}
        opt = cls(model.parameters(), lr=lr, weight_decay=0.1, **extra)
        curve = [loss_m().item()]
        for _ in range(steps):
            if name == "cnl":  # the reference recomputed at every step: first order is then exact
                with opt.capture_reference() as ref:
                    ref.backward(loss_m())
            opt.zero_grad()
            loss_i().backward()
            opt.step()
            curve.append(loss_m().item())
        curves[name] = curve
    plain, cnl = curves["adamw"], curves["cnl"]
    assert all(b > a for a, b in zip(plain, plain[1:])), f"AdamW should forget M step after step: {plain}"
    assert all(b <= a for a, b in zip(cnl, cnl[1:])), f"CNL must not raise the loss on M: {cnl}"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reference_dtype", ["float32", "sign2"])
def test_collaborative_share_matches_a_direct_count(backend, device, reference_dtype):
    model, loss_m, loss_i = _conflicting_tasks(device)
    params = list(model.parameters())
    r = torch.autograd.grad(loss_m(), params)
    g = torch.autograd.grad(loss_i(), params)
    for optimizer in ("sgd", "adamw"):
        copies = [p.detach().clone().requires_grad_() for p in params]
        if optimizer == "sgd":  # u = g
            opt = cnl_ext.FusedCNLSGD(copies, lr=1e-3, backend=backend, reference_dtype=reference_dtype, track_stats=True)
            updates = list(g)
        else:  # first AdamW step: u = g / (|g| + eps) + λθ
            opt = cnl_ext.FusedCNLAdamW(copies, lr=1e-3, weight_decay=0.1, backend=backend,
                                        reference_dtype=reference_dtype, track_stats=True)
            updates = [gi / (gi.abs() + 1e-8) + 0.1 * p.detach() for gi, p in zip(g, params)]
        opt.set_reference(r)
        for c, gi in zip(copies, g):
            c.grad = gi.clone()
        assert opt.cnl_stats() is None
        opt.step()
        stats = opt.cnl_stats()
        collaborative = sum(int((~conflicting(ri, ui)).sum()) for ri, ui in zip(r, updates))
        total = sum(p.numel() for p in params)
        assert stats.total == total
        assert stats.collaborative == collaborative
        assert stats.collaborative_share == pytest.approx(collaborative / total)
        assert 0 < stats.collaborative < total
        assert [s.collaborative for s in stats.per_parameter] == [
            int((~conflicting(ri, ui)).sum()) for ri, ui in zip(r, updates)]
        if reference_dtype == "float32":  # s = r·u, summed over each group
            s = torch.cat([(ri * ui).flatten() for ri, ui in zip(r, updates)])
            assert stats.sum_s_collaborative == pytest.approx(s[s >= 0].sum().item(), rel=1e-4)
            assert stats.sum_s_conflicting == pytest.approx(s[s < 0].sum().item(), rel=1e-4)
            assert stats.sum_s_conflicting < 0 < stats.sum_s_collaborative
