"""The report never replaces a file actscope did not write, writes atomically, and isolates every
piece of user text from the page's own text (bidirectional-text controls such as U+202E)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest

import actscope
from actscope.errors import InputError
from actscope.report import write_report

RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: reverses all that follows, up to the end of its isolate
BUILTIN = Path(actscope.__file__).parent / "data" / "builtin.txt"
USER_TEXT = "my notes: do not overwrite\n"


def sentences(n: int) -> list[str]:
    return [line for line in BUILTIN.read_text().splitlines() if line.strip()][:n]


def cli(*args: str):
    from typer.testing import CliRunner

    from actscope.cli.main import app

    return CliRunner(env={"COLUMNS": "200"}).invoke(app, list(args))


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A tiny llama run on disk, without its report (each test copies it)."""
    from actscope.zoo.tiny import tiny_model

    model, inputs = tiny_model("llama")
    out = tmp_path_factory.mktemp("safety") / "tiny"
    actscope.profile(actscope.wrap(model), [inputs], sites="blocks.*.mlp.post", out=out)
    return out


@pytest.fixture
def run_dir(saved_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


# -- overwriting ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_users_file_at_out_is_never_replaced(run_dir, tmp_path, flags):
    notes = tmp_path / "notes.txt"
    notes.write_text(USER_TEXT)
    result = cli("report", str(run_dir), "--out", str(notes), *flags)
    assert result.exit_code == 2, result.output
    assert f"{notes} exists and was not written by actscope" in said(result)
    assert "choose another --out or remove it yourself" in said(result)
    assert notes.read_text() == USER_TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]  # no temporary left


def test_the_api_refuses_a_users_file_even_with_overwrite(run_dir, tmp_path):
    notes = tmp_path / "page.html"
    notes.write_text("<!DOCTYPE html><html><head><title>my page</title></head><body>mine</body></html>")
    with pytest.raises(InputError, match="was not written by actscope"):
        write_report(run_dir, notes, overwrite=True)
    assert "mine" in notes.read_text()


def test_an_existing_actscope_report_needs_overwrite(run_dir, tmp_path):
    page = tmp_path / "page.html"
    assert cli("report", str(run_dir), "--out", str(page)).exit_code == 0
    before = page.stat()
    again = cli("report", str(run_dir), "--out", str(page))
    assert again.exit_code == 2, again.output
    assert f"{page} is an actscope report already; pass --overwrite to replace it" in said(again)
    assert (page.stat().st_ino, page.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    replaced = cli("report", str(run_dir), "--out", str(page), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert page.stat().st_ino != before.st_ino  # a new file, renamed into place
    with pytest.raises(InputError, match="pass --overwrite"):
        write_report(run_dir, page)
    assert write_report(run_dir, page, overwrite=True) == page


def test_the_runs_own_report_regenerates_without_the_flag(run_dir):
    own = run_dir / "report.html"
    first = cli("report", str(run_dir))
    assert first.exit_code == 0, first.output
    assert '<meta name="generator" content="actscope-report">' in own.read_text()[:4096]
    inode = own.stat().st_ino
    for args in ([], ["--out", str(own)]):  # named explicitly, it is still the run's own report
        again = cli("report", str(run_dir), *args)
        assert again.exit_code == 0, again.output
        assert own.stat().st_ino != inode
        inode = own.stat().st_ino


def test_an_unmarked_report_of_actscope_0_1_is_still_recognised(run_dir):
    from actscope.report import render_report
    from actscope.report.html import MARKER

    own = run_dir / "report.html"
    own.write_text(render_report(run_dir).replace(MARKER, ""))  # what 0.1.0 wrote
    assert cli("report", str(run_dir)).exit_code == 0
    assert MARKER in own.read_text()[:200]
    own.write_text("<!DOCTYPE html>\n<html><head><title>actscope report · my copy</title></head></html>")
    assert cli("report", str(run_dir), "--overwrite").exit_code == 2  # the title alone is not enough


def test_a_users_report_html_in_the_run_is_refused(run_dir):
    own = run_dir / "report.html"
    own.write_text("<html><body>my own write-up of this run</body></html>")
    for flags in ([], ["--overwrite"]):
        result = cli("report", str(run_dir), *flags)
        assert result.exit_code == 2, result.output
        assert f"{own} exists and was not written by actscope" in said(result)
        assert "my own write-up" in own.read_text()


def test_a_dangling_link_or_a_fifo_at_out_is_refused(run_dir, tmp_path):
    link = tmp_path / "link.html"
    link.symlink_to(tmp_path / "nowhere.html")
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    for target in (link, fifo):  # a fifo must not be opened: reading it would wait forever
        result = cli("report", str(run_dir), "--out", str(target), "--overwrite")
        assert result.exit_code == 2, result.output
        assert "was not written by actscope" in said(result)
    assert link.is_symlink() and not (tmp_path / "nowhere.html").exists()


def test_a_full_disk_leaves_no_temporary_and_exits_2(run_dir, tmp_path, monkeypatch):
    def half_then_full(self, data, *args, **kwargs):
        with open(self, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    monkeypatch.setattr(Path, "write_text", half_then_full)
    out = tmp_path / "pages"
    out.mkdir()
    result = cli("report", str(run_dir), "--out", str(out / "page.html"))
    assert result.exit_code == 2, result.output
    assert f"cannot write {out / 'page.html'}: no space left" in said(result)
    assert list(out.iterdir()) == []


def test_the_folder_is_checked_before_the_page_is_built(run_dir, tmp_path, monkeypatch):
    import actscope.report as report
    from actscope.errors import RunDirError

    def unwritable(target, what="--out"):
        raise RunDirError(f"cannot write {target}: not writable; choose another {what}")

    def never(run):
        raise AssertionError("rendered before the target was checked")

    monkeypatch.setattr("actscope.store.files.check_writable", unwritable)
    monkeypatch.setattr(report, "render_report", never)
    result = cli("report", str(run_dir), "--out", str(tmp_path / "page.html"))
    assert result.exit_code == 2, result.output
    assert "not writable; choose another --out" in said(result)


def test_console_output_escapes_rich_markup_in_paths(run_dir, tmp_path):
    folder = tmp_path / "[bold]x[red]y"
    folder.mkdir()
    result = cli("report", str(run_dir), "--out", str(folder / "page.html"))
    assert result.exit_code == 0, result.output
    assert f"Report: {folder / 'page.html'}" in said(result)


# -- bidirectional text -----------------------------------------------------------------------
BIDI_MODEL = f"tiny{RLO}ledom"
BIDI_SITE = f"blocks.0.mlp.post{RLO}x"
BIDI_TABLE = f"notes{RLO}eton"


def _renamed(value, old: str, new: str):
    """``value`` (a manifest) with ``old`` replaced by ``new`` in every string."""
    return json.loads(json.dumps(value, ensure_ascii=True).replace(old, json.dumps(new)[1:-1]))


def _with_site(table: pa.Table, old: str, new: str) -> pa.Table:
    sites = [new if s == old else s for s in table.column("site").to_pylist()]
    return table.set_column(table.column_names.index("site"), "site", pa.array(sites))


def bidi_run(folder: Path) -> actscope.Run:
    """MiniLM over a data file whose path holds U+202E, saved to a folder whose name holds one;
    then the model name, one site (tables, arrays, plan), a generic table's name and values,
    and the left context of the first examples also get one."""
    data = folder / f"data{RLO}txt.txt"
    data.write_text("\n".join(sentences(10) + [f"An override {RLO}reversed text{RLO} inside a document."]) + "\n")
    run = actscope.profile(actscope.load(), str(data), sites="blocks.0-1.mlp.post", out=folder / f"run{RLO}nur")
    old = "blocks.0.mlp.post"
    manifest = _renamed({**run.manifest, "model": {**run.manifest["model"], "name": BIDI_MODEL}}, old, BIDI_SITE)
    tables = {name: _with_site(t, old, BIDI_SITE) if "site" in t.column_names else t for name, t in run.tables.items()}
    examples = tables["examples"]
    left = [f"{RLO}override in a context" if i < 4 else v for i, v in enumerate(examples.column("left").to_pylist())]
    tables["examples"] = examples.set_column(examples.column_names.index("left"), "left", pa.array(left))
    tables[BIDI_TABLE] = pa.table({"site": [BIDI_SITE, "plain"], "value": [1.0, 2.0]})
    arrays = {name.replace(old, BIDI_SITE): array for name, array in run.arrays.items()}
    return replace(run, manifest=manifest, tables=tables, arrays=arrays)


@pytest.fixture(scope="module")
def bidi_page(tmp_path_factory) -> tuple[actscope.Run, str]:
    run = bidi_run(tmp_path_factory.mktemp("bidi"))
    return run, write_report(run).read_text()


class Isolation(HTMLParser):
    """Each rendered piece of text with a U+202E, and whether an element around it
    isolates it (``<bdi>`` or ``dir="auto"``); script contents are not rendered text."""

    VOID = {"meta", "link", "input", "br", "hr", "img", "col", "area", "base", "wbr", "source"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.found: list[tuple[str, bool, list[str]]] = []
        self.svg_text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        tags = [t for t, _ in self.stack]
        if "script" in tags or "style" in tags:
            return
        if "svg" in tags:
            self.svg_text.append(data)
        if RLO in data:
            isolated = any(t == "bdi" or a.get("dir") == "auto" for t, a in self.stack)
            self.found.append((data, isolated, tags))


def test_every_user_string_with_a_bidi_control_is_isolated(bidi_page):
    run, text = bidi_page
    page = Isolation(text)
    shown = [data for data, _, _ in page.found]
    for user in (BIDI_MODEL, BIDI_SITE, BIDI_TABLE, str(run.path), run.manifest["data"]["source"]):
        assert any(user in data for data in shown), (user, shown)
    assert [(data, tags) for data, isolated, tags in page.found if not isolated] == []
    head = text[:text.index("</title>")]
    assert RLO not in head  # the page title is plain text: controls removed, the name in FSI…PDI
    assert f"actscope report · \u2068tiny{'ledom'}\u2069" in head


def test_chart_labels_carry_no_bidi_controls_but_keep_the_name(bidi_page):
    _, text = bidi_page
    page = Isolation(text)
    assert not [t for t in page.svg_text if RLO in t]
    stripped = BIDI_SITE.replace(RLO, "")
    assert sum(stripped in t for t in page.svg_text) >= 3  # a bar label, a histogram and a firing title


def test_the_marker_comes_first(bidi_page):
    _, text = bidi_page
    assert '<meta name="generator" content="actscope-report">' in text[:200]
