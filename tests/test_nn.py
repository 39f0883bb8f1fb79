"""lipfast.nn: spectral normalization against torch's, operator mode against exact norms."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import lipfast
from test_conv import exact_norm

LAYERS = {
    "Linear": (lambda: nn.Linear(12, 7), (5, 12)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    "Conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 8, 7)),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 3)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (2, 4, 4, 5)),
}


def _pair(kind: str, seed: int = 0, **kwargs):
    """The same layer twice, one with torch's spectral norm, one with lipfast's, registered from the
    same random state."""
    make, shape = LAYERS[kind]
    torch.manual_seed(seed)
    base = make().double()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    parametrizations.spectral_norm(theirs, **kwargs)
    torch.manual_seed(seed + 1)
    lipfast.nn.spectral_norm(ours, **kwargs)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
    return ours, theirs, x


def _buffers(module):
    p = module.parametrizations.weight[0]
    return p._u, p._v


@pytest.mark.parametrize("kind", list(LAYERS))
def test_matrix_mode_is_torchs(kind, backend):
    ours, theirs, x = _pair(kind, n_power_iterations=2)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for a, b in zip(_buffers(ours), _buffers(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step in range(4):
        outs = []
        for module, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            y = module(x + step)
            (y * y).sum().backward()
            outs.append((y.detach(), module.parametrizations.weight.original.grad.clone()))
            opt.step()
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-7)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-7)
    # checkpoints, both ways
    for source, dest in ((ours, copy.deepcopy(theirs)), (theirs, copy.deepcopy(ours))):
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        dest.load_state_dict(torch.load(buffer))
        with torch.no_grad():
            torch.testing.assert_close(dest(x), source(x), rtol=1e-5, atol=1e-7)


def test_eval_reuses_w_over_sigma_until_something_changes():
    torch.manual_seed(0)
    layer = lipfast.nn.spectral_norm(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        w1 = layer.weight
        assert layer.weight is w1  # computed once
        layer.parametrizations.weight.original.mul_(2)  # the weight changes in place
        w2 = layer.weight
    assert w2 is not w1
    torch.testing.assert_close(w2, w1)  # W / sigma is scale-free
    layer.train()
    layer(torch.randn(3, 16))  # a training step moves u and v
    layer.eval()
    with torch.no_grad():
        assert layer.weight is not w2
    # with autograd on and a weight that needs it, every forward builds its own graph
    a, b = layer.weight, layer.weight
    assert a is not b and a.requires_grad


def test_two_forwards_then_backward_and_shared_module():
    torch.manual_seed(0)
    for mode in ("matrix", "operator"):
        layer = lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode=mode)
        x = torch.randn(2, 3, 6, 6)
        loss = layer(x).sum() - layer(x.new_ones(2, 3, 6, 6)).sum()
        loss = loss + layer(torch.cat([x, x], 1)[:, :3]).pow(2).sum()
        loss.backward()
        assert torch.isfinite(layer.parametrizations.weight.original.grad).all()
        model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(4, 3, 1), layer)  # the same module twice
        model(x).sum().backward()


def test_deepcopy_state_dict_dtype_and_removal():
    torch.manual_seed(0)
    for mode in ("matrix", "operator"):
        layer = lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode=mode)
        x = torch.randn(2, 3, 5, 5)
        layer(x)
        clone = copy.deepcopy(layer).eval()
        layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(clone(x), layer(x))
        fresh = lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode=mode).eval()
        fresh.load_state_dict(layer.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), layer(x))
        double = copy.deepcopy(layer).double()
        with torch.no_grad():
            torch.testing.assert_close(double(x.double()).float(), layer(x), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            expected = layer(x)
        parametrize.remove_parametrizations(layer, "weight")
        assert isinstance(layer.weight, nn.Parameter)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights(dtype):
    torch.manual_seed(0)
    for mode in ("matrix", "operator"):
        layer = lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode=mode, input_size=(6, 6))
        layer = layer.to(dtype)
        for _ in range(10):
            layer(torch.randn(2, 3, 6, 6, dtype=dtype))
        lipfast.nn.converge(layer)
        w = layer.weight.detach().float()
        if mode == "matrix":
            sigma = torch.linalg.matrix_norm(w.flatten(1), 2)
        else:
            sigma = lipfast.conv_spectral_norm(w, (6, 6), padding=1)
        assert abs(float(sigma) - 1) < 2e-2  # the weight itself is rounded to dtype


@pytest.mark.parametrize("layer, size", [
    (nn.Conv2d(3, 4, 3, padding=1), (6, 6)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1), (7, 6)),
    (nn.Conv2d(2, 4, 4, stride=2, padding=2, padding_mode="circular"), (8, 8)),
    (nn.Conv1d(4, 2, 5, padding="same", padding_mode="reflect"), (11,)),
    (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (4, 4)),
    (nn.Linear(9, 5), None),
], ids=lambda p: type(p).__name__ if isinstance(p, nn.Module) else str(p))
@pytest.mark.parametrize("target", [1.0, 0.5])
def test_operator_mode_reaches_target_exactly(layer, size, target, backend):
    torch.manual_seed(0)
    layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        layer.weight.mul_(3)
    lipfast.nn.spectral_norm(layer, mode="operator", target=target)
    x = torch.randn(2, layer.weight.shape[1] if isinstance(layer, nn.Linear) else layer.in_channels, *(size or ()),
                    dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        x = torch.randn(2, 9, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    for _ in range(3):  # a few training steps move the weight
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    lipfast.nn.converge(layer)
    layer.eval()
    with torch.no_grad():
        normalized = copy.deepcopy(layer)
        parametrize.remove_parametrizations(normalized, "weight")
        if isinstance(layer, nn.Linear):
            exact = float(torch.linalg.matrix_norm(normalized.weight, 2))
        else:
            exact = exact_norm(normalized, size)
    assert abs(exact - target) <= 1e-3 * target


def test_operator_mode_follows_the_input_size():
    torch.manual_seed(0)
    layer = lipfast.nn.spectral_norm(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), mode="operator")
    layer(torch.randn(1, 2, 8, 8))
    p = layer.parametrizations.weight[0]
    assert p.input_size == (8, 8) and tuple(p._v.shape) == (2, 8, 8)
    layer(torch.randn(2, 4, 6))  # an unbatched input of another size
    assert p.input_size == (4, 6) and tuple(p._v.shape) == (2, 4, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        lipfast.nn.spectral_norm(nn.Linear(3, 3), mode="exact")
    with pytest.raises(ValueError, match="target"):
        lipfast.nn.spectral_norm(nn.Linear(3, 3), target=0)
    with pytest.raises(ValueError, match="no parameter or buffer"):
        lipfast.nn.spectral_norm(nn.Linear(3, 3), name="kernel")
    with pytest.raises(ValueError, match="n_power_iterations"):
        lipfast.nn.spectral_norm(nn.Linear(3, 3), n_power_iterations=0)
    with pytest.raises(TypeError, match="mode='operator'"):
        lipfast.nn.spectral_norm(nn.Bilinear(3, 3, 2), mode="operator")
    layer = lipfast.nn.spectral_norm(nn.Conv2d(2, 2, 3), mode="operator")
    with pytest.raises(RuntimeError, match="input size"):
        layer.parametrizations.weight[0](layer.parametrizations.weight.original)


def test_lipschitz_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with torch.no_grad():
        model[0].weight.mul_(10)
        model[3].weight.div_(100)
    penalty = lipfast.nn.lipschitz_penalty(model, input_shape=(3, 6, 6))
    sigma_conv = float(lipfast.operator_norm(model[0], (6, 6)))
    assert sigma_conv > 1 and float(lipfast.spectral_norm(model[3].weight)) < 1
    assert abs(float(penalty) - (sigma_conv - 1) ** 2) <= 1e-3 * (sigma_conv - 1) ** 2
    penalty.backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[3].weight.grad.abs().sum() == 0
    normalized = lipfast.nn.spectral_norm(nn.Linear(6, 6))
    lipfast.nn.converge(normalized)
    assert float(lipfast.nn.lipschitz_penalty(normalized)) <= 1e-8


def test_compile_without_graph_break():
    torch.manual_seed(0)
    model = nn.Sequential(
        lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.ReLU(), nn.Flatten(),
        lipfast.nn.spectral_norm(nn.Linear(4 * 5 * 5, 3)),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    import lipfast
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)),
                          lipfast.nn.spectral_norm(nn.Conv2d(4, 4, 3, padding=1), mode="operator", input_size=(5, 5)),
                          nn.Flatten(), lipfast.nn.spectral_norm(nn.Linear(4 * 5 * 5, 2), mode="operator"))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # different data on each rank
    for _ in range(3):
        opt.zero_grad()
        ddp(torch.randn(4, 3, 5, 5)).pow(2).sum().backward()
        opt.step()
    state = torch.cat([b.flatten() for b in model.buffers()] + [p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(state) for _ in range(2)]
    dist.all_gather(gathered, state)
    assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()
    print("rank", rank, "ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_distributed_data_parallel(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "ok" in out


@pytest.mark.parametrize("layer, size", [
    (nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"), (5, 6)),
    (nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2), (5,)),
], ids=["Conv2d", "ConvTranspose1d"])
def test_operator_mode_gradient(layer, size):
    """The one-pass backward of W -> target W / ‖A_W v‖ (v fixed) is that function's gradient."""
    from lipfast import conv, nn as lnn

    torch.manual_seed(0)
    layer = layer.double()
    geometry = lnn.OperatorNorm(layer, layer.weight, input_size=size).geometry
    probe = conv.conv_operator("test", layer.weight, size, **geometry)
    v = torch.randn(layer.weight.shape[1] * layer.groups, *probe.input_size, dtype=torch.float64)
    v /= v.norm()

    def f(w):
        return lnn._ScaleByOperatorNorm.apply(w, v, conv.conv_operator("test", w, size, **geometry), 0.7)

    torch.autograd.gradcheck(f, (layer.weight.detach().clone().requires_grad_(),))


def test_compile_operator_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        lipfast.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator", input_size=(5, 5)), nn.ReLU(),
        nn.Flatten(), lipfast.nn.spectral_norm(nn.Linear(4 * 5 * 5, 3), mode="operator"),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
