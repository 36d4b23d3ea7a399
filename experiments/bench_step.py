"""Time one optimizer step: orthoopt's soft step against its matmul floor and the alternatives.

    PYTHONPATH=. python experiments/bench_step.py --device cpu --out results/bench_step_cpu.json
    PYTHONPATH=. python experiments/bench_step.py --device cuda --out results/bench_step_cuda.json

Same as ``python -m orthoopt bench``; see :mod:`orthoopt.bench.step` for the contenders and flags.
"""

import sys

from orthoopt.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
