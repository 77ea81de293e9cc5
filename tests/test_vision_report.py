"""The report of a CNN fed images: thumbnails in the neuron browser, offline and inert, under 20 MB."""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import actscope
from actscope.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from actscope.zoo.digits import digit_images, load_digits_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = actscope.wrap(load_digits_cnn(), name="digits-cnn")
        run = actscope.profile(model, digit_images(), sites="module:0@output,module:2@output,module:5@output", spatial="max",
                               out=tmp_path_factory.mktemp("digits") / "run", batch_size=128)
    finally:
        torch.set_num_threads(threads)
    return run


def test_report_holds_every_thumbnail_and_stays_small(digits_run):
    report = write_report(digits_run)
    html = report.read_text(encoding="utf-8")
    assert report.stat().st_size < 20_000_000
    shown = digits_run.to_pandas("images")
    assert len(shown) == (8 + 16 + 32) * 8  # every unit's 8 top images: within the run's byte budget
    first = base64.b64encode(shown.png.iloc[0]).decode()
    assert first in html  # as a data: URI, the only images the page's policy allows
    assert "img-src data:" in html


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: install Debian's package (`sudo apt-get install -y chromium`, or run `make test`)")
def test_neuron_browser_shows_the_top_images(digits_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]'")
    report = write_report(digits_run)
    url, requests, problems = report.resolve().as_uri(), [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.route("**/*", lambda route: (requests.append(route.request.url),
                                          route.continue_() if route.request.url == url else route.abort()))
        page.goto(url)
        page.fill("#unit-search", "module:5@output 7")
        page.press("#unit-search", "Enter")
        page.wait_for_selector("#unit-card:not([hidden]) img.thumb")
        sizes = page.eval_on_selector_all("#unit-card img.thumb", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        assert len(sizes) == 8 and all(done and w > 0 and h > 0 for done, w, h in sizes)
        assert requests == [url] and problems == []
        samples = page.eval_on_selector_all("#unit-card li.sample .tok", "els => els.map(e => e.textContent)")
        assert samples and all(text.startswith("image ") for text in samples)  # an image run's samples name their image
        page.eval_on_selector("#unit-card", "e => e.scrollIntoView()")
        shot = DOCS / "vision_report.png"
        if os.environ.get("ACTSCOPE_UPDATE_SCREENSHOT") != "1" and shot.exists():
            shot = tmp_path / "vision_report.png"
        page.locator("#unit-card").screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        browser.close()
    values = digits_run.to_pandas("examples")
    top = values[(values.site == "module:5@output") & (values.unit == 7)].sort_values("rank").value.to_numpy()
    assert np.all(np.diff(top) <= 0)
