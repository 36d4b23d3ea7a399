"""Where the soft step's time goes: CPU time per step of the floor, AdamW and the soft step,
interleaved, then ``torch.profiler`` of the soft step (the README's Performance section).

    python experiments/profile_soft_step.py --shape 256x64x16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orthoopt import OrthogonalityWarning  # noqa: E402
from orthoopt.bench.profiling import quiet_profile  # noqa: E402
from orthoopt.bench.step import Case, _adamw_flags, _base, _floor, _soft  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256x64x16", help="MxLxN: m matrices of l x n, one stacked parameter")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="profiled soft steps")
    args = p.parse_args(argv)
    # Random weights under random gradients drift: the drift check's warnings are not the profile.
    warnings.simplefilter("ignore", OrthogonalityWarning)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), torch.float32
    flags = _adamw_flags(device, dtype)
    case = Case(*(int(s) for s in args.shape.split("x")))
    contenders = [make(case, device, dtype, flags) for make in (_floor, _base, _soft)]
    for c in contenders:
        for _ in range(20):
            c.step()
    times = {c.name: [] for c in contenders}
    for _ in range(30):  # blocks of 20 steps, round-robin
        for c in contenders:
            t0 = time.process_time()
            for _ in range(20):
                c.step()
            times[c.name].append((time.process_time() - t0) / 20 * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    print("CPU ms per step:", {k: round(v, 3) for k, v in ms.items()})
    if ms["floor"] > 0:
        ratio = f"{(ms['soft'] - ms['base']) / ms['floor']:.2f}"
    else:  # a tiny shape's blocks of steps can take less than one tick of the CPU clock
        ratio = "not measured (the floor's steps took less than the CPU clock's resolution; use a larger --shape)"
    print(f"(soft - AdamW) / floor = {ratio}")
    soft = contenders[-1]
    with quiet_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            soft.step()
    events = prof.key_averages()
    print("tensor calls per step:", sum(e.count for e in events if e.key.startswith("aten::")) / args.steps)
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
