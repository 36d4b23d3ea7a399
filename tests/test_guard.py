"""ortho_init and the drift check (orthoopt.guard): a soft constraint that will not hold is reported."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

import orthoopt
from orthoopt import guard, testing


def _error(p: torch.Tensor) -> float:
    return orthoopt.orthogonality_error(p.detach().unsqueeze(1), group_dim=1).max().item()


def _far(seed: int = 0) -> torch.nn.Parameter:
    """A (64, 16) weight with timm's std-0.02 init: max |ΦᵀΦ - I| close to 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(0.02 * torch.randn(64, 16, dtype=torch.float64, generator=g))


def _step(opt: torch.optim.Optimizer, grad_scale: float = 1.0) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = grad_scale * torch.ones_like(p)
    opt.step()


def _records(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, guard.OrthogonalityWarning)]


def test_project_starts_on_the_manifold_after_the_first_step():
    w = _far()
    opt = orthoopt.OrthoAdamW([w], lr=1e-3, ortho=1.0, ortho_init="project")
    assert _error(w) > 0.9
    assert not _records(lambda: _step(opt))
    assert _error(w) < 1e-12
    assert opt.state[w][guard.STARTED] is True


def test_project_happens_once_not_at_later_steps():
    w = _far()
    opt = orthoopt.OrthoSGD([w], lr=1e-3, ortho=1e-6, ortho_init="project")
    _step(opt)
    with torch.no_grad():
        w.mul_(1.5)  # off the manifold again, by the user or the task
    _step(opt, grad_scale=0.0)
    assert _error(w) == pytest.approx(1.25, abs=1e-3)  # (1.5² - 1): pulled a little, not snapped


def test_project_mark_survives_a_checkpoint_so_a_resume_is_bitwise():
    def run(resume_at: int | None) -> torch.Tensor:
        torch.manual_seed(0)
        w = _far()
        opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0, ortho_init="project")
        for k in range(6):
            if k == resume_at:
                buf = io.BytesIO()
                torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                w = torch.nn.Parameter(saved["w"])
                opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1.0, ortho_init="project")
                opt.load_state_dict(saved["opt"])
            torch.manual_seed(k)
            w.grad = torch.randn_like(w)
            opt.step()
        return w.detach()

    assert torch.equal(run(None), run(3))


def test_warn_names_the_parameter_the_steps_needed_and_the_fix_at_the_callers_line():
    w = _far()
    opt = orthoopt.OrthoAdamW(
        [{"params": [w], "param_names": ["encoder.weight"]}], lr=1e-4, ortho=1.0
    )  # ortho_init="warn" is the default
    w.grad = torch.ones_like(w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # the line the warning must point at
    (record,) = [c for c in caught if issubclass(c.category, guard.OrthogonalityWarning)]
    text = str(record.message)
    assert "encoder.weight" in text and "ortho_init='project'" in text
    # 4·lr·β = 4e-4 per step, error ~0.99: about 2500 steps
    assert "at least 2.4" in text or "at least 2.5" in text, text
    assert record.filename == __file__
    assert not _records(lambda: _step(opt))  # once, at the first step only


def test_warn_stays_quiet_on_the_manifold_or_where_the_pull_is_fast():
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    on = torch.nn.Parameter(q)
    assert not _records(lambda: _step(orthoopt.OrthoAdamW([on], lr=1e-4, ortho=1.0)))
    far = _far()
    # lr·β = 1: the pull moves an entry by 4 per step, one step covers the distance
    assert not _records(lambda: _step(orthoopt.OrthoSGD([far], lr=1.0, ortho=1.0)))


def test_keep_is_silent_and_leaves_the_weights_to_the_step():
    w, ref = _far(), _far()
    opt = orthoopt.OrthoAdamW([w], lr=1e-4, ortho=1.0, ortho_init="keep")
    ref_opt = orthoopt.OrthoAdamW([ref], lr=1e-4, ortho=1.0)
    assert not _records(lambda: _step(opt))
    _records(lambda: _step(ref_opt))
    assert torch.equal(w, ref)  # 'warn' and 'keep' take the same step


def test_auto_uses_the_estimated_beta_in_the_estimate():
    w = _far()
    opt = orthoopt.OrthoAdamW([w], lr=1e-4, ortho="auto")
    (record,) = _records(lambda: _step(opt))
    beta = guard.auto.AUTO_SAFETY * opt.state[w][guard.auto.STATE].max().item()
    assert beta > 0
    assert f"lr·ortho = {1e-4 * beta:.3g}" in str(record.message)


def _drifting(**options):
    """A 32x8 orthonormal weight under SGD whose gradient -Φ grows every column each step, with
    β far below what holds that pull; ``train(steps)`` returns the error after each step."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64))
    w = torch.nn.Parameter(q)
    opt = orthoopt.OrthoSGD([w], lr=2e-3, ortho=1e-4, **options)

    def train(steps: int) -> list[float]:
        errors = []
        for _ in range(steps):
            w.grad = -w.detach().clone()
            opt.step()
            errors.append(_error(w))
        return errors

    return w, opt, train


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_drift_is_reported_once_within_ten_steps_of_the_error_passing_far(path):
    """The warning comes within 10 steps of the error passing FAR (two checks above it, every
    WATCH_EVERY = 4 steps; on the accelerator path the copy of the errors is read a step later,
    when it has arrived), and once only."""
    w, opt, train = _drifting()
    errors, records = [], []
    context = testing.accelerator_path() if path == "accelerator" else contextlib.nullcontext()
    with context:
        for _ in range(60):
            found = _records(lambda: errors.extend(train(1)))
            records.extend((len(errors), r) for r in found)
    passed = next(k for k, e in enumerate(errors, 1) if e > guard.FAR)
    assert len(records) == 1 and "moving away from orthonormality" in str(records[0][1].message)
    assert passed < records[0][0] <= passed + 10
    assert "If it is the output layer" in str(records[0][1].message)
    assert not _records(lambda: train(100))


def test_no_drift_report_where_the_constraint_holds():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64))
    w = torch.nn.Parameter(q)
    opt = orthoopt.OrthoSGD([w], lr=2e-3, ortho="auto")

    def train() -> None:
        for _ in range(300):
            w.grad = -w.detach().clone()
            opt.step()

    assert not _records(train)
    # what one base step adds after the penalty step, 2·lr: the floor of a constant lr
    assert _error(w) < 5e-3


def test_bad_ortho_init_is_refused():
    with pytest.raises(ValueError, match="ortho_init must be one of"):
        orthoopt.OrthoAdamW([_far()], ortho=1.0, ortho_init="snap")


def test_project_judges_the_start_not_the_first_step():
    # On the manifold at the start: the first step moves it off (error ~1e-2), and 'project' must
    # leave that step alone, as 'keep' does; only a start off the manifold is snapped.
    def first_step(policy: str) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        w = torch.nn.Parameter(q)
        opt = orthoopt.OrthoAdamW([w], lr=1e-2, ortho=1e-3, ortho_init=policy)
        w.grad = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        opt.step()
        return w.detach()

    projected, kept = first_step("project"), first_step("keep")
    assert _error(kept) > 1e-3
    assert torch.equal(projected, kept)


def test_a_parameter_that_gets_its_first_gradient_later_is_judged_then():
    far, later = _far(0), _far(1)
    opt = orthoopt.OrthoSGD([far, later], lr=1e-3, ortho=1.0, ortho_init="project")
    far.grad = torch.zeros_like(far)
    opt.step()  # `later` has no gradient yet: torch skips it, and so does the constraint
    assert _error(far) < 1e-12 and _error(later) > 0.9
    later.grad = torch.zeros_like(later)
    opt.step()
    assert _error(later) < 1e-12


def test_each_piece_of_a_composite_layout_is_judged_projected_and_reported_on_its_own():
    """A RowBlocks weight whose first block starts on the manifold and whose second starts
    far: 'project' snaps the second alone (the first keeps its step), each piece keeps its
    own mark, project_ snaps every block, and the errors are the worst block's."""
    from orthoopt.testing import RowBlocks, resolving

    g = torch.Generator().manual_seed(3)
    on = torch.linalg.qr(torch.randn(16, 7, generator=g, dtype=torch.float64)).Q.T.contiguous()
    far = 0.02 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    w, alone = torch.nn.Parameter(torch.cat([on, far])), torch.nn.Parameter(on.clone())
    with resolving("row_groups:1", RowBlocks(sizes=(7, 5))):
        opt = orthoopt.OrthoSGD([w], lr=1e-3, ortho=1.0, ortho_init="project", ortho_layout="row_groups:1")
        ref = orthoopt.OrthoSGD([alone], lr=1e-3, ortho=1.0, ortho_init="project", ortho_layout="rows")
        assert _records(lambda: (_step(opt), _step(ref))) == []
        assert torch.equal(w[:7], alone)  # the first block: its soft step, not snapped
        assert _error(w[7:].T) < 1e-12  # the second: projected
        assert opt.state[w][guard.STARTED] is True and opt.state[w][guard.STARTED + ".1"] is True
        with torch.no_grad():
            w[:7].mul_(1.1)
        worst = max(_error(w[:7].T), _error(w[7:].T))
        assert worst > 0.2 and opt.orthogonality_errors() == {"group0.param0": pytest.approx(worst, rel=1e-12)}
        orthoopt.project_(opt)
        assert max(opt.orthogonality_errors().values()) < 1e-12
    warn = torch.nn.Parameter(torch.cat([on, far]))
    with resolving("row_groups:1", RowBlocks(sizes=(7, 5))):
        opt = orthoopt.OrthoSGD([warn], lr=1e-3, ortho=1.0, ortho_layout="row_groups:1")
        (record,) = _records(lambda: _step(opt))
    assert "parameter 'group0.param0' (block 1 of 2) starts far from orthonormal" in str(record.message)
