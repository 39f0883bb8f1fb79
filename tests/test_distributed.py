"""lipfast on torch.distributed: gloo processes on 127.0.0.1, results against single-process answers."""
from __future__ import annotations

import gc
import math
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lipfast

TIMEOUT = 60  # seconds for one group of processes, start to finish


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # objects fn left in reference cycles (a DDP module's reducer) are freed now, while the
        # process group lives: freed after it, at exit, one aborted its process once (terminate)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path: Path, *args) -> list:
    """fn(rank, world, *args) on `world` gloo processes; returns each rank's result, in rank order."""
    context = mp.start_processes(
        _entry, args=(world, free_port(), str(tmp_path), fn, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} on {world} processes did not finish in {TIMEOUT} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def sharded_matrix(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(70, 45, generator=g, dtype=torch.float64)



def _sharded_norms(rank: int, world: int, dtype: torch.dtype, certificate: str = "cholesky", scale: float = 1.0):
    if certificate == "gram":  # no Cholesky test holds: the bounds fall back to Gram iteration
        lipfast.conv.certify_gram = lambda G, *args: torch.full(G.shape[:1], math.inf, dtype=torch.float64)
    W = (sharded_matrix() * scale).to(dtype)
    # uneven shards: rank r gets r + 1 parts of the rows / columns
    cuts_rows = [W.shape[0] * sum(range(1, r + 2)) // sum(range(1, world + 1)) for r in range(world - 1)]
    cuts_cols = [W.shape[1] * sum(range(1, r + 2)) // sum(range(1, world + 1)) for r in range(world - 1)]
    rows = torch.tensor_split(W, cuts_rows, dim=0)[rank]
    cols = torch.tensor_split(W, cuts_cols, dim=1)[rank]
    out = {
        "rows": lipfast.distributed.spectral_norm(rows, 0),
        "cols": lipfast.distributed.spectral_norm(cols, 1),
        "rows_bounds": lipfast.distributed.spectral_norm_bounds(rows, 0, rtol=1e-4),
        "cols_bounds": lipfast.distributed.spectral_norm_bounds(cols, 1, rtol=1e-4),
    }
    # the gradient of each rank's shard is its block of u vᵀ
    shard = rows.clone().requires_grad_(True)
    lipfast.distributed.spectral_norm(shard, 0).backward()
    out["grad_rows"] = shard.grad
    return out


@pytest.mark.parametrize("world, dtype, certificate", [
    (2, torch.float64, "cholesky"), (4, torch.float64, "cholesky"), (2, torch.float32, "cholesky"),
    (4, torch.float32, "cholesky"), (2, torch.float64, "gram"),
])
def test_sharded_spectral_norm(tmp_path, world, dtype, certificate):
    """Every rank gets the same norm and bracket, holding the exact norm: about 1e-6 wide from the
    all-reduced Gram matrix's Cholesky test, within rtol = 1e-4 by Gram iteration where it fails."""
    results = run_ranks(_sharded_norms, world, tmp_path, dtype, certificate)
    W = sharded_matrix()
    exact = float(torch.linalg.matrix_norm(W, 2))
    rtol = 1e-5 if dtype == torch.float64 else 1e-4
    for key in ("rows", "cols"):
        values = [float(r[key]) for r in results]
        assert len(set(values)) == 1, f"ranks disagree: {values}"
        assert values[0] == pytest.approx(exact, rel=rtol)
        lower, upper = (float(x) for x in results[0][f"{key}_bounds"])
        assert all(tuple(float(x) for x in r[f"{key}_bounds"]) == (lower, upper) for r in results)
        assert lower <= exact <= upper
        if certificate == "gram":  # Gram iteration stops once within rtol: wider than the test's
            assert lower * (1 + 1e-6) < upper <= lower * (1 + 1e-4)
        else:
            assert upper <= lower * (1 + 1e-6)
    U, S, Vh = torch.linalg.svd(W)
    grad = torch.outer(U[:, 0], Vh[0])  # u vᵀ: the same for either sign of the singular vectors

    got = torch.cat([r["grad_rows"].double() for r in results])
    torch.testing.assert_close(got, grad, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-7)


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-310), (torch.float32, 1e-41), (torch.float64, 1e300)])
def test_sharded_extreme_scales(tmp_path, dtype, scale):
    """Shards whose entries are all subnormal (or near overflow) are scaled into range first: the
    estimate holds its digits (subnormal float32 entries only ~17 bits) and the bracket holds."""
    results = run_ranks(_sharded_norms, 2, tmp_path, dtype, "cholesky", scale)
    exact = float(torch.linalg.matrix_norm((sharded_matrix() * scale).to(dtype).double(), 2))
    for key in ("rows", "cols"):
        assert float(results[0][key]) == pytest.approx(exact, rel=1e-3)
        lower, upper = (float(x) for x in results[0][f"{key}_bounds"])
        assert 0 < lower <= exact <= upper < math.inf
    U, _, Vh = torch.linalg.svd(sharded_matrix())
    got = torch.cat([r["grad_rows"].double() for r in results])  # u vᵀ, whatever the scale
    torch.testing.assert_close(got, torch.outer(U[:, 0], Vh[0]), rtol=0, atol=1e-3)


def small_cnn() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
        nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).eval()
    with torch.no_grad():  # statistics that differ by channel: the BatchNorm is folded into the conv before it
        model[3].running_var.copy_(torch.linspace(0.2, 3.0, 16))
        model[3].weight.copy_(torch.linspace(-1.5, 2.0, 16))
    return model


def _network_bound(rank: int, world: int):
    report = lipfast.lipschitz_bound(small_cnn(), (3, 8, 8), progress=False)
    return report.upper, report.naive_upper, [(layer.name, layer.lower, layer.upper) for layer in report.layers]


@pytest.mark.parametrize("world", [2, 4])
def test_lipschitz_bound_shares_layers(tmp_path, world):
    single = lipfast.lipschitz_bound(small_cnn(), (3, 8, 8), progress=False)
    assert single.layers[2].note == "3 folded in: the bracket is of 3 after 2"
    results = run_ranks(_network_bound, world, tmp_path)
    expected_layers = [(layer.name, layer.lower, layer.upper) for layer in single.layers]
    for upper, naive, layers in results:
        assert [name for name, *_ in layers] == [name for name, *_ in expected_layers]
        assert upper == pytest.approx(single.upper, rel=1e-3) and naive == pytest.approx(single.naive_upper, rel=1e-3)
        for (_, lo, up), (_, e_lo, e_up) in zip(layers, expected_layers):
            assert up == pytest.approx(e_up, rel=1e-3) and lo == pytest.approx(e_lo, rel=1e-3)
    assert all(r == results[0] for r in results)


class _Generator(nn.Module):
    """Padding modules before conv modules (bracketed as one functional layer each) and a conv in a
    custom forward; with ``drawn``, a conv whose weight is drawn in the forward, which has no bound."""

    def __init__(self, drawn: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.drawn = drawn
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)),
                                  nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(4, 8, 3, 3) * 0.2)
        with torch.no_grad():
            self.body[5].running_var.copy_(torch.linspace(0.2, 3.0, 8))

    def forward(self, x):
        weight = torch.randn_like(self.weight) if self.drawn else self.weight
        return torch.nn.functional.conv2d(self.body(x), weight, padding=1)


def _generator_bound(rank: int, world: int, drawn: bool):
    report = lipfast.lipschitz_bound(_Generator(drawn).eval(), (3, 8, 8), progress=False)
    return report.upper, report.notes, [(layer.name, layer.kind, layer.lower, layer.upper) for layer in report.layers]


@pytest.mark.parametrize("drawn", [False, True], ids=["bounded", "drawn-weight"])
def test_lipschitz_bound_shares_functional_layers(tmp_path, drawn):
    # the functional layers (here the conv modules after pads, rewritten as F.conv2d, and a conv in
    # the forward) are shared out too, and every rank returns the single process's report
    single = lipfast.lipschitz_bound(_Generator(drawn).eval(), (3, 8, 8), progress=False)
    names = [layer.name for layer in single.layers]
    assert names[:2] == ["body.0", "body.1"] and "body.4" in names
    assert math.isfinite(single.upper) != drawn
    results = run_ranks(_generator_bound, 2, tmp_path, drawn)
    for upper, notes, layers in results:
        assert [(name, kind) for name, kind, *_ in layers] == [(layer.name, layer.kind) for layer in single.layers]
        assert notes == single.notes
        assert upper == pytest.approx(single.upper, rel=1e-3) if not drawn else upper == math.inf
        for (*_, lo, up), layer in zip(layers, single.layers):
            assert up == pytest.approx(layer.upper, rel=1e-3) and lo == pytest.approx(layer.lower, rel=1e-3)
    assert all(r == results[0] for r in results)


def test_layer_share_is_balanced():
    from lipfast.network import _share_out

    owner = _share_out([10.0, 1.0, 9.0, 2.0, 3.0], 2)
    loads = [sum(c for c, r in zip([10.0, 1.0, 9.0, 2.0, 3.0], owner) if r == rank) for rank in (0, 1)]
    assert sorted(loads) == [12.0, 13.0]
    assert _share_out([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def _bad_shards(rank: int, world: int):
    errors = {}
    shard = torch.randn(5, 4 + rank)  # columns differ between ranks
    try:
        lipfast.distributed.spectral_norm(shard, 0)
    except ValueError as exc:
        errors["columns"] = str(exc)
    try:
        lipfast.distributed.spectral_norm(torch.randn(5, 4), 2)
    except ValueError as exc:
        errors["dim"] = str(exc)
    try:  # a bad shard on one rank only: every rank raises, none hangs
        lipfast.distributed.spectral_norm(torch.ones(5, 4, dtype=torch.int64) if rank == 0 else torch.randn(5, 4), 0)
    except ValueError as exc:
        errors["dtype"] = str(exc)
    # a rank with no rows at all still takes part
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    errors["empty_ok"] = float(lipfast.distributed.spectral_norm(W if rank == 0 else W[:0], 0))
    bad = torch.randn(5, 4)
    if rank == 1:
        bad[2, 2] = math.nan
    try:
        lipfast.distributed.spectral_norm(bad, 0)
    except ValueError as exc:
        errors["nan"] = str(exc)
    return errors


def test_bad_shards(tmp_path):
    results = run_ranks(_bad_shards, 2, tmp_path)
    exact = float(torch.linalg.matrix_norm(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), 2))
    for errors in results:
        assert "every rank must hold the same number of columns" in errors["columns"]
        assert "shard_dim must be 0 (rows) or 1 (columns)" in errors["dim"]
        assert "on rank 0: local_shard must be floating point" in errors["dtype"]
        assert errors["empty_ok"] == pytest.approx(exact, rel=1e-5)
    assert all("on rank 1: local_shard has a NaN or Inf entry" in errors["nan"] for errors in results)


def test_not_initialized():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        lipfast.distributed.spectral_norm(torch.randn(3, 3), 0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        lipfast.lipschitz_bound(nn.Linear(3, 2), (3,), progress=False, group=object())


def _ddp_training(rank: int, world: int, broadcast_buffers: bool):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _normalized_model()  # the same initial model on every rank
    ddp = DDP(model, broadcast_buffers=broadcast_buffers)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for _ in range(3):
        x = torch.randn(5, 2, 6, generator=g)
        loss = ddp(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_spectral_norm_under_ddp(tmp_path, broadcast_buffers):
    states = run_ranks(_ddp_training, 2, tmp_path, broadcast_buffers)
    assert any(key.endswith("_u") for key in states[0]) and any(key.endswith("_v") for key in states[0])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"{key} differs between ranks"
    start = _initial_state()
    moved = [k for k in start if not torch.equal(start[k], states[0][k])]
    assert any(k.endswith("_u") for k in moved) and any("original" in k for k in moved)


def _normalized_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))
    lipfast.nn.spectral_norm(model[0], mode="operator")
    lipfast.nn.spectral_norm(model[3])
    model(torch.zeros(1, 2, 6))  # sizes the operator-mode iterate before DDP collects the buffers
    return model


def _initial_state() -> dict:
    return {k: v.detach().clone() for k, v in _normalized_model().state_dict().items()}


def _fsdp_training(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for layer in (model[0], model[2]):
        lipfast.nn.spectral_norm(layer)  # before sharding: supported
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        loss = model(torch.randn(4, 6, generator=g)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    iterates = [model[i].parametrizations.weight[0]._u.clone() for i in (0, 2)]
    weight = model[0].parametrizations.weight.original.full_tensor()
    error = None
    late = nn.Linear(6, 8)
    fully_shard(late, mesh=mesh)
    try:
        lipfast.nn.spectral_norm(late)  # after sharding: a clear error
    except ValueError as exc:
        error = str(exc)
    # a DTensor weight's norm, from its shards
    sigma = lipfast.distributed.spectral_norm(late.weight)
    return iterates, weight, error, float(sigma), late.weight.full_tensor().detach()


def test_spectral_norm_under_fsdp2(tmp_path):
    results = run_ranks(_fsdp_training, 2, tmp_path)
    (u0, w0, error, sigma, late), (u1, w1, _, sigma1, _) = results
    assert all(torch.equal(a, b) for a, b in zip(u0, u1))  # u identical on every rank
    assert torch.equal(w0, w1)
    assert "register spectral_norm before sharding" in error
    assert sigma == sigma1 == pytest.approx(float(torch.linalg.matrix_norm(late.double(), 2)), rel=1e-5)
