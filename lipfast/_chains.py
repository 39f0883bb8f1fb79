"""Chains of linear layers and elementwise activations bounded as one map (lipschitz_bound).

A chain is x -> A_m s_(m-1)(... s_1(A_1 x + b_1) ...) + b_m, optionally plus x itself (a residual
block), with A_i linear layers (a Linear's matrix, or a conv's operator; a BatchNorm folded in) and
s_i elementwise activations whose slopes lie in [a_i, b_i] (ReLU: [0, 1]).  The rule of
composition bounds it by the product of the constants, 1 + prod_i ‖A_i‖ max(|a_i|, |b_i|) for the
residual block; this module bounds the map as a whole, which is often much tighter.

Why it holds.  For two inputs x, y, each activation's change is s_i(u) - s_i(v) = D_i (u - v), D_i
diagonal with entries the divided differences (s(u_k) - s(v_k)) / (u_k - v_k), each in [a_i, b_i]
(the mean value theorem; the same for piecewise-linear s).  So f(x) - f(y) = J (x - y) with

    J = rho I + A_m D_(m-1) A_(m-1) ... D_1 A_1,    rho = 1 for a residual block, else 0.

Write D_i = c_i I + r_i S_i with c_i = (a_i + b_i) / 2, r_i >= (b_i - a_i) / 2, so ‖S_i‖ <= 1, and
expand the product over the subsets T of activations that take r_i S_i (Combettes and Pesquet,
2020): each term is a product of segments A_j ... A_(i+1) (the layers between two cuts, the c's of
the activations inside them factored out) separated by S's, so

    ‖J‖ <= ‖rho I + (c_1 ... c_(m-1)) A_m ... A_1‖
           + sum over T != {} of prod_(i in T) r_i prod_(i not in T) |c_i| prod_segments N(segment),

N(i..j) >= ‖A_j ... A_i‖.  The sum is computed over the last cut (G below).  N of one layer is its
norm; of two adjacent layers, the norm of their product where it can be certified cheaply (a dense
product; a conv pair per frequency), else the product of their norms; longer segments split.

Convolutions are handled in the Fourier domain: stride-1 convs that keep the input size, one
groups, on one grid of N points per dim.  With circular padding and taps that make each one a
circulant, every A_i is block-circulant on that grid, and A_j A_i and rho I + C A_m ... A_1 are too,
one (out x in) complex matrix per frequency.  With zero padding, each A_i = P M_i E: E places the
input in a box of n points of a grid of N >= n + max(pad) points, M_i is the block-circulant conv on
that grid, P reads the box back; no tap of an output in the box reaches across the wrap.  Then
A_(i+1) D_i A_i = P M_(i+1) D'_i M_i E with D'_i = D_i on the box and 0 outside it (which the box's
zero padding is), and J = P (rho I + M_m D'_(m-1) ... D'_1 M_1) E: the same expansion holds for the
M's, with 0 added to each activation's slope interval, and ‖P X E‖ <= ‖X‖.  So every N is the norm
of a block-circulant operator, certified as the circulant bounds are (conv._CirculantBound).

The computed matrices differ from the exact ones by rounding, bounded and added: the symbols
(conv._symbol_error), each product (|fl(XY) - XY| <= gamma |X||Y| entrywise), the shift by rho I,
and each layer's BatchNorm fold (its margin, ‖A_exact - A_stored‖)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from lipfast import conv, linalg

_UNIT = 2.0**-53
#: The sums and products below are of a few dozen terms in float64, each within 2^-52 relative:
#: one factor this large covers all their rounding (upward).
_SLACK = 1 + 1e-12
#: Skip a conv chain whose per-frequency work would take more than this many flops, or whose
#: per-frequency matrices more than this many bytes (one stack).
_MAX_FLOPS = 2e11
_MAX_BYTES = 512 << 20


@dataclass(frozen=True)
class Piece:
    """One linear layer of a chain: ``weight`` its stored (folded) weight, a matrix (out, in) for a
    Linear, or a conv weight with ``op`` its operator; ``margin`` >= ‖exact map - stored map‖ (a
    BatchNorm fold's rounding); ``upper`` a certified bound on the exact map's norm."""

    weight: Tensor
    op: conv.ConvOperator | None
    margin: float
    upper: float


def slope_split(a: float, b: float) -> tuple[float, float]:
    """(c, r) with [c - r, c + r] containing [a, b]: the centre and a radius rounded up."""
    c = (a + b) / 2
    r = max(b - c, c - a, 0.0)
    return c, math.nextafter(r, math.inf) * _SLACK


def _gamma(k: float) -> float:
    return k * _UNIT / (1 - k * _UNIT)


def _up(x: float) -> float:
    return x * _SLACK


def _fro_upper(X: Tensor) -> Tensor:
    """An upper bound on the Frobenius norm of each matrix of X (real or complex, float64), its rounding
    covered (conv._frobenius_squared_upper)."""
    real = torch.view_as_real(X).flatten(-2) if X.is_complex() else X
    return conv._frobenius_squared_upper(real).sqrt() * (1 + 4 * _UNIT)


def _margins(pieces: Sequence[Piece], scale: float) -> float:
    """A bound on ‖scale (exact product - stored product)‖ of the pieces' maps: with A = F + E, ‖E‖
    within the margin m and U >= ‖F‖ (the exact map's bound plus its margin), the difference of the
    products is at most prod (U + m) - prod U."""
    if not any(p.margin for p in pieces):
        return 0.0
    with_margin, without = 1.0, 1.0
    for p in pieces:
        U = p.upper + p.margin
        with_margin *= U + p.margin
        without *= U
    return abs(scale) * max(with_margin - without, 0.0) * _SLACK


class _Dense:
    """The pieces as float64 matrices (Linear layers; a matrix acting on the last dim of its input,
    the same on every leading index, has the norm of the matrix)."""

    def __init__(self, pieces: Sequence[Piece], rtol: float, shortcut: Piece | None = None) -> None:
        self.pieces, self.rtol, self.shortcut = pieces, rtol, shortcut
        self.W = [p.weight.detach().double() for p in pieces]  # exact copies of the stored entries

    def single(self, i: int) -> float:
        return self.pieces[i].upper if i < len(self.pieces) else self.shortcut.upper

    def _product(self, i: int, j: int) -> tuple[Tensor, float]:
        """(fl(W_j ... W_i), a bound on ‖it - W_j ... W_i‖) for the stored matrices: with P the
        exact product so far and E its error, fl(W P~) - W P = W E + (fl(W P~) - W P~), whose norm is
        at most ‖W‖_F ‖E‖ + gamma(inner) ‖W‖_F ‖P~‖_F."""
        P, error = self.W[i], 0.0
        for k in range(i + 1, j + 1):
            W = self.W[k]
            fro = float(_fro_upper(W))
            product = W @ P
            error = fro * error + _gamma(W.shape[1] + 2) * fro * float(_fro_upper(P))
            P = product
        return P, error

    def product(self, i: int, j: int) -> float | None:
        P, error = self._product(i, j)
        upper = float(linalg.spectral_norm_bounds(P, rtol=self.rtol)[1])
        return _up(upper + error + _margins(self.pieces[i : j + 1], 1.0))

    def shifted(self, C: float) -> float | None:
        """A bound on ‖S + C A_m ... A_1‖, S the shortcut's matrix (the identity where there is none)."""
        P, error = self._product(0, len(self.W) - 1)
        M = P * C
        if self.shortcut is None:
            if P.shape[0] != P.shape[1]:
                return None
            M.diagonal().add_(1.0)
            base = math.sqrt(P.shape[0])
        else:
            S = self.shortcut.weight.detach().double()
            if S.shape != M.shape:
                return None
            M += S
            base = float(_fro_upper(S))
        # each entry of fl(S + fl(C p)) is within 2u of the exact one's |.| (two roundings), so the
        # matrix within 2u (‖S‖_F + |C| ‖P~‖_F) in norm
        shift = 2.1 * _UNIT * (base + abs(C) * float(_fro_upper(P)))
        upper = float(linalg.spectral_norm_bounds(M, rtol=self.rtol)[1])
        margins = _margins(self.pieces, C) + (self.shortcut.margin if self.shortcut is not None else 0.0)
        return _up(upper + abs(C) * error + shift + margins)


def conv_grid(pieces: Sequence[Piece], shortcut: Piece | None = None):
    """Per piece (then the shortcut), the grid (one conv._DimGrid per dim) on which the chain's convs
    are block-circulant operators (see the module docstring), or None where they do not fit one:
    one group each; the first conv (and the shortcut, on the same input) of any stride s, the later
    ones of stride 1 with the first's output size in and out; circular padding that makes each a
    circulant (s dividing the size), zero padding, or a one-tap kernel without padding.  The first
    conv's grid has s polyphase components per dim (conv._grids).  Returns (grids, boxed): boxed
    where some conv is zero-padded (then the activations' intervals must contain 0)."""
    ops = [p.op for p in pieces] + ([shortcut.op] if shortcut is not None else [])
    if any(op is None for op in ops):
        return None
    first, size = ops[0], ops[0].input_size
    out, stride = first.output_size, first.stride
    strided = [first] + ([ops[-1]] if shortcut is not None else [])
    later = ops[1 : len(pieces)]
    if any(op.groups != 1 for op in ops) or any(op.input_size != size or op.stride != stride or
                                                 op.output_size != out for op in strided) or \
            any(op.input_size != out or op.output_size != out or any(t != 1 for t in op.stride) for op in later):
        return None
    boxed, circular = False, False
    for op in ops:
        for k, lo, hi, d in zip(op.kernel, op.pad_lo, op.pad_hi, op.dilation):
            if k == 1 and lo == hi == 0:
                continue  # the same operator on any grid, with either padding
            if op.padding_mode == "circular" and lo + hi == d * (k - 1):
                circular = True
            elif op.padding_mode == "zeros":
                boxed = True
            else:
                return None
    if boxed and circular:
        return None
    if not boxed:  # circulants on the input's grid, polyphase for the stride: s must divide n
        if any(n % t or n // t != o for n, t, o in zip(size, stride, out)):
            return None
        frequencies = list(out)
    else:  # the box [0, n) in a grid of N = s F points (conv._grids), F >= out + the later convs' pads
        frequencies = [max(-(-(n + max(max(op.pad_lo[d], op.pad_hi[d]) for op in strided)) // t), o,
                           o + max((max(op.pad_lo[d], op.pad_hi[d]) for op in later), default=0))
                       for d, (n, t, o) in enumerate(zip(size, stride, out))]
    grids = [[conv._DimGrid(F, t, tuple(dl * j - lo for j in range(k)), 0)
              for F, t, k, lo, dl in zip(frequencies, op.stride, op.kernel, op.pad_lo, op.dilation)] for op in ops]
    return grids, boxed


class _Spectral:
    """The pieces as block-circulant operators on one grid: per kept frequency (one of each
    conjugate pair, whose matrices are complex conjugates) a complex matrix (out, in) per piece."""

    def __init__(self, pieces: Sequence[Piece], grids: list[list[conv._DimGrid]], rtol: float, boxed: bool,
                 shortcut: Piece | None = None) -> None:
        self.pieces, self.rtol, self.boxed, self.shortcut = pieces, rtol, boxed, shortcut
        self.K: list[Tensor] = []
        self.errors: list[float] = []  # ‖K~ - K‖ for every frequency, in the scaled units
        self.scales: list[int] = []  # weight = scaled weight * 2^e
        self.fro: list[Tensor] = []  # per frequency, ‖K~_f‖_F
        self.grids = grids
        for piece, grid in zip([*pieces, *([shortcut] if shortcut is not None else [])], grids):
            e, scaled, _, error = conv._scaled_weight(piece.weight.detach(), math.prod(g.phases for g in grid))
            sym = conv._symbol_stack(scaled, 1, grid)
            p = sym.p
            K = torch.complex(sym.S[:, :p], sym.S[:, p:])
            self.K.append(K.mT if sym.transposed else K)
            self.fro.append(_fro_upper(K))
            self.errors.append(error)
            self.scales.append(e)
        # the Lanczos estimates (which only choose where to test) in the weights' precision, as bracket's
        self.estimate_dtype = torch.float64 if any(p.weight.dtype == torch.float64 for p in pieces) else torch.float32
        self.m = len(pieces)

    @staticmethod
    def cost(pieces: Sequence[Piece], shortcut: Piece | None, grids: list[list[conv._DimGrid]], boxed: bool,
             pairs: bool, residual: bool) -> tuple[float, float]:
        """(flops, bytes of one per-frequency stack), roughly, of what chain_bounds will compute: the
        layers' norms on the grid (boxed), the adjacent products (pairs), the product of them all
        plus the identity or the shortcut (residual); grids: the pieces', then the shortcut's."""
        F = math.prod(g.frequencies for g in grids[0]) / 2 + 1
        everything = [*pieces, *([shortcut] if shortcut is not None else [])]
        shapes = [(p.weight.shape[0], p.weight.shape[1] * math.prod(g.phases for g in grid))
                  for p, grid in zip(everything, grids)]
        chain = shapes[: len(pieces)]

        def certified(o: int, i: int) -> float:  # the Gram matrix and its Cholesky test
            return 8 * o * i * min(o, i) + 2 * min(o, i) ** 3

        flops = sum(certified(o, i) for o, i in shapes) if boxed else 0.0
        if pairs:
            flops += sum(8 * o2 * o1 * i1 + certified(o2, i1) for (o2, _), (o1, i1) in zip(chain[1:], chain))
        if residual:
            flops += sum(8 * o * i * chain[0][1] for o, i in chain[1:]) + certified(chain[-1][0], chain[0][1])
        big = max(max(o, i) for o, i in shapes)
        return F * flops, F * big * big * 16

    def _certify(self, K: Tensor) -> float:
        """Certified max over the frequencies of sigma_max(K_f), K (F, p, q) complex128 as stored."""
        if K.shape[-2] < K.shape[-1]:
            K = K.mT
        p = K.shape[-2]
        S = torch.cat([K.real, K.imag], -2).contiguous()
        fro2 = conv._frobenius_squared_upper(S)
        Hr, Hi = conv._negated_gram(S, p)
        q, inner = Hr.shape[-1], 2 * p
        rounding = 8 * conv._gamma(2 * inner + 4) * fro2 + q * inner * 2.0**-1000  # as conv._direct_grams
        grams = conv._Grams(Hr, Hi, fro2, rounding, False, torch.arange(K.shape[0]))
        return conv._CirculantBound(grams, self.rtol, 1000, self.estimate_dtype).certify()

    def single(self, i: int) -> float:
        """‖M_i‖ on the grid (for a circulant conv, its norm; for a boxed one, at least its norm); i = m:
        the shortcut's."""
        piece = self.pieces[i] if i < self.m else self.shortcut
        if not self.boxed:  # M_i is the layer itself (a unitary change of basis): its bracket's upper end
            return piece.upper
        return _up(conv.circulant_upper(piece.weight.detach(), self.grids[i], self.rtol, 1000) + piece.margin)

    def _product(self, i: int, j: int) -> tuple[Tensor, float, float]:
        """(fl(K_j ... K_i) per frequency in scaled units, a bound on its error there, the bound U on
        ‖K~_k‖ products used): with X = K~ + E (‖E‖ <= e) and P = P~ + F the product so far,
        X P - fl(K~ P~) = K~ F + E P~ + E F + (K~ P~ - fl(K~ P~)); the last within 2 gamma(2 inner + 2)
        ‖K~‖_F ‖P~‖_F for a complex product of real ones."""
        P, error = self.K[i], self.errors[i]
        P_norm = float(self.fro[i].max())
        for k in range(i + 1, j + 1):
            K, e = self.K[k], self.errors[k]
            K_norm = float(self.fro[k].max())
            product = K @ P
            new_norm = float(_fro_upper(product).max())
            rounding = 2 * _gamma(2 * K.shape[-1] + 2) * K_norm * P_norm
            error = _up(K_norm * error + e * P_norm + e * error + rounding)
            P, P_norm = product, new_norm
        return P, error, P_norm

    def product(self, i: int, j: int) -> float | None:
        P, error, _ = self._product(i, j)
        bound = conv._in_units(self._certify(P) + error, sum(self.scales[i : j + 1]), up=True)
        return _up(bound + _margins(self.pieces[i : j + 1], 1.0))

    def shifted(self, C: float) -> float | None:
        """A bound on ‖S + C A_m ... A_1‖, S the shortcut (the identity where there is none)."""
        P, error, P_norm = self._product(0, self.m - 1)
        shift = sum(self.scales[: self.m])
        # M = fl(fl(P 2^shift C) + S): two roundings of each entry's parts (2^shift C is exact, a power
        # of two times C), each off by at most 2^-1075 more where it lands among the subnormals; plus
        # the shortcut's own errors
        M = P * (math.ldexp(1.0, shift) * C)
        q = P.shape[-1]
        base_fro, base_error = math.sqrt(q), 0.0
        if self.shortcut is None:
            if P.shape[-1] != P.shape[-2]:
                return None
            M.diagonal(dim1=-2, dim2=-1).add_(1.0)
        else:
            K = self.K[self.m] * math.ldexp(1.0, self.scales[self.m])
            if K.shape != M.shape:
                return None
            M += K
            base_fro = conv._in_units(float(self.fro[self.m].max()), self.scales[self.m], up=True)
            base_error = conv._in_units(self.errors[self.m], self.scales[self.m], up=True) + q * M.shape[-2] * 2.0**-1070
        form = 2 * 2.1 * _UNIT * (base_fro + abs(C) * conv._in_units(P_norm, shift, up=True)) + q * 2.0**-1070
        bound = self._certify(M) + abs(C) * conv._in_units(error, shift, up=True) + form + base_error
        margins = _margins(self.pieces, C) + (self.shortcut.margin if self.shortcut is not None else 0.0)
        return _up(bound + margins)


def segment_norms(m: int, single: Callable[[int], float], pair: Callable[[int], float | None]) -> list[list[float]]:
    """N[i][j] >= ‖A_j ... A_i‖: singles, adjacent pairs (pair(i): A_(i+1) A_i, or None), and longer
    segments as the best split, ‖XY‖ <= ‖X‖ ‖Y‖."""
    N = [[math.inf] * m for _ in range(m)]
    for i in range(m):
        N[i][i] = single(i)
    for i in range(m - 1):
        split = _up(N[i][i] * N[i + 1][i + 1])
        certified = pair(i)
        N[i][i + 1] = split if certified is None else min(split, certified)
    for length in range(3, m + 1):
        for i in range(m - length + 1):
            j = i + length - 1
            N[i][j] = min(_up(N[i][k] * N[k + 1][j]) for k in range(i, j))
    return N


def expansion(N: list[list[float]], slopes: Sequence[tuple[float, float]], shifted: float | None,
              residual: bool, base: float = 1.0) -> tuple[list[float], float | None]:
    """(G, R): G[j] bounds ‖A_j D_(j-1) ... D_1 A_1‖ (every prefix of the chain), R bounds ‖I + A_m
    D ... A_1‖ (residual; shifted >= ‖I + C A_m ... A_1‖ with C = prod c_i, or None for 1 + |C| N;
    with a shortcut S in place of I, base >= ‖S‖ in place of 1).

    G[j] = |c_1 ... c_(j-1)| N(1..j) + sum_(t < j) G[t] r_t |c_(t+1) ... c_(j-1)| N(t+1..j): the
    expansion's terms grouped by their last cut t (the module docstring)."""
    m = len(N)
    c = [abs(s[0]) for s in slopes]
    r = [s[1] for s in slopes]

    def cs(lo: int, hi: int) -> float:  # |c_lo ... c_(hi-1)| (activations lo..hi-1; 1 for none)
        return math.prod(c[lo:hi])

    G: list[float] = []
    for j in range(m):
        terms = [cs(0, j) * N[0][j]] + [G[t] * r[t] * cs(t + 1, j) * N[t + 1][j] for t in range(j)]
        G.append(_up(math.fsum(terms)))
    R = None
    if residual:
        head = shifted if shifted is not None else base + cs(0, m - 1) * N[0][m - 1]
        tail = [G[t] * r[t] * cs(t + 1, m - 1) * N[t + 1][m - 1] for t in range(m - 1)]
        R = _up(math.fsum([head, *tail]))
    return G, R


def chain_bounds(pieces: Sequence[Piece], slopes: Sequence[tuple[float, float]], residual: bool,
                 rtol: float, shortcut: Piece | None = None) -> tuple[list[float], float | None] | None:
    """(G, R) of expansion() for the chain, or None where its pieces do not fit (mixed Linear and
    conv layers, convs that do not share a grid, or too much work).  slopes: per activation its
    slope interval [a, b]; residual: R bounds the chain plus its input, or plus shortcut (a layer on
    the same input) where one is given."""
    rtol = min(rtol, 1e-3)
    m = len(pieces)
    # a residual block of two layers reads no pair's norm but through the prefix bound, which the
    # block's own bound makes moot: its product is not certified (the split bounds it)
    pairs = residual and m == 2
    everything = [*pieces, *([shortcut] if shortcut is not None else [])]
    if all(p.op is None for p in everything):
        if any(p.weight.dim() != 2 for p in everything):
            return None
        space = _Dense(pieces, rtol, shortcut)
    else:
        found = conv_grid(pieces, shortcut)
        if found is None:
            return None
        grids, boxed = found
        flops, bytes_ = _Spectral.cost(pieces, shortcut, grids, boxed, not pairs, residual)
        if flops > _MAX_FLOPS or bytes_ > _MAX_BYTES:
            return None
        if boxed:  # outside the box the activations' values are 0 (see the module docstring)
            slopes = [(min(a, 0.0), max(b, 0.0)) for a, b in slopes]
        space = _Spectral(pieces, grids, rtol, boxed, shortcut)
    split = [slope_split(a, b) for a, b in slopes]
    N = segment_norms(m, space.single, lambda i: None if pairs else space.product(i, i + 1))
    shifted, base = None, 1.0
    if residual:
        C = math.prod(c for c, _ in split)
        shifted = space.shifted(C)
        if shifted is not None:
            # C was rounded: the exact product of the c's is within gamma(m) |C|, times ‖A_m ... A_1‖
            shifted = _up(shifted + _gamma(m + 1) * abs(C) * N[0][m - 1])
        elif shortcut is not None:
            base = space.single(m)
    return expansion(N, split, shifted, residual, base)
