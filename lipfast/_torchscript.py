"""TorchScript models as torch.fx graphs, so that lipschitz_bound can compose their layers.

A scripted or traced model keeps its module tree and, for each module, a TorchScript graph of its
forward.  The torch.nn modules in a scripted model (Conv2d, BatchNorm2d, ReLU, ...) are rebuilt in
eager form from their settings and state_dict; a traced module keeps no settings (its graph holds
them as constants), so it is followed through its graph like every other module (the model's own
classes, Sequential), whose aten operations become the torch functions that the composition rules
know: helper methods and compiled functions are followed into, and a branch (prim::If) on a Python
value, such as a module's flag, takes its side; so does a branch or loop on the input's sizes alone
(a shape check, torch._assert), decided for the input shape being bounded.  Control flow on the
input's entries, and operations with no translation, raise ValueError; check_translation compares
the result with the script on a random input.
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import operator
import re

import torch
import torch.nn.functional as F
from torch import nn

from lipfast import _util

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: aten operations with a torch function of other name or signature (others: torch.<name>); the
#: argument orders are aten's
_FUNCTIONS = {
    "relu6": F.relu6, "hardtanh": F.hardtanh, "leaky_relu": F.leaky_relu, "dropout": F.dropout,
    "feature_dropout": F.dropout, "gelu": F.gelu, "silu": F.silu, "softplus": F.softplus, "linear": F.linear,
    "elu": torch._C._nn.elu,  # (self, alpha, scale, input_scale): F.elu takes (input, alpha, inplace)
    "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "selu": F.selu, "softsign": F.softsign,
    "log_sigmoid": F.logsigmoid, "mish": F.mish, "celu": F.celu, "prelu": F.prelu, "softshrink": F.softshrink,
    "im2col": F.unfold, "col2im": F.fold,  # (self[, output_size], kernel_size, dilation, padding, stride)
    "max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
    "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "_adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "_adaptive_avg_pool3d": F.adaptive_avg_pool3d, "floor_divide": operator.floordiv, "floordiv": operator.floordiv,
    # (values, indices), in aten's argument order, as these functions return them
    "max_pool1d_with_indices": F.max_pool1d_with_indices, "max_pool2d_with_indices": F.max_pool2d_with_indices,
    "max_pool3d_with_indices": F.max_pool3d_with_indices, "adaptive_max_pool1d": F.adaptive_max_pool1d_with_indices,
    "adaptive_max_pool2d": F.adaptive_max_pool2d_with_indices, "adaptive_max_pool3d": F.adaptive_max_pool3d_with_indices,
}
#: aten operations translated to tensor methods
_METHODS = {"view", "size", "dim", "numel", "detach", "clone", "expand_as", "type_as", "unfold"}
_PADS = {"pad": None, "constant_pad_nd": "constant", "reflection_pad1d": "reflect", "reflection_pad2d": "reflect",
         "reflection_pad3d": "reflect", "replication_pad1d": "replicate", "replication_pad2d": "replicate",
         "replication_pad3d": "replicate", "_pad_circular": "circular"}
_CONVOLUTIONS = {False: (F.conv1d, F.conv2d, F.conv3d), True: (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)}


def _eager_class(script: torch.jit.ScriptModule) -> type | None:
    """The torch.nn class a scripted module was made from, when it is one and not a container, or
    lipfast's own layer with a registered constant (GroupSort, Abs, the SLL blocks): rebuilt, it
    keeps that constant, where its graph would be followed op by op (MaxMin's max and min give 2)."""
    name = re.sub(r"___torch_mangle_\d+\.", "", script._c._type().qualified_name())
    name = name.removeprefix("__torch__.")
    module_name, _, class_name = name.rpartition(".")
    if module_name.startswith("lipfast."):
        from lipfast.network import _REGISTRY

        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            return None
        return cls if cls in _REGISTRY else None
    if not module_name.startswith("torch.nn."):
        return None
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, _CONTAINERS):
        return None
    return cls


#: constructor arguments a scripted torch.nn layer does not keep, whose absence cannot go unnoticed:
#: they decide its parameters' names, which the strict load of its state_dict checks (or, for
#: _freeze, only requires_grad)
_SHOWN_BY_STATE = {"MultiheadAttention": {"bias", "add_bias_kv"}, "Embedding": {"_freeze"}}


def _rebuild(cls: type, script: torch.jit.ScriptModule, path: str) -> nn.Module | None:
    """An eager ``cls`` with the scripted module's constants, parameters, buffers and mode; None when
    the script does not hold every constructor argument (a traced module keeps none: its graph
    holds them instead), so that rebuilding would fill in a default (a LeakyReLU's slope, say)."""
    if isinstance(script, torch.jit.TracedModule):
        return None
    kwargs = {}
    if issubclass(cls, nn.RNNBase):  # (its __init__ takes *args, **kwargs: the settings RNNBase keeps)
        names = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"]
        names += {nn.RNN: ["nonlinearity"], nn.LSTM: ["proj_size"]}.get(cls, [])
        if not all(hasattr(script, name) for name in names):
            return None
        kwargs = {name: getattr(script, name) for name in names}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if hasattr(script, name):
            value = getattr(script, name)
            kwargs[name] = (value is not None) if name == "bias" else value  # Optional[Tensor] -> flag
        elif parameter.default is not None and name not in _SHOWN_BY_STATE.get(cls.__name__, ()):
            return None  # (a default of None: a deprecated alias, or an optional tensor)
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


def _inline(script, path: str, graph: torch.fx.Graph, root: nn.Module, args: list, method: str = "forward"):
    """Adds the scripted module's ``method`` to ``graph`` with ``args`` as its inputs; returns its output."""
    ts = script._c._get_method(method).graph
    return _inline_graph(ts, [("module", script, path)] + list(args), graph, root, f"{path or 'the model'}'s {method}")


def _inline_graph(ts, args: list, graph: torch.fx.Graph, root: nn.Module, where: str):
    """Adds the TorchScript graph ``ts`` to ``graph`` with ``args`` as its inputs; returns its output."""
    env: dict = {value.debugName(): arg for value, arg in zip(ts.inputs(), args)}
    _Block(graph, root, env, where).run(ts.nodes())
    results = [env[v.debugName()] for v in ts.outputs()]
    return results[0] if len(results) == 1 else tuple(results)


#: compiled torch.nn.functional helpers of boolean_dispatch, by the function that dispatches to them
_DISPATCHED = {f"_{name}": name for name in ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
                                              "adaptive_max_pool2d", "adaptive_max_pool3d")}


def _called_function(node):
    """(the Python function, or the compiled function's graph) of a prim::CallFunction."""
    qualified = str(next(node.inputs()).type())
    name = qualified.removeprefix("__torch__.")
    module, _, function = name.rpartition(".")
    if module == "torch.nn.functional":
        fn = getattr(F, _DISPATCHED.get(function, function), None)
        if fn is not None:  # the Python function the script compiled: same arguments, same order
            return fn, None
    compiled = torch.jit._state._python_cu.find_function(qualified)
    if compiled is None:
        raise ValueError(f"TorchScript call of function {name} cannot be followed (pass the Python module instead)")
    return None, compiled.graph


#: the most steps a prim::Loop is unrolled to
_LOOP_LIMIT = 10_000

#: operations on Python values (sizes, flags, lists): evaluated while translating, so that a
#: prim::If on a module's flag (``if self.apply_residual``) takes its branch; on graph values they
#: become nodes
_PYTHON_OPERATIONS = {
    "__not__": operator.not_, "__and__": operator.and_, "__or__": operator.or_, "__is__": operator.is_,
    "__isnot__": operator.is_not, "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge, "len": len, "Int": int, "Float": float, "Bool": bool,
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
    "neg": operator.neg, "__contains__": operator.contains, "__getitem__": operator.getitem,
}
_SIZE_OPERATIONS = set(_PYTHON_OPERATIONS.values()) | {operator.floordiv, operator.mod}


#: the shape of one input (batch of one) of the translation under way, when the caller knows it: a
#: branch on sizes alone is then decided for that shape (_Block.decide)
_example_shape: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("example_shape", default=None)


def _shape_only(value) -> bool:
    """Whether a graph value is computed from tensors' sizes alone (their dims, sizes and numels,
    and Python arithmetic and comparisons on those), not from any tensor's entries."""
    if not isinstance(value, torch.fx.Node):
        return True
    if value.op == "call_method" and value.target in ("size", "dim", "numel"):
        return True
    if value.op == "call_function" and value.target in _SIZE_OPERATIONS:
        found: list = []
        torch.fx.node.map_arg((value.args, value.kwargs), found.append)
        return all(_shape_only(v) for v in found)
    return False


def _has_node(args) -> bool:
    found: list = []
    torch.fx.node.map_arg(args, found.append)
    return bool(found)


#: aten's recurrent layers: (class, nonlinearity); the overload ``.input``'s arguments are (input, hx,
#: params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
RECURRENT = {"lstm": (nn.LSTM, None), "gru": (nn.GRU, None), "rnn_tanh": (nn.RNN, "tanh"), "rnn_relu": (nn.RNN, "relu")}


def recurrent(graph: torch.fx.Graph, root: nn.Module, name: str, args: list, value_of) -> tuple | None:
    """A traced or exported aten::lstm / gru / rnn_tanh / rnn_relu as the torch.nn layer it came from,
    rebuilt from its parameters (value_of: a graph value's tensor, or None) and called on the input,
    when its initial states are zeros made in the forward (torch.zeros, as the module makes them; an
    exported program's, computed ahead by the translation, are tensors of zeros) and
    no dropout is on: the outputs (output, h_n[, c_n]) as graph values; None otherwise (the operator
    stays, with no rule)."""
    if name not in RECURRENT or len(args) != 9 or not isinstance(args[2], (list, tuple)):
        return None
    x, hx, params, biases, layers, dropout, train, bidirectional, batch_first = args
    states = hx if isinstance(hx, (list, tuple)) else [hx]
    def zero(h) -> bool:  # torch.zeros in the graph, or an exported program's zeros computed ahead (_export._folded)
        if not isinstance(h, torch.fx.Node):
            return False
        if h.op == "call_function" and h.target is torch.zeros:
            return True
        value = value_of(h) if h.op == "get_attr" and h.target.startswith(COMPUTED_PREFIX) else None
        return isinstance(value, torch.Tensor) and not bool(value.any())

    if not all(zero(h) for h in states):
        return None
    if train and dropout:
        return None
    tensors = [value_of(p) for p in params]
    if any(t is None for t in tensors):
        return None
    cls, nonlinearity = RECURRENT[name]
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls]
    per = len(tensors) // (layers * (2 if bidirectional else 1))  # weights, biases, and an LSTM's projection
    hidden = tensors[0].shape[0] // gates
    projection = tensors[per - 1].shape[0] if cls is nn.LSTM and per in (3, 5) else 0
    options = {"nonlinearity": nonlinearity} if cls is nn.RNN else ({"proj_size": projection} if cls is nn.LSTM else {})
    try:
        layer = cls(tensors[0].shape[1], hidden, layers, bias=bool(biases), batch_first=bool(batch_first),
                    bidirectional=bool(bidirectional), **options)
        layer.to(device=tensors[0].device, dtype=tensors[0].dtype)
        with torch.no_grad():
            for weight_name, tensor in zip(layer._flat_weights_names, tensors, strict=True):
                getattr(layer, weight_name).copy_(tensor)
    except (ValueError, RuntimeError, TypeError):
        return None
    # named for the module that held the parameters ("rnn.lstm"), as the report lists it
    owner = params[0].target.rpartition(".")[0] if isinstance(params[0], torch.fx.Node) and params[0].op == "get_attr" else ""
    base = path = f"{owner}.{name}" if owner else name
    taken = {n for n, _ in root.named_modules()} | {n for n, _ in root.named_buffers()} | {n for n, _ in root.named_parameters()}
    copies = 0
    while path in taken:  # (a second layer in the same module: "rnn.lstm_1")
        copies += 1
        path = f"{base}_{copies}"
    _install(root, path, module=layer.eval())
    call = graph.call_module(path, (x,))
    output, final = (graph.call_function(operator.getitem, (call, i)) for i in range(2))
    if cls is nn.LSTM:
        return output, *(graph.call_function(operator.getitem, (final, i)) for i in range(2))
    return output, final


class _Block:
    """Translates TorchScript nodes into ``graph``, reading and writing values in ``env`` (by debug
    name): torch.nn layers become module calls, everything else is followed into."""

    def __init__(self, graph: torch.fx.Graph, root: nn.Module, env: dict, where: str) -> None:
        self.graph, self.root, self.env, self.where = graph, root, env, where
        self.aliased: set[str] = set()  # values that share memory with another (a view, or viewed)

    def get(self, value):
        return self.env[value.debugName()]

    def tensor_of(self, value) -> torch.Tensor | None:
        """The tensor a graph value stands for, where it is one the model stores (get_attr)."""
        if not (isinstance(value, torch.fx.Node) and value.op == "get_attr"):
            return None
        found = functools.reduce(getattr, value.target.split("."), self.root)
        return found if isinstance(found, torch.Tensor) else None

    def run(self, nodes) -> None:
        for node in nodes:
            self.node(node)

    def node(self, node) -> None:
        env, graph, root = self.env, self.graph, self.root
        kind, outputs, ins = node.kind(), list(node.outputs()), list(node.inputs())
        if kind == "prim::Constant":
            env[outputs[0].debugName()] = outputs[0].toIValue()
        elif kind == "prim::GetAttr":
            _, owner, owner_path = self.get(ins[0])
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
            self.call_method(node, outputs, ins)
        elif kind == "prim::If":
            condition = self.decide(self.get(ins[0]))
            if not isinstance(condition, bool):  # decided by the input: no single graph
                self.control_flow("prim::If on a value computed from the input")
            block = list(node.blocks())[0 if condition else 1]
            self.run(block.nodes())
            for out, value in zip(outputs, block.outputs()):
                env[out.debugName()] = self.get(value)
        elif kind == "prim::Loop":
            self.loop(node, outputs, ins)
        elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            items = [self.get(v) for v in ins]
            env[outputs[0].debugName()] = items if kind == "prim::ListConstruct" else tuple(items)
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            items = self.get(ins[0])
            if isinstance(items, torch.fx.Node):  # the pieces of a graph value (a chunk, say)
                items = [graph.call_function(operator.getitem, (items, i)) for i in range(len(outputs))]
                if ins[0].debugName() in self.aliased:  # views of what it views
                    self.aliased.update(out.debugName() for out in outputs)
            for out, item in zip(outputs, items):
                env[out.debugName()] = item
        elif kind in ("prim::NumToTensor", "prim::unchecked_cast"):  # a size kept as it is
            env[outputs[0].debugName()] = self.get(ins[0])
        elif kind == "prim::Uninitialized":  # a branch's output on a path that raises
            env[outputs[0].debugName()] = None
        elif kind == "prim::RaiseException":
            message = self.get(ins[0]) if ins else None
            said = f" ({message})" if isinstance(message, str) and message else ""
            raise ValueError(f"the TorchScript code of {self.where} raises an exception for this input{said}")
        elif kind == "aten::warn":
            pass
        elif kind == "prim::CallFunction":
            fn, called = _called_function(node)
            args = [self.get(v) for v in ins[1:]]
            if fn is not None:
                env[outputs[0].debugName()] = graph.call_function(fn, tuple(args))
            else:
                env[outputs[0].debugName()] = _inline_graph(called, args, graph, root, f"{self.where} (a function call)")
        elif kind.startswith("aten::") and len(outputs) == 1:
            self.aten(kind, outputs[0], ins)
        elif kind.startswith("aten::") and len(outputs) > 1:  # a tuple (a sort's values and indices, say)
            name, args = kind[len("aten::"):], [self.get(v) for v in ins]
            rebuilt = recurrent(graph, root, name, args, self.tensor_of)
            result = rebuilt if rebuilt is not None else _aten(graph, name, args)
            for i, out in enumerate(outputs):
                if isinstance(result, Outputs) and not out.uses():
                    continue  # (a result nothing reads gets no node)
                env[out.debugName()] = result[i] if rebuilt is not None or isinstance(result, Outputs) else \
                    graph.call_function(operator.getitem, (result, i))
        else:
            raise ValueError(f"TorchScript operation {kind} has no translation (pass the Python module instead)")

    def loop(self, node, outputs, ins) -> None:
        """prim::Loop(trips, condition, *carried): unrolled, when the trip count and every condition
        are Python values (a loop over a list of layers or features, say)."""
        trips, condition = self.decide(self.get(ins[0])), self.decide(self.get(ins[1]))
        carried = [self.get(v) for v in ins[2:]]
        block = next(node.blocks())
        inputs, results = list(block.inputs()), list(block.outputs())
        i = 0
        while isinstance(trips, int) and isinstance(condition, bool) and condition and i < trips:
            if i == _LOOP_LIMIT:
                self.control_flow(f"prim::Loop of more than {_LOOP_LIMIT} steps")
            for value, item in zip(inputs, [i] + carried):
                self.env[value.debugName()] = item
            self.run(block.nodes())
            condition, carried = self.decide(self.get(results[0])), [self.get(v) for v in results[1:]]
            i += 1
        if not (isinstance(trips, int) and isinstance(condition, bool)):
            self.control_flow("prim::Loop on a value computed from the input")
        for out, item in zip(outputs, carried):
            self.env[out.debugName()] = item

    def decide(self, condition):
        """A branch's condition, or a loop's trip count, computed in the graph from sizes alone (a
        shape check in the forward, torch._assert on sizes, range(x.size(1))): its value for an
        input of the example shape, whose sizes it then has; anything else as it is."""
        shape = _example_shape.get()
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if not (isinstance(condition, torch.fx.Node) and shape is not None and len(placeholders) == 1
                and _shape_only(condition)):
            return condition
        copy = torch.fx.Graph()
        mapping: dict = {}
        copy.graph_copy(self.graph, mapping)
        copy.output(mapping[condition])
        param = next(self.root.parameters(), None)
        x = torch.zeros((1, *shape), dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else None)
        try:
            with torch.no_grad():
                value = torch.fx.GraphModule(self.root, copy).forward(x)
        except Exception:
            return condition
        return value if isinstance(value, (bool, int)) else condition

    def graph_constants(self, args: list) -> list:
        """args with each tensor constant of the script (a traced torch.tensor(...), say) installed
        under the root as a buffer and passed as its graph value: a graph's code cannot hold tensors."""
        def install(value):
            if not isinstance(value, torch.Tensor):
                return value
            name = f"_script_constant_{sum(1 for _ in self.root.buffers())}"
            _install(self.root, name, tensor=value)
            return self.graph.get_attr(name)

        return [torch.fx.node.map_aggregate(a, install) if isinstance(a, (list, tuple)) else install(a) for a in args]

    def control_flow(self, what: str) -> None:
        raise ValueError(f"TorchScript control flow ({what}) in {self.where} cannot be followed (pass the Python "
                         "module instead)")

    def call_method(self, node, outputs, ins) -> None:
        _, module, module_path = self.get(ins[0])
        call_args = [self.get(v) for v in ins[1:]]
        name = node.s("name")
        cls = _eager_class(module) if name in ("forward", "forward__0") else None
        if name == "forward__0":  # a recurrent layer's forward on a tensor: an overload, hx None by default
            cls = cls if cls is not None and issubclass(cls, nn.RNNBase) else None
            while cls is not None and call_args and call_args[-1] is None:
                call_args.pop()
        layer = None
        if cls is not None:
            try:  # a layer called twice is rebuilt once
                layer = self.root.get_submodule(module_path)
            except AttributeError:
                layer = _rebuild(cls, module, module_path)
                if layer is not None:
                    _install(self.root, module_path, module=layer)
            if not isinstance(layer, cls):
                layer = None  # not rebuilt: what is at its path holds the tensors of its inlined graph
        if layer is None:
            self.env[outputs[0].debugName()] = _inline(module, module_path, self.graph, self.root, call_args, name)
            return
        self.env[outputs[0].debugName()] = self.graph.call_module(module_path, tuple(call_args))
        if _util.may_share_memory(layer):
            self.aliased.update({v.debugName() for v in ins[1:2]} | {outputs[0].debugName()})

    def aten(self, kind: str, output, ins) -> None:
        name = kind[len("aten::"):]
        args = [self.get(v) for v in ins]
        if name in _PYTHON_OPERATIONS and not _has_node(args):
            self.env[output.debugName()] = _PYTHON_OPERATIONS[name](*args)
            return
        if name in _PYTHON_OPERATIONS and not any(isinstance(v.type(), torch._C.TensorType) for v in ins):
            # arithmetic or a comparison on sizes computed in the graph: the Python operation
            self.env[output.debugName()] = self.graph.call_function(_PYTHON_OPERATIONS[name], tuple(args))
            return
        if name == "append" and isinstance(args[0], list):  # a list being built (of features, say)
            args[0].append(args[1])
            self.env[output.debugName()] = args[0]
            return
        if name == "Bool":  # a tensor's truth value: it decides a branch (prim::If) by the input
            self.control_flow("prim::If on a value computed from the input")
        if identity_in_place(name, args):
            self.env[output.debugName()] = args[0]
            return
        folded = fold_constant(name, args)
        if folded is not None:
            self.env[output.debugName()] = folded
            return
        if not (name == "index" and len(args) == 2 and _constant_index(args[1]) is not None):
            args = self.graph_constants(args)
        self.env[output.debugName()] = _aten(self.graph, name, args)
        if name in _util.VIEW_OPERATIONS and ins:  # the output shares the input's memory
            self.aliased.update({ins[0].debugName(), output.debugName()})
        if name.endswith("_") and not name.endswith("__") and ins:
            # in place (translated out of place): later uses of the input read the result; a view
            # of it, or the tensor it views, would change too, which is not followed
            if ins[0].debugName() in self.aliased:
                raise ValueError(f"TorchScript in-place operation {kind} on a tensor that shares memory with a "
                                 "view (pass the Python module instead)")
            self.env[ins[0].debugName()] = self.env[output.debugName()]


#: operations that only copy, convert or move a tensor: on a constant (a traced index list, an
#: exported lifted tensor) they are evaluated while translating, and the result stays a constant
FOLDED = {"to", "_to_copy", "lift_fresh", "lift_fresh_copy", "clone", "detach", "detach_", "contiguous", "alias"}


def fold_constant(name: str, args: list) -> torch.Tensor | None:
    """aten::<name>(*args) evaluated now, when it is an operation of FOLDED on a constant tensor
    (no graph value among args); None otherwise."""
    if name not in FOLDED or not args or not isinstance(args[0], torch.Tensor) or _has_node(args):
        return None
    try:
        return getattr(torch.ops.aten, name)(*args)
    except Exception:  # an overload it cannot pick from these values: left to the graph
        return None


def _constant_index(indices) -> tuple | None:
    """aten::index's list of optional index tensors as a Python index (None -> every entry, a 1-D
    integer constant -> a list of ints, a 1-D boolean one -> the list of its true positions), which
    the composition can count copies in; None where some index is not such a constant."""
    if not isinstance(indices, (list, tuple)):
        return None
    parts: list = []
    for index in indices:
        if index is None:
            parts.append(slice(None))
        elif isinstance(index, torch.Tensor) and index.dim() == 1 and index.dtype == torch.bool:
            parts.append(index.nonzero().flatten().tolist())
        elif isinstance(index, torch.Tensor) and index.dim() == 1 and not index.is_floating_point():
            parts.append(index.tolist())
        else:
            return None
    return tuple(parts)


def identity_in_place(name: str, args: list) -> bool:
    """Whether aten::<name>(*args) leaves its input as it was: a dropout in place with train=False."""
    return name in ("dropout_", "feature_dropout_", "alpha_dropout_", "feature_alpha_dropout_") and \
        len(args) >= 3 and args[2] is False


#: c10::ScalarType's numbering, in which TorchScript graphs pass a dtype
_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 5: torch.float16,
                 6: torch.float32, 7: torch.float64, 8: torch.complex32, 9: torch.complex64, 10: torch.complex128,
                 11: torch.bool, 15: torch.bfloat16}


def _conversion(graph: torch.fx.Graph, args: list):
    """aten::to (any overload) or aten::_to_copy as x.to(dtype), x.to(other) or x.to(): the dtype is
    the first of args[1:3] that is a dtype (an exported program's), a ScalarType number (a
    TorchScript graph's; not a bool, which is non_blocking) or a tensor to take it from; none of
    these (a device, None) keeps the input's."""
    for value in args[1:3]:
        if isinstance(value, torch.dtype) or isinstance(value, torch.fx.Node):
            return graph.call_method("to", (args[0], value))
        if isinstance(value, int) and not isinstance(value, bool):
            if value not in _SCALAR_TYPES:
                raise ValueError(f"aten::to with scalar type {value} has no translation (pass the Python module instead)")
            return graph.call_method("to", (args[0], _SCALAR_TYPES[value]))
    return graph.call_method("to", (args[0],))


#: aten's arithmetic on numbers, as Python's (a traced size turned into a tensor and scaled, say:
#: torch.pow(4, -0.5) takes no two numbers)
def _rsub(a, b):
    return b - a  # aten::rsub(self, other): other - self


_NUMBER_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
                      "pow": operator.pow, "floor_divide": operator.floordiv, "neg": operator.neg, "rsub": _rsub}


def _is_number(value, depth: int = 0) -> bool:
    """Whether a translated value is a Python number when it runs: a constant, a size read
    (x.size(d), x.dim(), x.numel(), x.size()[d]), or arithmetic on such."""
    if (isinstance(value, (int, float)) and not isinstance(value, bool)) or \
            (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex()):
        return True  # (a number a trace kept as a tensor constant too)
    if not isinstance(value, torch.fx.Node) or depth > 16:
        return False
    read = _util.size_read(value)
    if read is not None:
        return isinstance(read[1], int)
    if value.op == "call_method":
        return value.target in ("dim", "numel")
    return value.target in _NUMBER_ARITHMETIC.values() and all(_is_number(a, depth + 1) for a in value.args)


class Outputs(tuple):
    """An aten operation's several results, the first translated into the torch function that the
    composition rules know; another (a batch norm's saved statistics, say) is computed by the
    operator itself, in a node made only when something reads it."""

    def __new__(cls, first, graph: torch.fx.Graph, name: str, args: list, count: int):
        outputs = super().__new__(cls, (first,) + (None,) * (count - 1))
        outputs._graph, outputs._name, outputs._args, outputs._whole = graph, name, tuple(args), None
        return outputs

    def __getitem__(self, i):
        if isinstance(i, slice) or i in (0, -len(self)):
            return super().__getitem__(i)
        if self._whole is None:
            self._whole = self._graph.call_function(getattr(torch.ops.aten, self._name), self._args)
        return self._graph.call_function(operator.getitem, (self._whole, i))


#: aten's batch norms that also return their statistics: (input, weight, bias, running_mean,
#: running_var[, training], momentum, eps) -> (output, saved mean, saved inverse std[, reserve])
_BATCH_NORMS_WITH_STATISTICS = {"_native_batch_norm_legit_no_training": 3, "native_batch_norm": 3,
                                "_batch_norm_impl_index": 5, "cudnn_batch_norm": 4}


def _factory_options(options: list) -> dict:
    """A tensor factory's trailing aten arguments (dtype, layout, device, pin_memory; those after the
    last one given may be left out) as torch's keywords: dtype (a TorchScript scalar type number
    turned into its dtype) and device."""
    dtype, _, device = (list(options) + [None] * 3)[:3]
    dtype = _SCALAR_TYPES.get(dtype) if isinstance(dtype, int) and not isinstance(dtype, bool) else dtype
    return {"dtype": dtype, "device": device}


#: where an exported program's values computed ahead from its constants are stored (_export._folded)
COMPUTED_PREFIX = "_lipfast_computed_"


def _aten(graph: torch.fx.Graph, name: str, args: list):
    """The fx node computing aten::<name>(*args) (an in-place operation out of place), or the value
    itself where the operation only converts a size."""
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name  # in place -> out of place
    if name in _NUMBER_ARITHMETIC and all(_is_number(a) for a in args) and any(isinstance(a, torch.fx.Node) for a in args) \
            and len(args) - (name in ("add", "sub", "rsub") and len(args) == 3 and args[2] == 1) == (1 if name == "neg" else 2):
        # numbers (sizes) only: (self, other[, alpha = 1])
        numbers = tuple(a.item() if isinstance(a, torch.Tensor) else a for a in args[: 1 if name == "neg" else 2])
        return graph.call_function(_NUMBER_ARITHMETIC[name], numbers)
    if name == "index" and len(args) == 2 and (index := _constant_index(args[1])) is not None:
        # x[i] with constant index lists: a getitem, whose copies of each entry the composition counts
        return graph.call_function(operator.getitem, (args[0], index))
    if name == "index" and len(args) == 2 and isinstance(args[1], (list, tuple)) and \
            all(i is None or isinstance(i, torch.fx.Node) for i in args[1]):
        # x[..., a, b] with index tensors of the graph (of several dims, broadcast together): a getitem,
        # whose copies the composition counts where the tensors are constants
        return graph.call_function(operator.getitem, (args[0], tuple(slice(None) if i is None else i for i in args[1])))
    if name in ("add", "sub") and len(args) == 3:  # aten::add(self, other, alpha)
        return graph.call_function(getattr(torch, name), tuple(args[:2]), {"alpha": args[2]})
    if name in ("_convolution", "convolution"):  # a traced conv layer (or core ATen's): (input, weight, bias,
        # stride, padding, dilation, transposed, output_padding, groups[, and flags of the backend])
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        fn = _CONVOLUTIONS[bool(transposed)][len(stride) - 1]
        if transposed:
            return graph.call_function(fn, (x, weight, bias, stride, padding, output_padding, groups, dilation))
        return graph.call_function(fn, (x, weight, bias, stride, padding, dilation, groups))
    if name == "batch_norm":  # (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        x, weight, bias, mean, var, training, momentum, eps = args[:8]
        return graph.call_function(F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps))
    if name in _BATCH_NORMS_WITH_STATISTICS and len(args) >= 7:
        x, weight, bias, mean, var = args[:5]
        training, (momentum, eps) = (False, args[5:7]) if name == "_native_batch_norm_legit_no_training" else \
            (args[5], args[6:8])
        out = graph.call_function(F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps))
        return Outputs(out, graph, name, args, _BATCH_NORMS_WITH_STATISTICS[name])
    if name == "native_layer_norm" and len(args) == 5:  # (input, normalized_shape, weight, bias, eps) -> (out, mean, rstd)
        return Outputs(graph.call_function(F.layer_norm, tuple(args)), graph, name, args, 3)
    if name in ("_log_softmax", "_softmax") and len(args) == 3:  # (self, dim, half_to_float)
        return graph.call_function(F.log_softmax if name == "_log_softmax" else F.softmax, tuple(args[:2]))
    if name == "arange" and args:  # ([start, ]end[, step], dtype, layout, device, pin_memory): keywords of torch's
        if len(args) >= 5 and (args[-1] is None or isinstance(args[-1], bool)):  # every option given (TorchScript's)
            count = len(args) - 4
        else:  # an exported program's, the options after the last one given left out
            count = next((i for i, a in enumerate(args[:3]) if isinstance(a, bool) or
                          not isinstance(a, (int, float, torch.fx.Node))), min(len(args), 3))
        return graph.call_function(torch.arange, tuple(args[:count]), _factory_options(args[count:]))
    if name == "scalar_tensor" and args:  # (s, dtype, layout, device, pin_memory): keywords of torch's
        return graph.call_function(torch.scalar_tensor, (args[0],), _factory_options(args[1:]))
    if name == "alias" and len(args) == 1:  # the same entries (a view): core ATen's x[:, :]
        return graph.call_method("view_as", (args[0], args[0]))
    if name == "mT" and len(args) == 1:  # the last two dims swapped
        return graph.call_function(torch.transpose, (args[0], -2, -1))
    if name in ("addmm", "addmv", "baddbmm") and 3 < len(args) <= 5:
        # (self, a, b, beta[, alpha]): beta and alpha are keywords of torch's
        return graph.call_function(getattr(torch, name), tuple(args[:3]), dict(zip(("beta", "alpha"), args[3:])))
    if name == "_convolution_mode":  # (input, weight, bias, stride, padding as "same" or "valid", dilation, groups)
        return graph.call_function(_CONVOLUTIONS[False][len(args[3]) - 1], tuple(args[:7]))
    if name == "gelu" and len(args) == 2:  # (self, approximate): a keyword of F.gelu
        return graph.call_function(F.gelu, (args[0],), {"approximate": args[1]})
    if name in _PADS:  # (input, pad[, value]) or aten::pad's (input, pad, mode, value)
        mode, value = _PADS[name], (args[2] if name == "constant_pad_nd" and len(args) > 2 else None)
        if name == "pad":  # (input, pad, mode="constant", value=None)
            mode, value = (args[2] if len(args) > 2 else "constant"), (args[3] if len(args) > 3 else None)
        return graph.call_function(F.pad, (args[0], args[1], mode, value))
    if name.startswith(("upsample_", "_upsample_nearest_exact", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")):
        # (input, output_size[, align_corners], scale_factors); _aa: antialiased
        antialias = name.endswith("_aa")
        mode = name.lstrip("_").removesuffix("_aa")[len("upsample_"):].rstrip("123d")
        mode = "nearest-exact" if mode == "nearest_exact" else mode
        options = {"size": args[1], "scale_factor": args[-1], "mode": mode, **({"antialias": True} if antialias else {})}
        if len(args) == 4:
            options["align_corners"] = args[2]
        return graph.call_function(F.interpolate, (args[0],), options)
    if name in ("mean", "sum") and len(args) == 4:  # (self, dim, keepdim, dtype): dtype is a keyword of torch's
        return graph.call_function(getattr(torch, name), tuple(args[:3]), {"dtype": args[3]})
    if name in ("mean", "sum") and len(args) == 2 and (args[1] is None or isinstance(args[1], torch.dtype)):
        return graph.call_function(getattr(torch, name), (args[0],), {"dtype": args[1]})  # (self, dtype)
    if name == "slice" and 1 <= len(args) <= 5 and isinstance((args + [0])[1], int):
        # (self, dim=0, start=None, end=None, step=1): x[..., start:end:step] along dim
        x, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
        index = (slice(None),) * dim + (slice(start, end, step),) if dim >= 0 else \
            (Ellipsis, slice(start, end, step)) + (slice(None),) * (-dim - 1)
        return graph.call_function(operator.getitem, (x, index))
    if name in ("sym_size", "sym_numel", "sym_stride") and args:  # a size of an exported program's dynamic input
        return graph.call_method(name[len("sym_"):], tuple(args))
    if name in ("expand", "repeat") and len(args) >= 2:  # (self, size[, implicit]) as the method
        return graph.call_method(name, tuple(args[:2]))
    if name == "cumsum" and len(args) == 3:  # (self, dim, dtype): dtype is a keyword of torch's
        return graph.call_function(torch.cumsum, tuple(args[:2]), {"dtype": args[2]})
    if name == "repeat_interleave" and len(args) == 4 and not isinstance(args[1], torch.fx.Node):
        # aten::repeat_interleave.self_int(self, repeats, dim, output_size): a number of copies
        return graph.call_function(torch.repeat_interleave, tuple(args[:3]))
    if name in ("linalg_vector_norm", "linalg_norm") and 1 <= len(args) <= 5:
        # (self, ord, dim, keepdim, dtype), defaults left out; dtype is a keyword of torch's
        fn = torch.linalg.vector_norm if name == "linalg_vector_norm" else torch.linalg.norm
        return graph.call_function(fn, tuple(args[:4]), {"dtype": (args + [None] * 4)[4]})
    if name == "norm" and 2 <= len(args) <= 4 and not isinstance(args[1], torch.dtype):
        # aten::norm.Scalar(self, p) and .ScalarOpt_dim(self, p, dim, keepdim): torch.norm's order
        return graph.call_function(torch.norm, tuple(args))
    if name == "sort" and len(args) == 4:  # aten::sort.stable(self, stable, dim, descending)
        return graph.call_function(torch.sort, (args[0],), {"stable": args[1], "dim": args[2], "descending": args[3]})
    if name in ("to", "_to_copy"):
        return _conversion(graph, args)
    if name in ("zeros", "ones", "empty", "full") and args and isinstance(args[0], (list, tuple)):
        # (size[, fill_value], dtype, layout, device, pin_memory): a constant made in the forward
        values = 2 if name == "full" else 1
        return graph.call_function(getattr(torch, name), tuple(args[:values]), _factory_options(args[values:]))
    if name in ("contiguous", "clone"):  # (self, memory_format): the layout does not change the values, but
        # a later view reads it (a channel shuffle's permute, clone to contiguous, then view)
        layout = args[1] if len(args) > 1 and isinstance(args[1], torch.memory_format) else None
        if layout is not None and layout != torch.preserve_format:
            return graph.call_method("contiguous" if name == "clone" else name, (args[0],), {"memory_format": layout})
        return graph.call_method(name, (args[0],))
    if name == "einsum" and 2 <= len(args) <= 3:  # (equation, tensors, path): torch's takes no path
        return graph.call_function(torch.einsum, (args[0], list(args[1])))
    if name == "tensordot" and len(args) == 4:  # (self, other, dims_self, dims_other)
        return graph.call_function(torch.tensordot, tuple(args[:2]), {"dims": (list(args[2]), list(args[3]))})
    if name == "linalg_vecdot" and 2 <= len(args) <= 3:  # (x, y, dim=-1): dim is a keyword of torch's
        return graph.call_function(torch.linalg.vecdot, tuple(args[:2]), {"dim": (args + [-1])[2]})
    if name == "gather" and len(args) == 4:  # (self, dim, index, sparse_grad): a keyword of torch.gather
        return graph.call_function(torch.gather, tuple(args[:3]), {"sparse_grad": args[3]})
    if name in ("Int", "Float", "ScalarImplicit") and len(args) == 1:  # a traced size, kept as it is
        return args[0]
    if name in _METHODS:
        return graph.call_method(name, tuple(args))
    fn = _FUNCTIONS.get(name) or getattr(torch, name, None)
    if fn is None:
        # the operator itself: it runs, and the composition names it where it has no rule (no
        # finite bound then, as for an attention or a norm in a Python model)
        fn = getattr(torch.ops.aten, name, None)
        if fn is None:
            raise ValueError(f"operation aten::{name} has no translation (pass the Python module instead)")
    return graph.call_function(fn, tuple(args))


def to_graph_module(script: torch.jit.ScriptModule, input_shape: tuple[int, ...] | None = None) -> torch.fx.GraphModule:
    """An fx GraphModule computing what the scripted model computes, with its torch.nn layers as
    eager leaf modules at their qualified names; with input_shape (one example's), branches on sizes
    alone are decided for it.  Raises ValueError for what cannot be translated."""
    token = _example_shape.set(tuple(input_shape) if input_shape is not None else None)
    try:
        return _to_graph_module(script)
    finally:
        _example_shape.reset(token)


def _to_graph_module(script: torch.jit.ScriptModule) -> torch.fx.GraphModule:
    root = nn.Module()
    graph = torch.fx.Graph()
    inputs = [graph.placeholder(value.debugName().split(".")[0] or f"input_{i}")
              for i, value in enumerate(list(script.graph.inputs())[1:])]
    cls = _eager_class(script)
    layer = _rebuild(cls, script, "") if cls is not None else None
    if layer is not None:  # the model itself is one torch.nn layer
        _install(root, "0", module=layer)
        out = graph.call_module("0", tuple(inputs))
    else:
        out = _inline(script, "", graph, root, inputs)
    graph.output(out)
    return torch.fx.GraphModule(root, graph)


class InputRejected(ValueError):
    """The model itself refuses an input of the given shape."""


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flat(item)]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _flat(out[key])]
    return []


@torch.no_grad()
def check_translation(script: nn.Module, graph_module: torch.fx.GraphModule, input_shape: tuple[int, ...],
                      batch: int = 1) -> None:
    """Raises ValueError unless the translation gives the script's outputs on a random input (a batch
    of one, as lipschitz_bound runs them, or of the batch a program was exported for; both in eval
    mode): a net under every rule that reads the graph.  Raises InputRejected where the script refuses
    that input; skipped where the script is random itself (dropout left on)."""
    dtype, device = _util.input_type(script)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(dtype=dtype, device=device)
    with _util.eval_mode(script), _util.eval_mode(graph_module):
        try:
            expected, again = _flat(script(x.clone())), _flat(script(x.clone()))
        except Exception as exc:  # said before the translation runs (a GraphModule that fails prints its code)
            raise InputRejected(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if len(expected) != len(again) or not all(torch.equal(a, b) for a, b in zip(expected, again)):
            return
        try:
            got = _flat(graph_module.forward(x.clone()))  # (its __call__ prints the failing line to stderr)
        except Exception as exc:
            raise ValueError(f"its translation into a graph fails on an input the script accepts ({type(exc).__name__}: "
                             f"{exc}; pass the Python module instead)") from exc
    same = len(got) == len(expected) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) if b.numel() else 0.0,
                                              equal_nan=True)
        for a, b in zip(got, expected))
    if not same:
        raise ValueError("its translation into a graph does not reproduce its outputs on a random input (pass the "
                         "Python module instead)")
