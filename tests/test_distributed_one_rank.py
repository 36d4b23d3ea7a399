"""The FSDP2 sharded soft step in the test process itself, on a one-rank gloo group.

With one rank every path of :mod:`orthoopt.distributed` runs (the Gram all-reduce, the gather,
the local step) with trivial communication, in a second or two and without a spawn, so that the
sharded code is exercised (and seen by tools that trace the test process, such as mutmut).
``tests/test_distributed.py`` checks 2 ranks with uneven and empty shards.
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import ShardingPathsNet
from torch import nn

import orthoopt
from orthoopt import distributed as odist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 6


@pytest.fixture(scope="module")
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    yield
    dist.destroy_process_group()


CONSTRAINED = ("up.weight", "down.weight", "mix", "heads")


def _optimizer(model: nn.Module, **options) -> torch.optim.Optimizer:
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, named[n]) for n in ("up.weight", "down.weight")], **options},
        {"params": [("mix", named["mix"])], "ortho_layout": "group_axis:0", **options},
        {"params": [("heads", named["heads"])], "ortho_layout": "column_groups:2", **options},
        {"params": [(n, named[n]) for n in ("up.bias", "down.bias", "head.weight", "head.bias")]},
    ]
    return orthoopt.OrthoAdamW(groups, lr=0.05)


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _sharded() -> nn.Module:
    return _sharded_from(ShardingPathsNet())


def _sharded_from(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if odist.is_dtensor(p) else p).detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "options",
    [
        {"ortho": 0.5},
        {"ortho": 0.1, "ortho_smoothing": 0.05},
        {"ortho": 2.0, "ortho_penalty": "frobenius"},
        {"ortho": "auto"},
        {"ortho": 0.5, "ortho_target": "orthogonal"},
        {"ortho": 0.5, "ortho_target": "orthogonal", "ortho_normalize": True},
        {"ortho": 2.0, "ortho_penalty": "frobenius", "ortho_target": "orthogonal"},
    ],
    ids=["l1", "huber", "frobenius", "auto", "orthogonal", "cosines", "orthogonal_frobenius"],
)
def test_one_rank_sharded_step_is_the_unsharded_step(one_rank, options):
    # Huber: 2η = 4·lr·β = 0.02 is below δ = 0.05, so that δ (not the no-crossing cutoff) shapes S.
    model, ref, free = _sharded(), ShardingPathsNet(), ShardingPathsNet()
    opt = _optimizer(model, **options)
    _train(model, opt)
    ref_opt = _optimizer(ref, **options)
    _train(ref, ref_opt)
    _train(free, torch.optim.AdamW(free.parameters(), lr=0.05))
    got, want = _full(model), dict(ref.named_parameters())
    for name in want:
        torch.testing.assert_close(got[name], want[name].detach(), rtol=0, atol=1e-12, msg=name)
    for name in CONSTRAINED:  # the penalty moved them: the comparison is not of idle steps
        assert (want[name] - dict(free.named_parameters())[name]).abs().max() > 1e-3, name
    errors = opt.orthogonality_errors()
    assert errors.keys() == set(CONSTRAINED)
    for name, value in ref_opt.orthogonality_errors().items():
        assert errors[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    if options["ortho"] == "auto":
        for p, q in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
            torch.testing.assert_close(opt.state[p]["ortho_multiplier"], ref_opt.state[q]["ortho_multiplier"])


def test_one_rank_paths_and_bytes(one_rank):
    model = _sharded()
    f64 = 8
    expected = {
        "up.weight": ("all_reduce", 1 * 3 * 3 * f64),
        "down.weight": ("gather", 3 * 7 * f64),
        "mix": ("local", 0),
        "heads": ("all_reduce", 2 * 2 * 2 * f64),
    }
    assert odist.communication_per_step(_optimizer(model, ortho=0.5)) == expected
    auto = {n: (how, nbytes * (2 if how == "all_reduce" else 3)) for n, (how, nbytes) in expected.items()}
    assert odist.communication_per_step(_optimizer(model, ortho="auto")) == auto
    assert odist.communication_per_step(_optimizer(model, ortho=0.0)) == {}
    assert odist.communication_per_step(_optimizer(model, ortho=0.5, ortho_mode="hard")) == {}


def test_one_rank_project_and_hard_refusal(one_rank):
    model, ref = _sharded(), ShardingPathsNet()
    orthoopt.project_(_optimizer(model, ortho=0.5))
    orthoopt.project_(_optimizer(ref, ortho=0.5))
    got = _full(model)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=1e-12, msg=name)
    hard = _optimizer(model, ortho=0.5, ortho_mode="hard")
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    before = _full(model)
    message = (
        "and ortho_mode='hard' needs each whole matrix on one rank for its retraction; orthoopt does not "
        "gather them. Use ortho_mode='soft' for sharded parameters (it supports FSDP2), or train with "
        "DistributedDataParallel, under which hard mode works unchanged"
    )
    with pytest.raises(NotImplementedError, match=r"^parameter 'up.weight' is a DTensor \(placements .*\), ") as e:
        hard.step()
    assert str(e.value).endswith(message)
    assert all(torch.equal(before[n], v) for n, v in _full(model).items())
    assert len(hard.state) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_rank_bytes_past_other_groups_and_parameters(one_rank, dtype):
    # An unpenalized group and an unsharded parameter come first, and nothing is named: every
    # sharded parameter after them is still counted, under its group and index; a half
    # parameter's Gram is all-reduced in float32.
    net = ShardingPathsNet().to(dtype)
    from torch.distributed.fsdp import fully_shard

    fully_shard(net)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    plain = nn.Parameter(torch.randn(5, 2, dtype=dtype))
    mesh = init_device_mesh("cpu", (1,))
    replicated = nn.Parameter(distribute_tensor(torch.randn(6, 3, dtype=dtype), mesh, [Replicate()]))
    groups = [
        {"params": [net.head.weight], "ortho": 0.0},
        {"params": [plain, net.up.weight]},
        {"params": [net.mix], "ortho_layout": "group_axis:0"},
        {"params": [replicated]},  # a DTensor not sharded along dim 0: local, nothing sent
    ]
    gram = 4 if dtype == torch.bfloat16 else 8
    assert odist.communication_per_step(orthoopt.OrthoAdamW(groups, lr=0.05, ortho=0.5)) == {
        "group1.param1": ("all_reduce", 1 * 3 * 3 * gram),
        "group2.param0": ("local", 0),
        "group3.param0": ("local", 0),
    }


@pytest.mark.parametrize("options", [{"ortho": 0.5}, {"ortho": 0.1, "ortho_smoothing": 0.05}], ids=["l1", "huber"])
def test_one_rank_warmup_step_at_lr_zero_changes_nothing(one_rank, options):
    """The first step of a linear warmup runs at lr = 0, where the penalty's cutoff max(δ, 2η)
    can be 0: the sharded step (which forms S without a workspace) must still be exactly zero
    where entries of R are exactly zero, as they are for weights made of identity columns."""
    plain = ShardingPathsNet()
    with torch.no_grad():
        plain.up.weight.copy_(torch.eye(7, 3))
        plain.down.weight.copy_(torch.eye(3, 7))
        plain.heads.copy_(torch.eye(6, 4))
    model = _sharded_from(plain)
    opt = _optimizer(model, **options)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
    before = _full(model)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    schedule.step()
    for name, value in _full(model).items():
        assert torch.equal(value, before[name]), name


def test_one_rank_composite_layout_is_refused_at_construction(one_rank):
    """A sharded parameter whose layout has blocks of unequal sizes is refused when the
    optimizer is built (and by project_ and the errors), naming it and the way out."""
    from orthoopt.testing import RowBlocks, resolving

    model = _sharded()  # up.weight: (7, 3)
    with resolving("row_groups:1", RowBlocks(sizes=(4, 3))):
        message = r"^parameter 'up.weight' is a DTensor .* with the layout 'row_blocks:4,3', whose blocks"
        with pytest.raises(NotImplementedError, match=message):
            orthoopt.OrthoAdamW([("up.weight", model.up.weight)], lr=0.05, ortho=0.5, ortho_layout="row_groups:1")
        opt = orthoopt.OrthoAdamW([("up.weight", model.up.weight)], lr=0.05, ortho=0.5, ortho_layout="columns")
        opt.param_groups[0]["ortho_layout"] = "row_groups:1"  # switched after construction
        model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
        before = model.up.weight.full_tensor().clone()
        for call in (opt.step, lambda: orthoopt.project_(opt), opt.orthogonality_errors):
            with pytest.raises(NotImplementedError, match=message):
                call()
    assert torch.equal(model.up.weight.full_tensor(), before) and len(opt.state) == 0
