"""`actscope query` reads the run's tables and nothing else: no other file, no write, no network,
no extension, no way to turn the lock off. Each escape is tried and must be refused with the rule."""
from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actscope.cli.main import app
from actscope.errors import InputError
from actscope.report import query_run
from actscope.store import write_run

runner = CliRunner(env={"COLUMNS": "200"})
RULE = ("reads only the run's tables, by name (neurons, layers); it cannot read other files, "
        "write files, attach databases, load extensions or change settings")
SECRET = "s3cr3t-value-outside-the-run"


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A small run in tmp_path/run, with a secret CSV and a Parquet file beside it (outside)."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # DuckDB keeps extensions and secrets under ~/.duckdb
    root = write_run(tmp_path / "run", manifest={"kind": "test"}, tables={
        "neurons": {"site": ["a", "a", "b"], "unit": [0, 1, 0], "frac_pos": [0.0, 0.5, 0.25]},
        "layers": {"site": ["a", "b"], "dead_units": [1, 0]},
    })
    (tmp_path / "secret.csv").write_text(f"key,value\npassword,{SECRET}\n")
    write_run(tmp_path / "other", manifest={"kind": "test"}, tables={"leak": {"value": [SECRET]}})
    return root


def refused(run_dir: Path, sql: str) -> str:
    with pytest.raises(InputError) as caught:
        query_run(run_dir, sql)
    message = " ".join(str(caught.value).split())
    assert "actscope query refused this SQL" in message and RULE in message, message
    assert SECRET not in message
    return message


def test_the_tables_and_joins_still_work(run):
    result = query_run(run, "SELECT n.site, count(*) AS units, max(l.dead_units) AS dead FROM neurons n "
                            "JOIN layers l USING (site) GROUP BY n.site ORDER BY n.site")
    assert result.rows == [("a", 2, 1), ("b", 1, 0)]


def test_a_file_outside_the_run_cannot_be_read(run, tmp_path):
    message = refused(run, f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')")
    assert "Cannot access file" in message
    refused(run, f"SELECT * FROM read_text('{tmp_path / 'secret.csv'}')")
    refused(run, "SELECT * FROM read_csv('/etc/passwd')")
    refused(run, f"SELECT * FROM glob('{tmp_path}/*')")


def test_a_parquet_file_outside_the_run_cannot_be_read(run, tmp_path):
    refused(run, f"SELECT * FROM read_parquet('{tmp_path / 'other' / 'leak.parquet'}')")


def test_dot_dot_cannot_leave_the_run(run):
    refused(run, f"SELECT * FROM read_csv('{run}/../secret.csv')")
    refused(run, f"SELECT * FROM read_parquet('{run}/neurons.parquet/../../other/leak.parquet')")


def test_a_symlink_inside_the_run_cannot_lead_out(run, tmp_path):
    (run / "link.csv").symlink_to(tmp_path / "secret.csv")
    (run / "up").symlink_to(tmp_path, target_is_directory=True)
    refused(run, f"SELECT * FROM read_csv('{run / 'link.csv'}')")
    refused(run, f"SELECT * FROM read_csv('{run / 'up' / 'secret.csv'}')")


def test_files_of_the_run_are_read_only_through_the_table_names(run):
    refused(run, f"SELECT * FROM read_json('{run / 'manifest.json'}')")
    refused(run, f"SELECT * FROM read_parquet('{run / 'neurons.parquet'}')")


def test_copy_cannot_write_a_file(run, tmp_path):
    target = tmp_path / "x.csv"
    refused(run, f"COPY (SELECT 1) TO '{target}'")
    assert not target.exists()


def test_copy_cannot_overwrite_the_runs_own_table(run):
    table = run / "neurons.parquet"
    before = table.read_bytes()
    refused(run, f"COPY (SELECT 99 AS x) TO '{table}' (FORMAT parquet, USE_TMP_FILE false)")
    assert table.read_bytes() == before
    assert query_run(run, "SELECT count(*) FROM neurons").rows == [(3,)]


def test_export_database_cannot_write(run, tmp_path):
    refused(run, f"EXPORT DATABASE '{tmp_path / 'export'}'")
    assert not (tmp_path / "export").exists()


def test_attach_of_a_database_file_is_refused(run, tmp_path):
    refused(run, f"ATTACH '{tmp_path / 'other.duckdb'}' AS other")
    assert not (tmp_path / "other.duckdb").exists()


@pytest.mark.parametrize("sql", ["INSTALL httpfs", "FORCE INSTALL httpfs", "LOAD httpfs"])
def test_extensions_cannot_be_installed_or_loaded(run, tmp_path, sql):
    refused(run, sql)
    assert not (tmp_path / "home" / ".duckdb").exists()  # nothing was downloaded or unpacked


def test_the_network_is_never_reached(run, tmp_path):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a\n1\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        refused(run, f"SELECT * FROM read_csv('http://127.0.0.1:{server.server_port}/x.csv')")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert hits == []
    assert not (tmp_path / "home" / ".duckdb").exists()  # no httpfs was auto-installed either


@pytest.mark.parametrize("sql", [
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET allowed_paths = ['/etc/passwd']",
    "SET autoinstall_known_extensions = true",
    "RESET enable_external_access",
    "SET lock_configuration = false",
])
def test_the_settings_cannot_be_changed_back(run, tmp_path, sql):
    message = refused(run, f"{sql}; SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')")
    assert "configuration has been locked" in message


def test_cli_refuses_with_exit_2_and_the_rule(run, tmp_path):
    target = tmp_path / "out.csv"
    result = runner.invoke(app, ["query", str(run), f"COPY neurons TO '{target}'"])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "actscope query refused this SQL" in output and RULE in output
    assert not target.exists()
