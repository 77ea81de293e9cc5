"""The Triton sparse-decoding kernels (actscope.sparse.triton_rows) against float64 computations
written here, and sparse execution through them against ``dense_with_thresholds``.

As in tests/test_triton_stats.py, ``TestInterpreted`` runs the kernels under Triton's CPU
interpreter in a child process started with ``TRITON_INTERPRET=1`` (one process holds one Triton
mode); the ``cuda`` tests run them compiled where a GPU is present. Tolerances: products
accumulate in float32 and are rounded once to the input's dtype, so ``|got - want| <= u·|want| +
(terms + 16)·2**-24·Σ|products|`` with u the output's unit roundoff (2**-8 bf16, 2**-11 fp16,
2**-24 fp32), two-sided. The interpreter truncates float32 → bfloat16 where a GPU rounds to
nearest (Triton 3.9's ``_convert_float``), so there u is 2**-7 for bf16.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton, in the 'test' extra): "
                                     "the GPU sparse kernels are tested under its CPU interpreter")

from actscope.sparse import kernels, triton_rows  # noqa: E402
from test_triton_stats import INTERPRETED, needs_cuda, run_interpreted  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETED_BF16 = 2.0**-7  # the interpreter truncates to bfloat16
ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: INTERPRETED_BF16 if INTERPRETED else 2.0**-8,
            torch.float16: 2.0**-11}
EPS32 = 2.0**-24


def test_kernels_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this process runs Triton interpreted: TestInterpreted runs here directly")
    print(run_interpreted(__file__))


def assert_close(got, want, scale, terms, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    tolerance = ROUNDOFF[dtype] * want.abs() + (terms + 16) * EPS32 * scale + 1e-30
    error = (got.double() - want).abs()
    assert bool((error <= tolerance).all()), f"max excess {float((error - tolerance).max()):.3g}"


def operands(n, units, d, k, dtype, seed):
    """x [n, d], w [units, d] with NaN in every row the index leaves out, index [k] unsorted
    with repeats."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, units, (k,), generator=g)
    w = torch.randn(units, d, generator=g)
    unused = torch.ones(units, dtype=torch.bool)
    unused[index] = False
    w[unused] = math.nan  # a row read by mistake would make the result NaN
    return torch.randn(n, d, generator=g).to(dtype), w.to(dtype), index


def naive_dot(x, w, index):
    rows = w.double()[index]
    return x.double() @ rows.T, x.double().abs() @ rows.abs().T


def naive_axpy(h, w, index):
    rows = w.double()[index]
    return h.double() @ rows, h.double().abs() @ rows.abs()


class _Interpreted:
    """The kernels under Triton's interpreter, on CPU tensors (collected as TestInterpreted in a
    process started with TRITON_INTERPRET=1)."""

    @pytest.mark.parametrize("dtype,n,units,d,k", [
        *((dtype, 1, 77, 45, 30) for dtype in DTYPES), (torch.bfloat16, 3, 40, 300, 9), (torch.float16, 17, 9, 5, 12)])
    def test_dot_rows(self, dtype, n, units, d, k):
        # d = 300: three steps of 128 columns; n = 17: two launches of up to 16 tokens.
        x, w, index = operands(n, units, d, k, dtype, seed=n)
        got = triton_rows.dot_rows(x, w, index)
        want, scale = naive_dot(x, w, index)
        assert_close(got, want, scale, d, dtype)

    @pytest.mark.parametrize("dtype,n,units,d_out,k,split", [
        *((dtype, 1, 77, 45, 30, 1) for dtype in DTYPES), (torch.bfloat16, 3, 200, 300, 150, 3),
        (torch.float32, 3, 200, 300, 150, 3), (torch.float16, 17, 9, 5, 12, 1)])
    def test_axpy_rows(self, dtype, n, units, d_out, k, split, monkeypatch):
        # split 3: three programs per column block add their partial sums with atomics.
        monkeypatch.setattr(triton_rows, "_split", lambda *args: split)
        g = torch.Generator().manual_seed(k)
        _, w, index = operands(1, units, d_out, k, dtype, seed=k)
        h = torch.randn(n, k, generator=g).to(dtype)
        got = triton_rows.axpy_rows(h, w, index)
        want, scale = naive_axpy(h, w, index)
        assert_close(got, want, scale, k, dtype)

    @pytest.mark.parametrize("dtype,per_channel", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
    def test_threshold_axpy_rows_reads_only_active_channels(self, dtype, per_channel):
        # Channels below the threshold for every token hold NaN weights: reading one would show.
        g = torch.Generator().manual_seed(7)
        n, d_in, d_out = 3, 70, 33
        x = torch.randn(n, d_in, generator=g)
        x[1] = 0.0  # an all-zero token
        x[0, 4], x[2, 4] = math.nan, 0.0  # NaN is not above any threshold: dropped, as |x| > t is False
        t = torch.rand(d_in, generator=g) + 0.3 if per_channel else torch.tensor(0.8)
        x, w = x.to(dtype), torch.randn(d_in, d_out, generator=g)
        keep = x.float().abs() > t  # [n, d_in]
        w[~keep.any(0)] = math.nan
        w = w.to(dtype)
        got = triton_rows.threshold_axpy_rows(x, w, t)
        h = torch.where(keep, x.double(), 0.0)
        active = keep.any(0)
        want = h[:, active] @ w.double()[active]
        scale = h[:, active].abs() @ w.double()[active].abs()
        assert_close(got, want, scale, d_in, dtype)
        assert got[1].abs().max() == 0  # the all-zero token
        assert 0 < int(active.sum()) < d_in

    def test_nothing_selected_and_out_of_range_indices(self):
        x, w = torch.randn(2, 6), torch.randn(5, 6)
        assert triton_rows.dot_rows(x, w, torch.empty(0, dtype=torch.int64)).shape == (2, 0)
        assert triton_rows.axpy_rows(torch.empty(2, 0), w, torch.empty(0, dtype=torch.int64)).eq(0).all()
        assert triton_rows.threshold_axpy_rows(torch.zeros(2, 5), w, 0.0).eq(0).all()  # no channel active
        # an index outside w's rows reads nothing: its output is 0 (dot) or its term is 0 (axpy)
        index = torch.tensor([1, 7, -1])
        got = triton_rows.dot_rows(x, w, index)
        assert torch.allclose(got[:, 0], x @ w[1], atol=1e-5) and got[:, 1:].eq(0).all()
        got = triton_rows.axpy_rows(torch.ones(2, 3), w, index)
        assert torch.allclose(got, w[1].expand(2, -1), atol=1e-6)

    @pytest.mark.parametrize("method", ["teal", "cats"])
    def test_sparse_execution_through_the_kernels_equals_dense_with_thresholds(self, method, monkeypatch):
        # sparse/forwards.py reaches the kernels through kernels.dot_rows / axpy_rows; route CPU
        # tensors to the Triton kernel (the C kernel off), as CUDA tensors are.
        import actscope
        from actscope.sparse import calibrate, dense_with_thresholds, sparsify
        from actscope.zoo.tiny import tiny_model

        calls = []
        real_run = triton_rows.run
        monkeypatch.setattr(kernels, "_kernel_applies", lambda *args: False)
        monkeypatch.setattr(kernels, "_rows_apply", lambda *args: False)  # TEAL's fused C product too
        monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
        monkeypatch.setattr(triton_rows, "applies", lambda a, w, index=None: a.dtype == w.dtype)
        monkeypatch.setattr(triton_rows, "run", lambda *args: calls.append(args[0]) or real_run(*args))
        module = tiny_model("llama")[0]
        model = actscope.wrap(module)
        g = torch.Generator().manual_seed(1)
        data = [{"input_ids": torch.randint(3, 128, (2, 12), generator=g)}]
        calibration = calibrate(model, data, method=method, sparsity=0.6)
        ids = torch.randint(3, 128, (1, 5), generator=g)
        with torch.no_grad():
            dense = module(ids).logits
            with dense_with_thresholds(model, calibration):
                reference = module(ids).logits
            with sparsify(model, calibration):
                sparse = module(ids).logits
        assert set(calls) == ({"axpy_rows"} if method == "teal" else {"dot_rows", "axpy_rows"})
        torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-5)
        assert float((reference - dense).abs().max()) > 1e-3  # the thresholds changed the output


if INTERPRETED:
    TestInterpreted = _Interpreted


def test_cuda_dispatch_needs_cuda_tensors():
    # CPU tensors never reach the Triton kernels (the C kernel or the reference serve them).
    x, w, index = torch.randn(1, 4, dtype=torch.bfloat16), torch.randn(3, 4, dtype=torch.bfloat16), torch.tensor([0, 2])
    assert not triton_rows.applies(x, w, index)
    assert triton_rows.run("dot_rows", x, w, index) is None
    torch.testing.assert_close(kernels.dot_rows(x, w, index), kernels.reference_dot_rows(x, w, index))


def test_threshold_axpy_rows_on_the_cpu_is_the_reference():
    # CPU tensors take the torch reference: where(|x| > t, x, 0) @ w, t a number or per channel.
    x, w = torch.tensor([[0.5, -2.0, 0.1], [1.0, 0.0, -0.3]]), torch.randn(3, 4, dtype=torch.float64).float()
    want = torch.tensor([[0.0, -2.0, 0.0], [1.0, 0.0, 0.0]]) @ w
    torch.testing.assert_close(kernels.threshold_axpy_rows(x, w, 0.5), want)
    torch.testing.assert_close(kernels.threshold_axpy_rows(x, w, torch.tensor([0.4, 1.0, 0.2])),
                               torch.tensor([[0.5, -2.0, 0.0], [1.0, 0.0, -0.3]]) @ w)


def test_mismatched_shapes_are_refused_with_the_fix():
    from actscope.errors import InputError

    with pytest.raises(InputError, match=r"dot_rows: the input has 5 columns .* w.shape\[1\] \(d_in\) is 4"):
        triton_rows.dot_rows(torch.randn(1, 5), torch.randn(3, 4), torch.tensor([0]))
    with pytest.raises(InputError, match=r"axpy_rows: .* index.shape\[0\] \(k\) is 1"):
        triton_rows.axpy_rows(torch.randn(1, 2), torch.randn(3, 4), torch.tensor([0]))
    with pytest.raises(InputError, match="threshold has 3 values; pass one, or one per input channel"):
        triton_rows.threshold_axpy_rows(torch.randn(1, 2), torch.randn(2, 4), torch.ones(3))


def test_a_failing_kernel_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(triton_rows, "_failed", [])
    monkeypatch.setattr(triton_rows, "applies", lambda *args: True)

    def broken(*args):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setitem(triton_rows._FUNCTIONS, "axpy_rows", broken)
    h, w, index = torch.randn(2, 2), torch.randn(4, 3), torch.tensor([3, 0])
    monkeypatch.setattr(kernels, "_kernel_applies", lambda *args: False)
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    with pytest.warns(RuntimeWarning, match="Triton sparse kernel failed .*PTX assembly failed"):
        got = kernels.axpy_rows(h, w, index)
    torch.testing.assert_close(got, kernels.reference_axpy_rows(h, w, index))
    assert not triton_rows.enabled()


# -- compiled, on a GPU ---------------------------------------------------------------------------

@pytest.fixture
def compiled(monkeypatch):
    if INTERPRETED:
        pytest.skip("this process runs Triton interpreted (TRITON_INTERPRET=1): no compiled kernels")
    monkeypatch.setattr(triton_rows, "_failed", [])
    monkeypatch.setenv("ACTSCOPE_TRITON_STRICT", "1")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4, 16])
def test_cuda_kernels_through_the_dispatch(dtype, n):
    units, d = 8192, 2048
    x, w, index = operands(n, units, d, units // 2, dtype, seed=n)
    x, w, index = x.cuda(), w.cuda(), index.cuda()
    want, scale = naive_dot(x.cpu(), w.cpu(), index.cpu())
    assert_close(kernels.dot_rows(x, w, index).cpu(), want, scale, d, dtype)
    h = torch.randn(n, index.numel()).to(dtype).cuda()
    want, scale = naive_axpy(h.cpu(), w.cpu(), index.cpu())
    assert_close(kernels.axpy_rows(h, w, index).cpu(), want, scale, index.numel(), dtype)
    xt = torch.randn(n, units).to(dtype).cuda()
    wt = torch.nan_to_num(w, nan=0.0)
    got = kernels.threshold_axpy_rows(xt, wt, 0.7).cpu()
    keep = xt.float().abs().cpu() > 0.7
    h = torch.where(keep, xt.cpu().double(), 0.0)
    assert_close(got, h @ wt.cpu().double(), h.abs() @ wt.cpu().double().abs(), units, dtype)
