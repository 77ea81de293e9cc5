"""The report in headless Chromium: it loads offline with no console errors and no request but
itself, charts render, the neuron browser finds units, data-set text never becomes markup, and
bidi controls in the run's text never reorder the page's own words.

Needs Debian's chromium on PATH (`make test` installs it) and the playwright Python package;
without chromium these tests skip, saying how to install it.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

import actscope
from actscope.report import write_report
from test_report_safety import BIDI_MODEL, BIDI_SITE, BIDI_TABLE, RLO, bidi_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: install Debian's package (`sudo apt-get install -y chromium`, or run `make test`, which does it)",
)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]'")

DOCS = Path(__file__).resolve().parents[1] / "docs"
BUILTIN = Path(actscope.__file__).parent / "data" / "builtin.txt"
HOSTILE = [
    "<script>window.__pwned = 1; alert(1)</script>",
    "<img src=x onerror=\"window.__pwned = 2; alert(2)\">",
    "\"'><b>bold</b> and '\"><svg onload=alert(3)>",
    "</script><script>window.__pwned = 3</script><!--",
    "line\u2028separator\u2029 & &amp; ]]> --> end",
]


def sentences(n: int) -> list[str]:
    return [line for line in BUILTIN.read_text().splitlines() if line.strip()][:n]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "minilm"
    return actscope.profile(actscope.load(), sentences(36), sites="blocks.*.mlp.post,blocks.*.attn.pattern", out=out)


class Visit:
    """A page with every console message, page error, dialog and request recorded; any request
    other than the report file itself is aborted (and recorded)."""

    def __init__(self, browser, report: Path, width: int = 1280, height: int = 900) -> None:
        self.url = report.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.console, self.errors, self.dialogs, self.requests = [], [], [], []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.route("**/*", self._route)
        self.page.goto(self.url)

    def _route(self, route) -> None:
        self.requests.append(route.request.url)
        if route.request.url == self.url:
            route.continue_()
        else:
            route.abort()

    def search(self, text: str) -> None:
        self.page.fill("#unit-search", text)
        self.page.press("#unit-search", "Enter")

    def quiet(self) -> bool:
        return not [m for m in self.console if m[0] in ("error", "warning")] and not self.errors and not self.dialogs


@pytest.fixture(scope="module")
def minilm_page(browser, minilm_run):
    visit = Visit(browser, write_report(minilm_run))
    yield visit
    visit.page.close()


def screenshot_path(tmp_path: Path) -> Path:
    """docs/report.png when it is missing or ACTSCOPE_UPDATE_SCREENSHOT=1 (every run would
    otherwise rewrite a tracked image), else a scratch file."""
    docs_image = DOCS / "report.png"
    if os.environ.get("ACTSCOPE_UPDATE_SCREENSHOT") == "1" or not docs_image.exists():
        return docs_image
    return tmp_path / "report.png"


def test_page_loads_offline_with_no_errors_and_charts_render(minilm_page, tmp_path):
    page = minilm_page.page
    page.wait_for_selector("#neuron-table table")
    assert minilm_page.quiet(), (minilm_page.console, minilm_page.errors)
    assert minilm_page.requests == [minilm_page.url]  # nothing but the file itself
    sizes = page.evaluate("""[...document.querySelectorAll('svg.chart')].filter(s => !s.closest('[hidden]'))
        .map(s => { const r = s.getBoundingClientRect(); return [s.dataset.chart, r.width, r.height, s.querySelectorAll('rect,path,polyline').length]; })""")
    names = [s[0] for s in sizes]
    assert {"activation-ratio-0", "dead-units-0", "sink-heatmap"} <= set(names)
    assert sum(n.startswith("hist-") for n in names) == 6 and sum(n.startswith("firing-") for n in names) == 6
    assert all(w > 50 and h > 50 and shapes > 0 for _, w, h, shapes in sizes), sizes
    tables = page.evaluate("[...document.querySelectorAll('div.as-table')].map(d => d.querySelectorAll('tbody tr').length)")
    assert tables == [6, 20]  # layers (6 sites), heads (72, first page of 20)
    page.set_viewport_size({"width": 1200, "height": 1500})
    shot = screenshot_path(tmp_path)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    page.set_viewport_size({"width": 1280, "height": 900})


def test_search_by_unit_number_opens_its_card_with_top_examples(minilm_page, minilm_run):
    page = minilm_page.page
    minilm_page.search("blocks.2.mlp.post 17")
    page.wait_for_selector("#unit-card:not([hidden]) li.example")
    assert page.inner_text("#unit-count") == f"1 of {minilm_run.tables['neurons'].num_rows} units match"
    assert page.inner_text("#unit-card h3") == "blocks.2.mlp.post · unit 17"
    examples = minilm_run.to_pandas("examples")
    want = examples[(examples.site == "blocks.2.mlp.post") & (examples.unit == 17)].sort_values("rank")
    tokens = page.eval_on_selector_all("#unit-card li.example .tok", "els => els.map(e => e.textContent)")
    assert tokens == list(want.token)
    alphas = page.eval_on_selector_all("#unit-card li.example .tok",
                                       "els => els.map(e => parseFloat(getComputedStyle(e).backgroundColor.split(',')[3]))")
    assert alphas[0] == pytest.approx(0.9, abs=1e-3) and alphas == sorted(alphas, reverse=True)  # strongest = darkest
    stats = dict(zip(page.eval_on_selector_all("#unit-card dt", "els => els.map(e => e.textContent)"),
                     page.eval_on_selector_all("#unit-card dd", "els => els.map(e => e.textContent)")))
    neurons = minilm_run.to_pandas("neurons").set_index(["site", "unit"])
    assert float(stats["max"]) == pytest.approx(neurons.loc[("blocks.2.mlp.post", 17), "max"], rel=5e-4)
    minilm_page.search("17")  # a bare number: unit 17 of every site
    page.wait_for_function("document.querySelector('#unit-count').textContent.startsWith('6 of')")
    page.click("#neuron-table tbody tr:nth-child(4)")
    assert page.inner_text("#unit-card h3") == "blocks.3.mlp.post · unit 17"
    assert minilm_page.quiet()


def test_neuron_table_sorts_by_any_column_and_pages(minilm_page, minilm_run):
    page = minilm_page.page
    minilm_page.search("")
    page.wait_for_function("document.querySelector('#unit-count').textContent === '9216 units'")
    page.click("#neuron-table th:has-text('max')")  # numbers sort largest first
    neurons = minilm_run.to_pandas("neurons").sort_values("max", ascending=False, kind="stable")
    first = page.eval_on_selector_all("#neuron-table tbody tr", "rows => rows.map(r => r.children[0].textContent + ':' + r.children[2].textContent)")
    assert len(first) == 50
    assert first[:5] == [f"{s}:{u}" for s, u in zip(neurons.site[:5], neurons.unit[:5])]
    page.click("#neuron-table button:has-text('next')")
    assert "rows 51–100 of 9216" in page.inner_text("#neuron-table .pager")
    second = page.eval_on_selector_all("#neuron-table tbody tr", "rows => rows.map(r => r.children[0].textContent + ':' + r.children[2].textContent)")
    assert second[:3] == [f"{s}:{u}" for s, u in zip(neurons.site[50:53], neurons.unit[50:53])]
    page.click("#neuron-table th:has-text('max')")  # again: smallest first
    lowest = page.eval_on_selector("#neuron-table tbody tr:first-child td:nth-child(8)", "e => parseFloat(e.textContent)")
    assert lowest == pytest.approx(neurons["max"].min(), rel=5e-4)
    assert minilm_page.quiet()


def test_criterion_picker_switches_the_layer_charts(minilm_page):
    page = minilm_page.page
    visible = "[...document.querySelectorAll('.crit')].filter(p => !p.hidden).map(p => p.dataset.key)"
    assert page.evaluate(visible) == ["0"]
    page.select_option("select.crit-select", "3")
    assert page.evaluate(visible) == ["3"]
    assert page.eval_on_selector("svg[data-chart='activation-ratio-3']", "s => s.getBoundingClientRect().height") > 50


# -- security -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> tuple[Path, actscope.Run]:
    """MiniLM over a corpus of markup-looking strings; then the exact strings are also planted
    in contexts, decoded tokens and a generic table, since the tokenizer splits them apart."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    run = actscope.profile(actscope.load(), sentences(12) + HOSTILE, sites="blocks.0-1.mlp.post", out=out)
    examples = run.tables["examples"]
    rows = examples.num_rows
    planted = {part: [HOSTILE[(i + shift) % len(HOSTILE)] if i < 8 else v for i, v in enumerate(examples.column(part).to_pylist())]
               for shift, part in enumerate(("left", "token", "right"))}
    examples = examples.set_column(examples.column_names.index("left"), "left", pa.array(planted["left"]))
    examples = examples.set_column(examples.column_names.index("token"), "token", pa.array(planted["token"]))
    examples = examples.set_column(examples.column_names.index("right"), "right", pa.array(planted["right"]))
    assert examples.num_rows == rows
    decoded = pa.table({"site": ["blocks.0.mlp.post"] * 5, "layer": [0] * 5, "unit": [0] * 5, "rank": list(range(5)), "token": HOSTILE,
                        "score": [5.0, 4.0, 3.0, 2.0, 1.0], "direction": ["promoted"] * 3 + ["suppressed"] * 2})
    notes = pa.table({"note": HOSTILE, "n": list(range(5))})
    hostile = replace(run, tables={**run.tables, "examples": examples, "decoded": decoded, HOSTILE[1]: notes})
    return write_report(hostile), hostile


def test_markup_in_the_data_never_executes_or_becomes_elements(browser, hostile_report):
    path, run = hostile_report
    text = path.read_text()
    body = text[:text.index('<script type="application/json"')]
    assert not any(h in body for h in HOSTILE) and "<img" not in text and "<b>" not in text
    visit = Visit(browser, path)
    page = visit.page
    visit.search("blocks.0.mlp.post 0")
    page.wait_for_selector("#unit-card:not([hidden]) li.example")
    page.click("nav a:has-text('Table: <img')")
    page.wait_for_timeout(300)  # give any stray handler (img onerror, svg onload) its chance
    injected = page.evaluate("""({pwned: String(window.__pwned), scripts: document.scripts.length,
        elements: document.querySelectorAll('img, b, iframe, object, embed, [onerror], [onload], svg:not(.chart)').length})""")
    assert injected == {"pwned": "undefined", "scripts": 2, "elements": 0}
    assert visit.quiet(), (visit.console, visit.errors, visit.dialogs)
    assert visit.requests == [visit.url]
    card = page.eval_on_selector_all("#unit-card li.example", "els => els.map(e => [...e.children].map(c => c.textContent))")
    assert [c[1] for c in card] == [HOSTILE[(i + 1) % 5] for i in range(8)]  # the token, shown as text
    assert [card[0][0], card[2][0]] == [HOSTILE[0] + " ", HOSTILE[2] + " "]  # left contexts (≤ 48 chars: whole)
    chips = page.eval_on_selector_all("#unit-card .chips span", "els => els.map(e => e.textContent)")
    assert chips == HOSTILE
    cells = page.eval_on_selector_all("div.as-table[data-table^='<img'] tbody td.text", "els => els.map(e => e.textContent)")
    assert cells == HOSTILE
    page.close()


# -- scale ----------------------------------------------------------------------------------
def test_100k_unit_report_opens_and_stays_responsive(browser, tmp_path):
    from test_report import synthetic_run

    path = write_report(synthetic_run(), tmp_path / "big.html")
    start = time.perf_counter()
    visit = Visit(browser, path)
    visit.page.wait_for_selector("#neuron-table tbody tr")
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    visit.search("blocks.7.mlp.post 9999")
    visit.page.wait_for_selector("#unit-card:not([hidden]) li.example")
    searched = time.perf_counter() - start
    start = time.perf_counter()
    visit.page.click("#neuron-table th:has-text('mean')")
    visit.search("")
    visit.page.wait_for_function("document.querySelector('#unit-count').textContent === '100000 units'")
    sorted_all = time.perf_counter() - start
    print(f"100k units: {path.stat().st_size / 1e6:.1f} MB, load {loaded:.2f} s, search {searched:.2f} s, sort {sorted_all:.2f} s")
    assert visit.page.inner_text("#unit-card h3") == "blocks.7.mlp.post · unit 9999"
    assert visit.page.eval_on_selector_all("#neuron-table tbody tr", "rows => rows.length") == 50  # the DOM holds one page
    assert loaded < 15 and searched < 5 and sorted_all < 5  # generous: a loaded 2-core machine
    assert visit.quiet() and visit.requests == [visit.url]
    visit.page.close()


# -- bidirectional text ---------------------------------------------------------------------
# The box of ``user`` (a string in the element at ``selector``) and of ``after`` (fixed text
# that follows it): with the user text isolated, ``after`` starts right of it on the same line.
BOXES = """([selector, user, after]) => {
  const root = document.querySelector(selector);
  const box = (text) => {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const at = node.data.indexOf(text);
      if (at < 0) continue;
      const range = document.createRange();
      range.setStart(node, at);
      range.setEnd(node, at + text.length);
      const r = range.getBoundingClientRect();
      return {left: r.left, right: r.right, top: Math.round(r.top),
              bidi: getComputedStyle(node.parentElement).unicodeBidi};
    }
    return null;
  };
  return [box(user), box(after)];
}"""


@pytest.fixture(scope="module")
def bidi_visit(browser, tmp_path_factory):
    run = bidi_run(tmp_path_factory.mktemp("bidi-browser"))
    visit = Visit(browser, write_report(run))
    yield visit, run
    visit.page.close()


def follows(visit: Visit, selector: str, user: str, after: str) -> tuple[dict, dict]:
    user_box, after_box = visit.page.evaluate(BOXES, [selector, user, after])
    assert user_box is not None and after_box is not None, (selector, user, after)
    assert user_box["top"] == after_box["top"], (user_box, after_box)  # one line, so left/right compare
    return user_box, after_box


def test_user_text_in_the_header_cannot_reorder_the_page_text(bidi_visit):
    visit, run = bidi_visit
    source = run.manifest["data"]["source"]
    for selector, user, after in (('dd[data-field="model"]', BIDI_MODEL, run.manifest["model"]["class"]),
                                  ('dd[data-field="data"]', source, "documents"),
                                  ('dd[data-field="sites"]', BIDI_SITE, "blocks.1.mlp.post")):
        user_box, after_box = follows(visit, selector, user, after)
        assert user_box["bidi"] == "isolate", (selector, user_box)
        assert after_box["left"] >= user_box["right"] - 0.5, (selector, user_box, after_box)
    for selector, user in (("header h1", BIDI_MODEL), ("header p.note", str(run.path)), ("nav", BIDI_TABLE),
                           ("section:last-of-type h2", BIDI_TABLE)):
        box = visit.page.evaluate(BOXES, [selector, user, user])[0]
        assert box is not None and box["bidi"] == "isolate", (selector, box)
    assert visit.quiet(), (visit.console, visit.errors)


def test_data_set_text_in_the_neuron_card_is_isolated(bidi_visit):
    visit, run = bidi_visit
    page = visit.page
    visit.search(f"{BIDI_SITE} 0")
    page.wait_for_selector("#unit-card:not([hidden]) li.example")
    site_box, unit_box = follows(visit, "#unit-card h3", BIDI_SITE, "unit 0")
    assert site_box["bidi"] == "isolate" and unit_box["left"] >= site_box["right"] - 0.5
    parts = page.eval_on_selector("#unit-card li.example", """li => [...li.children].filter(c => !c.matches('.window')).map(c => {
        const r = c.getBoundingClientRect();
        return [c.className, r.left, r.right, (r.top + r.bottom) / 2, getComputedStyle(c).unicodeBidi, c.textContent]; })""")
    assert [p[0] for p in parts] == ["ctx left", "tok", "ctx right", "meta"]  # (the activation window is the next line)
    assert parts[0][5].startswith(RLO)
    assert all(p[4] == "isolate" for p in parts[:3]), parts
    assert max(p[3] for p in parts) - min(p[3] for p in parts) < 6, parts  # one line (the meta's font is smaller)
    assert all(parts[i + 1][1] >= parts[i][2] - 0.5 for i in range(3)), parts  # left to right, in reading order
    cells = page.eval_on_selector_all(f'div.as-table[data-table="{BIDI_TABLE}"] td.text, #neuron-table td.text',
                                      "els => els.filter(e => e.textContent.includes('\\u202e')).map(e => getComputedStyle(e).unicodeBidi)")
    assert cells and set(cells) == {"isolate"}, cells
    assert visit.quiet(), (visit.console, visit.errors)
