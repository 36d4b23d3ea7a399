"""The accelerator's code path, run on CPU tensors (orthoopt.testing.accelerator_path).

On an accelerator every read of a tensor's value on the host is a sync that stalls the CPU's
run-ahead, and every aten operation a kernel launch.  In a steady-state step, with every
option at its default, the soft step reads nothing on the host (masks stay on the device, the
monitor's copy of the errors is read at its next check) and dispatches at most 15 operations
per shape class beyond the base step; the CPU path reads on the host where that is free, and
steps bitwise as the accelerator's path does.  The step is also CUDA-graph safe with a tensor
learning rate: its operations do not depend on the values of the tensors.
"""

from __future__ import annotations

import contextlib
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import orthoopt
from orthoopt import guard, testing

# 10 weights in 4 shapes: 4 buckets (two of several weights, two of one)
SHAPES = [(64, 16)] * 4 + [(32, 8)] * 3 + [(128, 32)] * 2 + [(16, 4)]
CLASSES = 4
OPS_PER_CLASS = 15  # the performance budget's count of operations per shape class beyond the base step
WARMUP, COUNTED = 12, 2 * guard.WATCH_EVERY  # the counted steps include the monitor's checks


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in SHAPES:
        q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g)).Q
        out.append(nn.Parameter((q.T if rows < cols else q).contiguous()))
    return out


def _path(name: str):
    return testing.accelerator_path() if name == "accelerator" else contextlib.nullcontext()


def _steps(make, params, counted: int, seed: int = 1) -> list[testing.OpCounter]:
    """``WARMUP`` steps, then ``counted`` steps whose operations are counted."""
    opt = make(params)
    g = torch.Generator().manual_seed(seed)
    counters = []
    for t in range(WARMUP + counted):
        for p in params:
            p.grad = 1e-2 * torch.randn(p.shape, generator=g)
        if t < WARMUP:
            opt.step()
        else:
            counters.append(testing.count_ops(opt.step))
    return counters


def _base(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)  # no host read of its own


OPTIONS = {
    "soft": {"ortho": 1.0},
    "soft, the cap may bind": {"ortho": 1.0, "lr": 2e-2},
    "auto": {"ortho": "auto"},
    "ortho_every": {"ortho": 1.0, "ortho_every": 3},
    "huber": {"ortho": 1.0, "ortho_smoothing": 0.01},
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_steady_state_steps_read_nothing_on_the_host_on_the_accelerator_path(options):
    kwargs = {"lr": 1e-3, **OPTIONS[options]}
    with testing.accelerator_path():
        counters = _steps(lambda ps: orthoopt.OrthoAdamW(ps, fused=True, **kwargs), _params(), COUNTED)
    assert [c.host_reads for c in counters] == [0] * COUNTED
    assert sum(c.ops["_fused_adamw_"] for c in counters) == COUNTED  # the base step ran


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("options", ["soft", "soft, the cap may bind", "huber"])
def test_a_steady_state_step_dispatches_at_most_15_operations_per_shape_class(path, options):
    """Counted over 10 steps, the monitor's two checks among them; the cap's power iteration
    runs where 4·1.25·n·η > 1 (n = 32 at lr 2e-2)."""
    kwargs = {"lr": 1e-3, **OPTIONS[options]}
    with _path(path):
        ortho = _steps(lambda ps: orthoopt.OrthoAdamW(ps, fused=True, **kwargs), _params(), COUNTED)
        base = _steps(_base, _params(), COUNTED)
    extra = (sum(c.total for c in ortho) - sum(c.total for c in base)) / COUNTED
    assert extra <= OPS_PER_CLASS * CLASSES, f"{extra / CLASSES:.2f} operations per shape class"
    if options == "soft, the cap may bind":  # it ran where 4·1.25·n·η > 1: n = 32, 16 and 8, not 4
        assert sum(c.ops["renorm_"] for c in ortho) == 3 * COUNTED


@pytest.mark.parametrize("options", list(OPTIONS))
def test_the_cpu_path_steps_bitwise_as_the_accelerator_path(options):
    """The CPU path's reads skip work (the mask of an all-finite bucket) but change no bit."""
    kwargs = {"lr": 1e-3, **OPTIONS[options]}
    cpu, accelerator = _params(), _params()
    _steps(lambda ps: orthoopt.OrthoAdamW(ps, **kwargs), cpu, 3)
    with testing.accelerator_path():
        _steps(lambda ps: orthoopt.OrthoAdamW(ps, **kwargs), accelerator, 3)
    start = _params()
    for p, q, s in zip(cpu, accelerator, start):
        assert torch.equal(p, q) and not torch.equal(p, s)


def test_the_step_is_cuda_graph_safe_with_a_tensor_learning_rate():
    """What a capturable base needs of the soft step: no host read, and the same operations on
    the same shapes whatever the tensors hold: an lr at which the cap cannot bind or does, and a
    matrix that turns NaN (masked on the device).  ortho_every > 1, counted on the host, is
    refused with capturable=True."""
    params = _params()
    lr = torch.tensor(1e-4)
    with testing.accelerator_path():
        opt = orthoopt.OrthoAdamW(params, lr=lr, ortho=1.0, fused=True)
        g = torch.Generator().manual_seed(1)
        # three steady steps, none of them the monitor's check (every WATCH_EVERY-th step)
        counted = [t for t in range(10, 30) if (t + 1) % guard.WATCH_EVERY][:3]
        sequences, reads = [], []
        for t in range(counted[-1] + 1):
            for p in params:
                p.grad = 1e-2 * torch.randn(p.shape, generator=g)
            if t == counted[1]:
                lr.fill_(1.0)  # the cap binds now
            if t == counted[2]:
                with torch.no_grad():
                    params[0][0, 0] = float("nan")
            counter = testing.count_ops(opt.step)
            if t in counted:
                sequences.append(counter.calls)
                reads.append(counter.host_reads)
    assert reads == [0, 0, 0] and sequences[0] == sequences[1] == sequences[2]
    assert torch.isnan(params[0][0, 0]) and torch.isfinite(params[0].detach().flatten()[1:]).all()
    with pytest.raises(ValueError, match="ortho_every=2 with capturable=True"):
        orthoopt.OrthoAdamW(_params(), lr=torch.tensor(1e-3), ortho=1.0, ortho_every=2, capturable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
def test_a_cuda_graph_of_the_step_replays_as_the_eager_steps():
    """Capture one step of a capturable OrthoAdamW (after eager warm-up steps on a side
    stream, as torch documents), replay it, and compare with eager steps on a copy."""
    params = [nn.Parameter(p.detach().cuda()) for p in _params()]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    grads = [1e-2 * torch.randn_like(p) for p in params]

    def make(ps):
        return orthoopt.OrthoAdamW(ps, lr=torch.tensor(1e-3, device="cuda"), ortho=1.0, capturable=True)

    opt, twin_opt = make(params), make(twins)
    for p, q, gr in zip(params, twins, grads):
        p.grad, q.grad = gr.clone(), gr.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.step()
            twin_opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(5):
        graph.replay()
        twin_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def one_rank():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    yield
    dist.destroy_process_group()


def test_the_sharded_step_reads_nothing_on_the_host_on_the_accelerator_path(one_rank):
    """FSDP2 on one rank: every sharding path (Gram all-reduce, gather, local) in steady state."""
    from conftest import ShardingPathsNet
    from torch.distributed.fsdp import fully_shard

    model = ShardingPathsNet()
    fully_shard(model)
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["up.weight"], named["down.weight"]], "ortho": 0.5},
        {"params": [named["mix"]], "ortho": 0.5, "ortho_layout": "group_axis:0"},
        {"params": [named["heads"]], "ortho": 0.5, "ortho_layout": "column_groups:2"},
        {"params": [named[n] for n in ("up.bias", "down.bias", "head.weight", "head.bias")]},
    ]
    opt = orthoopt.OrthoSGD(groups, lr=0.05)
    x = torch.randn(8, 3, dtype=torch.float64)
    with testing.accelerator_path():
        reads = []
        for t in range(8):
            opt.zero_grad()
            model(x).sum().backward()
            counter = testing.count_ops(opt.step)
            if t >= 2:
                reads.append(counter.host_reads)
    assert reads == [0] * 6
