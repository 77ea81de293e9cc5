"""The HTML report without a browser: sections present exactly for the data present, the page's
JSON against the run's tables, chart geometry against the numbers, page weight at 100k units."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest

import actscope
from actscope.report import render_report, write_report
from actscope.report.html import safe_json
from actscope.run import Run

BUILTIN = Path(actscope.__file__).parent / "data" / "builtin.txt"
PROFILE_SECTIONS = ["header", "layers", "histograms", "firing"]


def sentences(n: int) -> list[str]:
    return [line for line in BUILTIN.read_text().splitlines() if line.strip()][:n]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "minilm"
    return actscope.profile(actscope.load(), sentences(36), sites="blocks.*.mlp.post,blocks.*.attn.pattern", out=out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random llama observed at its MLPs only: no attention data, no text contexts."""
    from actscope.zoo.tiny import tiny_model

    model, inputs = tiny_model("llama")
    out = tmp_path_factory.mktemp("report") / "tiny"
    return actscope.profile(actscope.wrap(model), [inputs], sites="blocks.*.mlp.post", out=out)


class Page(HTMLParser):
    """The parts of a report a test looks at: sections, SVG elements, scripts, table slots."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.svgs: list[dict] = []
        self.scripts: list[dict] = []
        self.slots: list[str] = []
        self.json_text = ""
        self._in_json = False
        self._svg: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("section", "header") and "data-section" in attrs:
            self.sections.append(attrs["data-section"])
        if tag == "svg":
            self._svg = {"name": attrs.get("data-chart"), "width": float(attrs["width"]), "height": float(attrs["height"]), "elements": []}
            self.svgs.append(self._svg)
        elif self._svg is not None:
            self._svg["elements"].append((tag, attrs))
        if tag == "script":
            self.scripts.append(attrs)
            self._in_json = attrs.get("type") == "application/json"
        if tag == "div" and attrs.get("class") == "as-table":
            self.slots.append(attrs["data-table"])

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg = None
        if tag == "script":
            self._in_json = False

    def handle_data(self, data):
        if self._in_json:
            self.json_text += data

    def chart(self, name: str) -> dict:
        return next(s for s in self.svgs if s["name"] == name)

    def payload(self) -> dict:
        return json.loads(self.json_text)


def decode(column: dict, n: int) -> list:
    if "c" in column:
        return [column["c"]] * n
    if "s" in column:
        return [i for length in column["s"] for i in range(length)]
    if column["t"] == "cat":
        return [column["d"][i] for i in column["v"]]
    return column["v"]


def close4(got, want) -> bool:
    """Equal up to the page's 4-significant-digit rounding."""
    if want is None or (isinstance(want, float) and not math.isfinite(want)):
        return got is None
    return abs(got - want) <= 5e-4 * abs(want) + 1e-300


# -- structure ------------------------------------------------------------------------------
def test_minilm_report_has_exactly_the_sections_of_its_data(minilm_run):
    page = Page(render_report(minilm_run))
    assert page.sections == PROFILE_SECTIONS + ["sinks", "neurons"]
    assert page.slots == ["layers", "heads"]
    assert {s["name"] for s in page.svgs} >= {"activation-ratio-0", "dead-units-0", "sink-heatmap"}
    assert sum(s["name"].startswith("hist-") for s in page.svgs) == 6
    assert sum(s["name"].startswith("firing-") for s in page.svgs) == 6
    assert all(s["width"] > 0 and s["height"] > 0 for s in page.svgs)


def test_run_without_attention_omits_the_sink_section(tiny_run):
    page = Page(render_report(tiny_run))
    assert "heads" not in tiny_run.tables
    assert page.sections == PROFILE_SECTIONS + ["neurons"]
    assert not any(s["name"] == "sink-heatmap" for s in page.svgs)


def test_header_names_model_data_sites_tokens_and_time(minilm_run):
    text = render_report(minilm_run)
    header = text[text.index("<header"):text.index("</header>")]
    marked = dict(re.findall(r'<dd data-field="(\w+)">(.*?)</dd>', header))
    assert marked["model"].startswith("<bdi>all-MiniLM-L6-v2</bdi> · <bdi>BertModel</bdi>")  # run values isolated
    fields = {name: re.sub(r"</?bdi>", "", value) for name, value in marked.items()}
    assert fields["model"].startswith("all-MiniLM-L6-v2 · BertModel")
    assert fields["tokens"] == f"{minilm_run.manifest['data']['tokens']:,}"
    assert fields["sites"].startswith("12 sites · blocks.0.mlp.post")
    assert "36 documents" in fields["data"]
    assert fields["time"].startswith(minilm_run.manifest["timings"]["started"])


def test_the_page_is_self_contained(minilm_run):
    text = render_report(minilm_run)
    assert not re.search(r"(src|href)=\"(?!#)", text)  # no external file, image, font or script
    # the SVG namespace (charts' xmlns, and the name the scripts create SVG elements in) is no address
    assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "@import" not in text and "url(" not in text
    page = Page(text)
    assert [s.get("type") for s in page.scripts] == ["application/json", None]
    assert "default-src 'none'" in text  # the CSP forbids every fetch as well


# -- the numbers on the page ----------------------------------------------------------------
def test_neuron_columns_on_the_page_are_the_run_table(minilm_run):
    spec = Page(render_report(minilm_run)).payload()["neurons"]
    table = minilm_run.tables["neurons"]
    assert spec["n"] == table.num_rows and list(spec["columns"]) == table.column_names
    for name in table.column_names:
        want, got = table.column(name).to_pylist(), decode(spec["columns"][name], spec["n"])
        if isinstance(want[0], float):
            assert all(close4(g, w) for g, w in zip(got, want)), name
        else:
            assert got == want, name


def unit_examples(spec: dict, row: int) -> list[dict]:
    """The page's examples of neuron row ``row``, rebuilt as the browser does."""
    examples = spec["examples"]
    counts = decode(examples["cnt"], spec["n"])
    start = sum(counts[:row])
    contexts = examples["contexts"]
    return [{"value": examples["val"][j], **{k: contexts[k][examples["ctx"][j]] for k in ("doc", "pos", "left", "token", "right")}}
            for j in range(start, start + counts[row])]


def test_every_units_examples_are_its_rows_of_the_examples_table(minilm_run):
    spec = Page(render_report(minilm_run)).payload()["neurons"]
    examples = minilm_run.to_pandas("examples")
    neurons = minilm_run.to_pandas("neurons")
    assert spec["examples"]["keep"] == spec["examples"]["k"] == 8
    clipped = 0
    for row in [0, 17, 1536 * 2 + 17, len(neurons) - 1] + list(range(100, 3000, 97)):
        site, unit = neurons.site[row], neurons.unit[row]
        want = examples[(examples.site == site) & (examples.unit == unit)].sort_values("rank")
        got = unit_examples(spec, row)
        assert len(got) == len(want) == 8
        for g, (_, w) in zip(got, want.iterrows()):
            assert close4(g["value"], w.value)
            assert (g["doc"], g["pos"], g["token"]) == (w.doc, w.pos, w.token)
            assert shown_part(g["left"], w.left, "left") and shown_part(g["right"], w.right, "right")
            clipped += g["left"] != w.left
    assert clipped > 0  # the clipping was exercised


def shown_part(shown: str, full: str, side: str) -> bool:
    """The card shows the context whole, or its ≤ 48 characters nearest the token with '…'."""
    if shown == full:
        return len(full) <= 48
    kept = shown.removeprefix("…") if side == "left" else shown.removesuffix("…")
    ends = full.endswith(kept) if side == "left" else full.startswith(kept)
    return len(full) > 48 and kept != shown and ends and 24 <= len(kept) <= 48


def test_activation_ratio_bars_are_proportional_to_the_layers_table(minilm_run):
    page = Page(render_report(minilm_run))
    rects = [a for tag, a in page.chart("activation-ratio-0")["elements"] if tag == "rect" and a.get("class") == "bar"]
    ratios = minilm_run.tables["layers"].column("activation_ratio").to_pylist()
    x0 = float(rects[0]["x"])
    span = 640 - 60 - x0  # charts.bars: the plot runs from the labels to WIDTH - 60
    assert len(rects) == len(ratios) == 6
    for rect, ratio in zip(rects, ratios):
        assert float(rect["width"]) == pytest.approx(ratio * span, abs=0.06)
    dead = [a for tag, a in page.chart("dead-units-0")["elements"] if tag == "rect" and a.get("class") == "bar"]
    dead_units = minilm_run.tables["layers"].column("dead_units").to_pylist()
    widest = max(float(r["width"]) for r in dead)
    assert [round(float(r["width"]) / widest * max(dead_units)) for r in dead] == dead_units


def test_sink_heatmap_has_one_cell_per_head_shaded_by_first_token_attention(minilm_run):
    cells = [a for tag, a in Page(render_report(minilm_run)).chart("sink-heatmap")["elements"] if tag == "rect"]
    heads = minilm_run.to_pandas("heads")
    assert len(cells) == len(heads) == 6 * 12
    red = np.array([int(c["fill"][1:3], 16) for c in cells])  # the red channel falls as the value rises
    by_value = red[np.argsort(heads.first_token_attention.to_numpy(), kind="stable")]
    assert (np.diff(by_value) <= 0).all() and by_value[0] > by_value[-1]
    assert red[heads.first_token_attention.idxmax()] == red.min()


def test_firing_curves_are_the_token_shares_of_the_firing_array(minilm_run):
    from actscope.report.sections import _firing_curve

    firing = minilm_run.firing("blocks.3.mlp.post").double().numpy()  # [criterion, units + 1]
    xs, ys = _firing_curve(firing[0])
    width = math.ceil(firing.shape[1] / 100)
    naive = [firing[0, i:i + width].sum() / firing[0].sum() for i in range(0, firing.shape[1], width)]
    assert len(ys) == len(naive) <= 100
    assert ys == pytest.approx(naive, rel=1e-12)
    assert sum(ys) == pytest.approx(1.0, rel=1e-12)
    assert xs[0] == pytest.approx((width - 1) / 2 / 1536) and 0 < xs[-1] <= 1536 / 1536 + width / 1536


def test_histograms_count_every_value(minilm_run):
    edges, counts = minilm_run.histogram("blocks.1.mlp.post")
    assert int(counts.sum()) == minilm_run.manifest["data"]["tokens"] * 1536  # what the chart shares are of
    svg = Page(render_report(minilm_run)).chart("hist-blocks.1.mlp.post")
    assert any(tag == "path" and a.get("class") == "hist" for tag, a in svg["elements"])


# -- tables other developers add to runs ----------------------------------------------------
def with_tables(run: Run, **tables: dict) -> Run:
    return replace(run, tables={**run.tables, **{k: pa.table(v) for k, v in tables.items()}})


def measured_tables() -> dict[str, dict]:
    layers = np.arange(6)
    return {
        "cett_sweep": {"method": ["cett", "cett", "cett", "topk", "topk", "topk"], "p": [0.01, 0.03, 0.1] * 2,
                       "sparsity": [0.4, 0.5, 0.7, 0.3, 0.35, 0.5], "degradation": [0.01, 0.03, 0.1] * 2, "passes": [5] * 6},
        "cett_layers": {"site": [f"blocks.{i}.mlp.post" for i in layers], "layer": layers, "eps": 0.1 * (layers + 1),
                        "activation_ratio": 0.05 * (layers + 1), "dense_activation_ratio": np.full(6, 0.5)},
        "extreme_heads": {"layer": np.repeat(layers, 4), "head": np.tile(np.arange(4), 6), "sink_score": np.linspace(0, 1, 24),
                          "dormant": np.linspace(0, 1, 24) > 0.5},
        "moe_experts": {"layer": np.repeat([0, 1], 8), "expert": np.tile(np.arange(8), 2), "frequency": np.linspace(0.05, 0.4, 16),
                        "activation_ratio": np.linspace(0.1, 0.9, 16)},
        "outliers": {"site": ["blocks.0.mlp.post"] * 30, "layer": [0] * 30, "channel": np.arange(30),
                     "ratio": np.r_[np.arange(29.0), np.nan], "kurtosis": np.arange(30.0)},
        "decoded": {"site": ["blocks.0.mlp.post"] * 4, "layer": [0] * 4, "unit": [5] * 4, "rank": [0, 1, 0, 1],
                    "token": ["cat", "<b>dog</b>", "rain", "sun"], "score": [3.0, 2.0, -2.0, -1.0],
                    "direction": ["promoted", "promoted", "suppressed", "suppressed"]},
        "my_extra": {"name": ["a", "b"], "score": [1.0, 2.0]},
    }


def test_measured_tables_get_their_sections_and_charts(minilm_run):
    run = with_tables(minilm_run, **measured_tables())
    page = Page(render_report(run))
    assert page.sections == PROFILE_SECTIONS + ["sinks", "extreme_heads", "cett_sweep", "cett_layers", "moe_experts",
                                                "outliers", "neurons", "table-my_extra"]
    assert page.slots == ["layers", "heads", "extreme_heads", "cett_sweep", "cett_layers", "moe_experts", "outliers", "my_extra"]
    sweep = page.chart("cett-sweep")["elements"]
    assert sum(tag == "polyline" for tag, _ in sweep) == 2  # one line per method
    assert sum(tag == "circle" for tag, _ in sweep) == 6
    ratio_bars = [a for tag, a in page.chart("cett-ratios")["elements"] if tag == "rect" and a.get("class") == "bar"]
    assert len(ratio_bars) == 12  # sparse and dense ratio per layer
    active = [a for tag, a in page.chart("active-heads")["elements"] if tag == "rect"]
    assert len(active) == 24 and sum(a["fill"] == "#ffffff" for a in active) == int((np.linspace(0, 1, 24) > 0.5).sum())
    assert sum(tag == "rect" for tag, _ in page.chart("moe-frequency")["elements"]) == 16
    outliers = [a for tag, a in page.chart("outlier-channels")["elements"] if tag == "rect" and a.get("class") == "bar"]
    assert len(outliers) == 20  # the top 20 finite ratios (28 down to 9; the NaN left out), largest first
    widths = [float(a["width"]) for a in outliers]
    assert widths == sorted(widths, reverse=True) and widths[-1] == pytest.approx(widths[0] * 9 / 28, abs=0.1)
    labels = [a for tag, a in page.chart("outlier-channels")["elements"] if tag == "text" and a.get("text-anchor") == "end"
              and a.get("class") == "lbl"]  # row labels, not the title
    assert len(labels) == 20
    payload = page.payload()
    assert set(payload["tables"]) == {"layers", "heads", "cett_sweep", "cett_layers", "extreme_heads", "moe_experts", "outliers", "my_extra"}
    assert decode(payload["tables"]["my_extra"]["columns"]["name"], 2) == ["a", "b"]


def test_generic_tables_get_one_section_each_with_distinct_ids(minilm_run):
    run = with_tables(minilm_run, **{"a b": {"x": [1]}, "a-b": {"x": [2]}, "a/b": {"x": [3]}})
    page = Page(render_report(run))
    assert page.sections[-3:] == ["table-a-b", "table-a-b-", "table-a-b--"]
    assert page.slots[-3:] == ["a b", "a-b", "a/b"]


def test_decoded_tokens_reach_the_unit_cards(minilm_run):
    run = with_tables(minilm_run, decoded=measured_tables()["decoded"])
    spec = Page(render_report(run)).payload()["neurons"]["decoded"]
    counts = decode(spec["cnt"], run.tables["neurons"].num_rows)
    assert counts[5] == 4 and sum(counts) == 4  # unit 5 of blocks.0 is neuron row 5
    n = len(spec["score"])
    assert decode(spec["token"], n) == ["cat", "<b>dog</b>", "rain", "sun"]
    assert decode(spec["dir"], n) == ["promoted", "promoted", "suppressed", "suppressed"]
    assert spec["score"] == [3.0, 2.0, -2.0, -1.0]


@pytest.mark.parametrize(("column", "shown"), [
    (pa.array(["x", "x", "x"]), ["x", "x", "x"]),  # constant strings
    (pa.array(["b", None, "a", "b"]), ["b", "", "a", "b"]),
    (pa.array([1, None, 3]), [1.0, None, 3.0]),  # nullable ints come as floats
    (pa.array([True, False, True]), [1, 0, 1]),
    (pa.array([0.0, float("nan"), float("inf"), 123456.7, -1.23456e-7]), [0.0, None, None, 123500.0, -1.235e-7]),
    (pa.array([[1, 2], [3]]), ["[1 2]", "[3]"]),
    (pa.array(list(range(40)) + list(range(30)) + list(range(50))), list(range(40)) + list(range(30)) + list(range(50))),
    (pa.array([0, 1, 2, 5]), [0, 1, 2, 5]),
    (pa.array([7, 7]), [7, 7]),
    (pa.array([], pa.int64()), []),
])
def test_columns_round_trip_through_the_page_encoding(column, shown):
    from actscope.report.columns import encode_column

    encoded = encode_column(column)
    assert decode(json.loads(safe_json(encoded)), len(column)) == shown


def test_a_single_site_run_keeps_its_site_names(tiny_run):
    one = replace(tiny_run, tables={name: t.filter(pa.compute.equal(t.column("site"), "blocks.0.mlp.post"))
                                     for name, t in tiny_run.tables.items()})
    spec = Page(render_report(one)).payload()["neurons"]
    assert spec["columns"]["site"] == {"t": "cat", "c": "blocks.0.mlp.post"}
    assert decode(spec["columns"]["unit"], spec["n"]) == list(range(spec["n"]))


def test_safe_json_cannot_close_its_script_element():
    payload = {"s": "</script><script>alert(1)</script><!-- & \u2028\u2029 \"'"}
    text = safe_json(payload)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == payload


# -- scale ----------------------------------------------------------------------------------
def synthetic_run(units_per_site: int = 10_000, sites: int = 10, k: int = 8, contexts: int = 50_000) -> Run:
    """A run with sites × units_per_site units, k examples each over a pool of contexts."""
    rng = np.random.default_rng(0)
    n = units_per_site * sites
    names = np.array([f"blocks.{i}.mlp.post" for i in range(sites)], dtype=object)
    site = np.repeat(names, units_per_site)
    unit = np.tile(np.arange(units_per_site), sites)
    neurons = {"site": site, "layer": np.repeat(np.arange(sites), units_per_site), "unit": unit, "count": np.full(n, 200_000),
               "mean": rng.normal(size=n), "std": rng.random(n), "min": -rng.random(n), "max": 3 * rng.random(n),
               "frac_pos": rng.random(n), **{f"frac_abs_gt_{e}": rng.random(n) for e in ("0", "0.001", "0.01", "0.1", "1")},
               "nonfinite": np.zeros(n, dtype=np.int64)}
    words = np.array([f"word{i}" for i in range(5000)], dtype=object)
    pool = rng.integers(0, contexts, size=n * k)
    examples = {"site": np.repeat(site, k), "layer": np.repeat(neurons["layer"], k), "unit": np.repeat(unit, k),
                "rank": np.tile(np.arange(k), n), "value": np.sort(rng.random((n, k)))[:, ::-1].reshape(-1),
                "doc": pool // 100, "pos": pool % 100,
                "left": np.array([" ".join(words[[(c * 7 + j) % 5000 for j in range(8)]]) for c in range(contexts)], dtype=object)[pool],
                "token": words[pool % 5000],
                "right": np.array([" ".join(words[[(c * 11 + j) % 5000 for j in range(8)]]) for c in range(contexts)], dtype=object)[pool]}
    layers = {"site": names, "layer": np.arange(sites), "units": np.full(sites, units_per_site), "tokens": np.full(sites, 200_000),
              "activation_ratio": rng.random(sites), "dead_units": rng.integers(0, 100, sites)}
    arrays = {}
    import torch

    for name in names:
        arrays[f"hist.edges.{name}"] = torch.logspace(-6, 4, 81, dtype=torch.float64)
        arrays[f"hist.counts.{name}"] = torch.from_numpy(rng.integers(0, 10_000, 83))
        arrays[f"firing.{name}"] = torch.from_numpy(rng.integers(0, 50, (6, units_per_site + 1)))
    manifest = {"model": {"name": "synthetic"}, "data": {"name": "synthetic", "tokens": 200_000},
                "plan": [{"site": s} for s in names], "config": {"eps": [0.0, 0.001, 0.01, 0.1, 1.0]}, "timings": {}}
    examples, tokens = with_windows(examples, words, rng)
    tables = {"neurons": pa.table(neurons), "layers": pa.table(layers), "examples": examples, "tokens": tokens}
    return Run(manifest, tables, arrays, None)


def with_windows(examples: dict, words: np.ndarray, rng) -> tuple[pa.Table, pa.Table]:
    """The examples with a window of 16 activations each (10 before, 5 after, cut at the
    document's start), and the text of every token a window covers."""
    start = np.maximum(examples["pos"] - 10, 0)
    length = examples["pos"] + 6 - start
    values = rng.normal(size=int(length.sum())).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
    table = pa.table({**examples, "window_start": start, "window": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
    doc = np.repeat(examples["doc"], length)
    pos = np.repeat(start, length) + np.arange(int(length.sum())) - np.repeat(offsets[:-1], length)
    key = np.unique(doc * 200 + pos)
    tokens = pa.table({"doc": key // 200, "pos": key % 200, "token": words[(key * 13) % len(words)]})
    return table, tokens


@pytest.fixture(scope="module")
def big_report(tmp_path_factory) -> Path:
    return write_report(synthetic_run(), tmp_path_factory.mktemp("big") / "report.html")


def test_100k_units_stay_under_20_mb(big_report):
    size = big_report.stat().st_size
    print(f"100k-unit report: {size / 1e6:.1f} MB, {Page(big_report.read_text()).payload()['neurons']['examples']['keep']} examples a unit")
    assert size < 20e6
    page = Page(big_report.read_text())
    spec = page.payload()["neurons"]
    assert spec["n"] == 100_000
    # 800k examples: the count cap leaves each unit its 4 strongest, the byte budget then fewer
    examples = spec["examples"]
    keep = examples["keep"]
    assert keep in (1, 2) and examples["k"] == 8
    assert decode(examples["cnt"], 100_000) == [keep] * 100_000
    windows = examples["windows"]  # every shown example has its per-token activations
    assert len(windows["win"]) == 100_000 * keep and all(0 < len(w) <= 32 and len(w) % 2 == 0 for w in windows["win"])
    assert len(windows["tok"]["doc"]) == 500  # the texts of every document a window is in
    firing = [s for s in page.svgs if s["name"].startswith("firing-")]
    assert len(firing) == 10 and all(len(a["points"].split()) <= 100 for s in firing for tag, a in s["elements"] if tag == "polyline")


def test_the_byte_budget_halves_the_examples_per_unit(minilm_run, monkeypatch):
    from actscope.report import data

    full = data.page_payload(minilm_run)["neurons"]
    extras = ("cofire", "hist", "samples")  # the unit pages' extras, dropped before examples are halved
    size = data._size({k: v for k, v in full.items() if k != "examples"}) + data._size(full["examples"])
    monkeypatch.setattr(data, "NEURON_BUDGET", size - 1)  # just too big: the last extra goes
    shorter = data.page_payload(minilm_run)["neurons"]
    assert shorter["examples"]["keep"] == 8 and "samples" not in shorter and {"cofire", "hist"} <= set(shorter)
    core = data._size({k: v for k, v in full.items() if k not in ("examples", *extras)}) + data._size(full["examples"])
    monkeypatch.setattr(data, "NEURON_BUDGET", core - 1)  # even without the extras too big: one halving
    assert data.page_payload(minilm_run)["neurons"]["examples"]["keep"] == 4
    monkeypatch.setattr(data, "NEURON_BUDGET", 1)  # never fits: down to one example per unit
    smallest = data.page_payload(minilm_run)["neurons"]
    assert not set(extras) & set(smallest)
    assert smallest["examples"]["keep"] == 1 and decode(smallest["examples"]["cnt"], smallest["n"]) == [1] * smallest["n"]
    assert smallest["examples"]["val"] == full["examples"]["val"][::8]  # rank 0 of every unit


def test_write_report_refuses_a_bad_target(minilm_run, tmp_path):
    from actscope.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        write_report(minilm_run, tmp_path / "missing" / "r.html")
    with pytest.raises(InputError, match="is a directory"):
        write_report(minilm_run, tmp_path)
    with pytest.raises(InputError, match="not saved"):
        write_report(replace(minilm_run, path=None))
    assert write_report(minilm_run) == minilm_run.path / "report.html"


# -- command line ---------------------------------------------------------------------------
def cli(*args: str):
    from typer.testing import CliRunner

    from actscope.cli.main import app

    return CliRunner(env={"COLUMNS": "200"}).invoke(app, list(args))


def test_report_command_writes_the_page(minilm_run, tmp_path):
    out = tmp_path / "page.html"
    result = cli("report", str(minilm_run.path), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"Report: {out}" in result.output and out.stat().st_size > 100_000
    assert Page(out.read_text()).sections == PROFILE_SECTIONS + ["sinks", "neurons"]
    default = cli("report", str(minilm_run.path))
    assert default.exit_code == 0 and (minilm_run.path / "report.html").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "no run directory"),
    (["{empty}"], "not an actscope run"),
    (["{run}", "--out", "{missing}/page.html"], "does not exist"),
    (["{run}", "--out", "{empty}"], "is a directory"),
])
def test_report_command_bad_input_exits_2(minilm_run, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "run": minilm_run.path}
    result = cli("report", *[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_profile_writes_the_report_unless_told_not_to(tmp_path):
    with_report = cli("profile", "--out", str(tmp_path / "a"), "--max-tokens", "60")
    assert with_report.exit_code == 0, with_report.output
    assert (tmp_path / "a" / "report.html").is_file()
    assert f"Report: {tmp_path / 'a' / 'report.html'}" in with_report.output
    without = cli("profile", "--out", str(tmp_path / "b"), "--max-tokens", "60", "--no-report")
    assert without.exit_code == 0, without.output
    assert not (tmp_path / "b" / "report.html").exists() and "Report:" not in without.output
