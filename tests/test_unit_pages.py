"""Unit pages: the activation windows of the top examples, the quantile samples, the per-unit
histograms and co-firing, each checked against a naive computation on captured activations."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import actscope
from actscope.feeding import feed
from actscope.stats import SiteStats
from actscope.stats.pages import PageConfig
from actscope.stats.sampling import FiringSample, TokenSample, token_keys
from actscope.trace import Capture, token_id

BUILTIN = Path(actscope.__file__).parent / "data" / "builtin.txt"
SITE = "blocks.1.mlp.post"


def sentences(n: int) -> list[str]:
    return [line for line in BUILTIN.read_text().splitlines() if line.strip()][:n]


@pytest.fixture(scope="module")
def minilm():
    return actscope.load()


@pytest.fixture(scope="module")
def texts():
    return sentences(40)


@pytest.fixture(scope="module")
def run(minilm, texts, tmp_path_factory):
    return actscope.profile(minilm, texts, sites=SITE, batch_size=8, out=tmp_path_factory.mktemp("pages") / "run")


@pytest.fixture(scope="module")
def captured(minilm, texts):
    """``{doc: [T, U] activations}`` from a capture fed exactly as the profile was (same batches)."""
    capture = Capture(minilm, SITE)
    feed(capture, texts, batch_size=8)
    acts, doc = {}, 0
    for tensor, start in zip(capture.tensors[SITE], range(0, len(texts), 8)):
        ids = actscope.feeding.tokenize(minilm, texts[start:start + 8], 128)
        for row, length in enumerate(len(i) for i in ids):
            acts[doc] = tensor[row, :length].float()
            doc += 1
    return acts


def test_window_activations_equal_a_captured_forward(run, captured):
    examples = run.to_pandas("examples")
    assert {"window_start", "window"} <= set(examples.columns)
    checked = 0
    for row in examples.itertuples():
        acts = captured[row.doc][:, row.unit]  # [T]
        start, window = row.window_start, np.asarray(row.window, dtype=np.float32)
        assert start == max(0, row.pos - 10) and start + len(window) - 1 == min(len(acts) - 1, row.pos + 5)
        assert np.array_equal(window, acts[start:start + len(window)].numpy())  # bit for bit
        assert window[row.pos - start] == np.float32(row.value)
        checked += 1
    assert checked == 1536 * 8


def test_the_firing_sample_is_the_bottom_keys_of_the_firing_tokens(run, captured):
    """Each unit's sample = its firing tokens with the 64 smallest hash keys (naive, here)."""
    values = torch.cat([captured[d] for d in sorted(captured)])  # [n, U]
    tok = torch.cat([token_id(torch.full((len(captured[d]),), d), torch.arange(len(captured[d]))) for d in sorted(captured)])
    keys = token_keys(tok)
    stats_sample = _stats(run)
    for unit in (0, 5, 700, 1535):
        fired = torch.nonzero(values[:, unit] > 0).squeeze(1)
        order = fired[torch.argsort(keys[fired])][:64]
        want = set(tok[order].tolist())
        got = stats_sample.tok[unit]
        assert set(got[got >= 0].tolist()) == want
        chosen = {int(t): float(v) for t, v in zip(stats_sample.tok[unit], stats_sample.value[unit]) if t >= 0}
        assert all(chosen[int(tok[i])] == float(values[i, unit]) for i in order.tolist())


def _stats(run) -> FiringSample:
    """The firing sample of SITE, from the run's saved accumulator state."""
    return FiringSample.from_state_dict(torch.load(Path(run.path) / "state.pt", weights_only=True)[SITE]["pages"]["sample"])


def test_samples_come_from_each_quantile_bin(run):
    samples = run.to_pandas("samples")
    hist = run.to_pandas("unit_hist")
    sample = _stats(run)
    for unit in (0, 9, 1000):
        mine = samples[samples.unit == unit]
        values = np.sort(sample.value[unit][: int(sample.filled[unit])].numpy())
        n = len(values)
        assert sorted(set(mine.bin)) == list(range(min(4, n)))
        for row in mine.itertuples():  # the value's rank in the sample lies in the bin's quantile range
            rank = int(np.searchsorted(values, np.float32(row.value)))
            assert row.q_lo * n <= rank < row.q_hi * n + 1e-9
            assert (row.q_lo, row.q_hi) == (row.bin / 4, (row.bin + 1) / 4)
        assert mine.groupby("bin").size().max() <= 2
        counts = hist[hist.unit == unit].sort_values("bin")
        assert counts["count"].sum() == n == counts["sampled"].iloc[0]
        assert abs(counts["lo"].iloc[0]) == 0 and counts["hi"].iloc[-1] == pytest.approx(values.max(), rel=1e-6)
        naive, _ = np.histogram(values.astype(np.float64), bins=16, range=(0.0, float(values.max())))  # 16 equal bins from 0
        assert list(counts["count"]) == list(naive)
        frac_pos = run.to_pandas("neurons").set_index("unit").frac_pos[unit]
        assert np.allclose(counts["share"], naive / n * frac_pos)  # the estimated share of all tokens in each bin


def test_cofiring_is_the_jaccard_index_over_the_token_sample(run, captured):
    state = torch.load(Path(run.path) / "state.pt", weights_only=True)[SITE]["pages"]["cofire"]
    sample = TokenSample.from_state_dict(state)
    from actscope.trace import split_token_id

    doc, pos = split_token_id(sample.tok)
    fired = torch.stack([captured[int(d)][int(p)] for d, p in zip(doc, pos)]) > 0  # [n, U] naive
    assert torch.equal(fired, sample.firing())
    cofiring = run.to_pandas("cofiring")
    for unit in (0, 3, 800):
        rows = cofiring[cofiring.unit == unit].sort_values("rank")
        a = fired[:, unit]
        naive = []
        for other in range(fired.shape[1]):
            both = int((a & fired[:, other]).sum())
            either = int((a | fired[:, other]).sum())
            if other != unit and both >= 2:
                naive.append((-both / either, other, both))
        naive.sort()
        assert list(rows.other) == [o for _, o, _ in naive[:5]]
        assert list(rows.jaccard) == pytest.approx([-j for j, _, _ in naive[:5]], abs=1e-6)
        assert list(rows.shared) == [b for _, _, b in naive[:5]] and (rows.fired == int(a.sum())).all()
        assert (rows.tokens == len(fired)).all()


@pytest.mark.parametrize("chunks", [[64], [16, 48], [16, 16, 32]])
def test_page_accumulators_do_not_depend_on_the_batching(chunks):
    """Samples are by hash key: any split of the stream, and any merge, gives the one-pass
    result; windows too, as long as each update holds whole examples (every forward call does)."""
    torch.manual_seed(0)
    x = torch.randn(64, 40).relu() * torch.rand(40)  # [N, U]
    tok = token_id(torch.arange(64) // 16, torch.arange(64) % 16)
    whole = SiteStats(40, k=4, pages=PageConfig(sample=6, cofire=10))
    whole.update(x, tok)
    parts, start = [], 0
    for size in chunks:
        part = SiteStats(40, k=4, pages=PageConfig(sample=6, cofire=10))
        part.update(x[start:start + size], tok[start:start + size])
        parts.append(part)
        start += size
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(SiteStats.from_state_dict(part.state_dict()))
    streamed = SiteStats(40, k=4, pages=PageConfig(sample=6, cofire=10))
    start = 0
    for size in chunks:
        streamed.update(x[start:start + size], tok[start:start + size])
        start += size
    for other in (merged, streamed):
        assert torch.equal(other.pages.sample.tok, whole.pages.sample.tok)
        assert torch.equal(other.pages.sample.value, whole.pages.sample.value)
        assert torch.equal(other.pages.cofire.tok, whole.pages.cofire.tok)
        assert torch.equal(other.pages.cofire.firing(), whole.pages.cofire.firing())
        assert torch.equal(other.top.tok, whole.top.tok)
        assert torch.equal(other.pages.windows.tok, whole.top.tok)
        assert torch.equal(other.pages.windows.values.nan_to_num(-9.0), whole.pages.windows.values.nan_to_num(-9.0))


def test_windows_of_a_streamed_top_table_hold_the_naive_windows():
    """Windows read from each batch as tokens enter the top-k, on a stream of 5 examples."""
    torch.manual_seed(1)
    lengths = [9, 3, 14, 1, 20]
    rows = [torch.randn(n, 6) for n in lengths]
    stats = SiteStats(6, k=3, pages=PageConfig(before=2, after=1))
    for start in range(0, 5, 2):
        chunk = rows[start:start + 2]
        tok = torch.cat([token_id(torch.full((len(r),), start + i), torch.arange(len(r))) for i, r in enumerate(chunk)])
        stats.update(torch.cat(chunk), tok)
    windows, tok = stats.pages.windows.values, stats.top.tok
    for unit in range(6):
        for slot in range(3):
            doc, pos = int(tok[unit, slot]) >> 20, int(tok[unit, slot]) & 0xFFFFF
            want = [float(rows[doc][p, unit]) if 0 <= p < lengths[doc] else math.nan for p in range(pos - 2, pos + 2)]
            got = windows[unit, slot].tolist()
            assert [round(v, 6) if v == v else None for v in got] == [round(v, 6) if v == v else None for v in want]


def test_unit_page_tables_reach_sql(run):
    from actscope.report import query_run

    rows = query_run(run.path, """
        SELECT e.unit, e.rank, t.pos, t.token, e.window[t.pos - e.window_start + 1] AS value
        FROM examples e JOIN tokens t ON t.doc = e.doc AND t.pos BETWEEN e.window_start AND e.window_start + len(e.window) - 1
        WHERE e.unit = 17 AND e.rank = 0 ORDER BY t.pos""").to_pandas()
    examples = run.to_pandas("examples")
    top = examples[(examples.unit == 17) & (examples["rank"] == 0)].iloc[0]
    assert list(rows.value) == pytest.approx(list(top.window))
    assert top.token.strip() in "".join(rows.token)
    counts = query_run(run.path, "SELECT count(*) FROM samples WHERE unit = 17").rows[0][0]
    assert 1 <= counts <= 8
    assert query_run(run.path, "SELECT max(rank) FROM cofiring").rows[0][0] == 4


def test_pages_can_be_turned_off(minilm, texts):
    run = actscope.profile(minilm, texts[:8], sites=SITE, pages=False)
    assert set(run.tables) == {"neurons", "layers", "examples"}
    assert "window" not in run.tables["examples"].column_names
    assert run.manifest["config"]["pages"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_firing_sample_equals_the_torch_path(monkeypatch, dtype):
    """_sample.c and the torch path keep the same tokens and values, batch after batch."""
    from actscope.stats import sampling

    if sampling._library() is None:
        pytest.skip("no C compiler: only the torch path exists here")
    torch.manual_seed(2)
    batches = [(torch.randn(300, 700) * torch.rand(700)).to(dtype) for _ in range(6)]
    batches[2][5, 3] = math.inf  # never sampled
    batches[3][7, 9] = math.nan
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(sampling, "_kernel_fits", lambda x, compiled=compiled: compiled)
        sample = FiringSample(700, size=16)
        for i, x in enumerate(batches):
            sample.update(x, token_id(torch.full((300,), i), torch.arange(300)))
        results.append(sample)
    assert torch.equal(results[0].tok, results[1].tok)
    assert torch.equal(results[0].value.nan_to_num(-1.0), results[1].value.nan_to_num(-1.0))
    assert int(results[0].filled.min()) == 16 and bool((results[0].value[results[0].tok >= 0] > 0).all())


def test_the_page_carries_every_shown_window_within_its_encoding(run):
    """Two base-64 characters a token: the value relative to the unit's peak on 4095 levels."""
    from actscope.report.data import page_payload
    from actscope.report.units import ALPHABET, LEVELS
    from test_report import decode

    spec = page_payload(run)["neurons"]
    examples, windows = spec["examples"], spec["examples"]["windows"]
    table = run.to_pandas("examples").set_index(["site", "unit", "doc", "pos"])
    counts = np.repeat(np.arange(spec["n"]), decode(examples["cnt"], spec["n"]))  # the neuron row of each shown example
    sites, units = decode(spec["columns"]["site"], spec["n"]), decode(spec["columns"]["unit"], spec["n"])
    for j in range(0, len(windows["win"]), 97):
        row, ctx = counts[j], examples["ctx"][j]
        doc, pos = examples["contexts"]["doc"][ctx], examples["contexts"]["pos"][ctx]
        want = table.loc[(sites[row], units[row], doc, pos)]
        code = windows["win"][j]
        values = [(ALPHABET.index(code[i]) * 64 + ALPHABET.index(code[i + 1]) - LEVELS - 1) / LEVELS * windows["peak"][row]
                  for i in range(0, len(code), 2)]
        assert pos + windows["ws"][j] == want.window_start and len(values) == len(want.window)
        assert np.allclose(values, want.window, atol=windows["peak"][row] / LEVELS, rtol=1e-3)


def test_decoding_into_a_profiled_run_puts_the_tokens_on_its_unit_pages(tmp_path):
    """`actscope decode --out RUN` adds promoted and suppressed tokens to the run and rewrites its
    report, whose unit cards then carry them (the same tokens as the decode table)."""
    from typer.testing import CliRunner

    from actscope.cli.main import app
    from test_report import Page, decode as decoded_column

    runner = CliRunner(env={"COLUMNS": "200"})
    out = tmp_path / "run"
    result = runner.invoke(app, ["profile", "--sites", "blocks.1.mlp.post[0:8]", "--max-tokens", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "decoded" not in Page((out / "report.html").read_text()).payload()["neurons"]
    result = runner.invoke(app, ["decode", "--site", "blocks.1.mlp.post[0:8]", "--top", "3", "--out", str(out), "--show", "0"])
    assert result.exit_code == 0, result.output
    assert f"Report: {out / 'report.html'}" in result.output.replace("\n", "")
    table = actscope.open_run(out).to_pandas("decode")
    spec = Page((out / "report.html").read_text()).payload()["neurons"]["decoded"]
    counts = decoded_column(spec["cnt"], 8)
    assert counts == [6] * 8  # 3 promoted + 3 suppressed for each unit
    want = table.sort_values(["unit", "direction", "rank"])  # the card's order: unit, promoted before suppressed, rank
    assert decoded_column(spec["token"], 48) == list(want.token) and decoded_column(spec["dir"], 48) == list(want.direction)
