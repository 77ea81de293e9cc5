"""`actscope query`: DuckDB SQL over a run's tables, checked against pandas on the same files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.report import query_run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "report.md"
BUILTIN = Path(actscope.__file__).parent / "data" / "builtin.txt"
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    texts = [line for line in BUILTIN.read_text().splitlines() if line.strip()][:12] + ["[bold red]not markup[/] here"]
    out = tmp_path_factory.mktemp("query") / "run"
    return actscope.profile(actscope.load(), texts, sites="blocks.0-1.mlp.post,blocks.*.attn.pattern", out=out)


def query(*args: str):
    return runner.invoke(app, ["query", *args])


def test_every_table_is_a_view_under_its_run_name(run):
    for name in run.tables:
        result = query_run(run.path, f"SELECT count(*) FROM {name}")
        assert result.rows == [(run.tables[name].num_rows,)], name


def test_aggregates_match_pandas(run):
    neurons = run.to_pandas("neurons")
    result = query_run(run.path, "SELECT site, count(*) AS units, sum(CASE WHEN frac_pos = 0 THEN 1 ELSE 0 END) AS dead, "
                                 "avg(frac_pos) AS firing FROM neurons GROUP BY site ORDER BY site")
    naive = neurons.groupby("site").agg(units=("unit", "size"), dead=("frac_pos", lambda s: int((s == 0).sum())), firing=("frac_pos", "mean"))
    assert result.columns == ("site", "units", "dead", "firing")
    assert [r[0] for r in result.rows] == list(naive.index)
    for site, units, dead, firing in result.rows:
        assert (units, dead) == (naive.units[site], naive.dead[site])
        assert firing == pytest.approx(naive.firing[site], rel=1e-9)
    layers = run.to_pandas("layers").set_index("site")
    assert [int(d) for d in layers.dead_units[list(naive.index)]] == [r[2] for r in result.rows]  # the run agrees


def test_join_examples_to_neurons(run):
    result = query_run(run.path, "SELECT n.site, n.unit, e.value, n.max FROM neurons n JOIN examples e USING (site, unit) "
                                 "WHERE e.rank = 0 ORDER BY n.site, n.unit")
    assert len(result.rows) == run.tables["neurons"].num_rows
    assert all(value == pytest.approx(peak, rel=1e-6) for _, _, value, peak in result.rows)  # rank 0 is the unit's max


def test_cli_prints_a_table_and_counts_rows(run):
    result = query(str(run.path), "SELECT site, activation_ratio, dead_units FROM layers ORDER BY layer")
    assert result.exit_code == 0, result.output
    layers = run.to_pandas("layers").sort_values("layer")
    for site, ratio in zip(layers.site, layers.activation_ratio):
        assert re.search(rf"{re.escape(site)}\s*│\s*{ratio:.6g}\s*│", result.output), result.output
    assert "2 rows" in result.output
    limited = query(str(run.path), "SELECT * FROM neurons", "--max-rows", "3")
    assert limited.exit_code == 0 and "3 rows (more rows left out; raise --max-rows)" in limited.output


def test_cli_shows_data_text_verbatim(run):
    result = query(str(run.path), "SELECT DISTINCT token FROM examples WHERE token LIKE '%bold%' OR token = '['")
    assert result.exit_code == 0, result.output
    text = query(str(run.path), "SELECT '[bold red]not markup[/]' AS s")
    assert "[bold red]not markup[/]" in text.output


@pytest.mark.parametrize(("args", "message"), [
    (["{run}", "SELEC 1"], "the SQL failed"),
    (["{run}", "SELECT * FROM nope"], "Tables in this run: neurons, layers, examples, heads"),
    (["{missing}", "SELECT 1"], "no run directory"),
    (["{empty}", "SELECT 1"], "not an actscope run"),
    (["{run}", "SELECT 1", "--max-rows", "0"], "--max-rows must be at least 1"),
])
def test_bad_sql_or_run_exits_2(run, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"run": run.path, "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    result = query(*[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_the_documented_queries_run(run):
    queries = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(queries) >= 3
    for sql in queries:
        result = query_run(run.path, sql)
        assert result.columns and result.rows, sql
