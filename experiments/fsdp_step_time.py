"""Step time: 2-process FSDP2 (gloo, CPU) vs one unsharded process, same model and global batch.

Usage: python experiments/fsdp_step_time.py [--steps 30] [--d 256] [--hidden 1024] [--blocks 4]
Prints medians (ms) of the optimizer step and of the whole iteration, and the bytes per step
that orthoopt adds (orthoopt.distributed.communication_per_step) next to FSDP2's own.
"""

import argparse
import datetime
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import orthoopt
from orthoopt import distributed as odist


def model(a):
    torch.manual_seed(0)
    layers = []
    for _ in range(a.blocks):
        layers += [nn.Linear(a.d, a.hidden), nn.GELU(), nn.Linear(a.hidden, a.d), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(a.d, 1))


def run(m, a, rank=None, world=1):
    opt = orthoopt.OrthoAdamW(orthoopt.param_groups(m, ortho=a.ortho), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    it, st = [], []
    for _ in range(a.warmup + a.steps):
        x = torch.randn(a.batch, a.d, generator=g)
        y = torch.randn(a.batch, 1, generator=g)
        if rank is not None:
            per = a.batch // world
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        if world > 1:
            dist.barrier()
        t1 = time.perf_counter()
        opt.step()
        if world > 1:
            dist.barrier()
        t2 = time.perf_counter()
        it.append(t2 - t0)
        st.append(t2 - t1)
    return opt, statistics.median(it[a.warmup :]) * 1e3, statistics.median(st[a.warmup :]) * 1e3


def worker(rank, port, a, q):
    torch.set_num_threads(a.threads // 2 or 1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    from torch.distributed.fsdp import fully_shard

    m = model(a)
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    opt, it, st = run(m, a, rank, 2)
    if rank == 0:
        q.put((it, st, odist.communication_per_step(opt), sum(p.numel() * p.dtype.itemsize for p in m.parameters())))
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    for k, v in dict(steps=30, warmup=5, d=256, hidden=1024, blocks=4, batch=64, threads=2).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--ortho", type=float, default=0.1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = {}
    for ortho in (0.0, a.ortho):  # ortho=0: plain AdamW, FSDP2's own cost
        a.ortho = ortho
        _, it1, st1 = run(model(a), a)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        mp.spawn(worker, args=(port, a, q), nprocs=2)
        it2, st2, c, pbytes = q.get()
        comm = c
        rows[ortho] = (st1, st2, it1, it2)
    print(
        f"model: {a.blocks} blocks Linear({a.d},{a.hidden})+Linear({a.hidden},{a.d}), {pbytes / 2**20:.2f} MiB fp32, batch {a.batch}, threads total {a.threads}, {a.steps} timed steps"
    )
    print(f"{'median (ms)':34s}{'1 process':>12s}{'FSDP2 x2':>12s}")
    for ortho, (st1, st2, it1, it2) in rows.items():
        print(f"{f'optimizer step, ortho={ortho}':34s}{st1:12.2f}{st2:12.2f}")
        print(f"{f'iteration,      ortho={ortho}':34s}{it1:12.2f}{it2:12.2f}")
    paths = {}
    for path, nbytes in comm.values():
        paths.setdefault(path, [0, 0])
        paths[path][0] += 1
        paths[path][1] += nbytes
    for path, (count, nbytes) in paths.items():
        print(f"orthoopt {path:10s}: {count} params, {nbytes} bytes/step ({nbytes / 2**20:.3f} MiB)")
    print(
        f"FSDP2's own: all-gather params fwd + bwd and reduce-scatter grads ~ 3 x {pbytes / 2**20:.2f} MiB payload/step"
    )
