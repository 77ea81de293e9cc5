"""The streamed layer × layer comparison: equal to the in-memory estimators on the concatenated
activations, in one pass or several, with memory that does not grow with the tokens; the
sampled measures; ``actscope compare`` end to end with its report section."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.cli.main import app
from actscope.metrics import cka, compare_representations, rsa
from actscope.metrics.compare import Reservoir, StreamSums
from actscope.metrics.representations import Rows
from actscope.zoo.tiny import tiny_model
from conftest import model_state, word_tokenizer

runner = CliRunner(env={"COLUMNS": "200"})
WORDS = ["<pad>", "<s>"] + [f"w{i}" for i in range(126)]
SITES = "blocks.*.resid.post,blocks.*.mlp.post"


def token_batches(vocab: int, batches: int = 5, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (3, 11), generator=generator)} for _ in range(batches)]


def captured(module, data, sites=SITES) -> dict[str, torch.Tensor]:
    with torch.no_grad(), actscope.capture(module, sites, flat=True) as capture:
        for batch in data:
            module(**batch)
    return {label: capture.tensor(label) for label in capture.tensors}


@pytest.fixture(scope="module")
def two_models():
    first, _ = tiny_model("llama", 0)
    second, _ = tiny_model("llama", 1)
    return first, second, token_batches(first.config.vocab_size)


def streamed(xs: list[torch.Tensor], ys: list[torch.Tensor], precision="float64"):
    """Feed (x, y) batches through StreamSums directly: (biased CKA, unbiased CKA)."""
    sums = StreamSums([(0, 0)], precision, need_self=lambda key: True)
    for x, y in zip(xs, ys):
        ids = torch.arange(len(x))
        sums.update(Rows({"x": x}, {"x": ids}), Rows({"y": y}, {"y": ids}), ["x"], ["y"])
    selves = {key: value for key, (value, _) in sums.selves().items()}
    (biased, unbiased), = sums.crosses().values()
    return (biased / np.sqrt(selves[("a", 0)][0] * selves[("b", 0)][0]),
            unbiased / np.sqrt(selves[("a", 0)][1] * selves[("b", 0)][1]))


def test_streamed_sums_equal_the_in_memory_estimators():
    generator = torch.Generator().manual_seed(0)
    for offset in (0.0, 1000.0):  # a large mean: the shift keeps the centering exact
        x = torch.randn(300, 24, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 4, 24, dtype=torch.float64) + offset
        y = torch.tanh(x @ torch.randn(24, 17, generator=generator, dtype=torch.float64) / 10) + torch.randn(300, 17, generator=generator, dtype=torch.float64)
        cuts = [0, 7, 8, 100, 213, 300]  # uneven batches, one of a single row
        xs, ys = [x[a:b] for a, b in zip(cuts, cuts[1:])], [y[a:b] for a, b in zip(cuts, cuts[1:])]
        biased, unbiased = streamed(xs, ys)
        assert abs(biased - cka(x, y)) < 1e-12
        assert abs(unbiased - cka(x, y, unbiased=True)) < 1e-12
        fast, _ = streamed(xs, ys, precision="float32")
        assert abs(fast - cka(x, y)) < 1e-5


def test_stream_memory_does_not_grow_with_the_rows():
    def kept(rows: int) -> int:
        sums = StreamSums([(0, 0)], "float64", need_self=lambda key: True)
        for _ in range(rows // 100):
            x, y = torch.randn(100, 8), torch.randn(100, 5)
            ids = torch.arange(100)
            sums.update(Rows({"x": x}, {"x": ids}), Rows({"y": y}, {"y": ids}), ["x"], ["y"])
        tensors = [t for part in (*sums.site.values(), *sums.cross.values()) for t in part.values()]
        return sum(t.numel() for t in tensors)

    site_x = 8 + 1 + 8 * 8 + 1 + 8  # Σx, Σr, XᵀX, Σr², Σrx
    site_y = 5 + 1 + 5 * 5 + 1 + 5
    pair = 8 * 5 + 1 + 8 + 5  # XᵀY, Σrs, Σsx, Σry
    assert kept(200) == kept(5000) == site_x + site_y + pair


def test_layer_by_layer_matrix_equals_cka_of_captured_activations(two_models):
    first, second, data = two_models
    before = model_state(first), model_state(second)
    first.train()  # each module's flag comes back, and grad mode too (the two streams interleave)
    result = compare_representations(first, second, data, SITES)
    assert torch.is_grad_enabled() and first.training and not second.training
    first.eval()
    assert (model_state(first), model_state(second)) == before
    a, b = captured(first, data), captured(second, data)
    want = np.array([[cka(a[s], b[t]) for t in result.sites_b] for s in result.sites_a])
    assert result.values.shape == (4, 4) and result.samples == 5 * 3 * 11 and result.passes == 1
    assert np.abs(result.values - want).max() < 1e-6  # two forward passes of float32 activations
    unbiased = compare_representations(first, second, data, SITES, unbiased=True)
    want = np.array([[cka(a[s], b[t], unbiased=True) for t in result.sites_b] for s in result.sites_a])
    assert np.abs(unbiased.values - want).max() < 1e-6
    one = compare_representations(first, None, data, SITES)
    assert np.abs(np.diag(one.values) - 1).max() < 1e-9 and np.abs(one.values - one.values.T).max() < 1e-9


def test_several_passes_when_the_pairs_do_not_fit(two_models):
    first, second, data = two_models
    whole = compare_representations(first, second, data, SITES)
    split = compare_representations(first, second, data, SITES, max_bytes=200_000)
    assert split.passes > 1
    assert np.abs(split.values - whole.values).max() < 1e-12
    with pytest.raises(actscope.InputError, match="more than max_bytes"):
        compare_representations(first, second, data, SITES, max_bytes=1000)


def test_matching_and_listed_pairs(two_models):
    first, second, data = two_models
    whole = compare_representations(first, second, data, SITES)
    matching = compare_representations(first, second, data, SITES, pairs="matching")
    assert np.isnan(matching.values[0, 1]) and np.abs(np.diag(matching.values) - np.diag(whole.values)).max() < 1e-12
    listed = compare_representations(first, second, data, SITES, pairs=[("blocks.1.mlp.post", "blocks.0.resid.post")])
    assert np.isfinite(listed.values).sum() == 1
    table = listed.to_table()
    assert list(table["site_a"]) == ["blocks.1.mlp.post"] and list(table["layer_b"]) == [0]
    with pytest.raises(actscope.InputError, match="does not name a selected site"):
        compare_representations(first, second, data, SITES, pairs=[("blocks.9.mlp.post", "embed")])


@pytest.mark.parametrize("options", [dict(kernel="rbf"), dict(kernel="rbf", unbiased=True), dict(measure="rsa"),
                                     dict(measure="rsa", metric="euclidean", compare="kendall")])
def test_sampled_measures_equal_the_in_memory_ones_on_all_rows(two_models, options):
    first, second, data = two_models
    result = compare_representations(first, second, data, "blocks.*.resid.post", max_samples=1000, **options)
    a, b = captured(first, data, "blocks.*.resid.post"), captured(second, data, "blocks.*.resid.post")
    if options.get("measure") == "rsa":
        want = [[rsa(a[s], b[t], options.get("metric", "correlation"), compare=options.get("compare", "spearman")) for t in result.sites_b]
                for s in result.sites_a]
    else:
        want = [[cka(a[s], b[t], "rbf", unbiased=options.get("unbiased", False)) for t in result.sites_b] for s in result.sites_a]
    assert result.samples == 165 and not result.streamed
    assert np.abs(result.values - np.array(want)).max() < 1e-6


def test_the_reservoir_is_a_uniform_sample_of_rows_and_repeatable():
    counts = np.zeros(50)
    for seed in range(400):
        reservoir = Reservoir(10, seed)
        for start in range(0, 50, 7):
            rows = torch.arange(start, min(start + 7, 50), dtype=torch.float32)[:, None]
            reservoir.add({"x": rows, "y": rows * 2})
        kept = reservoir.kept()
        assert torch.equal(kept["y"], kept["x"] * 2)  # the same rows for every site
        counts[kept["x"][:, 0].long().numpy()] += 1
    assert abs(counts.mean() - 80) < 1e-9 and counts.min() > 45 and counts.max() < 120  # 10/50 of 400 each
    again = Reservoir(10, 3)
    first = Reservoir(10, 3)
    for reservoir in (again, first):
        reservoir.add({"x": torch.arange(50.0)[:, None]})
    assert torch.equal(again.kept()["x"], first.kept()["x"])


def test_rbf_on_a_sample_of_rows(two_models):
    first, second, data = two_models
    small = compare_representations(first, second, data, "blocks.1.resid.post", kernel="rbf", max_samples=40, seed=1)
    assert small.samples == 40
    same = compare_representations(first, second, data, "blocks.1.resid.post", kernel="rbf", max_samples=40, seed=1)
    assert np.array_equal(small.values, same.values)


def test_per_document_rows_pair_models_whose_tokenizers_differ(tmp_path):
    module, _ = tiny_model("llama", 0)
    first = actscope.wrap(module, word_tokenizer(WORDS, bos="<s>", pad_token="<pad>"), name="one")
    second = actscope.wrap(module, word_tokenizer(WORDS, pad_token="<pad>"), name="two")  # no BOS: other tokens
    texts = [" ".join(f"w{(7 * i + j) % 120}" for j in range(3 + i % 4)) for i in range(12)]
    with pytest.raises(actscope.DataError, match="tokenize batch 0 differently"):
        compare_representations(first, second, texts, "blocks.1.resid.post")
    result = compare_representations(first, second, texts, "blocks.1.resid.post", pool="mean", batch_size=5)
    assert result.samples == 12

    def means(model) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = model.tokenizer(text, return_tensors="pt")
            with torch.no_grad(), actscope.capture(model, "blocks.1.resid.post", flat=True) as capture:
                model(**ids)
            rows.append(capture.tensor("blocks.1.resid.post").double().mean(dim=0))
        return torch.stack(rows)

    assert abs(result.values[0, 0] - cka(means(first), means(second))) < 1e-6


def test_effective_ranks_come_with_the_matrix(two_models):
    first, second, data = two_models
    result = compare_representations(first, second, data, "blocks.0.mlp.post")
    table = result.sites_table()
    x = captured(first, data, "blocks.0.mlp.post")["blocks.0.mlp.post"]
    assert abs(table["effective_rank"][0] - actscope.metrics.effective_rank(x)) < 1e-6
    assert abs(table["participation_ratio"][0] - actscope.metrics.participation_ratio(x)) < 1e-6
    assert list(table["side"]) == ["a", "b"] and table["units"][0] == x.shape[1]


@pytest.mark.parametrize("options,message", [
    (dict(measure="svcca"), "measure must be one of cka, rsa"),
    (dict(pool="sum"), "pool must be one of tokens, mean, last"),
    (dict(precision="half"), "precision must be one of"),
    (dict(measure="rsa", unbiased=True), "RSA has none"),
    (dict(pairs="diagonal"), "pairs must be 'all', 'matching'"),
    (dict(sites_b="blocks.0.resid.post", pairs="matching"), "A has 2 sites and B 1"),
    (dict(max_samples=0), "max_samples must be a positive whole number"),
])
def test_bad_options_are_refused(two_models, options, message):
    first, second, data = two_models
    with pytest.raises(actscope.InputError, match=message):
        compare_representations(first, second, data, "blocks.*.resid.post", **options)


# -- the command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for seed in (0, 1):
        module, _ = tiny_model("llama", seed)
        module.save_pretrained(root / f"m{seed}")
        word_tokenizer(WORDS, bos="<s>", pad_token="<pad>").save_pretrained(root / f"m{seed}")
    generator = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in generator.integers(0, 120, size=6 + n % 5)) for n in range(20)]
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    return root


def test_command_prints_the_matrix_and_writes_a_run_with_a_heat_map(model_dirs, tmp_path):
    out = tmp_path / "run"
    args = ["compare", str(model_dirs / "m0"), str(model_dirs / "m1"), "--data", str(model_dirs / "data.txt"), "--out", str(out)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first, second = actscope.load(model_dirs / "m0"), actscope.load(model_dirs / "m1")
    expected = compare_representations(first, second, str(model_dirs / "data.txt"))
    printed = [line.replace("│", " ").split() for line in result.output.splitlines() if "blocks." in line and "│" in line]
    assert [row[0] for row in printed] == list(expected.sites_a)
    assert np.abs(np.array([[float(v) for v in row[1:]] for row in printed]) - expected.values).max() <= 5e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "compare" and [m["name"] for m in manifest["models"]] == ["m0", "m1"]
    run = actscope.open_run(out)
    stored = run.to_pandas("similarity")
    assert np.abs(stored["similarity"].to_numpy() - expected.values.reshape(-1)).max() < 1e-6
    assert set(run.tables) == {"similarity", "similarity_sites"}
    page = (out / "report.html").read_text()
    assert 'data-chart="similarity-0"' in page and 'id="similarity"' in page and 'data-chart="similarity-ranks"' in page
    assert page.count('class="cell"') == expected.values.size


def test_command_refuses_bad_input_with_exit_2(model_dirs, tmp_path):
    base = ["compare", str(model_dirs / "m0"), str(model_dirs / "m1"), "--data", str(model_dirs / "data.txt")]
    for extra, message in ((["--kernel", "poly"], "kernel must be one of"), (["--sites", "blocks.7.resid.post"], "blocks.7"),
                           (["--max-memory", "0"], "--max-memory must be at least 1")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "not an actscope run" in result.output


def test_benchmark_smoke():
    """benchmarks/compare_cka.py's measured row, at a tiny size: it runs, and its streamed matrix
    equals the in-memory CKA of captured activations."""
    from conftest import EXAMPLES, example_script

    bench = example_script("compare_cka", EXAMPLES.parent / "benchmarks")
    threads = torch.get_num_threads()
    try:
        row = bench.child(1024, "float64", True, layers=2, width=48)
    finally:
        torch.set_num_threads(threads)
    assert row["tokens"] == 1024 and row["passes"] == 1 and np.array(row["values"]).shape == (2, 2)
    assert row["check"] < 1e-9 and row["capture_bytes"] == 1024 * 48 * 2 * 2 * 4
    assert row["seconds"] > 0 and row["forward"] > 0
