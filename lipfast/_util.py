"""Small helpers shared by lipfast's modules: eval-mode probes, a model's input type, size reads in
a graph, full-float32 arithmetic, optional progress bars."""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every module's own train/eval flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except NotImplementedError:  # a module whose mode was fixed when it was made (torch.export's)
        modes = []
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def differentiable_in_eval(model: nn.Module) -> Iterator[None]:
    """Inside the block autograd can differentiate ``model`` in eval mode on any device: cuDNN's
    recurrent kernels have no backward outside training mode ("cudnn RNN backward can only be called
    in training mode"), so for a model holding an RNN, LSTM or GRU cuDNN is switched off for the
    block, and PyTorch's own kernels (the same function) run instead.  Other models keep cuDNN."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


def input_type(model: nn.Module) -> tuple[torch.dtype, torch.device | None]:
    """The dtype and device to give a model's example input: its first parameter's, else its first
    floating buffer's, else (an exported program's module, which checks its inputs) the first input
    it was exported with; else float32 on the default device."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next((b for b in model.buffers() if b.is_floating_point()), None)
    if tensor is None and isinstance(model, torch.fx.GraphModule):
        values = (node.meta.get("val") for node in model.graph.nodes if node.op == "placeholder")
        tensor = next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    return (tensor.dtype, tensor.device) if tensor is not None else (torch.float32, None)


def size_read(value) -> tuple[torch.fx.Node, object] | None:
    """(x, index) for a graph value that reads x's sizes: x.size(i) and x.shape[i] or x.size()[i] (an
    int index), x.shape[a:b] or x.size()[a:b] (a slice); None for anything else."""
    if not isinstance(value, torch.fx.Node):
        return None
    if value.op == "call_method" and value.target == "size" and len(value.args) == 2 and not value.kwargs:
        return value.args[0], value.args[1]
    inner = value.args[0] if value.target is operator.getitem and len(value.args) == 2 else None
    if isinstance(inner, torch.fx.Node) and ((inner.target is getattr and inner.args[1:] == ("shape",)) or
                                             (inner.op == "call_method" and inner.target == "size" and
                                              len(inner.args) == 1)):
        return inner.args[0], value.args[1]
    return None


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matrix products and cuDNN convolutions in full float32 (no TF32) inside the block,
    whatever the global settings, which are restored on exit."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    cudnn = torch.backends.cudnn
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def progress(items: Iterable[Any], desc: str, unit: str) -> Iterable[Any]:
    """``items`` behind a tqdm progress bar when tqdm is installed, else ``items`` itself."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False)


def unravel(flat, sizes) -> list:
    """torch.unravel_index(flat, sizes) (row-major; flat an int or an integer tensor), without it:
    its argument check imports torch.fx.experimental.symbolic_shapes and sympy, about 0.3 s that
    the first bound in a process (the `lipfast bound` command's only one) would pay."""
    index = []
    for size in reversed(list(sizes)):
        index.append(flat % size)
        flat = flat // size
    return index[::-1]


#: layers whose output may share memory with their input: the input itself (Identity, Dropout in
#: eval mode, an empty Sequential) or a view of it (Flatten, Unflatten); in-place layers too
ALIASING_LAYERS = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                   nn.AlphaDropout, nn.Sequential)


def may_share_memory(layer: nn.Module) -> bool:
    """Whether a layer's output may share memory with its input (ALIASING_LAYERS, or inplace=True)."""
    return isinstance(layer, ALIASING_LAYERS) or getattr(layer, "inplace", False) is True


#: tensor methods (and the aten operations of the same names) whose output may share memory with
#: their input: views, and the conversions that return the input itself when there is nothing to do
VIEW_OPERATIONS = {"view", "view_as", "reshape", "flatten", "unflatten", "select", "slice", "narrow", "transpose",
                   "permute", "t", "expand", "expand_as", "broadcast_to", "squeeze", "unsqueeze", "detach",
                   "contiguous", "to", "float", "double", "half", "bfloat16", "type", "type_as", "as_strided", "split", "chunk", "unbind",
                   "tensor_split", "hsplit", "vsplit", "dsplit", "split_with_sizes", "unsafe_split", "unsafe_chunk",
                   "movedim", "moveaxis", "swapaxes", "swapdims", "reshape_as", "ravel", "alias", "dropout",
                   "feature_dropout", "unfold", "diagonal"}
