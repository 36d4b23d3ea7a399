"""Property tests over shapes, layouts, dtypes, β and δ (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import orthoopt
from orthoopt.layout import resolve_layout


@st.composite
def layouts_and_shapes(draw):
    """A layout and a parameter shape it fits."""
    kind = draw(st.sampled_from(["auto", "rows", "columns", "column_groups", "group_axis", "conv"]))
    n = draw(st.integers(1, 6))
    l = draw(st.integers(n, 9))
    if kind == "rows":
        return "rows", (n, l)
    if kind == "columns":
        return "columns", (l, n)
    if kind == "auto":
        return "auto", draw(st.sampled_from([(l, n), (n, l)]))
    if kind == "conv":
        k = draw(st.integers(1, 2))
        cin = draw(st.integers(1, 3))
        out = draw(st.integers(1, cin * k * k))
        return "filters", (out, cin, k, k)
    if kind == "column_groups":
        h = draw(st.integers(1, 3))
        return f"column_groups:{h}", (l, h * n)
    dim = draw(st.integers(0, 2))
    m = draw(st.integers(1, 4))
    shape = [l, n]
    shape.insert(dim, m)
    return f"group_axis:{dim}", tuple(shape)


@settings(max_examples=150)
@given(spec=layouts_and_shapes(), beta=st.floats(0.01, 50.0), seed=st.integers(0, 2**31 - 1))
def test_optimizer_penalty_step_is_minus_lr_times_the_gradient(spec, beta, seed):
    layout, shape = spec
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=g))
    lay = resolve_layout(layout, shape, "w")
    mats = lay.matrices(w.detach().clone())
    r = mats.mT @ mats - torch.eye(mats.shape[-1], dtype=torch.float64)
    lr = 1e-7  # 2·lr·β <= 1e-5: neither cap binds unless R is (almost) zero
    # entries of R below 2η = 4·lr·β are moved to zero rather than by the sign (no crossing)
    assume(bool(r.abs().amin() > 4 * lr * beta))
    assume(bool(r.abs().amax() > 1e-3))  # nearer the manifold the step is all rounding
    w0 = w.detach().clone()
    opt = orthoopt.OrthoSGD([w], lr=lr, ortho=beta, ortho_layout=layout)
    w.grad = torch.zeros_like(w)
    opt.step()
    expected = lay.from_matrices(-lr * orthoopt.l1_orthogonality_grad(mats, beta, group_dim=0), shape)
    rounding = 4 * torch.finfo(torch.float64).eps * w0.abs().max()
    torch.testing.assert_close(w.detach() - w0, expected, rtol=0, atol=rounding)
    assert expected.abs().max() > 1e3 * rounding


@settings(max_examples=150)
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 8)),
    beta=st.floats(0.01, 50.0),
    delta=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    group_dim=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_functional_gradient_matches_autograd(shape, beta, delta, group_dim, seed):
    phi = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = phi.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(orthoopt.l1_orthogonality(x, beta, group_dim=group_dim, smoothing=delta), x)
    closed = orthoopt.l1_orthogonality_grad(phi, beta, group_dim=group_dim, smoothing=delta)
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)


@settings(max_examples=100)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 6),
    extra=st.integers(0, 5),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_is_zero_on_orthonormal_and_invariant_under_left_rotation(m, n, extra, dtype, seed):
    l = n + extra
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, l, n, dtype=torch.float64, generator=g))
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert orthoopt.orthogonality_error(q.to(dtype), group_dim=0).max() <= tol
    phi = torch.randn(m, l, n, dtype=torch.float64, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(l, l, dtype=torch.float64, generator=g))
    before = orthoopt.orthogonality_error(phi, group_dim=0)
    after = orthoopt.orthogonality_error(rot @ phi, group_dim=0)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)
    # the loss is invariant and its gradient equivariant: L(QΦ) = L(Φ), ∇L(QΦ) = Q∇L(Φ)
    torch.testing.assert_close(
        orthoopt.l1_orthogonality(rot @ phi, group_dim=0),
        orthoopt.l1_orthogonality(phi, group_dim=0),
        rtol=1e-10,
        atol=1e-10,
    )
    # smoothed, so that a Gram entry within rounding of zero cannot flip its sign between the two
    torch.testing.assert_close(
        orthoopt.l1_orthogonality_grad(rot @ phi, group_dim=0, smoothing=1e-6),
        rot @ orthoopt.l1_orthogonality_grad(phi, group_dim=0, smoothing=1e-6),
        rtol=1e-9,
        atol=1e-9,
    )


options = st.fixed_dictionaries(
    {
        "ortho": st.one_of(st.floats(-1, 10), st.sampled_from([float("nan"), float("inf"), "x", None, True, 0, 2])),
        "ortho_smoothing": st.one_of(st.floats(-1, 1), st.sampled_from([0, "y"])),
        "ortho_layout": st.sampled_from(
            [
                "auto",
                "rows",
                "columns",
                "filters",
                "group_axis:0",
                "group_axis:1",
                "group_axis:4",
                "column_groups:2",
                "column_groups:3",
                "bogus",
                5,
            ]
        ),
        "ortho_mode": st.sampled_from(["soft", "soft", "nope"]),
        "ortho_penalty": st.sampled_from(["l1", "frobenius", "l3"]),
    }
)


@settings(max_examples=150)
@example(opts={"ortho": 1.0, "ortho_layout": "columns"}, shape=(3, 0), dtype=torch.float32)
@example(opts={"ortho": 1.0, "ortho_layout": "auto"}, shape=(0, 3), dtype=torch.float32)
@example(opts={"ortho": 1.0, "ortho_layout": "group_axis:1"}, shape=(4, 0, 2), dtype=torch.float32)
@given(
    opts=options,
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_no_crash_but_the_documented_errors(opts, shape, dtype):
    w = nn.Parameter(torch.randn(shape).to(dtype))
    try:
        opt = orthoopt.OrthoSGD([("w", w)], lr=1e-2, **opts)
    except (ValueError, TypeError) as e:
        assert "ortho" in str(e) or "'w'" in str(e) or "layout" in str(e)
        return
    w.grad = torch.zeros_like(w)
    opt.step()
    assert w.shape == shape and w.dtype == dtype
    errs = opt.orthogonality_errors()
    penalized = opts["ortho"] == "auto" or opts["ortho"] > 0
    layout = resolve_layout(opts["ortho_layout"], shape, "w") if penalized else None
    # Exactly the constrained parameter is logged (an empty dict passes only where none is),
    # with its error max|ΦᵀΦ - I| recomputed here in float64.
    assert set(errs) == ({"w"} if layout is not None else set())
    if layout is not None:
        mats = layout.matrices(w.detach()).double()
        expected = (mats.mT @ mats - torch.eye(mats.shape[-1], dtype=torch.float64)).abs().max().item()
        assert abs(errs["w"] - expected) <= 1e-5 * max(1.0, expected), (errs["w"], expected)
