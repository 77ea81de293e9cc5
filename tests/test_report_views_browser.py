"""The new report views in headless Chromium: the unit page (per-token activation windows with the
value on hover, quantile samples, histogram, co-firing partners), the logit-lens grid, the
steering sweep and the attention viewer — rendered offline with no request but the file, data
text inert, bidi controls isolated. Skips like tests/test_report_browser.py without chromium."""
from __future__ import annotations

from dataclasses import replace
import numpy as np
import pyarrow as pa
import pytest

import actscope
from actscope.report import write_report
from test_report_browser import CHROMIUM, HOSTILE, Visit, sentences

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: install Debian's package (`sudo apt-get install -y chromium`)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]'")
RLO = "\u202e"
PROMPT = "The kettle whistled while she read the letter."


@pytest.fixture(scope="module")
def views_run(tmp_path_factory) -> actscope.Run:
    """MiniLM profiled over 24 sentences, with a prompt's attention patterns and logit lens added."""
    from actscope.explain import attention_patterns, logit_lens

    model = actscope.load()
    run = actscope.profile(model, sentences(24), sites="blocks.0-1.mlp.post", out=tmp_path_factory.mktemp("views") / "run")
    attention = attention_patterns(model, PROMPT, "blocks.0-1.attn.pattern")
    lens = logit_lens(model, PROMPT, top=3)
    tables = {**run.tables, "attention": pa.table(attention.to_table()), "attention_tokens": pa.table(attention.tokens_table()),
              "lens": pa.table(lens.to_table())}
    return replace(run, tables=tables)


@pytest.fixture(scope="module")
def views_page(browser, views_run):
    visit = Visit(browser, write_report(views_run))
    yield visit
    visit.page.close()


def card_for(visit: Visit, query: str) -> None:
    visit.search(query)
    visit.page.wait_for_selector("#unit-card:not([hidden]) li.example .window")


def test_the_unit_page_shades_every_token_of_each_window(views_page, views_run):
    page = views_page.page
    card_for(views_page, "blocks.1.mlp.post 5")
    examples = views_run.to_pandas("examples")
    mine = examples[(examples.site == "blocks.1.mlp.post") & (examples.unit == 5)].sort_values("rank")
    tokens = views_run.to_pandas("tokens").set_index(["doc", "pos"]).token
    strips = page.eval_on_selector_all("#unit-card li.example .window", """els => els.map(w => [...w.children].map(t => [
        t.textContent, t.classList.contains('own'), t.dataset.value === undefined ? null : Number(t.dataset.value),
        parseFloat((getComputedStyle(t).backgroundColor.split(',')[3] || '0')), t.title, getComputedStyle(t).unicodeBidi]))""")
    assert len(strips) == len(mine) == 8
    peak = max(np.abs(np.asarray(w, dtype=np.float64)).max() for w in mine.window)
    for strip, row in zip(strips, mine.itertuples()):
        window = np.asarray(row.window, dtype=np.float64)
        assert [t[0] for t in strip] == [tokens[(row.doc, p)] for p in range(row.window_start, row.window_start + len(window))]
        assert [t[1] for t in strip] == [p == row.pos for p in range(row.window_start, row.window_start + len(window))]
        shown = np.array([np.nan if t[2] is None else t[2] for t in strip], dtype=np.float64)  # the hover value, 3 digits
        assert np.allclose(shown, window, rtol=5e-3, atol=peak / 2047, equal_nan=True)
        real = ~np.isnan(window)
        alphas = np.array([t[3] for t in strip])
        assert np.allclose(alphas[real], 0.06 + 0.84 * np.minimum(1, np.abs(window[real]) / peak), atol=0.02)  # shade ∝ |a| / peak
        assert all("a = " in t[4] for t, ok in zip(strip, real) if ok)
        assert {t[5] for t in strip} == {"isolate"}
    assert views_page.quiet(), (views_page.console, views_page.errors)


def test_the_unit_page_has_its_histogram_samples_and_cofiring(views_page, views_run):
    page = views_page.page
    card_for(views_page, "blocks.0.mlp.post 7")
    bars = page.eval_on_selector_all("#unit-card svg.unit-hist rect.bar", "els => els.map(e => parseFloat(e.getAttribute('height')))")
    hist = views_run.to_pandas("unit_hist")
    counts = hist[(hist.site == "blocks.0.mlp.post") & (hist.unit == 7)].sort_values("bin")["count"].to_numpy()
    assert len(bars) == 16 and np.allclose(np.array(bars) / max(bars), counts / counts.max(), atol=1e-3)
    samples = views_run.to_pandas("samples")
    mine = samples[(samples.site == "blocks.0.mlp.post") & (samples.unit == 7)]
    shown = page.eval_on_selector_all("#unit-card li.sample .tok", "els => els.map(e => e.textContent)")
    assert shown == list(mine.sort_values(["bin", "value"]).token)
    assert page.eval_on_selector_all("#unit-card h5", "els => els.map(e => e.textContent)")[0] == "quantile 0–25 %"
    cofiring = views_run.to_pandas("cofiring")
    partners = cofiring[(cofiring.site == "blocks.0.mlp.post") & (cofiring.unit == 7)].sort_values("rank")
    buttons = page.eval_on_selector_all("#unit-card button.partner", "els => els.map(e => e.firstChild.textContent)")
    assert buttons == [f"unit {u}" for u in partners.other]
    page.click("#unit-card button.partner >> nth=0")
    assert page.inner_text("#unit-card h3") == f"blocks.0.mlp.post · unit {partners.other.iloc[0]}"
    assert views_page.quiet() and views_page.requests == [views_page.url]


def test_the_lens_grid_shows_each_layers_top_token(views_page, views_run):
    page = views_page.page
    lens = views_run.to_pandas("lens")
    head = page.eval_on_selector_all("#lens-grid th.input", "els => els.map(e => e.textContent)")
    top = lens[lens["rank"] == 0]
    assert head == list(top[top.layer == 0].sort_values("position").input)
    rows = page.eval_on_selector_all("#lens-grid tbody tr", "rows => rows.map(r => [...r.querySelectorAll('td.cell')].map(c => c.textContent))")
    assert rows == [list(top[top.layer == layer].sort_values("position").token) for layer in range(6)]
    assert views_page.quiet()


def test_the_attention_viewer_renders_every_head(views_page, views_run):
    page = views_page.page
    attention = views_run.to_pandas("attention")
    size = int(attention["query"].max()) + 1
    options = page.eval_on_selector_all("#attention-head option", "els => els.length")
    assert options == 24  # 2 sites × 12 heads
    page.select_option("#attention-head", "13")  # blocks.1.attn.pattern, head 1
    cells = page.eval_on_selector_all("#attention-grid rect.cell", "els => els.map(e => [+e.dataset.query, +e.dataset.key, e.getAttribute('fill')])")
    assert len(cells) == size * size
    head = attention[(attention.site == "blocks.1.attn.pattern") & (attention["head"] == 1)]
    weight = head.set_index(["query", "key"]).weight
    for q, k, fill in cells[:: max(1, len(cells) // 40)]:
        alpha = float(fill.rsplit(",", 1)[1].strip(" )"))
        assert alpha == pytest.approx(min(1, 0.03 + 0.97 * weight[(q, k)]), abs=1.5e-3)
    assert page.eval_on_selector_all("#attention-grid rect.sink", "els => els.length") == 1
    page.hover("#attention-grid rect.cell[data-query='3'][data-key='0']")
    readout = page.inner_text("#attention-readout")
    tokens = views_run.to_pandas("attention_tokens").token
    assert readout.startswith("query 3 ") and f"key 0 {tokens[0]}" in readout and f"{weight[(3, 0)]:.3g}"[:4] in readout
    assert views_page.quiet() and views_page.requests == [views_page.url]


def test_the_steering_sweep_has_its_chart_and_generations(browser, tmp_path):
    from actscope.cli.saving import save_tables
    from actscope.explain import steering_sweep, steering_vector
    from actscope.zoo import held_out_corpus, tiny_lm

    model = actscope.load(str(tiny_lm("relu")))
    docs = held_out_corpus(200)
    vector = steering_vector(model, "blocks.0.resid.post", [d for d in docs if " los " in d][:8], [d for d in docs if " lo " in d][:8])
    sweep = steering_sweep(model, vector, ["Siri feneet", "la mua"], [0.0, 2.0, 4.0], targets=[" los"], max_new_tokens=6)
    out = save_tables(model, tmp_path / "steer", "steer", {}, {"steering": sweep.to_table()}, report=True)
    visit = Visit(browser, out / "report.html")
    page = visit.page
    page.wait_for_selector("div.as-table[data-table='steering'] tbody tr")
    assert page.eval_on_selector("svg[data-chart='steering-logprob']", "s => s.querySelectorAll('polyline, circle').length") > 0
    texts = page.eval_on_selector_all("div.as-table[data-table='steering'] tbody tr", "rows => rows.map(r => r.children[2].textContent)")
    assert texts == list(sweep.text)
    assert visit.quiet() and visit.requests == [visit.url]
    page.close()


def test_the_lens_picker_switches_to_the_tuned_lens_and_the_kl_chart_has_both(browser, tmp_path):
    from actscope.cli.saving import save_tables
    from actscope.explain import fit_tuned_lens, lens_kl, logit_lens
    from actscope.zoo import held_out_corpus, tiny_lm

    model = actscope.load(str(tiny_lm("relu")))
    docs = held_out_corpus(200)
    tuned = fit_tuned_lens(model, docs, seed=0, steps=10)
    prompt = "Siri feneet un peo . shi gasoet"
    both = {**logit_lens(model, prompt, top=3).to_table()}
    tuned_rows = logit_lens(model, prompt, top=3, lens=tuned).to_table()
    both = {k: np.concatenate([np.asarray(both[k]), np.asarray(tuned_rows[k])]) for k in both}
    kl = {"layer": np.arange(2), "logit": np.asarray(lens_kl(model, docs[-40:])), "tuned": np.asarray(lens_kl(model, docs[-40:], tuned))}
    out = save_tables(model, tmp_path / "lens", "lens", {}, {"lens": both, "lens_kl": kl}, report=True)
    visit = Visit(browser, out / "report.html")
    page = visit.page
    page.wait_for_selector("#lens-grid td.cell")
    table = pa.table(both).to_pandas()

    def shown() -> list[list[str]]:
        return page.eval_on_selector_all("#lens-grid tbody tr", "rows => rows.map(r => [...r.querySelectorAll('td.cell')].map(c => c.textContent))")

    def expected(kind: str) -> list[list[str]]:
        top = table[(table.kind == kind) & (table["rank"] == 0)]
        return [list(top[top.layer == layer].sort_values("position").token) for layer in sorted(set(top.layer))]

    assert page.eval_on_selector_all("#lens-kind option", "els => els.map(e => e.textContent)") == ["logit lens", "tuned lens"]
    assert shown() == expected("logit") and page.get_attribute("#lens-grid", "data-kind") == "logit"
    page.select_option("#lens-kind", "1")
    assert shown() == expected("tuned") and page.get_attribute("#lens-grid", "data-kind") == "tuned"
    assert expected("tuned") != expected("logit")  # the switch shows something else
    title = page.get_attribute("#lens-grid tbody tr:first-child td.cell", "title")  # hover: the cell's top tokens and its KL
    first = table[(table.kind == "tuned") & (table.layer == 0) & (table.position == 0)].sort_values("rank")
    cells = [line.rsplit(" ", 1) for line in title.splitlines()[:3]]
    assert [name for name, _ in cells] == [f"\u2068{token}\u2069" for token in first.token]  # isolated, as in every tooltip
    assert [float(p) for _, p in cells] == pytest.approx(list(first.prob), rel=1e-3)
    assert title.splitlines()[3].startswith("KL from the final distribution: ")
    lines = page.eval_on_selector("svg[data-chart='lens-kl']", "s => s.querySelectorAll('polyline').length")
    assert lines == 2
    assert visit.quiet() and visit.requests == [visit.url]
    page.close()


# -- security --------------------------------------------------------------------------------
def _hostile(run: actscope.Run, text_of) -> actscope.Run:
    """Every text the new views show replaced by ``text_of(i)`` (markup or bidi controls)."""
    tables = dict(run.tables)

    def swap(name: str, column: str) -> None:
        table = tables[name]
        values = [text_of(i) for i in range(table.num_rows)]
        tables[name] = table.set_column(table.column_names.index(column), column, pa.array(values))

    for name, column in (("tokens", "token"), ("attention_tokens", "token"), ("lens", "input"), ("lens", "token"),
                         ("samples", "token"), ("samples", "left"), ("samples", "right")):
        swap(name, column)
    tables["steering"] = pa.table({"scale": [0.0, 1.0], "prompt": [text_of(0), text_of(1)], "text": [text_of(2), text_of(3)],
                                   "logprob": [-2.0, -1.0], "score": [np.nan, np.nan], "site": ["blocks.0.resid.post"] * 2,
                                   "positions": ["all"] * 2})
    return replace(run, tables=tables)


def test_markup_in_the_new_views_never_executes(browser, views_run, tmp_path):
    run = _hostile(views_run, lambda i: HOSTILE[i % len(HOSTILE)])
    path = write_report(run, tmp_path / "hostile.html")
    text = path.read_text()
    assert not any(h in text[:text.index('<script type="application/json"')] for h in HOSTILE)
    visit = Visit(browser, path)
    page = visit.page
    card_for(visit, "blocks.0.mlp.post 3")
    page.select_option("#attention-head", "5")
    page.hover("#attention-grid rect.cell[data-query='1'][data-key='2']")
    page.wait_for_timeout(300)  # any stray handler's chance
    injected = page.evaluate("""({pwned: String(window.__pwned), scripts: document.scripts.length,
        elements: document.querySelectorAll('img, b, iframe, object, embed, [onerror], [onload], svg:not(.chart)').length})""")
    assert injected == {"pwned": "undefined", "scripts": 2, "elements": 0}
    shown = page.eval_on_selector_all("#unit-card .window .wt", "els => els.map(e => e.textContent)")
    assert set(shown) <= set(HOSTILE) and len(set(shown)) > 1  # the strings, as text
    assert set(page.eval_on_selector_all("#lens-grid td.cell", "els => els.map(e => e.textContent)")) <= set(HOSTILE)
    assert page.eval_on_selector_all("div.as-table[data-table='steering'] tbody tr td.text", "els => els.map(e => e.textContent)")[:2] == \
        [HOSTILE[0], HOSTILE[2]]
    assert visit.quiet(), (visit.console, visit.errors, visit.dialogs)
    assert visit.requests == [visit.url]
    page.close()


def test_bidi_controls_in_the_new_views_are_isolated(browser, views_run, tmp_path):
    run = _hostile(views_run, lambda i: f"{RLO}tok{i}")
    visit = Visit(browser, write_report(run, tmp_path / "bidi.html"))
    page = visit.page
    card_for(visit, "blocks.0.mlp.post 3")
    styles = page.evaluate("""() => {
        const isolated = sel => [...document.querySelectorAll(sel)].filter(e => e.textContent.includes('\\u202e'))
            .map(e => getComputedStyle(e).unicodeBidi);
        return {window: isolated('#unit-card .window .wt'), lens: isolated('#lens-grid td, #lens-grid th'),
                samples: isolated('#unit-card li.sample span'), steering: isolated("div.as-table[data-table='steering'] td")};
    }""")
    for name, found in styles.items():
        assert found and set(found) == {"isolate"}, (name, found)
    # where no element can be put (SVG labels, option text, tooltips): controls removed, name between FSI and PDI
    labels = page.eval_on_selector_all("#attention-grid g.tokens text, #attention-head option",
                                       "els => els.map(e => e.textContent)")
    assert labels and not any(RLO in t for t in labels)
    titles = page.eval_on_selector_all("#unit-card .window .wt, #lens-grid td.cell", "els => els.map(e => e.title)")
    assert titles and not any(RLO in t for t in titles)
    page.hover("#attention-grid rect.cell[data-query='1'][data-key='2']")
    readout = page.eval_on_selector_all("#attention-readout span", "els => els.map(e => getComputedStyle(e).unicodeBidi)")
    assert readout == ["isolate", "isolate"]
    assert visit.quiet() and visit.requests == [visit.url]
    page.close()
