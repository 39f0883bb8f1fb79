"""TorchScript models as torch.fx graphs, so that lipschitz_bound can compose their layers.

A scripted model keeps its module tree and, for each module, a TorchScript graph of its forward.
The torch.nn modules in it (Conv2d, BatchNorm2d, ReLU, ...) are rebuilt in eager form from their
constants and state_dict; every other module (the model's own classes, Sequential) is inlined from
its graph, whose aten operations become the torch functions that the composition rules know.
Control flow (prim::If, prim::Loop) and operations with no translation raise ValueError.
"""
from __future__ import annotations

import importlib
import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn

from lipfast import _util

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: aten operations with a torch function of other name or signature (others: torch.<name>)
_FUNCTIONS = {
    "relu6": F.relu6, "hardtanh": F.hardtanh, "leaky_relu": F.leaky_relu, "dropout": F.dropout,
    "feature_dropout": F.dropout, "gelu": F.gelu, "silu": F.silu, "elu": F.elu, "softplus": F.softplus,
}
#: aten operations translated to tensor methods
_METHODS = {"view", "contiguous", "size", "dim", "numel", "detach", "clone", "expand_as", "type_as"}


def _eager_class(script: torch.jit.ScriptModule) -> type | None:
    """The torch.nn class a scripted module was made from, when it is one and not a container."""
    name = re.sub(r"___torch_mangle_\d+\.", "", script._c._type().qualified_name())
    name = name.removeprefix("__torch__.")
    module_name, _, class_name = name.rpartition(".")
    if not module_name.startswith("torch.nn."):
        return None
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, _CONTAINERS):
        return None
    return cls


def _rebuild(cls: type, script: torch.jit.ScriptModule, path: str) -> nn.Module:
    """An eager ``cls`` with the scripted module's constants, parameters, buffers and mode."""
    kwargs = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if hasattr(script, name):
            value = getattr(script, name)
            kwargs[name] = (value is not None) if name == "bias" else value  # Optional[Tensor] -> flag
    try:
        module = cls(**kwargs)
    except Exception as exc:
        raise ValueError(f"cannot rebuild the TorchScript module {path or 'model'} ({cls.__name__}): {exc}") from exc
    state = script.state_dict()
    tensors = [t for t in state.values() if t.is_floating_point()]
    if tensors:
        module.to(device=tensors[0].device, dtype=tensors[0].dtype)
    module.load_state_dict(state)
    return module.train(script.training)


def _install(root: nn.Module, path: str, module: nn.Module | None = None, tensor: torch.Tensor | None = None) -> None:
    """Puts a module (or a buffer) at the dotted ``path`` under root, making the containers on the way."""
    *parents, last = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if module is not None:
        owner.add_module(last, module)
    else:
        owner.register_buffer(last, tensor)


def _inline(script, path: str, graph: torch.fx.Graph, root: nn.Module, args: list):
    """Adds the scripted module's forward to ``graph`` with ``args`` as its inputs; returns its output."""
    ts = script.graph
    for node in ts.nodes():
        if node.kind() in ("prim::If", "prim::Loop"):
            raise ValueError(f"TorchScript control flow ({node.kind()}) in {path or 'the model'}'s forward cannot be "
                             "followed (pass the Python module instead)")
    inputs = list(ts.inputs())
    env: dict = {inputs[0].debugName(): ("module", script, path)}
    aliased: set[str] = set()  # values that share memory with another (a view, or viewed)
    for value, arg in zip(inputs[1:], args):
        env[value.debugName()] = arg

    def get(value):
        return env[value.debugName()]

    for node in ts.nodes():
        kind, outputs = node.kind(), list(node.outputs())
        ins = list(node.inputs())
        if kind == "prim::Constant":
            env[outputs[0].debugName()] = outputs[0].toIValue()
        elif kind == "prim::GetAttr":
            _, owner, owner_path = get(ins[0])
            name = node.s("name")
            attr = getattr(owner, name)
            qualified = f"{owner_path}.{name}" if owner_path else name
            if isinstance(attr, torch.jit.ScriptModule):
                env[outputs[0].debugName()] = ("module", attr, qualified)
            elif isinstance(attr, torch.Tensor):
                _install(root, qualified, tensor=attr)
                env[outputs[0].debugName()] = graph.get_attr(qualified)
            else:
                env[outputs[0].debugName()] = attr
        elif kind == "prim::CallMethod":
            if node.s("name") != "forward":
                raise ValueError(f"TorchScript call of method {node.s('name')!r}: only forward calls are followed")
            _, module, module_path = get(ins[0])
            call_args = [get(v) for v in ins[1:]]
            cls = _eager_class(module)
            if cls is None:
                env[outputs[0].debugName()] = _inline(module, module_path, graph, root, call_args)
            else:
                try:  # a layer called twice is rebuilt once
                    root.get_submodule(module_path)
                except AttributeError:
                    _install(root, module_path, module=_rebuild(cls, module, module_path))
                env[outputs[0].debugName()] = graph.call_module(module_path, tuple(call_args))
                if _util.may_share_memory(root.get_submodule(module_path)):
                    aliased.update({v.debugName() for v in ins[1:2]} | {outputs[0].debugName()})
        elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            items = [get(v) for v in ins]
            env[outputs[0].debugName()] = items if kind == "prim::ListConstruct" else tuple(items)
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            for out, item in zip(outputs, get(ins[0])):
                env[out.debugName()] = item
        elif kind.startswith("aten::") and len(outputs) == 1:
            env[outputs[0].debugName()] = _aten(graph, kind[len("aten::"):], [get(v) for v in ins])
            name = kind[len("aten::"):]
            if name in _util.VIEW_OPERATIONS and ins:  # the output shares the input's memory
                aliased.update({ins[0].debugName(), outputs[0].debugName()})
            if name.endswith("_") and not name.endswith("__") and ins:
                # in place (translated out of place): later uses of the input read the result; a
                # view of it, or the tensor it views, would change too, which is not followed
                if ins[0].debugName() in aliased:
                    raise ValueError(f"TorchScript in-place operation {kind} on a tensor that shares memory with a "
                                     "view (pass the Python module instead)")
                env[ins[0].debugName()] = env[outputs[0].debugName()]
        else:
            raise ValueError(f"TorchScript operation {kind} has no translation (pass the Python module instead)")
    results = [get(v) for v in ts.outputs()]
    return results[0] if len(results) == 1 else tuple(results)


def _aten(graph: torch.fx.Graph, name: str, args: list) -> torch.fx.Node:
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name  # in place -> out of place
    if name in ("add", "sub") and len(args) == 3:  # aten::add(self, other, alpha)
        return graph.call_function(getattr(torch, name), tuple(args[:2]), {"alpha": args[2]})
    if name in _METHODS:
        return graph.call_method(name, tuple(args))
    fn = _FUNCTIONS.get(name) or getattr(torch, name, None)
    if fn is None:
        raise ValueError(f"TorchScript operation aten::{name} has no translation (pass the Python module instead)")
    return graph.call_function(fn, tuple(args))


def to_graph_module(script: torch.jit.ScriptModule) -> torch.fx.GraphModule:
    """An fx GraphModule computing what the scripted model computes, with its torch.nn layers as
    eager leaf modules at their qualified names.  Raises ValueError for what cannot be translated."""
    root = nn.Module()
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(value.debugName().split(".")[0] or f"input_{i}")
              for i, value in enumerate(list(script.graph.inputs())[1:])]
    cls = _eager_class(script)
    if cls is not None:  # the model itself is one torch.nn layer
        _install(root, "0", module=_rebuild(cls, script, ""))
        out = graph.call_module("0", tuple(inputs))
    else:
        out = _inline(script, "", graph, root, inputs)
    graph.output(out)
    return torch.fx.GraphModule(root, graph)
