"""The batched Hermitian ops behind the circulant bound: the Gram matrices, the Cholesky test and
the power gain, compiled kernel and pure-PyTorch form, against exact products and eigenvalues."""
from __future__ import annotations

import pytest
import torch

from lipfast import ops, reference
from conftest import DEVICES, require_ext


def _hermitian(B: int, q: int, seed: int, dtype: torch.dtype = torch.float64):
    """(re, im, eigenvalues ascending) of B Hermitian matrices re + i im = KᴴK (K complex q x q),
    im exactly antisymmetric, eigenvalues in float64 from the float64 matrices."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, q, q, generator=g, dtype=torch.float64) / q**0.5
    Bm = torch.randn(B, q, q, generator=g, dtype=torch.float64) / q**0.5
    X = A.mT @ Bm
    re = (A.mT @ A + Bm.mT @ Bm).to(dtype)
    im = (X - X.mT).to(dtype)
    eig = torch.linalg.eigvalsh(torch.complex(re.double(), im.double()))
    return re, im, eig


def _tests():
    """Both forms of the Cholesky test: the kernel's and reference.py's."""
    require_ext()
    return {"cpp": ops.hermitian_cholesky_test, "python": reference.hermitian_cholesky_test}


@pytest.mark.parametrize("q", [1, 2, 3, 5, 8, 17, 64, 130, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cholesky_test_decides_definiteness(q, dtype):
    """shift I - H is positive definite exactly when shift exceeds the top eigenvalue: tested just
    above and just below it (a margin far beyond rounding), on both sides for every matrix."""
    re, im, eig = _hermitian(6, q, seed=q)
    margin = 1e-9 if dtype == torch.float64 else 1e-3
    top = eig[:, -1]
    above = (top * (1 + margin)).to(dtype)
    below = (top * (1 - margin)).to(dtype)
    for name, test in _tests().items():
        neg_re, neg_im = (-re).to(dtype), (-im).to(dtype)
        assert test(neg_re, neg_im, above).tolist() == [True] * 6, name
        assert test(neg_re, neg_im, below).tolist() == [False] * 6, name


def _grams():
    """Both forms of the Gram op: the kernel's and reference.py's."""
    require_ext()
    return {"cpp": ops.hermitian_gram, "python": reference.hermitian_gram}


@pytest.mark.parametrize("p, q", [(1, 1), (5, 3), (2, 17), (7, 37), (64, 64), (129, 33), (200, 70), (3, 130)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_matches_exact_product(p, q, dtype):
    """re + i im = KᴴK (or -KᴴK) for K = A + i B, within the rounding of sums of 2p products, against
    the float64 complex product; re exactly symmetric, im exactly antisymmetric with a zero
    diagonal.  Sizes cover partial tiles, several slabs of rows (p > 128) and odd shapes."""
    g = torch.Generator().manual_seed(100 * p + q)
    S = torch.randn(3, 2 * p, q, generator=g, dtype=torch.float64).to(dtype)
    K = torch.complex(S[:, :p].double(), S[:, p:].double())
    H = K.mH @ K
    Sd = S.double().abs()
    A, B = Sd[:, :p], Sd[:, p:]
    eps = 2 * p * torch.finfo(dtype).eps  # over gamma(2p), generously
    bound_re = eps * (Sd.mT @ Sd) + 1e-300  # the products' magnitudes: |A|ᵀ|A| + |B|ᵀ|B| for re
    bound_im = eps * (A.mT @ B + B.mT @ A) + 1e-300  # |A|ᵀ|B| + |B|ᵀ|A| for im
    for name, gram in _grams().items():
        for negate in (False, True):
            re, im = gram(S, p, negate)
            assert re.dtype == dtype and re.shape == (3, q, q), name
            sign = -1 if negate else 1
            assert ((re.double() - sign * H.real).abs() <= bound_re).all(), name
            assert ((im.double() - sign * H.imag).abs() <= bound_im).all(), name
            assert torch.equal(re, re.mT) and torch.equal(im, -im.mT), name
            assert (im.diagonal(dim1=-2, dim2=-1) == 0).all(), name


@pytest.mark.parametrize("q", [70, 300])
def test_real_matrices_take_the_real_paths(q):
    """Matrices whose imaginary parts are zero (the self-conjugate frequencies) go through the
    kernels' real paths: the same Gram matrices (im exactly zero) and the same definiteness answers
    as LAPACK's, next to complex matrices in the same batch.  q = 300: the Cholesky test's update
    from the rows above a panel spans more than one slab of the real kernel (256 rows)."""
    require_ext()
    g = torch.Generator().manual_seed(7)
    p = 150
    S = torch.randn(4, 2 * p, q, generator=g, dtype=torch.float64)
    S[1:3, p:] = 0  # two real K
    re, im = ops.hermitian_gram(S, p, True)
    want_re, want_im = reference.hermitian_gram(S, p, True)
    torch.testing.assert_close(re, want_re, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(im, want_im, rtol=1e-13, atol=1e-12)
    assert (im[1:3] == 0).all() and (im[0] != 0).any()
    K = torch.complex(S[:, :p], S[:, p:])
    top = torch.linalg.matrix_norm(K, ord=2).square()
    for factor, expect in ((1 + 1e-9, True), (1 - 1e-9, False)):
        shift = top * factor
        assert ops.hermitian_cholesky_test(re, im, shift).tolist() == [expect] * 4
        assert reference.hermitian_cholesky_test(re, im, shift).tolist() == [expect] * 4


def test_gram_reads_any_layout_and_empty_batches():
    require_ext()
    S = torch.randn(4, 10, 6, dtype=torch.float64)
    want = ops.hermitian_gram(S, 5)
    S_t = S.mT.contiguous().mT  # the same values, column-major
    assert not S_t.is_contiguous()
    got = ops.hermitian_gram(S_t, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    re, im = ops.hermitian_gram(torch.zeros(0, 4, 3, dtype=torch.float32), 2)
    assert re.shape == im.shape == (0, 3, 3)


def test_cholesky_test_reads_lower_triangles_and_any_layout():
    """Only the lower triangles count, and a transposed (column-major) layout reads the same."""
    require_ext()
    re, im, eig = _hermitian(4, 37, seed=1)
    shift = eig[:, -1] * (1 + 1e-9)
    expect = ops.hermitian_cholesky_test(-re, -im, shift)
    assert expect.all()
    junk_re, junk_im = -re.clone(), -im.clone()
    upper = torch.ones(37, 37, dtype=torch.bool).triu(1)
    junk_re[:, upper] = 1e6
    junk_im[:, upper] = -3e5
    assert torch.equal(ops.hermitian_cholesky_test(junk_re, junk_im, shift), expect)
    im_t = (-im).mT.contiguous().mT  # the same values, column-major
    assert not im_t.is_contiguous()
    assert torch.equal(ops.hermitian_cholesky_test(-re, im_t, shift), expect)


def test_cholesky_test_nonfinite_and_empty():
    """A NaN anywhere in the lower triangle, or an infinite off-diagonal entry, fails the test (the
    circulant bound checks finiteness itself too); an empty batch gives an empty answer."""
    require_ext()
    re, im, eig = _hermitian(3, 9, seed=2)
    shift = eig[:, -1] * 2
    neg_re, neg_im = -re, -im
    neg_re[1, 4, 2] = float("nan")
    neg_im[2, 5, 1] = float("inf")
    assert ops.hermitian_cholesky_test(neg_re, neg_im, shift).tolist() == [True, False, False]
    empty = torch.zeros(0, 5, 5, dtype=torch.float64)
    assert ops.hermitian_cholesky_test(empty, empty, torch.zeros(0, dtype=torch.float64)).shape == (0,)


@pytest.mark.parametrize("q", [1, 4, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_power_gain_matches_reference(q, dtype):
    require_ext()
    re, im, eig = _hermitian(5, q, seed=10 + q, dtype=dtype)
    start = torch.randn(2, q, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    start = start / start.square().sum().sqrt()
    got = ops.hermitian_power_gain(re, im, start, 6)
    want = reference.hermitian_power_gain(re, im, start, 6)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    assert (got.double() <= eig[:, -1] * (1 + 4 * tol)).all()  # ‖H x‖ for a unit x: at most the top eigenvalue
    assert (got.double() >= eig[:, -1] * 0.3).all()  # six steps from a generic start get close


def test_errors_name_the_argument():
    require_ext()
    re, im, _ = _hermitian(2, 4, seed=4)
    shift = torch.ones(2, dtype=torch.float64)
    start = torch.ones(2, 4, dtype=torch.float64) / 8**0.5
    with pytest.raises(ValueError, match="re must be"):
        ops.hermitian_cholesky_test(re[0], im, shift)
    with pytest.raises(ValueError, match="im must have"):
        ops.hermitian_cholesky_test(re, im[:, :3], shift)
    with pytest.raises(ValueError, match="shift must be"):
        ops.hermitian_cholesky_test(re, im, shift[:1])
    with pytest.raises(ValueError, match="shift must have"):
        ops.hermitian_cholesky_test(re, im, shift.float())
    with pytest.raises(ValueError, match="re must be float32 or float64"):
        ops.hermitian_cholesky_test(re.half(), im.half(), shift.half())
    with pytest.raises(ValueError, match="start must be"):
        ops.hermitian_power_gain(re, im, start[:, :3], 2)
    with pytest.raises(ValueError, match="steps must be"):
        ops.hermitian_power_gain(re, im, start, 0)
    S = torch.ones(2, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="p must be >= 1"):
        ops.hermitian_gram(S, 0)
    with pytest.raises(ValueError, match=r"S must be \(B, 2p, q\)"):
        ops.hermitian_gram(S, 2)
    with pytest.raises(ValueError, match=r"S must be \(B, 2p, q\)"):
        ops.hermitian_gram(S[0], 3)
    with pytest.raises(ValueError, match="S must be float32 or float64"):
        ops.hermitian_gram(S.half(), 3)


def test_opcheck():
    require_ext()
    re, im, eig = _hermitian(3, 6, seed=5)
    shift = eig[:, -1] * 1.5
    torch.library.opcheck(torch.ops.lipfast.hermitian_cholesky_test.default, (-re, -im, shift))
    start = torch.ones(2, 6, dtype=torch.float64) / 12**0.5
    torch.library.opcheck(torch.ops.lipfast.hermitian_power_gain.default, (re, im, start, 3))
    S = torch.randn(2, 8, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lipfast.hermitian_gram.default, (S, 4, True))


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_cuda_forms_match_cpu(device):
    re, im, eig = _hermitian(4, 20, seed=6)
    shift = eig[:, -1] * torch.tensor([1 + 1e-9, 1 - 1e-9, 1.5, 0.5], dtype=torch.float64)
    want = ops.hermitian_cholesky_test(-re, -im, shift)
    got = torch.ops.lipfast.hermitian_cholesky_test(-re.to(device), -im.to(device), shift.to(device))
    assert torch.equal(got.cpu(), want)
    start = torch.ones(2, 20, dtype=torch.float64) / 40**0.5
    torch.testing.assert_close(
        torch.ops.lipfast.hermitian_power_gain(re.to(device), im.to(device), start.to(device), 5).cpu(),
        reference.hermitian_power_gain(re, im, start, 5), rtol=1e-12, atol=0,
    )
    S = torch.randn(3, 14, 9, dtype=torch.float64)
    got = torch.ops.lipfast.hermitian_gram(S.to(device), 7, True)
    want = reference.hermitian_gram(S, 7, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)
