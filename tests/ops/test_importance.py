"""KIF's importance EMAs (cnl_ext.ops.importance): spec §7 tests 1-2 and the contract's rounding."""
import pytest
import torch

from cnl_ext.ops.importance import importance_update_


def _states(like):
    return [torch.zeros_like(t, dtype=torch.float32) for t in like]


def test_ema_by_hand():
    # spec §7.1: SGD lr = 0 keeps w = 2; g = 0.5, -1, 0.25 -> I = 1, 2, 0.5
    w = [torch.tensor([2.0])]
    S, U = _states(w), _states(w)
    expected = [(0.15, 0.1275), (0.4275, 0.34425), (0.438375, 0.30185625)]
    for g, (s, u) in zip((0.5, -1.0, 0.25), expected):
        importance_update_(w, [torch.tensor([g])], S, U, kind="first", betas=(0.85, 0.85))
        assert S[0].item() == pytest.approx(s, rel=1e-6)
        assert U[0].item() == pytest.approx(u, rel=1e-6)
    assert (S[0] * U[0]).item() == pytest.approx(0.1323262336, rel=1e-6)


def test_constant_importance_closed_form():
    alpha, c = 0.85, 3.0
    w = [torch.tensor([1.5, -1.5])]
    g = [torch.tensor([2.0, -2.0])]  # I = |w g| = 3 for both signs
    S, U = _states(w), _states(w)
    for k in range(1, 9):
        importance_update_(w, g, S, U, kind="first", betas=(alpha, alpha))
        torch.testing.assert_close(S[0], torch.full((2,), c * (1 - alpha**k)), rtol=1e-5, atol=0)
        torch.testing.assert_close(U[0], torch.full((2,), (1 - alpha) * c * k * alpha**k), rtol=1e-5, atol=0)


def test_param_mix_is_asymmetric_and_first_order_is_not():
    w = [torch.tensor([1.0, 1.0])]
    g = [torch.tensor([0.5, -0.5])]
    for kind, expected in (("param_mix", [0.375, 0.625]), ("first", [0.5, 0.5])):
        S, U = _states(w), _states(w)
        importance_update_(w, g, S, U, kind=kind, betas=(0.0, 0.0))  # beta 0: S = I
        assert S[0].tolist() == expected
        assert U[0].tolist() == [0.0, 0.0]  # |I - S| = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["first", "param_mix"])
def test_separate_float32_operations_on_many_tensors(dtype, kind):
    shapes = [(3,), (7, 5), (0,), (2, 3, 4), (1000,)]
    w = [torch.randn(s).to(dtype) for s in shapes]
    g = [torch.randn(s).to(dtype) for s in shapes]
    S = [torch.rand(s) for s in shapes]
    U = [torch.rand(s) for s in shapes]
    expected_S, expected_U = [], []
    for wi, gi, si, ui in zip(w, g, S, U):  # the contract's formula, one op at a time
        x = wi.float() * gi.float()
        imp = x.abs() if kind == "first" else (x - (x * x) * 0.5).abs()
        s = si * 0.75 + imp * (1 - 0.75)
        expected_S.append(s)
        expected_U.append(ui * 0.5 + (imp - s).abs() * (1 - 0.5))
    w_before, g_before = [t.clone() for t in w], [t.clone() for t in g]
    importance_update_(w, g, S, U, kind=kind, betas=(0.75, 0.5))
    for i in range(len(shapes)):
        assert torch.equal(S[i], expected_S[i]) and torch.equal(U[i], expected_U[i])
        assert torch.equal(w[i], w_before[i]) and torch.equal(g[i], g_before[i])  # read only


@pytest.mark.parametrize("kind, betas, problem", [
    ("second", (0.85, 0.85), "importance kind"),
    ("first", (0.85,), "two numbers"),
    ("first", (1.0, 0.5), r"\[0, 1\)"),
])
def test_bad_options_are_refused_before_writing(kind, betas, problem):
    w, g = [torch.ones(3)], [torch.ones(3)]
    S, U = _states(w), _states(w)
    with pytest.raises(ValueError, match=problem):
        importance_update_(w, g, S, U, kind=kind, betas=betas)
    assert not S[0].any() and not U[0].any()


def test_list_lengths_must_match():
    with pytest.raises(ValueError, match="2 params, 1 grads"):
        importance_update_([torch.ones(1)] * 2, [torch.ones(1)], [torch.zeros(1)] * 2, [torch.zeros(1)] * 2,
                           kind="first", betas=(0.85, 0.85))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["first", "param_mix"])
def test_chunk_size_changes_nothing(monkeypatch, dtype, kind):
    from cnl_ext.ops import chunking

    shapes = [(3,), (50, 7), (1000,), (33,)]
    w = [torch.randn(s).to(dtype) for s in shapes]
    g = [torch.randn(s).to(dtype) for s in shapes]
    states = [torch.rand(s) for s in shapes], [torch.rand(s) for s in shapes]
    in_one_chunk = [t.clone() for t in states[0]], [t.clone() for t in states[1]]
    monkeypatch.setattr(chunking, "CPU_CHUNK", 1 << 30)
    importance_update_(w, g, *in_one_chunk, kind=kind, betas=(0.8, 0.6))
    monkeypatch.setattr(chunking, "CPU_CHUNK", 32)  # tensors cut at chunk boundaries, small ones packed
    importance_update_(w, g, *states, kind=kind, betas=(0.8, 0.6))
    for got, want in zip(states[0] + states[1], in_one_chunk[0] + in_one_chunk[1]):
        assert torch.equal(got, want)
