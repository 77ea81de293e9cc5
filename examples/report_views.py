"""The screenshots of docs/report.md: a MiniLM unit page (with its decoded tokens), the logit and
tuned lens grid and a steering sweep on the zoo's tiny causal LM, each made with the commands a
user runs and photographed in headless Chromium (offline: every request but the file refused).

1. ``actscope profile --sites blocks.2.mlp.post`` over the built-in corpus, then ``actscope decode
   --site blocks.2.mlp.post --out RUN`` (the promoted and suppressed tokens join the unit pages);
   the card of unit 17 → ``unit-page.png``;
2. ``actscope lens TINY_LM --prompt … --tuned --data held.txt --out LM_RUN`` → ``lens.png``;
3. ``actscope steer TINY_LM --positive … --negative … --sweep 0,0.25,0.5,1,2 --target ' nuvuent'
   --out LM_RUN`` → ``steering.png``.

Run (about 2 minutes on 2 CPU cores; needs ``chromium`` and the ``playwright`` package):
    HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python examples/report_views.py [WORKDIR] [PNG_FOLDER]
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SITE, UNIT = "blocks.2.mlp.post", 17
LENS_PROMPT = "Siri feneet un peo . shi gasoet los kelion"


def actscope(*args: str) -> None:
    print("$ actscope", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "actscope", *args], check=True)


def main(work: Path, pngs: Path) -> None:
    from actscope.zoo import held_out_corpus, tiny_lm

    work.mkdir(parents=True, exist_ok=True)
    pngs.mkdir(parents=True, exist_ok=True)
    w = lambda name: str(work / name)  # noqa: E731
    actscope("profile", "--sites", SITE, "--out", w("run-minilm"), "--overwrite")
    actscope("decode", "--site", SITE, "--top", "8", "--out", w("run-minilm"), "--show", "0")
    lm = str(tiny_lm("relu"))
    (work / "held.txt").write_text("\n".join(held_out_corpus(300)) + "\n")
    (work / "pos.txt").write_text("los kelion\nlas zian\n")
    (work / "neg.txt").write_text("lo kelio\nla zia\n")
    actscope("lens", lm, "--prompt", LENS_PROMPT, "--tuned", "--data", w("held.txt"), "--out", w("run-lm"))
    actscope("steer", lm, "--positive", w("pos.txt"), "--negative", w("neg.txt"), "--site", "blocks.0.resid.post", "--tokens", "last",
             "--scale", "1", "--prompt", "lo kelio", "--prompt", "la mua", "--sweep", "0,0.25,0.5,1,2", "--target", " nuvuent",
             "--max-new-tokens", "8", "--out", w("run-lm"))
    if not shutil.which("chromium"):
        print("no chromium on PATH: no screenshots")
        return
    shoot(work / "run-minilm" / "report.html", pngs / "unit-page.png", card=f"{SITE} {UNIT}")
    shoot(work / "run-lm" / "report.html", pngs / "lens.png", section="lens")
    shoot(work / "run-lm" / "report.html", pngs / "steering.png", section="steering")


def shoot(report: Path, out: Path, *, card: str | None = None, section: str | None = None) -> None:
    """A PNG of one unit's card (searched as a user types it) or of one section of the report."""
    from playwright.sync_api import sync_playwright

    url = report.resolve().as_uri()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1180, "height": 1000})
        page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())  # offline
        page.goto(url)
        if card is not None:
            page.wait_for_selector("#neuron-table table")
            page.fill("#unit-search", card)
            page.press("#unit-search", "Enter")
            page.wait_for_selector("#unit-card:not([hidden]) li.example .window")
            page.query_selector("#unit-card").screenshot(path=str(out))
        else:
            page.wait_for_selector(f"section#{section}")
            page.wait_for_timeout(300)  # tables and charts drawn
            page.query_selector(f"section#{section}").screenshot(path=str(out))
        browser.close()
    print("screenshot:", out, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "report-views"), Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs"))
