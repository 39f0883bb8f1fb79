"""The lipfast command: its demo, the main job until whole-network bounds land."""
from __future__ import annotations

import io

import pytest
import torch

from lipfast import cli


@pytest.mark.parametrize("model, layers", [("resnet18", 21), ("resnet50", 54)])
def test_resnet_layer_shapes(model, layers):
    shapes = cli.resnet_layer_shapes(model)
    assert len(shapes) == layers
    assert shapes[0] == ("conv1", (64, 3, 7, 7))
    assert shapes[-1] == ("fc", (1000, 512 if model == "resnet18" else 2048))


def test_demo_reports_norms_that_match_svd(backend):
    out = io.StringIO()
    figures = cli.demo(model="resnet18", rtol=1e-5, out=out)
    text = out.getvalue()
    assert f"backend: {backend}" in text
    assert "resnet18: 21 layers" in text
    assert figures["layers"] == 21
    # the demo compares with float32 torch.linalg.matrix_norm, itself accurate to about 1e-6
    assert figures["max_relative_error"] < 1e-5
    assert 1.0 < figures["product_upper"] < float("inf")


def test_main_rejects_bad_rtol(capsys):
    assert cli.main(["demo", "--rtol", "-1"]) == 2
    assert "--rtol must be a positive number" in capsys.readouterr().err


# --- lipfast bound / certify, end to end through the console -------------------------------------

import json
import subprocess
import sys


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lipfast", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_bound_default_and_json(tmp_path):
    result = _run("bound", "--no-progress", "--json", str(tmp_path / "r.json"), "--rtol", "1e-2")
    assert result.returncode == 0, result.stderr
    assert "network bound (composed over the graph, fx)" in result.stdout and "layer4.1.conv2" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "fx" and len(report["layers"]) == 42 and report["upper"] > 1
    assert "16 random inputs, uniform in [0, 1] (pass --data for real ones)" in result.stdout
    assert any(note.startswith("attained lower bound at 16 random inputs") for note in report["notes"])


def test_bound_with_data(tmp_path):
    torch.manual_seed(1)
    W = torch.randn(5, 7)
    torch.save(W, tmp_path / "w.pt")
    torch.save(torch.randn(9, 7), tmp_path / "x.pt")
    result = _run("bound", str(tmp_path / "w.pt"), "--data", str(tmp_path / "x.pt"), "--no-progress")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("attained lower bound"))
    lower = float(line.split()[3])
    sigma = float(torch.linalg.matrix_norm(W.double(), 2))
    assert lower == pytest.approx(sigma, rel=1e-5)  # a linear map: local = global
    assert "9 inputs from" in line and "within a factor 1.000" in line
    torch.save(torch.randn(9, 6), tmp_path / "bad.pt")
    bad = _run("bound", str(tmp_path / "w.pt"), "--data", str(tmp_path / "bad.pt"), "--no-progress")
    assert bad.returncode == 2 and "must hold a floating-point tensor of inputs (N, 7)" in bad.stderr
    assert bad.stdout == ""  # checked before the work: no report
    missing = _run("bound", str(tmp_path / "w.pt"), "--data", str(tmp_path / "none.pt"), "--no-progress")
    assert missing.returncode == 2 and "--data" in missing.stderr and missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1


def test_bound_model_files(tmp_path):
    torch.manual_seed(0)
    W = torch.randn(5, 7)
    torch.save(W, tmp_path / "w.pt")
    result = _run("bound", str(tmp_path / "w.pt"), "--no-progress")
    assert result.returncode == 0, result.stderr
    sigma = float(torch.linalg.matrix_norm(W.double(), 2))
    upper = float(result.stdout.split("network bound (composed over the graph, fx): ")[1].split()[0])
    assert sigma <= upper <= sigma * 1.001
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save(model, tmp_path / "model.pt")
    refused = _run("bound", str(tmp_path / "model.pt"), "--input-shape", "4", "--no-progress")
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "Traceback" not in refused.stderr
    trusted = _run("bound", str(tmp_path / "model.pt"), "--input-shape", "4", "--trust-pickle", "--no-progress")
    assert trusted.returncode == 0, trusted.stderr
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    scripted = _run("bound", str(tmp_path / "scripted.pt"), "--input-shape", "4", "--no-progress")
    assert scripted.returncode == 0, scripted.stderr
    assert "TorchScript" in scripted.stdout and "network bound (composed over the graph, fx)" in scripted.stdout

    class Branching(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    torch.jit.script(Branching()).save(str(tmp_path / "branching.pt"))
    refused = _run("bound", str(tmp_path / "branching.pt"), "--input-shape", "4", "--no-progress")
    assert refused.returncode == 2 and "prim::If" in refused.stderr and "Traceback" not in refused.stderr


def test_bound_exported_program_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 5 * 5, 4)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 2, 5, 5),)), str(tmp_path / "m.pt2"))
    result = _run("bound", str(tmp_path / "m.pt2"), "--no-progress")  # the shape: its example input's
    assert result.returncode == 0, result.stderr
    assert "exported program" in result.stdout and "attained lower bound" in result.stdout
    upper = float(result.stdout.split("network bound (composed over the graph, fx): ")[1].split()[0])
    assert upper == pytest.approx(__import__("lipfast").lipschitz_bound(model, (2, 5, 5), progress=False).upper, rel=1e-2)
    (tmp_path / "junk.pt2").write_text("not an archive")
    junk = _run("bound", str(tmp_path / "junk.pt2"), "--no-progress")
    assert junk.returncode == 2 and "cannot read" in junk.stderr and len(junk.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["bound", "missing.pt"], "no such model file"),
    (["bound", "--input-shape", "3,x"], "--input-shape"),
    (["bound", "--input-shape", "3,16"], "does not accept"),
    (["bound", "--rtol", "-1"], "--rtol"),
    (["bound", "lipfast.models:nothing"], "cannot find model"),
    (["bound", "math:pi"], "not a function that builds a model"),
    (["bound", "os:getcwd"], "returned a str, not a torch.nn.Module"),
    (["bound", "os:system"], "os:system() failed: TypeError"),
    (["bound", "--input-shape", "1000000,1000000,100000"], "is too large"),
    (["bound", "--samples", "-1"], "--samples must be >= 0"),
    (["bound", "--json", "/no-such-folder/r.json"], "no such folder"),
    (["bound", "--plot", "/no-such-folder/p.png"], "no such folder"),
    (["bound", "--json", "."], "is a folder"),
    (["bound", "--device", "nonsense"], "--device nonsense: not a device"),
    (["bound", "--device", "meta"], "meta tensors hold no values"),
] + ([] if torch.cuda.is_available() else [(["bound", "--device", "cuda"], "--device cuda: not a device this machine has")]))
def test_bound_errors(args, message):
    result = _run(*args, "--no-progress")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""  # before any work: no report


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bound_on_a_device(tmp_path, device):
    torch.manual_seed(2)
    W = torch.randn(5, 7)
    torch.save(W, tmp_path / "w.pt")
    torch.save(torch.randn(4, 7), tmp_path / "x.pt")
    result = _run("bound", str(tmp_path / "w.pt"), "--device", device, "--data", str(tmp_path / "x.pt"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (", on cuda" in result.stdout.splitlines()[0]) == (device == "cuda")
    sigma = float(torch.linalg.matrix_norm(W.double(), 2))
    upper = float(result.stdout.split("network bound (composed over the graph, fx): ")[1].split()[0])
    assert sigma <= upper <= sigma * 1.001 and "attained lower bound" in result.stdout


def test_certify_rejects_bad_epochs():
    result = _run("certify", "--epochs", "0")
    assert result.returncode == 2 and "--epochs must be >= 1, got 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_without_or_with_matplotlib(tmp_path):
    result = _run("bound", "lipfast.models:resnet18_cifar", "--rtol", "1e-2", "--no-progress", "--plot", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in result.stderr
    else:
        assert (tmp_path / "p.png").stat().st_size > 0


def test_exported_program_refusing_an_input_shape(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 4),)), str(tmp_path / "m.pt2"))
    result = _run("bound", str(tmp_path / "m.pt2"), "--input-shape", "3,5", "--no-progress")
    assert result.returncode == 2 and "does not accept an input of shape (3, 5)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
