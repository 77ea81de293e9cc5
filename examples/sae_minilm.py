"""The worked example of docs/sae.md: an SAE trained here on MiniLM, its reconstruction quality,
and its top features' pages in the report (a PNG made in headless Chromium).

1. split the built-in corpus: the first 290 sentences to train on, the last 73 held out;
2. harvest ``blocks.3.resid.post`` on the training sentences (``actscope harvest``);
3. train a standard (ReLU + L1) SAE, 1536 features, 1000 steps of 512 tokens (``actscope train-sae``);
4. profile its features on the whole corpus (the report) and on the held-out sentences alone
   (reconstruction quality on text it was not trained on);
5. screenshot the cards of the three features with the highest maximum among those firing on
   0.3–2 % of tokens (needs ``chromium`` and the ``playwright`` package; skipped without them).

Run (about 3 minutes on 2 CPU cores):
    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python examples/sae_minilm.py [WORKDIR] [PNG]
"""
from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path


def actscope(*args: str) -> None:
    print("$ actscope", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "actscope", *args], check=True)


def main(work: Path, png: Path | None) -> None:
    import actscope as api

    work.mkdir(parents=True, exist_ok=True)
    lines = [line for line in files("actscope.data").joinpath("builtin.txt").read_text().splitlines() if line.strip()]
    (work / "train.txt").write_text("\n".join(lines[:290]) + "\n")
    (work / "held.txt").write_text("\n".join(lines[290:]) + "\n")
    w = lambda name: str(work / name)  # noqa: E731
    actscope("harvest", "--data", w("train.txt"), "--sites", "blocks.3.resid.post", "--out", w("acts"), "--overwrite")
    actscope("train-sae", "--activations", w("acts"), "--site", "blocks.3.resid.post", "--d-sae", "1536", "--l1", "2",
             "--steps", "1000", "--batch-size", "512", "--out", w("sae-minilm"), "--overwrite")
    actscope("profile", "--sae", w("sae-minilm"), "--out", w("run-minilm"), "--overwrite")
    actscope("profile", "--data", w("held.txt"), "--sae", w("sae-minilm"), "--out", w("run-held"), "--overwrite", "--no-report")
    neurons = api.open_run(work / "run-minilm").to_pandas("neurons")
    chosen = neurons[(neurons.frac_pos > 0.003) & (neurons.frac_pos < 0.02)].sort_values("max", ascending=False).unit[:3].tolist()
    print("features shown:", chosen)
    if png is not None and shutil.which("chromium"):
        screenshot(work / "run-minilm" / "report.html", png, chosen)
        print("screenshot:", png)


def screenshot(report: Path, out: Path, units: list[int], site: str = "blocks.3.resid.post.sae") -> None:
    """The report's card of each unit, side by side in one PNG."""
    from playwright.sync_api import sync_playwright

    url = report.resolve().as_uri()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 860, "height": 1000})
        page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())  # offline
        page.goto(url)
        page.wait_for_selector("#neuron-table table")
        cards = []
        for unit in units:
            page.fill("#unit-search", f"{site} {unit}")
            page.press("#unit-search", "Enter")
            page.wait_for_selector("#unit-card:not([hidden]) li.example")
            cards.append(base64.b64encode(page.query_selector("#unit-card").screenshot()).decode())
        sheet = browser.new_page(viewport={"width": 100, "height": 100})
        images = "".join(f'<img src="data:image/png;base64,{card}" style="display:block">' for card in cards)
        sheet.set_content(f'<body style="margin:0;background:#fff"><div id="s" style="display:inline-flex;gap:12px;padding:12px;'
                          f'align-items:flex-start">{images}</div></body>')
        sheet.query_selector("#s").screenshot(path=str(out))
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "sae-example"), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
