"""orthoopt under torch's own engines: DDP (replicated) and FSDP2 (``fully_shard``, sharded).

Each scenario spawns 2 CPU processes (gloo, loopback) once and compares with an unsharded
single-process run on the same global batches, computed in the pytest process.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from conftest import ShardingPathsNet
from torch import nn

import orthoopt
from orthoopt import distributed as odist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, world: int = WORLD) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(_free_port(), *args), nprocs=world, join=True)


def _init(rank: int, port: int, world: int = WORLD) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _shutdown() -> None:
    gc.collect()
    dist.destroy_process_group()


def _batches(steps: int, d_in: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (
            torch.randn(BATCH, d_in, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=g, dtype=torch.float64),
        )


def _local(t: torch.Tensor, rank: int | None) -> torch.Tensor:
    if rank is None:
        return t
    per = BATCH // WORLD
    return t[rank * per : (rank + 1) * per]


def _train(model, opt, steps: int, d_in: int, rank: int | None = None, step_guard=contextlib.nullcontext) -> None:
    for x, y in _batches(steps, d_in):
        opt.zero_grad()
        nn.functional.mse_loss(model(_local(x, rank)), _local(y, rank)).backward()
        with step_guard():
            opt.step()


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


@contextlib.contextmanager
def _no_collectives():
    """Any torch.distributed collective inside raises: the step must talk to no other rank."""

    def refuse(*args, **kwargs):
        raise AssertionError("the optimizer step called a collective")

    with contextlib.ExitStack() as stack:
        for name in _COLLECTIVES:
            stack.enter_context(mock.patch.object(dist, name, refuse))
        yield


# -- DDP --------------------------------------------------------------------------------
DDP_STEPS = 50


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def _ddp_optimizer(model: nn.Module, mode: str):
    groups = orthoopt.param_groups(model, ortho=0.5, ortho_mode=mode, exclude=["4"])
    opt = orthoopt.OrthoAdamW(groups, lr=0.02)
    if mode == "hard":
        orthoopt.project_(opt)  # start on the manifold
    return opt


def _ddp_worker(rank: int, port: int, out: str, modes: list[str]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, port)
    try:
        for mode in modes:
            model = _ddp_model()
            ddp = DistributedDataParallel(model)
            opt = _ddp_optimizer(model, mode)
            # DDP averaged the gradients; the step needs nothing more from the other rank.
            _train(ddp, opt, DDP_STEPS, 3, rank, step_guard=_no_collectives)
            torch.save(model.state_dict(), os.path.join(out, f"ddp-{mode}-{rank}.pt"))
            # DDP's reducer sits in reference cycles; left to the collector at interpreter exit it
            # is torn down after its process group and aborts the process (seen 1 run in 5).
            del ddp
            gc.collect()
    finally:
        _shutdown()


def test_ddp_replicas_identical_and_equal_to_one_process(tmp_path):
    modes = ["soft", "hard"]
    _spawn(_ddp_worker, str(tmp_path), modes)
    for mode in modes:
        ranks = [torch.load(tmp_path / f"ddp-{mode}-{r}.pt") for r in range(WORLD)]
        model = _ddp_model()
        _train(model, _ddp_optimizer(model, mode), DDP_STEPS, 3)
        free = _ddp_model()
        _train(free, torch.optim.AdamW(free.parameters(), lr=0.02), DDP_STEPS, 3)
        for name, ref in model.state_dict().items():
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{mode}: replicas differ in {name}"
            torch.testing.assert_close(ranks[0][name], ref, rtol=0, atol=1e-6, msg=f"{mode}: {name}")
        # The comparison can fail: the constraint moved the penalized weights well beyond 1e-6.
        assert (model.state_dict()["0.weight"] - free.state_dict()["0.weight"]).abs().max() > 1e-3


# -- FSDP2 ------------------------------------------------------------------------------
FSDP_STEPS = 20


def _fsdp_optimizer(model: nn.Module, mode: str = "soft", smoothing: float = 0.0, ortho: float | str = 0.5, **options):
    common = {"ortho": ortho, "ortho_mode": mode, "ortho_smoothing": smoothing, **options}
    named = dict(model.named_parameters())

    def pick(*names):
        return [(n, named[n]) for n in names]

    groups = [
        {"params": pick("up.weight", "down.weight", "head.weight"), **common},
        {"params": pick("mix"), "ortho_layout": "group_axis:0", **common},
        {"params": pick("heads"), "ortho_layout": "column_groups:2", **common},
        {"params": pick("up.bias", "down.bias", "head.bias")},
    ]
    return orthoopt.OrthoAdamW(groups, lr=0.02)


class _GateNet(nn.Module):
    """Row-block layouts whose blocks a ``Shard(0)`` cuts: dim 0 holds (block, row in block).

    ``wide.weight`` (9, 4), 'row_groups:3': blocks (3, 4), rows orthonormal; rows split 5 + 4.
    ``tall.weight`` (12, 2), 'row_groups:3': blocks (4, 2), columns orthonormal; rows split 6 + 6.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = nn.Linear(4, 9)
        self.tall = nn.Linear(2, 12)
        self.head = nn.Linear(21, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.tanh(self.wide(x)), torch.tanh(self.tall(x[:, :2]))], dim=1))


def _gate_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    named = dict(model.named_parameters())
    blocks = [(n, named[n]) for n in ("wide.weight", "tall.weight")]
    rest = [(n, p) for n, p in named.items() if n not in ("wide.weight", "tall.weight")]
    return orthoopt.OrthoAdamW(
        [{"params": blocks, "ortho": 0.5, "ortho_layout": "row_groups:3"}, {"params": rest}], lr=0.02
    )


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    try:
        results = {}
        for smoothing in (0.0, 0.05):
            model = ShardingPathsNet()
            fully_shard(model)
            opt = _fsdp_optimizer(model, smoothing=smoothing)
            _train(model, opt, FSDP_STEPS, 3, rank)
            full = {n: p.full_tensor() for n, p in model.named_parameters()}
            local = {n: p.to_local().shape for n, p in model.named_parameters()}
            results[smoothing] = {
                "params": full,
                "local": local,
                "comm": odist.communication_per_step(opt),
                "errors": opt.orthogonality_errors(),
            }
        # HSDP-style 2-D mesh (replicate 1 x shard 2), and 'heads' sharded on dim 1 (gather path).
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard

        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
        model = ShardingPathsNet()
        fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p is model.heads else None)
        opt = _fsdp_optimizer(model, smoothing=0.05)
        _train(model, opt, FSDP_STEPS, 3, rank)
        results["hsdp"] = {
            "params": {n: p.full_tensor() for n, p in model.named_parameters()},
            "comm": odist.communication_per_step(opt),
        }
        results["hard"] = _try_hard_step()
        model = _GateNet()
        fully_shard(model)
        opt = _gate_optimizer(model)
        _train(model, opt, FSDP_STEPS, 4, rank)
        results["row_groups"] = {
            "params": {n: p.full_tensor() for n, p in model.named_parameters()},
            "comm": odist.communication_per_step(opt),
            "errors": opt.orthogonality_errors(),
        }
        model = ShardingPathsNet()
        fully_shard(model)
        opt = _fsdp_optimizer(model, ortho="auto")
        _train(model, opt, FSDP_STEPS, 3, rank)
        results["auto"] = {n: p.full_tensor() for n, p in model.named_parameters()}
        results["auto_comm"] = odist.communication_per_step(opt)
        for normalize in (False, True):  # free lengths: the Gram matrices themselves are summed
            model = ShardingPathsNet()
            fully_shard(model)
            opt = _fsdp_optimizer(model, ortho_target="orthogonal", ortho_normalize=normalize)
            _train(model, opt, FSDP_STEPS, 3, rank)
            results[f"orthogonal-{normalize}"] = {n: p.full_tensor() for n, p in model.named_parameters()}
        model = ShardingPathsNet()
        fully_shard(model)
        opt = _fsdp_optimizer(model)
        orthoopt.project_(opt)
        results["project"] = {
            "params": {n: p.full_tensor() for n, p in model.named_parameters()},
            "errors": opt.orthogonality_errors(),
        }
        torch.save(results, os.path.join(out, f"fsdp-{rank}.pt"))
    finally:
        _shutdown()


def _try_hard_step() -> dict:
    from torch.distributed.fsdp import fully_shard

    model = ShardingPathsNet()
    fully_shard(model)
    opt = _fsdp_optimizer(model, mode="hard")
    x, y = next(_batches(1, 3))
    nn.functional.mse_loss(model(_local(x, dist.get_rank())), _local(y, dist.get_rank())).backward()
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    try:
        opt.step()
        error = None
    except NotImplementedError as e:
        error = str(e)
    unchanged = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    return {"error": error, "unchanged": unchanged, "state": len(opt.state)}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One 2-process FSDP2 spawn for every FSDP2 test: the results of both ranks."""
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(_fsdp_worker, str(out))
    return [torch.load(out / f"fsdp-{r}.pt") for r in range(WORLD)]


def test_fsdp2_soft_matches_unsharded(fsdp_runs):
    ranks = fsdp_runs
    # The shards are the uneven and empty ones the test is about.
    local = [ranks[r][0.0]["local"] for r in range(WORLD)]
    assert [local[r]["up.weight"][0] for r in range(WORLD)] == [4, 3]
    assert [local[r]["head.weight"][0] for r in range(WORLD)] == [1, 0]
    assert ranks[0][0.0]["comm"] == {
        "up.weight": ("all_reduce", 3 * 3 * 8),
        "down.weight": ("gather", 3 * 7 * 8),
        "head.weight": ("gather", 1 * 2 * 8),
        "mix": ("local", 0),
        "heads": ("all_reduce", 2 * 2 * 2 * 8),
    }
    for smoothing in (0.0, 0.05):
        model = ShardingPathsNet()
        opt = _fsdp_optimizer(model, smoothing=smoothing)
        _train(model, opt, FSDP_STEPS, 3)
        free = ShardingPathsNet()
        _train(free, _plain(free), FSDP_STEPS, 3)
        for name, ref in model.named_parameters():
            for r in range(WORLD):
                got = ranks[r][smoothing]["params"][name]
                torch.testing.assert_close(got, ref.detach(), rtol=0, atol=1e-5, msg=f"δ={smoothing}: {name}")
        # Logged errors are of the whole matrices, the same on every rank (a collective).
        for r in range(WORLD):
            errors = ranks[r][smoothing]["errors"]
            assert errors.keys() == opt.orthogonality_errors().keys()
            for name, ref in opt.orthogonality_errors().items():
                assert errors[name] == pytest.approx(ref, abs=1e-6), name
        # Without the sharded penalty step, every penalized weight would be off by far more.
        for name in ("up.weight", "down.weight", "head.weight", "mix", "heads"):
            moved = (dict(model.named_parameters())[name] - dict(free.named_parameters())[name]).abs().max()
            assert moved > 1e-3, name
    # δ reaches the sharded step: the runs at δ = 0.05 and δ = 0 differ (on every path).
    for name in ("up.weight", "down.weight", "head.weight", "mix", "heads"):
        smoothed, exact = (ranks[0][s]["params"][name] for s in (0.05, 0.0))
        assert (smoothed - exact).abs().max() > 1e-4, name


def _plain(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.02)


def test_hsdp_mesh_and_dim1_sharding(fsdp_runs):
    """A 2-D mesh reduces over its shard dim only; a Shard(1) parameter takes the gather path."""
    model = ShardingPathsNet()
    _train(model, _fsdp_optimizer(model, smoothing=0.05), FSDP_STEPS, 3)
    for r in range(WORLD):
        hsdp = fsdp_runs[r]["hsdp"]
        assert hsdp["comm"]["up.weight"][0] == "all_reduce" and hsdp["comm"]["heads"][0] == "gather"
        for name, ref in model.named_parameters():
            torch.testing.assert_close(hsdp["params"][name], ref.detach(), rtol=0, atol=1e-5, msg=name)


def test_fsdp2_hard_mode_refused_before_any_change(fsdp_runs):
    for r in range(WORLD):
        hard = fsdp_runs[r]["hard"]
        assert hard["error"] is not None and "parameter 'up.weight'" in hard["error"]
        assert "ortho_mode='soft'" in hard["error"] and "DistributedDataParallel" in hard["error"]
        assert hard["unchanged"] and hard["state"] == 0, "the refused step modified something"


def test_sharded_axis_is_where_dim0_lands():
    """The path table's premise, for every layout: dim 0 of the parameter becomes these stack axes."""
    cases = [("rows", (4, 6)), ("columns", (6, 4)), ("column_groups:2", (6, 4))]
    cases += [(f"group_axis:{d}", (5, 4, 3)) for d in range(3)]
    cases += [("row_groups:3", (9, 4)), ("row_groups:3", (12, 2))]  # wide blocks (m, n), tall blocks (m, l)
    for spec, shape in cases:
        layout = orthoopt.layout.resolve_layout(spec, shape, spec)
        row = torch.arange(shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1)).expand(shape)
        mats = layout.matrices(row)
        axis = odist.sharded_axis(layout)
        varying = [a for a, name in enumerate("mln") if mats.shape[a] > 1 and not (mats == mats.narrow(a, 0, 1)).all()]
        assert varying == sorted("mln".index(a) for a in axis), (spec, axis, varying)


def test_fsdp2_row_groups_take_the_gather_path_and_match_unsharded(fsdp_runs):
    """Shards that end inside a row block (5 + 4 rows of 3-row blocks; 6 + 6 of 4-row blocks)."""
    model = _GateNet()
    opt = _gate_optimizer(model)
    _train(model, opt, FSDP_STEPS, 4)
    free = _GateNet()
    _train(free, _plain(free), FSDP_STEPS, 4)
    for r in range(WORLD):
        run = fsdp_runs[r]["row_groups"]
        assert run["comm"] == {"wide.weight": ("gather", 9 * 4 * 8), "tall.weight": ("gather", 12 * 2 * 8)}
        for name, ref in model.named_parameters():
            torch.testing.assert_close(run["params"][name], ref.detach(), rtol=0, atol=1e-5, msg=name)
        for name, ref in opt.orthogonality_errors().items():
            assert run["errors"][name] == pytest.approx(ref, abs=1e-6), name
    for name in ("wide.weight", "tall.weight"):
        moved = (dict(model.named_parameters())[name] - dict(free.named_parameters())[name]).abs().max()
        assert moved > 1e-3, name


@pytest.mark.parametrize("normalize", [False, True])
def test_fsdp2_orthogonal_target_matches_unsharded(fsdp_runs, normalize):
    """ortho_target='orthogonal' on every sharding path: the Gram matrices summed over the ranks
    (no identity to correct for), then the target's residual and step."""
    model = ShardingPathsNet()
    _train(model, _fsdp_optimizer(model, ortho_target="orthogonal", ortho_normalize=normalize), FSDP_STEPS, 3)
    free = ShardingPathsNet()
    _train(free, _plain(free), FSDP_STEPS, 3)
    for r in range(WORLD):
        for name, ref in model.named_parameters():
            got = fsdp_runs[r][f"orthogonal-{normalize}"][name]
            torch.testing.assert_close(got, ref.detach(), rtol=0, atol=1e-5, msg=name)
    for name in ("up.weight", "down.weight", "head.weight", "mix", "heads"):
        moved = (dict(model.named_parameters())[name] - dict(free.named_parameters())[name]).abs().max()
        assert moved > 1e-3, name


def test_project_on_sharded_parameters_is_the_unsharded_projection(fsdp_runs):
    """``project_`` after ``fully_shard``: each rank keeps its part of the whole matrices' polar factor."""
    model = ShardingPathsNet()
    opt = _fsdp_optimizer(model)
    orthoopt.project_(opt)
    assert max(opt.orthogonality_errors().values()) < 1e-12
    for r in range(WORLD):
        projected = fsdp_runs[r]["project"]
        for name, ref in model.named_parameters():
            torch.testing.assert_close(projected["params"][name], ref.detach(), rtol=0, atol=1e-12, msg=name)
        assert projected["errors"].keys() == opt.orthogonality_errors().keys()
        assert max(projected["errors"].values()) < 1e-12
    # The projection moved the weights: the comparison above is not of untouched parameters.
    assert (dict(ShardingPathsNet().named_parameters())["up.weight"] - model.up.weight).abs().max() > 1e-2


def test_fsdp2_auto_beta_matches_unsharded(fsdp_runs):
    """ortho='auto' on every sharding path: β from the update, its products summed or gathered."""
    model = ShardingPathsNet()
    opt = _fsdp_optimizer(model, ortho="auto")
    _train(model, opt, FSDP_STEPS, 3)
    assert all("ortho_multiplier" in opt.state[p] for p in opt.param_groups[0]["params"])
    free = ShardingPathsNet()
    _train(free, _plain(free), FSDP_STEPS, 3)
    for r in range(WORLD):
        for name, ref in model.named_parameters():
            torch.testing.assert_close(fsdp_runs[r]["auto"][name], ref.detach(), rtol=0, atol=1e-5, msg=name)
    for name in ("up.weight", "down.weight", "head.weight", "mix", "heads"):
        moved = (dict(model.named_parameters())[name] - dict(free.named_parameters())[name]).abs().max()
        assert moved > 1e-3, name
    # The update's products travel with the residuals: twice the all-reduce, three gathers.
    assert fsdp_runs[0]["auto_comm"] == {
        "up.weight": ("all_reduce", 2 * 3 * 3 * 8),
        "down.weight": ("gather", 3 * 3 * 7 * 8),
        "head.weight": ("gather", 3 * 1 * 2 * 8),
        "mix": ("local", 0),
        "heads": ("all_reduce", 2 * 2 * 2 * 2 * 8),
    }


# -- 4 ranks: a 2 x 2 mesh --------------------------------------------------------------
MESH_STEPS = 5


def _mesh_parameters() -> dict[str, tuple[torch.Tensor, str, str]]:
    """``{name: (initial value, layout, placements)}`` on a 2 x 2 mesh ('R' Replicate, 'S' Shard(0)).

    'RS' (HSDP: replicas along mesh dim 0) sums the Gram over mesh dim 1 only; 'SS' shards dim 0
    over both mesh dims, so the sum runs over two groups; (3, 1) in 'SS' leaves shards of one
    row and an empty one on the all-reduce path, (3, 2, 2) an empty one on the local path.
    """
    g = torch.Generator().manual_seed(3)

    def near(*shape):
        mats = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0]
        return mats + 0.05 * torch.randn(mats.shape, generator=g, dtype=torch.float64)

    return {
        "none": (torch.zeros(0, 3, dtype=torch.float64), "columns", "SS"),
        "hsdp": (near(6, 3), "columns", "RS"),
        "both": (near(8, 3), "columns", "SS"),
        "thin": (near(3, 1), "columns", "SS"),
        "stack": (near(3, 2, 2), "group_axis:0", "SS"),
    }


def _mesh_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, (t, _, _) in _mesh_parameters().items()}


def _mesh_optimizer(params: dict[str, torch.Tensor], ortho: float | str) -> torch.optim.Optimizer:
    layouts = {n: layout for n, (_, layout, _) in _mesh_parameters().items()}
    groups = [
        {"params": [(n, params[n]) for n in ("none", "hsdp", "both", "thin")], "ortho_layout": "columns"},
        {"params": [("stack", params["stack"])], "ortho_layout": layouts["stack"]},
    ]
    return orthoopt.OrthoAdamW(groups, lr=0.02, ortho=ortho)


def _mesh_train(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, shard=lambda n, grad: grad) -> None:
    for step in range(MESH_STEPS):
        for n, grad in _mesh_grads(step).items():
            params[n].grad = shard(n, grad)
        opt.step()


MESH_ORTHO = (0.5, "auto")


def _mesh_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    _init(rank, port, world=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2))
        kinds = {"R": Replicate(), "S": Shard(0)}
        placements = {n: [kinds[k] for k in spec] for n, (_, _, spec) in _mesh_parameters().items()}
        results = {}
        for ortho in MESH_ORTHO:
            params = {
                n: nn.Parameter(distribute_tensor(t.clone(), mesh, placements[n]))
                for n, (t, _, _) in _mesh_parameters().items()
            }
            opt = _mesh_optimizer(params, ortho)
            _mesh_train(params, opt, lambda n, grad: distribute_tensor(grad, mesh, placements[n]))
            results[ortho] = {
                "params": {n: p.full_tensor() for n, p in params.items()},
                "local": {n: p.to_local().shape for n, p in params.items()},
                "comm": odist.communication_per_step(opt),
                "errors": opt.orthogonality_errors(),
            }
        torch.save(results, os.path.join(out, f"mesh-{rank}.pt"))
    finally:
        _shutdown()


@pytest.mark.parametrize("ortho", MESH_ORTHO)
def test_2x2_mesh_sums_over_the_shard_dims_only(mesh_runs, ortho):
    """4 ranks: the Gram is summed over the mesh dims that shard dim 0, not over replicas, and
    over both where both shard; shards of one row and empty shards on the all-reduce and local paths."""
    ranks = [run[ortho] for run in mesh_runs]
    params = {n: nn.Parameter(t.clone()) for n, (t, _, _) in _mesh_parameters().items()}
    opt = _mesh_optimizer(params, ortho)
    _mesh_train(params, opt)
    # The shards are those the test is about.
    assert [ranks[r]["local"]["thin"][0] for r in range(4)] == [1, 1, 1, 0]
    assert [ranks[r]["local"]["stack"][0] for r in range(4)] == [1, 1, 1, 0]
    assert [ranks[r]["local"]["hsdp"][0] for r in range(4)] == [3, 3, 3, 3]
    # Per step: the Gram (m·n·n float64) once per mesh dim that shards dim 0; 'auto' adds the
    # update's products, as many.
    per_dim = 2 if ortho == "auto" else 1
    for r in range(4):
        # A zero-size parameter has no matrices and no entry; the ones after it have theirs.
        assert ranks[r]["comm"] == {
            "hsdp": ("all_reduce", 3 * 3 * 8 * per_dim),
            "both": ("all_reduce", 3 * 3 * 8 * 2 * per_dim),
            "thin": ("all_reduce", 1 * 1 * 8 * 2 * per_dim),
            "stack": ("local", 0),
        }
        for n, ref in params.items():
            torch.testing.assert_close(ranks[r]["params"][n], ref.detach(), rtol=0, atol=1e-12, msg=n)
        assert ranks[r]["errors"].keys() == opt.orthogonality_errors().keys()
        for n, ref in opt.orthogonality_errors().items():
            assert ranks[r]["errors"][n] == pytest.approx(ref, abs=1e-12), n
    # The penalty moved every constrained weight: a step without it would be far off.
    free = {n: nn.Parameter(t.clone()) for n, (t, _, _) in _mesh_parameters().items()}
    _mesh_train(free, torch.optim.AdamW(free.values(), lr=0.02))
    for n in ("hsdp", "both", "thin", "stack"):
        assert (params[n] - free[n]).abs().max() > 1e-3, n


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    """One 4-process spawn on a 2 x 2 mesh: each rank's results, for β = 0.5 and 'auto'."""
    out = tmp_path_factory.mktemp("mesh")
    _spawn(_mesh_worker, str(out), world=4)
    return [torch.load(out / f"mesh-{r}.pt") for r in range(4)]
