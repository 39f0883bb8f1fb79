"""Lipschitz bounds of torch.nn's recurrent layers (RNN, LSTM, GRU) on sequences of a given length.

The layer maps the sequence x = (x_1, ..., x_T) to its outputs and final states; its constant in the
2-norm is bounded through per-step norms.  With u_t = ‖Δx_t‖ and e_t a bound on ‖Δh_t‖ (and k_t on
‖Δc_t‖ for an LSTM), one step of each cell gives e_t as a sum of nonnegative multiples of u_t and of
the previous step's bounds (below), so by induction every e_t is (R u)_t for a nonnegative matrix R
built by running that recursion on rows.  A nonnegative matrix is monotone, so layers compose by
multiplying their matrices, and the outputs' norm is at most ‖P u‖ <= ‖P‖_2 ‖Δx‖ with P the rows of
every output (the top layer's sequence, and each layer's and direction's final h, and c).

One step, with W_k x the gate k's input rows (their norms a_k = ‖W_ik‖, per input block: the previous
layer's directions), b_k = ‖W_hk‖, sigmoid' <= 1/4, |tanh'| <= 1, and gates in (0, 1):
* RNN (tanh or relu, 1-Lipschitz): ‖Δh'‖ <= a u + b ‖Δh‖.
* GRU: h' = (1 - z) n + z h with n = tanh(W_in x + b_in + r (W_hn h + b_hn)).  From h_0 = 0, every h is
  in (-1, 1) (a convex combination of n and h), so |W_hn h + b_hn| <= Q = max_i sum_j |W_hn|_ij +
  |b_hn|_i, and ‖Δn‖ <= a_n u + Q ‖Δr‖ + b_n ‖Δh‖.  Δh' = (1 - z') Δn + z' Δh + Δz (h - n), |h - n| < 2:
  ‖Δh'‖ <= ‖Δn‖ + ‖Δh‖ + 2 ‖Δz‖.
* LSTM: c' = f c + i g, h' = o tanh(c') (times W_hr with proj_size: p = ‖W_hr‖).  From c_0 = 0,
  |c_t| < t (|f c + i g| < |c| + 1), so ‖Δc'‖ <= (t - 1) ‖Δf‖ + ‖Δc‖ + ‖Δi‖ + ‖Δg‖ at step t, and
  ‖Δh'‖ <= p (‖Δo‖ + ‖Δc'‖).
The bounds hold for zero initial states only (the module called with the sequence alone).  They grow
with T: an RNN's and a GRU's like the step's gain to the power T, an LSTM's faster (its cell can grow
by 1 a step, and the forget gate's effect with it), so beyond a few steps they certify little.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from lipfast import _util, linalg

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def _norm_upper(matrix: Tensor) -> float:
    """A certified upper bound of ‖matrix‖_2."""
    return float(linalg.spectral_norm_bounds(matrix.detach(), rtol=1e-3)[1])


def _direction_rows(module: nn.RNNBase, layer: int, suffix: str, blocks: int, steps: int,
                    reverse: bool) -> tuple[Tensor, Tensor | None]:
    """(e, k): row t of e bounds ‖Δh_t‖ (k: ‖Δc_t‖, LSTM) of one layer's direction as a nonnegative
    combination of the per-step norms of its input blocks (index j * steps + t)."""
    mode, hidden = module.mode, module.hidden_size
    w_ih = getattr(module, f"weight_ih_l{layer}{suffix}").detach()
    w_hh = getattr(module, f"weight_hh_l{layer}{suffix}").detach()
    gates = _GATES[mode]
    width = w_ih.shape[1] // blocks
    a = [[_norm_upper(w_ih[k * hidden:(k + 1) * hidden, j * width:(j + 1) * width]) for j in range(blocks)]
         for k in range(gates)]
    b = [_norm_upper(w_hh[k * hidden:(k + 1) * hidden]) for k in range(gates)]
    projection = 1.0
    if mode == "LSTM" and getattr(module, "proj_size", 0) > 0:
        projection = _norm_upper(getattr(module, f"weight_hr_l{layer}{suffix}"))
    reach = 0.0
    if mode == "GRU":  # |W_hn h + b_hn| entrywise, for h in (-1, 1)
        rows = w_hh[2 * hidden:].double().abs().sum(1)
        if module.bias:
            rows = rows + getattr(module, f"bias_hh_l{layer}{suffix}").detach().double()[2 * hidden:].abs()
        reach = float(rows.max()) * (1 + 1e-12)
    size = blocks * steps
    e = torch.zeros(steps, size, dtype=torch.float64)
    k = torch.zeros(steps, size, dtype=torch.float64) if mode == "LSTM" else None
    previous = torch.zeros(size, dtype=torch.float64)
    cell = torch.zeros(size, dtype=torch.float64)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for count, t in enumerate(order):
        inputs = []
        for gate in range(gates):  # the gate's input rows: a_(gate, j) u_(j, t)
            row = torch.zeros(size, dtype=torch.float64)
            row[torch.arange(blocks) * steps + t] = torch.tensor(a[gate], dtype=torch.float64)
            inputs.append(row)
        if gates == 1:
            current = inputs[0] + b[0] * previous
        elif mode == "GRU":
            reset, update = 0.25 * (inputs[0] + b[0] * previous), 0.25 * (inputs[1] + b[1] * previous)
            candidate = inputs[2] + reach * reset + b[2] * previous
            current = candidate + previous + 2 * update
        else:
            i, f, g, o = (inputs[n] + b[n] * previous for n in range(4))
            cell = count * 0.25 * f + cell + 0.25 * i + g  # |c| < count before this step
            current = projection * (0.25 * o + cell)
            k[t] = cell
        e[t] = current
        previous = current
    return e, k


def recurrent_bound(module: nn.RNNBase, input_shape: tuple[int, ...]) -> tuple[float, float, str]:
    """(lower, upper, note) of an nn.RNN, nn.LSTM or nn.GRU on one sequence of input_shape (steps,
    features), zero initial states: the map from the sequence to (output, h_n) (and c_n)."""
    if module.mode not in _GATES:
        return 0.0, math.inf, f"{type(module).__name__} in mode {module.mode!r}: no rule"
    if len(input_shape) != 2 or input_shape[1] != module.input_size:
        return 0.0, math.inf, (f"{type(module).__name__} on inputs of shape {tuple(input_shape)}: a rule for one "
                               "(steps, features) sequence only")
    steps = input_shape[0]
    directions = 2 if module.bidirectional else 1
    reach = torch.eye(steps, dtype=torch.float64)  # the previous layer's per-step bounds, in terms of u
    outputs = []
    for layer in range(module.num_layers):
        blocks = 1 if layer == 0 else directions
        rows, finals = [], []
        for d in range(directions):
            e, k = _direction_rows(module, layer, "_reverse" if d else "", blocks, steps, reverse=bool(d))
            last = 0 if d else steps - 1
            rows.append(e)
            finals.append(e[last:last + 1])
            if k is not None:
                finals.append(k[last:last + 1])
        outputs += [final @ reach for final in finals]  # h_n (and c_n) of this layer's directions
        reach = torch.cat(rows) @ reach
    P = torch.cat([reach] + outputs)  # the top layer's sequence, then the final states
    upper = float(torch.linalg.matrix_norm(P, 2)) * (1 + 1e-9)  # (entries and norm within 1e-12 relative)
    growth = "exponentially" if module.mode != "LSTM" else "faster than exponentially"
    return _jacobian_lower(module, steps), upper, \
        f"per-step norms over {steps} steps, zero initial states: grows {growth} with the sequence's length"


def _jacobian_lower(module: nn.RNNBase, steps: int) -> float:
    """The largest difference quotient ‖f(x + h v) - f(x)‖ / ‖h v‖ (a lower bound of the constant by
    its definition; computed in float64, and decreased for that rounding) near the zero sequence and
    a random one, v taken by power steps on the Jacobian there (J v by the quotient, Jᵀ by autograd)."""
    model = copy.deepcopy(module).double().eval().requires_grad_(False)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    shape = (1, steps, module.input_size) if module.batch_first else (steps, 1, module.input_size)

    def flat(t: Tensor) -> Tensor:
        out = model(t)
        parts = [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]
        return torch.cat([p.reshape(-1) for p in parts])

    lower, h = 0.0, 1e-5
    with _util.differentiable_in_eval(model):  # (cuDNN's RNN kernels have no backward in eval mode)
        for x, power_steps in ((torch.zeros(shape, dtype=torch.float64), 8),
                               (torch.randn(shape, generator=generator, dtype=torch.float64), 3)):
            v = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
            x = x.to(device).requires_grad_()
            y = flat(x)
            for _ in range(power_steps):
                v = v / torch.linalg.vector_norm(v)
                with torch.no_grad():
                    difference = flat(x + h * v) - y
                # the two outputs' rounding (float64: far under 1e-9 of (‖y‖ + sqrt(size)) in norm), over h
                error = 1e-9 * (float(torch.linalg.vector_norm(y.detach())) + y.numel() ** 0.5) / h
                lower = max(lower, (float(torch.linalg.vector_norm(difference)) / h - error) * (1 - 1e-9))
                (v,) = torch.autograd.grad(y, x, difference / h, retain_graph=True)
    return max(lower, 0.0)
