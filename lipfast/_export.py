"""Programs made by torch.export as torch.fx graphs that lipschitz_bound can compose.

``torch.export.export(model, args).module()`` is a GraphModule whose nodes call aten operators
(``torch.ops.aten.conv2d.default``, ``aten.batch_norm``, ``aten.relu_``, ...) on the model's
parameters and buffers.  Each operator becomes the torch function of the same arguments that the
composition rules know (the translation TorchScript graphs use, _torchscript._aten); an in-place
operator is taken out of place, and later uses of its input read its result.  The result is checked
against the program on a random input (_torchscript.check_translation).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch import nn

from lipfast import _torchscript, _util


def is_exported_program(model) -> bool:
    """Whether ``model`` is a torch.export.ExportedProgram (checked without importing torch.export)."""
    return any(cls.__name__ == "ExportedProgram" and cls.__module__.startswith("torch.export")
               for cls in type(model).__mro__)


def is_aten_graph(model: nn.Module) -> bool:
    """Whether ``model`` is a GraphModule that calls aten operators (an exported program's module)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "aten" for node in model.graph.nodes)


def runnable(model):
    """model, or for an exported program (or its module, whose guards fix the batch size) its
    translation into torch functions, which runs on any batch (in pieces of the batch the program was
    made for, padded with zero examples, where its views fix that batch)."""
    if is_exported_program(model):
        model = model.module()
    if not (isinstance(model, nn.Module) and is_aten_graph(model)):
        return model
    batch = fixed_batch(model)
    translated = to_graph_module(model)
    return translated if batch == 1 else _InPieces(translated, batch)


class _InPieces(nn.Module):
    """A program whose views fix its batch, run on any batch: pieces of that many examples, the last
    padded with zero examples, each output's rows of the real examples concatenated."""

    def __init__(self, program: nn.Module, batch: int):
        super().__init__()
        self.program, self.batch = program, batch

    def forward(self, x: torch.Tensor):
        pieces = []
        for piece in x.split(self.batch):
            rows = piece.shape[0]
            if rows < self.batch:
                piece = torch.cat([piece, piece.new_zeros((self.batch - rows, *piece.shape[1:]))])
            pieces.append(torch.utils._pytree.tree_map(
                lambda out, rows=rows: out[:rows] if isinstance(out, torch.Tensor) else out, self.program(piece)))
        flat = [torch.utils._pytree.tree_flatten(p) for p in pieces]
        spec = flat[0][1]
        joined = [torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0]
                  for parts in zip(*(leaves for leaves, _ in flat))]
        return torch.utils._pytree.tree_unflatten(joined, spec)


def fixed_batch(module: nn.Module) -> int:
    """The batch size an exported program's module was made for where its guards fix it above 1
    (torch.export specializes a static batch dim), else 1: its input placeholder's recorded shape."""
    for node in module.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            if shape and isinstance(shape[0], int) and shape[0] > 1:
                return int(shape[0])
            return 1
    return 1


def one_example(translated: torch.fx.GraphModule, batch: int, example: torch.Tensor) -> torch.fx.GraphModule:
    """A graph computing, for a batch of one x (example's dtype, device and shape), translated's
    outputs on the batch of ``batch`` made of x followed by batch - 1 zero examples, each output's
    first example: for a program whose views and guards fix its batch (torch.export specializes a
    batch dim above 1), the same function of x.  The rules see a concatenation with a constant (1,
    for x) and a selection (1), so the bound is the program's own."""
    root = nn.Module()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    root.register_buffer("_lipfast_padding", example.new_zeros((batch - 1, *example.shape[1:])))
    padded = graph.call_function(torch.cat, ([x, graph.get_attr("_lipfast_padding")],))
    (placeholder,) = [node for node in translated.graph.nodes if node.op == "placeholder"]
    outputs = graph.graph_copy(translated.graph, {placeholder: padded}, return_output_node=False)
    first = torch.fx.node.map_arg(outputs, lambda node: graph.call_function(operator.getitem, (node, slice(0, 1))))
    graph.output(first)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target != "_lipfast_padding":
            _torchscript._install(root, node.target, tensor=functools.reduce(getattr, node.target.split("."), translated))
    return torch.fx.GraphModule(root, graph)


def _positional(target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list:
    """args followed by the keyword arguments in the schema's order (defaults filling the gaps)."""
    positional = list(args)
    schema = target._schema.arguments
    last = max((i for i, a in enumerate(schema) if a.name in kwargs), default=-1)
    for argument in schema[len(args):last + 1]:
        positional.append(kwargs[argument.name] if argument.name in kwargs else argument.default_value)
    return positional


def to_graph_module(source: nn.Module) -> torch.fx.GraphModule:
    """A GraphModule computing what ``source`` (an exported program's module) computes, with torch
    functions in place of aten operators.  Raises ValueError for what cannot be translated."""
    graph = torch.fx.Graph()
    root = nn.Module()
    env: dict[torch.fx.Node, object] = {}
    constants: dict[torch.fx.Node, torch.Tensor] = {}  # the program's tensors, and copies of them made in it
    computed: dict[str, torch.Tensor] = {}  # values computed from constants alone, by the name they are stored at
    aliased: set[torch.fx.Node] = set()  # values that share memory with another (a view, or viewed)

    def get(value):
        return torch.fx.node.map_aggregate(value, lambda v: env[v] if isinstance(v, torch.fx.Node) else v)

    for node in source.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
            value = functools.reduce(getattr, node.target.split("."), source)
            if isinstance(value, torch.Tensor):
                constants[node] = value
        elif node.op == "call_module":
            if node.users:  # (the input guards of an exported program return nothing)
                raise ValueError(f"exported program calls module {node.target}, which is not followed")
        elif node.op == "output":
            outputs, spec = get(node.args[0]), getattr(source, "_out_spec", None)
            if spec is not None:  # the program's own output structure (a single tensor, say), as its module returns it
                outputs = torch.utils._pytree.tree_unflatten(list(outputs), spec)
            graph.output(outputs)
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten":
            name = node.target._schema.name.split("::")[1]
            if name.startswith("_assert") and not node.users:  # a check of dtypes or sizes: computes nothing
                continue
            value = _folded(node, name, constants)
            if value is not None:  # computed from the program's constants alone: a constant itself
                target = f"{_torchscript.COMPUTED_PREFIX}{len(computed)}"
                computed[target], constants[node], env[node] = value, value, graph.get_attr(target)
                continue
            args = _positional(node.target, get(node.args), get(node.kwargs))
            if name == "copy" and len(args) >= 2:  # (self, src): src's values in self's shape and type
                env[node] = _copied(graph, node, args[0], args[1])
                continue
            if _torchscript.identity_in_place(name, args):
                env[node] = args[0]
                continue
            if name in _torchscript.FOLDED or name == "index":  # the program's constants as their values
                values = _positional(node.target, *torch.fx.node.map_aggregate(
                    (node.args, node.kwargs), lambda v: constants.get(v, env.get(v)) if isinstance(v, torch.fx.Node) else v))
                folded = _torchscript.fold_constant(name, values)
                source_value = values[0] if values else None
                if folded is not None and isinstance(source_value, torch.Tensor) and folded.dtype == source_value.dtype \
                        and folded.device == source_value.device and torch.equal(folded, source_value):
                    # a copy of a constant (an index list lifted into the program, say): the same buffer
                    env[node], constants[node] = env[node.args[0]], folded
                    continue
                if name == "index" and _torchscript._constant_index(values[1]) is not None:
                    args[1] = values[1]  # constant index tensors, which the translation turns into lists
                    pad = _copying_pad(node.args[0], values[1])
                    if pad is not None:  # a reflection or replication pad, as core ATen writes one
                        env[node] = graph.call_function(F.pad, (args[0], *pad, None))
                        continue
            rebuilt = _torchscript.recurrent(graph, root, name, args, lambda value: next(
                (constants[n] for n, v in env.items() if v is value and n in constants), None))
            env[node] = rebuilt if rebuilt is not None else _torchscript._aten(graph, name, args)
            first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if first is not None and name in _util.VIEW_OPERATIONS:  # the result shares its input's memory
                aliased.update({first, node})
            if first is not None and name.endswith("_") and not name.startswith("_"):
                # in place (translated out of place): later uses of the input read the result; a
                # view of it, or what it views, would change too, which is not followed
                if first in aliased:
                    raise ValueError(f"exported program: in-place {name} on a tensor that shares memory with a view "
                                     "(pass the Python module instead)")
                env[first] = env[node]
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of a recurrent layer rebuilt (_torchscript.recurrent)
        elif node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload):
            env[node] = graph.call_function(node.target, get(node.args), get(node.kwargs))  # getitem and the like
            if node.target is operator.getitem and node.args[0] in aliased:  # a piece of a split: a view too
                aliased.add(node)
        else:
            raise ValueError(f"exported program: operator {node.target} has no translation (pass the Python module "
                             "instead)")
    _recomposed(graph)
    for node in graph.nodes:
        if node.op == "get_attr":
            value = computed[node.target] if node.target in computed else \
                functools.reduce(getattr, node.target.split("."), source)
            _torchscript._install(root, node.target, tensor=value)
    return torch.fx.GraphModule(root, graph)


def _copied(graph: torch.fx.Graph, node: torch.fx.Node, target, src):
    """aten.copy(self, src) (the functional form of self.copy_(src)): src broadcast to self's shape
    and converted to its dtype, as the program recorded them."""
    shapes = [getattr(a.meta.get("val"), "shape", None) if isinstance(a, torch.fx.Node) else None for a in node.args[:2]]
    dtypes = [getattr(a.meta.get("val"), "dtype", None) if isinstance(a, torch.fx.Node) else None for a in node.args[:2]]
    result = src if shapes[0] is not None and shapes[0] == shapes[1] else graph.call_method("expand_as", (src, target))
    if dtypes[0] is None or dtypes[0] != dtypes[1]:
        result = graph.call_method("to", (result,), {"dtype": dtypes[0]}) if dtypes[0] is not None else \
            graph.call_method("type_as", (result, target))
    return result


#: operators whose result is random or unset, never computed ahead (a name containing one of these)
_UNFOLDED = ("rand", "normal", "bernoulli", "uniform", "multinomial", "dropout", "empty", "poisson", "exponential",
             "geometric", "cauchy")


def _folded(node: torch.fx.Node, name: str, constants: dict) -> torch.Tensor | None:
    """The value of an aten node whose tensor inputs are all constants of the program (an index made
    from aranges, as core ATen writes a reflection pad or a diag_embed), computed now: the rules then
    read it as a stored tensor (a constant index list, a mask); an arange or a full, which take no
    tensor, too.  None for an operator with random or unset results, one done in place, or a result
    other than one tensor."""
    if not all(n in constants for n in node.all_input_nodes) or any(word in name for word in _UNFOLDED) or \
            (name.endswith("_") and not name.startswith("_")):
        return None
    args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), lambda v: constants[v] if isinstance(
        v, torch.fx.Node) else v)
    try:
        with torch.no_grad():
            value = node.target(*args, **kwargs)
    except Exception:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _copying_pad(x: object, index: object) -> tuple[tuple[int, ...], str] | None:
    """(pad, mode) where x[index] is F.pad(x, pad, mode) with mode reflect, replicate or circular
    along one spatial dim: index None for every dim but that one, where it is a constant 1-D integer
    tensor j -> (n - 1) - |(n - 1) - |j - a||, clamp(j - a, 0, n - 1) or (j - a) mod n (the gathers
    core ATen writes those pads as, one dim at a time), for x of 3 to 5 dims and n entries there."""
    shape = getattr(getattr(x, "meta", {}).get("val"), "shape", None) if isinstance(x, torch.fx.Node) else None
    if shape is None or not 3 <= len(shape) <= 5 or not isinstance(index, (list, tuple)) or len(index) > len(shape):
        return None
    given = [d for d, i in enumerate(index) if i is not None]
    if len(given) != 1 or given[0] < 2:
        return None
    d, idx = given[0], index[given[0]]
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 1 and not idx.is_floating_point() and idx.dtype != torch.bool):
        return None
    n, m = int(shape[d]), idx.numel()
    idx = idx.cpu().long()
    if m == n:  # (every entry in place, or a permutation: no pad)
        return None
    for before in range(m - n + 1):
        j = torch.arange(m) - before
        after = m - n - before
        forms = {"reflect": (n - 1) - ((n - 1) - j.abs()).abs(), "replicate": j.clamp(0, n - 1), "circular": j % n}
        for mode, expected in forms.items():
            if torch.equal(idx, expected) and (mode != "reflect" or max(before, after) < n) and \
                    (mode != "circular" or max(before, after) <= n):
                # (every spatial dim named: F.pad takes 2 (dims - 2) amounts for these modes)
                return (0, 0) * (len(shape) - 1 - d) + (before, after) + (0, 0) * (d - 2), mode
    return None


def _merged_pads(node: torch.fx.Node) -> tuple | None:
    """(x, pad, mode) where node is F.pad(F.pad(x, p, mode), q, mode) (no value) with the inner pad
    read by it alone, on other dims than the outer: one pad of x by both (these pads act on each dim
    apart, so padding one dim, then another, is padding both)."""
    if not (_calls(node, F.pad, 4) and _calls(node.args[0], F.pad, 4)) or len(node.args[0].users) != 1:
        return None
    inner = node.args[0]
    if inner.args[2] != node.args[2] or node.args[2] not in ("reflect", "replicate", "circular") or \
            inner.args[3] is not None or node.args[3] is not None:
        return None
    p, q = list(inner.args[1]), list(node.args[1])
    width = max(len(p), len(q))
    p, q = p + [0] * (width - len(p)), q + [0] * (width - len(q))
    if any(p[i] and q[i] for i in range(width)) or any((p[i] or p[i ^ 1]) and (q[i] or q[i ^ 1]) for i in range(width)):
        return None
    return inner.args[0], tuple(a + b for a, b in zip(p, q)), node.args[2]


def _calls(value, fn, arity: int) -> bool:
    """Whether value is a call of fn on `arity` positional arguments and no keywords."""
    return isinstance(value, torch.fx.Node) and value.op == "call_function" and value.target is fn and \
        len(value.args) == arity and not value.kwargs


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _softplus_form(node: torch.fx.Node) -> tuple | None:
    """(x, beta, threshold) where node computes F.softplus(x, beta, threshold) as core ATen writes
    it: torch.where(torch.gt(s, threshold), x, torch.log1p(torch.exp(s)) [/ beta]), s = x [* beta]."""
    if not (_calls(node, torch.where, 3) and _calls(node.args[0], torch.gt, 2)):
        return None
    (s, threshold), x, r = node.args[0].args, node.args[1], node.args[2]
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        return None
    beta = 1.0
    if s is not x:
        if not (_calls(s, torch.mul, 2) and s.args[0] is x and _positive_number(s.args[1])):
            return None
        beta = s.args[1]
        if not (_calls(r, torch.div, 2) and r.args[1] == beta):
            return None
        r = r.args[0]
    if _calls(r, torch.log1p, 1) and _calls(r.args[0], torch.exp, 1) and r.args[0].args[0] is s:
        return x, beta, threshold
    return None


def _logsumexp_form(node: torch.fx.Node) -> tuple | None:
    """(x, dims, keepdim) where node computes torch.logsumexp(x, dims, keepdim) as core ATen writes
    it: log(sum(exp(x - m), dims[, keepdim])) + m (m squeezed along dims without keepdim), with m =
    where(c, zero, a) and a = amax(x, dims, keepdim=True): m is constant along each summed slice
    (a's max, or a stored number where that max is infinite), and such a shift cancels exactly."""
    if not (_calls(node, torch.add, 2) and _calls(node.args[0], torch.log, 1)):
        return None
    total, shift = node.args[0].args[0], node.args[1]
    if not (isinstance(total, torch.fx.Node) and total.op == "call_function" and total.target is torch.sum and
            len(total.args) in (2, 3) and not total.kwargs):
        return None
    exp, dims, keepdim = (list(total.args) + [False])[:3]
    if not (_calls(exp, torch.exp, 1) and _calls(exp.args[0], torch.sub, 2) and isinstance(keepdim, bool)):
        return None
    x, m = exp.args[0].args
    if not (_calls(m, torch.where, 3) and isinstance(m.args[1], torch.fx.Node) and m.args[1].op == "get_attr"):
        return None
    a = m.args[2]
    if not (_calls(a, torch.amax, 3) and a.args[0] is x and list(a.args[1]) == list(dims) and a.args[2] is True):
        return None
    squeezed = _calls(shift, torch.squeeze, 2) and shift.args[0] is m and list(shift.args[1]) == list(dims)
    if shift is not m if keepdim else not squeezed:
        return None
    return x, list(dims), keepdim


def _recomposed(graph: torch.fx.Graph) -> None:
    """Core ATen's decompositions of softplus and logsumexp (a test on the input picks a branch,
    where no rule sees a constant) replaced by the functions themselves, which compute the same
    (check_translation compares them), whose constants are 1; and its copying pads, one dim at a
    time (_copying_pad), merged into one pad, which a conv after it is bracketed with.  The calls
    that nothing else reads then are removed.  Mish, x * tanh(softplus(x)), then follows."""
    for node in list(graph.nodes):
        if node.graph is not graph:  # (removed with an earlier match)
            continue
        softplus, logsumexp, pads = _softplus_form(node), _logsumexp_form(node), _merged_pads(node)
        if softplus is None and logsumexp is None and pads is None:
            continue
        with graph.inserting_before(node):
            if softplus is not None:
                whole = graph.call_function(F.softplus, softplus)
            elif logsumexp is not None:
                whole = graph.call_function(torch.logsumexp, logsumexp)
            else:
                whole = graph.call_function(F.pad, (*pads, None))
        node.replace_all_uses_with(whole)
        unused = [node]
        while unused:
            call = unused.pop()
            if call.op == "call_function" and not call.users and call.graph is graph:
                inputs = call.all_input_nodes
                graph.erase_node(call)
                unused.extend(inputs)
