"""Class-wise PCA on the digits, every method, k in {4, 8, 16} (Φ of shape (64, 10, k)).

python experiments/pca.py [--quick] [--steps 4000] [--seeds 3]
"""

from __future__ import annotations

from _common import sweep


def main(argv=None):
    tasks = {f"k{k}": (f"pca:k={k}", f"PCA k={k}") for k in (4, 8, 16)}
    sweep("pca", __doc__, tasks, default_steps=4000, argv=argv)


if __name__ == "__main__":
    main()
