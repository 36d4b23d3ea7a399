"""Batched orthogonal Procrustes, m groups of 16x8 (A 32x16), m in {1, 64, 512}: every method,
time to reach |f - f*| < 1e-4|f*| together with max|ΦᵀΦ - I| < 1e-3.

    python experiments/procrustes.py [--quick] [--steps 2000] [--seeds 3]
"""

from __future__ import annotations

from _common import sweep


def main(argv=None):
    tasks = {f"m{m}": (f"procrustes:m={m}", f"Procrustes m={m}") for m in (1, 64, 512)}
    sweep("procrustes", __doc__, tasks, default_steps=2000, argv=argv)


if __name__ == "__main__":
    main()
