"""What every integration test asserts about a script's runs (tests/integration/training_scripts.py)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import training_scripts as ts

from orthoopt.guard import OrthogonalityWarning

# The targets of the framework training scripts: max |ΦᵀΦ - I| of every constrained parameter at the end of the run.
SOFT_TOL = 1e-2
HARD_TOL = 1e-5
# The swapped run's held-out task loss may exceed the unswapped one's by at most this fraction.
LOSS_MARGIN = 0.10


class Runs:
    """One run per variant of a script ("plain", "soft", "auto", "hard"), made on first use,
    with the OrthogonalityWarnings it raised."""

    def __init__(self, script: Callable[[dict[str, Any] | None], Any]):
        self.script = script
        self.cache: dict[str, ts.Run] = {}
        self.warnings: dict[str, list[str]] = {}

    def __getitem__(self, variant: str) -> ts.Run:
        if variant not in self.cache:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", OrthogonalityWarning)
                self.cache[variant] = ts.run(self.script(ts.RECIPES[variant]))
            self.warnings[variant] = [str(w.message) for w in caught if issubclass(w.category, OrthogonalityWarning)]
        return self.cache[variant]


def constraint_holds(runs: Runs, variant: str, expected: set[str]) -> None:
    """Every constrained parameter ends on target, and orthoopt said nothing (it had nothing to say)."""
    run = runs[variant]
    assert set(run.errors) == expected
    tol = HARD_TOL if variant == "hard" else SOFT_TOL
    missed = {name: error for name, error in run.errors.items() if not error <= tol}
    assert not missed, f"{variant}: above {tol}: {missed}"
    assert runs.warnings[variant] == []


def nothing_else_is_penalized(runs: Runs, variant: str, expected: set[str]) -> None:
    """The constrained groups hold exactly the expected parameters; every other parameter is in a
    group with ortho=0 and took, at the first step, bitwise the step of the plain optimizer
    (same seed, same batch, so the same gradients)."""
    run, plain = runs[variant], runs["plain"]
    penalized = [g for g in run.groups if g["ortho"] == "auto" or g["ortho"] > 0]
    held = [n for g in penalized for n in g["param_names"]]
    assert sorted(held) == sorted(expected)
    others = set(plain.first_step) - expected
    assert others, "the script must have unconstrained parameters"
    changed = [n for n in others if not torch.equal(run.first_step[n], plain.first_step[n])]
    assert not changed, f"{variant}: unconstrained parameters stepped differently from the plain optimizer: {changed}"
    # and the constrained ones did take the orthoopt step
    assert any(not torch.equal(run.first_step[n], plain.first_step[n]) for n in expected)


def loss_within_margin(runs: Runs, variant: str) -> None:
    run, plain = runs[variant], runs["plain"]
    assert run.loss <= (1 + LOSS_MARGIN) * plain.loss, (
        f"{variant}: held-out loss {run.loss:.4g} against {plain.loss:.4g} unswapped "
        f"({run.metric_name} {run.metric:.4g} against {plain.metric:.4g})"
    )


def far_start_reported(step: Callable[[], Any], expected: set[str]) -> None:
    """One ``step()`` of an optimizer swapped with ortho_init='warn' reports exactly the
    ``expected`` parameters as starting far from orthonormal, each with the way to project them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OrthogonalityWarning)
        step()
    far = {str(w.message).split("'")[1] for w in caught if "starts far from orthonormal" in str(w.message)}
    assert far == expected
    assert all("ortho_init='project'" in str(w.message) for w in caught)
