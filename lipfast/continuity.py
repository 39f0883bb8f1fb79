"""Knowledge continuity: the k-volatility of hidden representations (Sun, Ma, Ge, Vosoughi, NeurIPS 2024).

A Lipschitz bound needs a distance on inputs; text and other discrete inputs have none.  Knowledge
continuity measures robustness in the space of one layer's outputs instead: how much the loss
changes per unit of distance between the representations of two examples.  For layer outputs h_i
(flattened to vectors), distances d_ij = ‖h_i − h_j‖₂ and per-example losses ℓ_i, a pair {i, j}
(i != j) is *valid* when d_ij > 0 (and d_ij <= delta when delta is given); its ratio is
r_ij = |ℓ_i − ℓ_j| / d_ij.

* score: the mean of r_ij over the valid pairs (NaN if there are none);
* per_sample[i]: the mean of r_ij over the valid pairs that contain i (NaN if none);
* zero_distance_pairs: the pairs with d_ij = 0; discontinuities: those of them with ℓ_i != ℓ_j
  (the loss jumps where the representation does not move); pairs: the number of valid pairs.

Small volatility means robust.  All pairs are computed by a tiled, fused kernel (memory O(n d),
never n × n; n = 50,000 rows of 768 fit in well under a gigabyte), or a uniform random sample of
pairs when ``max_pairs`` is smaller than n (n − 1) / 2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipfast import _ext, _util, ops, reference

__all__ = [
    "KnowledgeContinuity",
    "LayerVolatility",
    "knowledge_continuity",
    "knowledge_continuity_penalty",
    "volatility",
]


@dataclass(frozen=True)
class LayerVolatility:
    """The k-volatility of one set of representations (see the module docstring for the terms)."""

    score: float
    per_sample: Tensor
    zero_distance_pairs: int
    discontinuities: int
    pairs: int
    #: True when the pairs were a uniform random sample (max_pairs), not all n (n − 1) / 2 of them.
    sampled: bool

    def __str__(self) -> str:
        kind = "sampled valid pairs" if self.sampled else "valid pairs"
        return (
            f"k-volatility {self.score:.4g} over {self.pairs} {kind} of {self.per_sample.numel()} examples; "
            f"{self.zero_distance_pairs} zero-distance pairs, {self.discontinuities} discontinuities"
        )


class KnowledgeContinuity(dict):
    """``knowledge_continuity``'s result: layer name -> :class:`LayerVolatility`, in the order asked for;
    ``str()`` gives a table."""

    def __str__(self) -> str:
        rows = [("layer", "k-volatility", "pairs", "zero-distance", "discontinuities")]
        for name, v in self.items():
            pairs = f"{v.pairs}{' (sampled)' if v.sampled else ''}"
            rows.append((name, f"{v.score:.4g}", pairs, str(v.zero_distance_pairs), str(v.discontinuities)))
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(r, widths))) for r in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Argument checks

def _check_hidden(fn: str, hidden: object) -> Tensor:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"lipfast.{fn}: hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"lipfast.{fn}: hidden must be a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() == 0:
        raise ValueError(f"lipfast.{fn}: hidden must be (n, ...), one row per example, got a 0-dim tensor")
    if hidden.shape[0] < 2:
        raise ValueError(f"lipfast.{fn}: hidden must hold at least 2 examples (rows), got {hidden.shape[0]}")
    return hidden.reshape(hidden.shape[0], -1)


def _check_losses(fn: str, losses: object, n: int) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"lipfast.{fn}: losses must be a torch.Tensor, got {type(losses).__name__}")
    if losses.is_complex():
        raise TypeError(f"lipfast.{fn}: losses must be real, got {losses.dtype}")
    if losses.dim() != 1 or losses.shape[0] != n:
        raise ValueError(
            f"lipfast.{fn}: losses must be (n,) with one loss per row of hidden (n = {n}), got shape {tuple(losses.shape)}"
        )
    return losses


def _check_finite(fn: str, name: str, x: Tensor) -> None:
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"lipfast.{fn}: {name} has a NaN or Inf entry (row {int(bad.nonzero()[0, 0])})")


def _check_delta(fn: str, delta: object) -> float | None:
    if delta is None:
        return None
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or math.isnan(delta) or delta <= 0:
        raise ValueError(f"lipfast.{fn}: delta must be a positive number or None, got {delta!r}")
    return None if math.isinf(delta) else float(delta)


def _check_max_pairs(fn: str, max_pairs: object) -> int | None:
    if max_pairs is None:
        return None
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"lipfast.{fn}: max_pairs must be an int >= 1 or None, got {max_pairs!r}")
    return max_pairs


def _check_seed(fn: str, seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"lipfast.{fn}: seed must be an int, got {seed!r}")
    return seed


# ---------------------------------------------------------------------------------------------------
# k-volatility of given representations

def _layer_volatility(
    fn: str, hidden: Tensor, losses: Tensor, delta: object, max_pairs: object, seed: object
) -> LayerVolatility:
    hidden = _check_hidden(fn, hidden)
    losses = _check_losses(fn, losses, hidden.shape[0])
    delta = _check_delta(fn, delta)
    max_pairs = _check_max_pairs(fn, max_pairs)
    seed = _check_seed(fn, seed)
    _check_finite(fn, "hidden", hidden)
    _check_finite(fn, "losses", losses[:, None])
    hidden = hidden.detach()
    losses = losses.detach().to(device=hidden.device, dtype=torch.float64)
    n = hidden.shape[0]
    sampled = max_pairs is not None and max_pairs < n * (n - 1) // 2
    if sampled:
        score, per_sample, counts = reference.sampled_volatility(hidden, losses, delta, max_pairs, seed)
    elif _ext.use_kernel("pairwise_volatility", hidden.device):
        score, per_sample, counts = ops.pairwise_volatility(hidden, losses, delta)
    else:
        score, per_sample, counts = reference.pairwise_volatility(hidden, losses, delta)
    valid, zero, jumps = (int(c) for c in counts.tolist())
    return LayerVolatility(float(score), per_sample, zero, jumps, valid, sampled)


def volatility(
    hidden: Tensor, losses: Tensor, *, delta: float | None = None, max_pairs: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """k-volatility of representations ``hidden (n, ...)`` (each row flattened) with per-example
    ``losses (n,)``: returns ``(score, per_sample)``, float64 on hidden's device (a 0-dim tensor and
    an (n,) tensor; NaN where there are no valid pairs).  See the module docstring for the terms.

    ``delta`` keeps only pairs with d_ij <= delta (a local volatility).  ``max_pairs`` caps the work:
    when n (n − 1) / 2 is larger, that many pairs are drawn uniformly at random with replacement
    (seeded by ``seed``, so repeatable).  Distances at 0 are decided exactly (equal rows); others are
    accurate to about 1e-6 relative in float32 (exactly as stored, in float64, for pairs where
    cancellation could matter); sums are float64.  Use :func:`knowledge_continuity` for the zero-distance
    and discontinuity counts, or a model's layers directly; nothing here is differentiable (see
    :func:`knowledge_continuity_penalty` for training).

    >>> score, per_sample = lipfast.volatility(torch.randn(1000, 64), torch.rand(1000))
    """
    v = _layer_volatility("volatility", hidden, losses, delta, max_pairs, seed)
    device = v.per_sample.device
    return torch.tensor(v.score, dtype=torch.float64, device=device), v.per_sample


def knowledge_continuity_penalty(hidden: Tensor, losses: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Differentiable k-volatility of a training batch: the mean over all pairs i < j of
    |ℓ_i − ℓ_j| / (d_ij + eps), with d_ij = ‖h_i − h_j‖₂ (each row of ``hidden (n, ...)`` flattened).

    Add it to the loss, scaled, to train for knowledge continuity.  ``losses (n,)`` are per-example
    losses (``reduction="none"``) that keep their graph; gradients flow into both.  ``eps > 0`` keeps
    the ratio finite for equal rows (whose distance then has zero gradient).  It materializes the
    n (n − 1) / 2 pair distances, which suits batches; use :func:`volatility` to evaluate large sets.
    Unlike the evaluation functions it does not scan for NaN (no host sync in a training step).
    """
    fn = "knowledge_continuity_penalty"
    hidden = _check_hidden(fn, hidden)
    losses = _check_losses(fn, losses, hidden.shape[0])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"lipfast.{fn}: eps must be a positive finite number, got {eps!r}")
    if hidden.dtype not in (torch.float32, torch.float64):
        hidden = hidden.float()
    n = hidden.shape[0]
    distances = F.pdist(hidden)  # the pairs (0, 1), (0, 2), ..., (n - 2, n - 1), as triu_indices
    i, j = torch.triu_indices(n, n, 1, device=hidden.device)
    return ((losses[i] - losses[j]).abs() / (distances + eps)).mean()


# ---------------------------------------------------------------------------------------------------
# k-volatility of a model's layers

def _batches(data: object) -> Iterable[Sequence[Any]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(x, Tensor) for x in data):
        return [data]  # one batch (inputs, targets)
    if isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
        return data
    raise TypeError(
        "lipfast.knowledge_continuity: data must be a tuple (inputs, targets) of tensors or an iterable of "
        f"such batches (a DataLoader), got {type(data).__name__}"
    )


def _first_tensor(name: str, output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise ValueError(f"lipfast.knowledge_continuity: layer {name!r} returned {type(output).__name__}, which holds no tensor")


def _to_device(x: Any, device: torch.device | None) -> Any:
    return x.to(device) if device is not None and isinstance(x, Tensor) else x


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _pooled(output: Tensor, pool: str) -> Tensor:
    if pool == "mean" and output.dim() == 3:
        output = output.mean(dim=1)  # (batch, seq, d): the mean over the sequence
    return output.reshape(output.shape[0], -1)


def knowledge_continuity(
    model: nn.Module,
    data: object,
    loss_fn: Callable[[Any, Any], Tensor],
    layers: str | Sequence[str],
    *,
    delta: float | None = None,
    max_pairs: int | None = None,
    progress: bool = True,
    pool: Literal["mean", "flatten"] = "mean",
    seed: int = 0,
) -> KnowledgeContinuity:
    """k-volatility of the outputs of ``model``'s ``layers`` (qualified module names, as in
    ``model.named_modules()``) over a data set.

    ``data`` is one batch ``(inputs, targets)`` or an iterable of them (a DataLoader); inputs may be a
    tensor, a tuple (passed as arguments) or a dict (keyword arguments) and are moved to the model's
    device.  ``loss_fn(outputs, targets)`` must return per-example losses (``reduction="none"``).
    Each layer's output is captured by a forward hook (a tuple or dict output: its first tensor; a
    layer called several times in one forward pass: its first call) and flattened per example;
    3-dim outputs ``(batch, seq, d)`` are mean-pooled over seq unless ``pool="flatten"``.  The model
    runs in eval mode without autograd, and every module's mode is restored afterwards.

    Returns a :class:`KnowledgeContinuity`: layer name -> :class:`LayerVolatility` (score, per_sample,
    zero_distance_pairs, discontinuities, pairs, sampled).  ``delta``, ``max_pairs`` and ``seed`` are
    as in :func:`volatility`; ``progress`` shows progress bars (tqdm, when installed).

    >>> kc = lipfast.knowledge_continuity(model, (x, y), nn.CrossEntropyLoss(reduction="none"), ["0", "2"])
    >>> print(kc)
    """
    fn = "knowledge_continuity"
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipfast.{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"lipfast.{fn}: loss_fn must be callable, got {type(loss_fn).__name__}")
    names = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, Sequence) else None
    if not names or not all(isinstance(x, str) for x in names):
        raise ValueError(f"lipfast.{fn}: layers must be a module name or a non-empty list of them, got {layers!r}")
    modules = dict(model.named_modules())
    unknown = [x for x in names if x not in modules]
    if unknown:
        valid = ", ".join(repr(x) for x in modules if x) or "(none)"
        raise ValueError(f"lipfast.{fn}: unknown layer name(s) {', '.join(map(repr, unknown))}; the model's layers are {valid}")
    if pool not in ("mean", "flatten"):
        raise ValueError(f"lipfast.{fn}: pool must be 'mean' or 'flatten', got {pool!r}")
    delta = _check_delta(fn, delta)
    max_pairs = _check_max_pairs(fn, max_pairs)
    seed = _check_seed(fn, seed)
    names = list(dict.fromkeys(names))

    reference_tensor = next(model.parameters(), None)
    if reference_tensor is None:
        reference_tensor = next(model.buffers(), None)
    device = reference_tensor.device if reference_tensor is not None else None
    captured: dict[str, list[Tensor]] = {x: [] for x in names}
    seen: set[str] = set()

    def capture(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in seen:
                seen.add(name)
                captured[name].append(_pooled(_first_tensor(name, output).detach(), pool))
        return hook

    losses: list[Tensor] = []
    handles = [modules[x].register_forward_hook(capture(x)) for x in names]
    batches = _batches(data)
    if progress:
        batches = _util.progress(batches, "lipfast: knowledge continuity (forward)", "batch")
    try:
        with _util.eval_mode(model), torch.no_grad():
            for number, batch in enumerate(batches):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError(f"lipfast.{fn}: each batch must be (inputs, targets), got {type(batch).__name__}")
                inputs, targets = batch
                if isinstance(inputs, (tuple, list)):
                    inputs = type(inputs)(_to_device(x, device) for x in inputs)
                elif isinstance(inputs, Mapping):
                    inputs = {k: _to_device(x, device) for k, x in inputs.items()}
                else:
                    inputs = _to_device(inputs, device)
                seen.clear()
                outputs = _call(model, inputs)
                loss = loss_fn(outputs, _to_device(targets, device))
                missing = [x for x in names if x not in seen]
                if missing:
                    raise ValueError(f"lipfast.{fn}: layer(s) {', '.join(map(repr, missing))} did not run in the model's forward pass")
                if not isinstance(loss, Tensor) or loss.dim() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise ValueError(
                        f"lipfast.{fn}: loss_fn must return one loss per example, a 1-dim tensor, for batch {number}; "
                        f"got {shape} (use reduction='none')"
                    )
                for x in names:
                    rows = captured[x][-1].shape[0]
                    if rows != loss.shape[0]:
                        raise ValueError(
                            f"lipfast.{fn}: in batch {number}, layer {x!r} gave {rows} rows (its output's first dim) "
                            f"but loss_fn gave {loss.shape[0]} losses; outputs must be batch-first"
                        )
                losses.append(loss.detach())
    finally:
        for handle in handles:
            handle.remove()
    if not losses:
        raise ValueError(f"lipfast.{fn}: data holds no batches")

    all_losses = torch.cat([x.to(device=losses[0].device) for x in losses])
    result = KnowledgeContinuity()
    layer_names: Iterable[str] = names
    if progress:
        layer_names = _util.progress(names, "lipfast: knowledge continuity (pairs)", "layer")
    for name in layer_names:
        hidden = torch.cat([x.to(captured[name][0].device) for x in captured[name]])
        result[name] = _layer_volatility(fn, hidden, all_losses, delta, max_pairs, seed)
    return result

