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
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--rtol", "-1"])
    assert exit_info.value.code == 2
    assert "--rtol must be a positive number" in capsys.readouterr().err
