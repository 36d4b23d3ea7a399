"""Gather the experiments' README sections into experiments/results/README.md.

python tools/collect.py [--results experiments/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
ORDER = [
    ("group_tensor", "0. The (l, m, n) = (32, 8, 16) group tensor, penalty alone"),
    ("mlp_swap", "0. The one-line swap on a small MLP"),
    ("pca_target", "1. Class-wise PCA: the soft target, soft vs hard (k=8, 20,000 steps)"),
    ("pca_beta_sweep_k8", "1. Class-wise PCA: β across the exactness threshold"),
    ("soft_cap_ablation/pca", "1. Ablation of the step cap (PCA)"),
    ("pca", "1. Class-wise PCA, every method, k in {4, 8, 16}"),
    ("procrustes", "2. Batched orthogonal Procrustes, m in {1, 64, 512}"),
    ("soft_cap_ablation/procrustes_m64", "2. Ablation of the step cap (Procrustes m=64)"),
    ("classifiers", "3. Digit classifiers (MLP, CNN)"),
    ("soft_cap_ablation/mlp", "3. Ablation of the step cap (MLP)"),
    ("copying/L100_h128", "4. Copying memory problem, L = 100, hidden 128 (and soft's variants)"),
    ("copying/L200_h128", "4. Copying memory problem, L = 200, hidden 128"),
    ("copying/L200_h190", "4. Copying memory problem, L = 200, hidden 190: ms per iteration"),
    ("mppca/n4", "5. Mixture of probabilistic PCA on the digits, n = 4, against EM"),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default experiments/results)")
    results = p.parse_args(argv).results
    parts = [
        "# Experiment results\n\nProduced by the scripts in `experiments/` on the 2-core CPU machine "
        "(one torch thread, float32). Each folder holds `table.md`, `summary.csv`, `runs.csv`, "
        "`results.json` and PNG plots; times are medians per step measured side by side in one run."
    ]
    for folder, title in ORDER:
        readme = results / folder / "README.md"
        if readme.exists():
            body = readme.read_text().replace("\n## ", "\n### ")
            body = body[3:] if body.startswith("## ") else body
            parts.append(f"## {title}\n\n[{folder}/]({folder}/)\n\n### {body}")
    (results / "README.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {results / 'README.md'}")


if __name__ == "__main__":
    main()
