"""The row-selective primitives (actscope.sparse.kernels): C kernel and torch fallback.

Every result is checked against a naive computation on full tensors in float64 — the whole
product, then the selected columns (dot_rows), or a scatter of h into a dense [n, units] matrix
(axpy_rows) — with a two-sided tolerance from the float32 summation error bound.
"""
from __future__ import annotations

import pytest
import torch

from actscope.errors import InputError
from actscope import native
from actscope.sparse import kernels

SHAPES = [(1, 1), (5, 7), (40, 33), (96, 128), (300, 77), (64, 1000)]  # (units, d)
EPS32 = 2.0**-24


@pytest.fixture(params=["kernel", "fallback"])
def backend(request, monkeypatch):
    """Both paths: the C kernel (skipped without a compiler) and ACTSCOPE_SPARSE_KERNEL=0."""
    if request.param == "kernel":
        if kernels.library() is None:
            pytest.skip("no C compiler: the sparse kernel cannot be built here")
        monkeypatch.setenv("ACTSCOPE_SPARSE_KERNEL", "1")
    else:
        monkeypatch.setenv("ACTSCOPE_SPARSE_KERNEL", "0")
    return request.param


def naive_dot(x, w, index):
    """x @ w[index].T in float64 and its error scale sum_i |x_i w_i|."""
    full = x.double() @ w.double().T                       # [n, units]
    scale = x.double().abs() @ w.double().abs().T
    return full[:, index], scale[:, index]


def naive_axpy(h, w, index):
    """h @ w[index] in float64 via a dense [n, units] coefficient matrix (repeats add up)."""
    dense = torch.zeros(h.shape[0], w.shape[0], dtype=torch.float64)
    dense.index_add_(1, index, h.double())                 # [n, units]
    scale = torch.zeros_like(dense).index_add_(1, index, h.double().abs())
    return dense @ w.double(), scale @ w.double().abs()


def assert_close(got, want, scale, terms):
    """|got - want| <= (terms + 16) * eps32 * sum|products|, two-sided, plus float32's rounding of want."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    tolerance = (terms + 16) * EPS32 * scale + EPS32 * want.abs() + 1e-30
    error = (got.double() - want).abs()
    assert bool((error <= tolerance).all()), f"max error {float((error - tolerance).max()):.3g} over tolerance"


def random_index(units, k, generator):
    """Unsorted, with repeats when k > units / 2."""
    return torch.randint(0, units, (k,), generator=generator)


@pytest.mark.parametrize("units,d", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_dot_rows_equals_the_naive_product(backend, units, d, n):
    g = torch.Generator().manual_seed(units * 1000 + d * 10 + n)
    x, w = torch.randn(n, d, generator=g), torch.randn(units, d, generator=g)
    index = random_index(units, max(1, units * 2 // 3), g)
    want, scale = naive_dot(x, w, index)
    assert_close(kernels.dot_rows(x, w, index), want, scale, terms=d)


@pytest.mark.parametrize("units,d", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_axpy_rows_equals_the_naive_product(backend, units, d, n):
    g = torch.Generator().manual_seed(units * 1000 + d * 10 + n + 7)
    w = torch.randn(units, d, generator=g)
    index = random_index(units, max(1, units * 2 // 3), g)
    h = torch.randn(n, index.numel(), generator=g)
    want, scale = naive_axpy(h, w, index)
    assert_close(kernels.axpy_rows(h, w, index), want, scale, terms=index.numel())


def test_kernel_takes_the_fast_path_and_fallback_is_the_reference(backend, monkeypatch):
    """The kernel path never calls the reference; the fallback is the reference bit for bit."""
    g = torch.Generator().manual_seed(3)
    x, w, index = torch.randn(2, 50, generator=g), torch.randn(30, 50, generator=g), torch.tensor([4, 1, 4, 29])
    h = torch.randn(2, 4, generator=g)
    if backend == "fallback":
        assert torch.equal(kernels.dot_rows(x, w, index), kernels.reference_dot_rows(x, w, index))
        assert torch.equal(kernels.axpy_rows(h, w, index), kernels.reference_axpy_rows(h, w, index))
        assert kernels.kernel_info().startswith("off")
        return
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a: pytest.fail("the kernel path gathered rows"))
    kernels.dot_rows(x, w, index)
    kernels.axpy_rows(h, w, index)


def test_empty_index(backend):
    x, w = torch.randn(3, 20), torch.randn(10, 20)
    empty = torch.empty(0, dtype=torch.int64)
    out = kernels.dot_rows(x, w, empty)
    assert out.shape == (3, 0)
    down = kernels.axpy_rows(torch.empty(3, 0), w, empty)
    assert down.shape == (3, 20) and bool((down == 0).all())


def test_repeated_unsorted_index_counts_every_entry(backend):
    w = torch.arange(12.0).reshape(4, 3)                   # rows [0,1,2], [3,4,5], ...
    index = torch.tensor([3, 0, 3, 3])
    out = kernels.axpy_rows(torch.ones(1, 4), w, index)
    assert out.tolist() == [[27.0, 31.0, 35.0]]             # 3 * row 3 + row 0, exact in float32
    dots = kernels.dot_rows(torch.tensor([[1.0, 0.0, 2.0]]), w, index)
    assert dots.tolist() == [[31.0, 4.0, 31.0, 31.0]]  # 9 + 2 * 11, 0 + 2 * 2


@pytest.mark.parametrize("n", [1, 4, 8])
def test_large_products_on_two_threads_are_exact_and_deterministic(n):
    """Big enough to be cut into chunks shared with the worker pool (dot: 32, axpy: 8)."""
    if kernels.library() is None:
        pytest.skip("no C compiler")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(n)
        w = torch.randn(1024, 1024, generator=g)
        index = torch.randperm(1024, generator=g)[:512]
        x, h = torch.randn(n, 1024, generator=g), torch.randn(n, 512, generator=g)
        want, scale = naive_dot(x, w, index)
        assert_close(kernels.dot_rows(x, w, index), want, scale, terms=1024)
        first = kernels.axpy_rows(h, w, index)
        want, scale = naive_axpy(h, w, index)
        assert_close(first, want, scale, terms=512)
        assert all(torch.equal(first, kernels.axpy_rows(h, w, index)) for _ in range(5))
    finally:
        torch.set_num_threads(threads)


def test_strided_inputs_are_read_in_place_or_handled(backend):
    g = torch.Generator().manual_seed(5)
    big = torch.randn(40, 70, generator=g)
    w = big[:, 3:67]                                       # rows with a leading stride of 70
    x = torch.randn(64, 6, generator=g).T                  # [6, 64], column-major
    index = torch.arange(39, -1, -1)[::3]                  # a strided, descending index
    want, scale = naive_dot(x, w, index)
    assert_close(kernels.dot_rows(x, w, index), want, scale, terms=64)
    h = torch.randn(index.numel(), 6, generator=g).T       # [6, k], column-major
    want, scale = naive_axpy(h, w, index)
    assert_close(kernels.axpy_rows(h, w, index), want, scale, terms=index.numel())
    w_t = torch.randn(64, 40, generator=g).T               # a transposed view: rows not contiguous
    want, scale = naive_dot(x, w_t, index)
    assert_close(kernels.dot_rows(x, w_t, index), want, scale, terms=64)


def test_many_tokens_use_the_gemm_and_agree(backend):
    g = torch.Generator().manual_seed(6)
    n = kernels.MAX_KERNEL_TOKENS + 5
    x, w = torch.randn(n, 48, generator=g), torch.randn(20, 48, generator=g)
    index = torch.tensor([19, 2, 7])
    want, scale = naive_dot(x, w, index)
    assert_close(kernels.dot_rows(x, w, index), want, scale, terms=48)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_fall_back_to_the_reference(dtype):
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 24, generator=g).to(dtype), torch.randn(9, 24, generator=g).to(dtype)
    index = torch.tensor([8, 0, 8])
    assert torch.equal(kernels.dot_rows(x, w, index), kernels.reference_dot_rows(x, w, index))
    h = torch.randn(2, 3, generator=g).to(dtype)
    out = kernels.axpy_rows(h, w, index)
    assert out.dtype == dtype and torch.equal(out, kernels.reference_axpy_rows(h, w, index))


def test_autograd_inputs_take_the_differentiable_path():
    x = torch.randn(2, 16, requires_grad=True)
    w = torch.randn(8, 16)
    kernels.dot_rows(x, w, torch.tensor([1, 5])).sum().backward()
    assert torch.allclose(x.grad, (w[1] + w[5]).expand(2, 16))


def test_bad_index_and_shapes_are_refused_with_the_fix():
    if kernels.library() is None:
        pytest.skip("no C compiler")
    x, w = torch.randn(1, 8), torch.randn(5, 8)
    with pytest.raises(InputError, match=r"index values \[5\] are outside the 5 rows"):
        kernels.dot_rows(x, w, torch.tensor([0, 5]))
    with pytest.raises(InputError, match=r"index values \[-1\]"):
        kernels.axpy_rows(torch.randn(1, 2), w, torch.tensor([-1, 2]))
    with pytest.raises(InputError, match="the input has 7 columns"):
        kernels.dot_rows(torch.randn(1, 7), w, torch.tensor([0]))
    with pytest.raises(InputError, match=r"index.shape\[0\] \(k\) is 2"):
        kernels.axpy_rows(torch.randn(1, 3), w, torch.tensor([0, 1]))


def test_build_goes_to_the_cache_atomically(tmp_path, monkeypatch):
    if kernels.library() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].startswith("sparse_rows-") and built[0].endswith(".so")
    finally:
        kernels.library.cache_clear()


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None and not kernels.kernel_enabled()
        assert kernels.kernel_info().startswith("unavailable")
        x, w, index = torch.randn(2, 8), torch.randn(4, 8), torch.tensor([3, 1])
        assert torch.equal(kernels.dot_rows(x, w, index), kernels.reference_dot_rows(x, w, index))
    finally:
        kernels.library.cache_clear()


def test_a_forked_child_computes_with_its_own_pool():
    """After fork() the child has none of the parent's worker threads; products stay exact."""
    import os

    if kernels.library() is None or not hasattr(os, "fork"):
        pytest.skip("no C compiler or no fork()")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(9)
        w, index = torch.randn(1024, 512, generator=g), torch.randperm(1024, generator=g)[:700]
        h = torch.randn(2, 700, generator=g)
        parent = kernels.axpy_rows(h, w, index)  # starts the parent's pool
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if the result is bit-identical
            os._exit(0 if torch.equal(kernels.axpy_rows(h, w, index), parent) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("d_in,d_out", [(1, 3), (33, 40), (300, 77), (1000, 64)])
def test_thresholded_product_equals_the_naive_masked_product(backend, n, d_in, d_out):
    """TEAL's product (the fused C call, or the union index built in torch): each row's own
    channels above the threshold, how many, and the union."""
    from actscope.sparse.forwards import _thresholded

    g = torch.Generator().manual_seed(d_in * 31 + n)
    x, w = torch.randn(n, d_in, generator=g), torch.randn(d_in, d_out, generator=g)
    x[:, ::5] = 0.0  # exact zeros: never kept, even at threshold 0
    for value in (0.0, 0.7, 10.0):  # nothing dropped but zeros, about half, everything
        threshold = torch.tensor([value])
        got, kept, union = _thresholded(x, w, threshold, None)
        keep = x.abs() > value
        masked = torch.where(keep, x, 0.0).double()
        assert_close(got, masked @ w.double(), masked.abs() @ w.double().abs(), d_in)
        assert kept.tolist() == keep.sum(1).tolist() and union == int(keep.any(0).sum())


def test_thresholded_product_takes_the_c_kernel_on_the_cpu(monkeypatch):
    from actscope.sparse.forwards import _thresholded

    if kernels.library() is None:
        pytest.skip("no C compiler: the sparse kernel cannot be built here")
    calls = []
    monkeypatch.setattr(kernels, "_fused_threshold_axpy", lambda *a: calls.append(a) or (None, None, 0))
    x, w = torch.randn(2, 8), torch.randn(8, 4)
    _thresholded(x, w, torch.tensor([0.5]), None)
    _thresholded(x.double(), w.double(), torch.tensor([0.5]), None)  # float64: torch builds the index
    _thresholded(torch.randn(17, 8), w, torch.tensor([0.5]), None)  # a prompt: torch's GEMM
    assert len(calls) == 1 and calls[0][2] == 0.5


def test_fused_threshold_axpy_on_two_threads_is_exact_and_deterministic():
    if kernels.library() is None:
        pytest.skip("no C compiler: the sparse kernel cannot be built here")
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(3, 4096, generator=g), torch.randn(4096, 1024, generator=g)  # many chunks of rows
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, kept, union = kernels.fused_threshold_axpy(x, w, torch.tensor([0.5]))
        again, _, _ = kernels.fused_threshold_axpy(x, w, torch.tensor([0.5]))
    finally:
        torch.set_num_threads(threads)
    masked = torch.where(x.abs() > 0.5, x, 0.0).double()
    assert_close(first, masked @ w.double(), masked.abs() @ w.double().abs(), 4096)
    assert torch.equal(first, again) and union == int((x.abs() > 0.5).any(0).sum())
