"""The Triton statistics kernel (actscope.stats.triton_stats) against the C kernel, the torch path
and float64 computations written here.

The kernel is written for CUDA; ``TestInterpreted`` runs it under Triton's CPU interpreter on CPU
tensors. The interpreter must be chosen before Triton is first imported (Triton makes its own
standard library, ``tl.sum`` and the like, interpreted or compiled at import time), so one process
holds one mode: ``test_kernel_under_the_interpreter`` runs ``TestInterpreted`` in a child process
started with ``TRITON_INTERPRET=1`` (a process started with it set runs the class directly), and
this process keeps compiled Triton for the ``cuda`` tests. Shapes are small and odd (the
interpreter runs each program in Python), with several row ranges and column blocks per call so
that the merge of the per-program partials is exercised.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton, in the 'test' extra): "
                                     "the GPU statistics kernel is tested under its CPU interpreter")

from actscope.stats import SiteStats, fused, triton_stats  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernel)")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # this process imported Triton interpreted


CHILD_FILES = ("tests/test_triton_stats.py", "tests/test_triton_sparse.py")
_CHILD: dict[str, str] = {}


def run_interpreted(path: str) -> str:
    """The result of ``path``'s TestInterpreted, run (once per session, for both kernel test
    files: one interpreter start) in a child process started with TRITON_INTERPRET=1."""
    if not _CHILD:
        env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
        root = Path(__file__).resolve().parents[1]
        tests = [f"{name}::TestInterpreted" for name in CHILD_FILES]
        child = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *tests],
                               env=env, cwd=root, capture_output=True, text=True, timeout=600)
        _CHILD["out"] = child.stdout + child.stderr
    out, name = _CHILD["out"], Path(path).name
    lines = [line for line in out.splitlines() if line.startswith(f"tests/{name}::TestInterpreted")]
    passed = sum(" PASSED" in line for line in lines)
    assert passed and passed == len(lines), f"the interpreted tests of {name} failed:\n{out[-8000:]}"
    return f"{name}: {passed} passed under the interpreter"


def test_kernel_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this process runs Triton interpreted: TestInterpreted runs here directly")
    print(run_interpreted(__file__))


@pytest.fixture
def interpret(monkeypatch):
    """A clean failure record (the kernel runs interpreted: this process started with it)."""
    monkeypatch.setattr(triton_stats, "_failed", [])


def sample(n=45, u=70, dtype=torch.float32, seed=0, nonfinite=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(n, u, generator=g) * 2)
    x[:, 3] = 0.0  # a dead unit
    x[7] = 0.0  # an all-zero row
    x[2, 5] = -0.0
    if nonfinite:
        x[1, 1], x[4, 1], x[9, 2], x[10, 2] = math.nan, math.inf, -math.inf, math.nan
        x[:, 6] = math.nan  # a unit with no finite value
    tok = torch.arange(n, dtype=torch.int64) * 5 + 2
    return x.to(dtype), tok


def kernel_partials(x, tok, site, rows=16, precision="float64"):
    return triton_stats.site_partials(x, site.ladder.eps, site.hist._edges, site.top._values[:, -1], tok,
                                      site.top.k, precision=precision, rows_per_program=rows)


def torch_site(x, tok, monkeypatch, **kwargs):
    """A SiteStats fed through the pure-torch path."""
    monkeypatch.setenv("ACTSCOPE_FUSED", "0")
    site = SiteStats(x.shape[1], **kwargs)
    site.update(x, tok)
    monkeypatch.delenv("ACTSCOPE_FUSED")
    return site


def triton_site(x, tok, sizes=(), **kwargs):
    """A SiteStats fed through the kernel (``update_site``), in batches of ``sizes`` rows."""
    site = SiteStats(x.shape[1], **kwargs)
    start = 0
    for size in [*sizes, x.shape[0] - sum(sizes)]:
        assert triton_stats.update_site(site, x[start:start + size], tok[start:start + size])
        start += size
    return site


def assert_relative(actual, expected, rtol):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    both_nan = np.isnan(actual) & np.isnan(expected)
    error = np.abs(actual - expected)
    assert bool(np.all(both_nan | (error <= rtol * np.abs(expected) + 1e-300))), f"max error {np.nanmax(error):.3g}"


class _Interpreted:
    """The kernel under Triton's interpreter, on CPU tensors (collected as TestInterpreted in a
    process started with TRITON_INTERPRET=1)."""

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_partials_equal_the_c_kernel(self, dtype, interpret):
        # 45 x 70 in programs of 16 rows x 64 columns: 3 row ranges x 2 column blocks, odd edges.
        if fused.library() is None:
            pytest.skip("no C compiler: the C kernel to compare with cannot be built here")
        x, tok = sample(dtype=dtype)
        site = SiteStats(x.shape[1], k=3)
        got = kernel_partials(x, tok, site)
        want = fused.site_partials(x, site.ladder.eps, site.hist._edges)
        for key in ("count", "nonfinite", "fired", "firing_hist", "slots"):
            assert torch.equal(got[key], want[key]), key
        for key in ("min", "max"):
            assert torch.equal(got[key], want[key]), key
        for key in ("mean", "m2"):
            assert_relative(got[key], want[key], 1e-9)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_site_stats_equal_the_torch_path(self, dtype, interpret, monkeypatch):
        # Three batches (one of a single row); every part against the torch path's state.
        x, tok = sample(dtype=dtype, seed=1)
        setup = {"eps": (0.0, 0.05, 1.0), "k": 4, "hist_kwargs": {"bins_per_decade": 3}}
        mine = triton_site(x, tok, sizes=(20, 1), **setup)
        ref = torch_site(x, tok, monkeypatch, **setup)
        for part in ("ladder", "hist"):
            a, b = getattr(mine, part).state_dict(), getattr(ref, part).state_dict()
            for key, value in b.items():
                assert torch.equal(a[key], value) if isinstance(value, torch.Tensor) else a[key] == value, (part, key)
        for key in ("count", "nonfinite"):
            assert torch.equal(getattr(mine.moments, key), getattr(ref.moments, key))
        for key in ("mean", "var", "min", "max"):
            assert_relative(getattr(mine.moments, key), getattr(ref.moments, key), 1e-9)
        assert torch.equal(mine.top.values, ref.top.values)  # no ties in GELU(randn) at these sizes

    def test_histogram_and_ladder_are_exact_at_edges_and_subnormals(self, interpret):
        # Every histogram edge and ε, the floats on either side of them, subnormals, ±0, ±inf, NaN.
        site = SiteStats(8, eps=(0.0, 1e-3, 1e-2, 0.1, 1.0), k=2, hist_kwargs={"bins_per_decade": 4})
        near = torch.cat([site.hist.edges.to(torch.float32), torch.tensor(site.ladder.eps, dtype=torch.float32)])
        values = torch.cat([near, torch.nextafter(near, torch.tensor(0.0)), torch.nextafter(near, torch.tensor(1e9))])
        tiny = torch.tensor([1e-45, 1e-40, 1.1754942e-38, 0.0, -0.0, 3e4, 3.4e38, math.inf, math.nan])
        values = torch.cat([values, -values, tiny, -tiny])
        x = values[: (len(values) // 8) * 8].reshape(-1, 8)
        tok = torch.arange(x.shape[0])
        triton_stats.update_site(site, x, tok)
        a = np.abs(x.numpy().astype(np.float64))
        finite = np.isfinite(a)
        counts, _ = np.histogram(a[finite & (a >= 1e-6) & (a < 1e4)], bins=site.hist.edges.numpy())
        assert site.hist.counts.tolist() == counts.tolist()
        assert site.hist.zero == int((a == 0).sum()) and site.hist.overflow == int((finite & (a >= 1e4)).sum())
        assert site.hist.underflow == int((finite & (a > 0) & (a < 1e-6)).sum()) and site.hist.nonfinite == int((~finite).sum())
        assert site.ladder.pos.tolist() == (finite & (x.numpy() > 0)).sum(0).tolist()
        for j, e in enumerate(site.ladder.eps):
            assert site.ladder.abs_gt[j].tolist() == (finite & (a > e)).sum(0).tolist()

    def test_empty_and_nonfinite_units_and_zero_rows(self, interpret):
        x = torch.zeros(5, 3)
        x[:, 1] = math.nan
        x[2, 2], x[3, 2] = -2.0, 7.0
        site = triton_site(x, torch.arange(5), k=2)
        assert site.moments.count.tolist() == [5, 0, 5] and site.moments.nonfinite.tolist() == [0, 5, 0]
        assert site.moments.min.tolist()[0] == 0.0 and math.isnan(site.moments.min[1]) and site.moments.max[2] == 7.0
        assert site.ladder.firing_hist[0].tolist() == [4, 1, 0, 0]  # token 3 alone has a unit above 0
        assert site.top.values.tolist()[1] == [-math.inf, -math.inf] and site.top.tok.tolist()[1] == [-1, -1]
        assert site.top.values.tolist()[2] == [7.0, 0.0] and site.top.tok.tolist()[2] == [3, 0]  # 0.0: token 0 first

    @pytest.mark.parametrize("k,sizes", [(1, (7, 3)), (5, (1, 9, 2)), (9, ())])
    def test_top_examples_keep_the_earliest_tokens_among_ties(self, k, sizes, interpret):
        # Small integers: ties at every rank, within and across batches and row ranges.
        g = torch.Generator().manual_seed(k)
        x = torch.randint(-3, 4, (40, 9), generator=g).to(torch.float32)
        x[5, 2], x[17, 4], x[30, 4] = math.inf, math.nan, -math.inf  # never examples
        x[6, 2] = -0.0
        tok = torch.arange(40, dtype=torch.int64) * 7 + 3
        site = triton_site(x, tok, sizes=sizes, k=k)
        for unit in range(9):
            column = [(float(v), int(t)) for v, t in zip(x[:, unit], tok) if math.isfinite(float(v))]
            best = sorted(column, key=lambda pair: (-pair[0], pair[1]))[:k]  # value desc, then token
            assert site.top.values[unit].tolist() == [v for v, _ in best]
            assert site.top.tok[unit].tolist() == [t for _, t in best]

    def test_moments_precision_modes_meet_their_bounds(self, interpret):
        # The mean 10**4 standard deviations from zero: float64 tiles to 1e-9, float32 tiles to
        # the bounds the module states (means to 1e-7 mean|x|, variances to 1e-6 relative).
        g = torch.Generator().manual_seed(3)
        x = (1e4 + torch.randn(300, 5, generator=g, dtype=torch.float64)).to(torch.float32)
        a = x.double()
        mean, var, scale = a.mean(0), a.var(0, unbiased=False), a.abs().mean(0)
        site = SiteStats(5, k=1)
        for precision, mean_tol, var_tol in (("float64", 1e-12, 1e-9), ("float32", 1e-7, 1e-6)):
            part = kernel_partials(x, torch.arange(300), site, rows=64, precision=precision)
            assert bool(((part["mean"] - mean).abs() <= mean_tol * scale).all()), precision
            assert_relative(part["m2"] / 300, var, var_tol)

    def test_site_stats_dispatches_to_the_kernel(self, interpret, monkeypatch):
        # SiteStats.update takes the kernel wherever usable() says so (CUDA); here, with the C kernel
        # off, a CPU batch is routed to it under the interpreter and must equal the torch path.
        x, tok = sample(n=20, u=9, seed=4)
        ref = torch_site(x, tok, monkeypatch, k=2)
        calls = []
        real = triton_stats.site_partials
        monkeypatch.setattr(triton_stats, "usable", lambda t: True)
        monkeypatch.setattr(triton_stats, "site_partials", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        monkeypatch.setenv("ACTSCOPE_FUSED", "0")
        site = SiteStats(9, k=2)
        site.update(x, tok)
        assert calls and torch.equal(site.ladder.firing_hist, ref.ladder.firing_hist)
        assert torch.equal(site.top.values, ref.top.values) and site.hist.total == ref.hist.total


if INTERPRETED:
    TestInterpreted = _Interpreted


def test_float64_is_chosen_where_it_is_fast(monkeypatch):
    monkeypatch.delenv("ACTSCOPE_TRITON_MOMENTS", raising=False)
    assert triton_stats.moments_precision(torch.device("cpu")) == "float64"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert triton_stats.moments_precision(torch.device("cuda", 0)) == "float32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert triton_stats.moments_precision(torch.device("cuda", 0)) == "float64"
    monkeypatch.setenv("ACTSCOPE_TRITON_MOMENTS", "float32")
    assert triton_stats.moments_precision(torch.device("cuda", 0)) == "float32"


def test_a_failing_kernel_leaves_the_site_untouched_and_falls_back(monkeypatch):
    monkeypatch.setattr(triton_stats, "_failed", [])

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_stats, "site_partials", broken)
    site = SiteStats(4)
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="Triton statistics kernel failed .*PTX assembly failed"):
        assert triton_stats.update_site(site, x, torch.arange(3)) is False
    assert site.ladder.n_tokens == 0 and not triton_stats.enabled()
    assert not triton_stats.usable(x)


def test_only_cuda_batches_are_taken(monkeypatch):
    monkeypatch.setattr(triton_stats, "_failed", [])
    assert not triton_stats.usable(torch.randn(2, 3))  # the CPU has the C kernel
    monkeypatch.setenv("ACTSCOPE_TRITON", "0")
    assert not triton_stats.enabled()


# -- compiled, on a GPU ---------------------------------------------------------------------------

@pytest.fixture
def compiled(monkeypatch):
    if INTERPRETED:
        pytest.skip("this process runs Triton interpreted (TRITON_INTERPRET=1): no compiled kernels")
    monkeypatch.setattr(triton_stats, "_failed", [])
    monkeypatch.setenv("ACTSCOPE_TRITON_STRICT", "1")  # a compile failure fails the test
    monkeypatch.setenv("ACTSCOPE_TRITON_MOMENTS", "float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(45, 70), (1000, 3072)])
@pytest.mark.usefixtures("compiled")
@pytest.mark.cuda
@needs_cuda
def test_cuda_site_stats_equal_the_cpu(dtype, shape, monkeypatch):
    x, tok = sample(*shape, dtype=dtype, seed=6)
    setup = {"k": 8}
    ref = torch_site(x, tok, monkeypatch, **setup)
    site = SiteStats(shape[1], **setup)
    assert triton_stats.usable(x.cuda())
    for rows in (slice(0, shape[0] // 3), slice(shape[0] // 3, None)):
        site.update(x[rows].cuda(), tok[rows].cuda())
    for part in ("ladder", "hist"):
        a, b = getattr(site, part).state_dict(), getattr(ref, part).state_dict()
        for key, value in b.items():
            assert torch.equal(a[key].cpu(), value) if isinstance(value, torch.Tensor) else a[key] == value, (part, key)
    for key in ("mean", "var", "min", "max"):
        assert_relative(getattr(site.moments, key).cpu(), getattr(ref.moments, key), 1e-9)
    assert torch.equal(site.top.values.cpu(), ref.top.values)
