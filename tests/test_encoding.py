"""Encoding models: cross-validated ridge against scikit-learn on the same folds, the noise
ceiling against its definition on simulated repeats, layer ranking on simulated recordings,
and reading responses from files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actscope
from actscope.metrics import encoding_scores, load_responses, noise_ceiling, ridge_cv
from actscope.metrics.encoding import kfold, stimulus_features
from actscope.zoo.tiny import tiny_model


def regression(seed: int = 0, n: int = 90, d: int = 25, channels: int = 4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 5.0, size=d) + rng.normal(size=d) * 3
    y = x[:, :6] @ rng.normal(size=(6, channels)) + rng.normal(size=(n, channels)) * rng.uniform(0.5, 4, size=channels)
    return x, y


def test_folds_are_sklearns_kfold():
    from sklearn.model_selection import KFold

    for n, k, seed in ((23, 5, 0), (100, 7, 3), (10, 10, 1)):
        for (train, test), (want_train, want_test) in zip(kfold(n, k, seed), KFold(k, shuffle=True, random_state=seed).split(np.zeros(n))):
            assert np.array_equal(train, want_train) and np.array_equal(test, want_test)


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("shape", [(90, 25), (40, 120)])  # more stimuli than features, and fewer
def test_ridge_r2_matches_sklearn_on_the_same_folds(standardize, shape):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = regression(1, *shape)
    folds = list(KFold(5, shuffle=True, random_state=2).split(x))
    for alpha in (0.1, 30.0):
        estimator = make_pipeline(StandardScaler(), Ridge(alpha=alpha)) if standardize else Ridge(alpha=alpha)
        want = r2_score(y, cross_val_predict(estimator, x, y, cv=folds), multioutput="raw_values")
        fit = ridge_cv(x, y, alphas=[alpha], folds=folds, standardize=standardize)
        assert np.abs(fit.r2 - want).max() < 1e-9
        assert np.all(fit.alphas == alpha)


def test_penalty_per_channel_is_ridgecvs_leave_one_out_choice():
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    alphas = np.logspace(-2, 5, 8)
    for shape in ((90, 25), (40, 120)):
        x, y = regression(3, *shape)
        folds = kfold(len(x), 5, 0)
        fit = ridge_cv(x, y, alphas=alphas, folds=5, seed=0)
        for k, (train, _) in enumerate(folds):
            scaled = StandardScaler().fit(x[train]).transform(x[train])
            assert np.array_equal(RidgeCV(alphas=alphas, alpha_per_target=True).fit(scaled, y[train]).alpha_, fit.alphas[k])
        estimator = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas, alpha_per_target=True))
        want = r2_score(y, cross_val_predict(estimator, x, y, cv=folds), multioutput="raw_values")
        assert np.abs(fit.r2 - want).max() < 1e-9
        assert len(set(fit.alphas.reshape(-1))) > 1  # channels do get different penalties


def test_noise_ceiling_is_the_explainable_variance():
    rng = np.random.default_rng(0)
    stimuli, channels = 20000, 3
    signal = rng.normal(size=(stimuli, channels))
    noise_sd = np.array([0.5, 1.0, 2.0])
    for count in (2, 4):
        repeats = signal[None] + rng.normal(size=(count, stimuli, channels)) * noise_sd
        variance = signal.var(axis=0, ddof=1)
        expected = variance / (variance + noise_sd**2 / count)  # var(signal) / var(mean of the repeats)
        assert np.abs(noise_ceiling(repeats) - expected).max() < 0.02
        by_hand = 1 - repeats.var(axis=0, ddof=1).mean(axis=0) / (count * repeats.mean(axis=0).var(axis=0, ddof=1))
        assert np.abs(noise_ceiling(repeats) - by_hand).max() < 1e-12


def test_ridge_with_repeats_reports_the_ceiling_and_normalized_r2():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 10))
    signal = x @ rng.normal(size=(10, 2))
    repeats = signal[None] + rng.normal(size=(3, 300, 2)) * 2.0
    fit = ridge_cv(x, repeats, alphas=[1.0])
    assert np.allclose(fit.noise_ceiling, noise_ceiling(repeats))
    assert np.allclose(fit.normalized_r2, fit.r2 / fit.noise_ceiling)
    assert np.all(np.abs(fit.normalized_r2 - 1) < 0.1)  # a linear truth: the model explains what can be explained
    table = fit.to_pandas()
    assert list(table.columns) == ["channel", "r2", "alpha_median", "noise_ceiling", "normalized_r2"]


@pytest.fixture(scope="module")
def gpt2():
    module, _ = tiny_model("gpt2", 0)
    generator = torch.Generator().manual_seed(0)
    stimuli = []
    for _ in range(20):  # 20 calls of 8 stimuli, right-padded to different lengths
        ids = torch.randint(0, module.config.vocab_size, (8, 10), generator=generator)
        mask = (torch.arange(10)[None, :] < torch.randint(4, 11, (8, 1), generator=generator)).long()
        stimuli.append({"input_ids": ids, "attention_mask": mask})
    return module, stimuli


def test_stimulus_features_are_the_mean_over_real_tokens(gpt2):
    module, stimuli = gpt2
    features = stimulus_features(module, stimuli[:2], "blocks.1.mlp.post")["blocks.1.mlp.post"]
    rows = []
    for batch in stimuli[:2]:
        with torch.no_grad(), actscope.capture(module, "blocks.1.mlp.post") as capture:
            module(**batch)
        values = capture.tensor("blocks.1.mlp.post").double()  # [8, 10, units]
        mask = batch["attention_mask"].double()[..., None]
        rows.append((values * mask).sum(1) / mask.sum(1))
    assert features.shape == (16, module.config.n_inner or 4 * module.config.n_embd)
    assert np.abs(features - torch.cat(rows).numpy()).max() < 1e-6


def test_simulated_recordings_from_one_layer_rank_that_layer_first(gpt2):
    module, stimuli = gpt2
    sites = "blocks.*.mlp.post,blocks.*.attn.out"
    features = stimulus_features(module, stimuli, sites)
    rng = np.random.default_rng(0)
    for truth in features:
        x = features[truth]
        clean = (x - x.mean(0)) / (x.std(0) + 1e-9) @ rng.normal(size=(x.shape[1], 8)) / np.sqrt(x.shape[1])
        recording = clean + rng.normal(size=clean.shape) * clean.std() * 0.7
        scores = encoding_scores(module, stimuli, recording, sites, folds=5)
        assert scores.best()["site"] == truth
        assert scores.ranking()[0] == ("GPT2LMHeadModel", truth)


def test_which_objective_and_layer_in_one_call(gpt2):
    module, stimuli = gpt2
    other, _ = tiny_model("gpt2", 7)
    features = stimulus_features(other, stimuli, "blocks.1.mlp.post")["blocks.1.mlp.post"]
    rng = np.random.default_rng(1)
    recording = features @ rng.normal(size=(features.shape[1], 5)) + rng.normal(size=(160, 5)) * 0.05
    scores = encoding_scores({"objective A": module, "objective B": other}, stimuli, recording, "blocks.*.mlp.post")
    assert scores.best()["model"] == "objective B" and scores.best()["site"] == "blocks.1.mlp.post"
    table = scores.to_pandas()
    assert list(table["model"]) == ["objective A", "objective A", "objective B", "objective B"]
    assert list(table["layer"]) == [0, 1, 0, 1]
    channels = scores.channels_table()
    assert len(channels["model"]) == 4 * 5


def test_precomputed_features_need_no_model():
    x, y = regression(4)
    noise = np.random.default_rng(0).normal(size=x.shape)
    scores = encoding_scores({"mine": {"good": x, "bad": noise}}, None, y)
    assert scores.best()["site"] == "good"
    assert abs(scores.score(("mine", "good")) - ridge_cv(x, y).r2.mean()) < 1e-12


def test_responses_from_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    repeats = rng.normal(size=(3, 5, 2))
    np.save(tmp_path / "two.npy", repeats[0])
    np.save(tmp_path / "three.npy", repeats)
    np.savez(tmp_path / "named.npz", responses=repeats[1], other=np.zeros(3))
    assert np.array_equal(load_responses(tmp_path / "two.npy").values, repeats[0])
    loaded = load_responses(tmp_path / "three.npy")
    assert np.array_equal(loaded.repeats, repeats) and np.allclose(loaded.values, repeats.mean(0))
    assert np.array_equal(load_responses(tmp_path / "named.npz").values, repeats[1])
    # long table: a repeat and a stimulus column, rows shuffled
    rows = [(r, s, *repeats[r, s]) for r in range(3) for s in range(5)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    columns = {"repeat": [r[0] for r in rows], "stimulus": [f"s{r[1]}" for r in rows], "v1": [r[2] for r in rows], "v4": [r[3] for r in rows]}
    pq.write_table(pa.table(columns), tmp_path / "long.parquet")
    table = load_responses(tmp_path / "long.parquet")
    assert table.channels == ("v1", "v4") and np.allclose(table.repeats, repeats)
    lines = ["stimulus,v1,v4"] + [f"s{s},{float(repeats[0, s, 0])!r},{float(repeats[0, s, 1])!r}" for s in (3, 0, 4, 1, 2)]
    (tmp_path / "wide.csv").write_text("\n".join(lines) + "\n")
    assert np.allclose(load_responses(tmp_path / "wide.csv").values, repeats[0])


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("a,b\nx,y\n"), "no numeric channel columns"),
    (lambda p: p.write_bytes(b"\x00\x01garbage"), "cannot read"),
])
def test_broken_response_files_are_refused(tmp_path, make, message):
    path = tmp_path / ("bad.csv" if "numeric" in message else "bad.parquet")
    make(path)
    with pytest.raises(actscope.DataError, match=message):
        load_responses(path)


@pytest.mark.parametrize("call,message", [
    (lambda: ridge_cv(np.ones((10, 2)), np.ones((11, 2))), "features have 10 stimuli and responses 11"),
    (lambda: ridge_cv(*regression(0), alphas=[0.0]), "alphas must be positive"),
    (lambda: ridge_cv(*regression(0), folds=1), "folds must be a whole number from 2"),
    (lambda: ridge_cv(*regression(0), folds=[(np.arange(40), np.arange(40, 50))]), "cover every stimulus exactly once"),
    (lambda: ridge_cv(np.full((10, 2), np.nan), np.ones((10, 2))), "NaN or infinite"),
    (lambda: noise_ceiling(np.ones((1, 4, 2))), "repeats ≥ 2"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(actscope.InputError, match=message):
        call()


# -- the command ----------------------------------------------------------------------------------
WORDS = ["<pad>", "<s>"] + [f"w{i}" for i in range(126)]
SIMULATED = "blocks.1.resid.post"


@pytest.fixture(scope="module")
def encode_files(tmp_path_factory):
    """Two small models, 40 stimuli, and responses simulated from model m1's SIMULATED site
    (3 repeats, as a long Parquet table with shuffled rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import word_tokenizer

    root = tmp_path_factory.mktemp("encode")
    for seed in (0, 1):
        module, _ = tiny_model("llama", seed)
        module.save_pretrained(root / f"m{seed}")
        word_tokenizer(WORDS, bos="<s>", pad_token="<pad>").save_pretrained(root / f"m{seed}")
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 120, size=4 + n % 6)) for n in range(40)]
    (root / "stimuli.txt").write_text("\n".join(lines) + "\n")
    x = stimulus_features(actscope.load(root / "m1"), lines, SIMULATED)[SIMULATED]
    clean = (x - x.mean(0)) / (x.std(0) + 1e-9) @ rng.normal(size=(x.shape[1], 6)) / np.sqrt(x.shape[1])
    repeats = clean[None] + rng.normal(size=(3, *clean.shape)) * clean.std() * 0.5
    rows = [(r, s) for r in range(3) for s in range(40)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    columns = {"repeat": [r for r, _ in rows], "stimulus": [s for _, s in rows]}
    columns.update({f"ch{c}": [float(repeats[r, s, c]) for r, s in rows] for c in range(6)})
    pq.write_table(pa.table(columns), root / "responses.parquet")
    np.save(root / "responses.npy", repeats)
    return root, lines, repeats


def test_encode_command_ranks_the_generating_site_and_writes_a_run(encode_files, tmp_path):
    from typer.testing import CliRunner

    from actscope.cli.main import app

    root, lines, repeats = encode_files
    out = tmp_path / "run"
    args = ["encode", str(root / "m0"), str(root / "m1"), "--stimuli", str(root / "stimuli.txt"), "--responses",
            str(root / "responses.parquet"), "--sites", "blocks.*.resid.post", "--alphas", "0.1,10,1000", "--out", str(out)]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Best: m1 · {SIMULATED}" in result.output and "R² / ceiling" in result.output
    expected = encoding_scores({"m0": actscope.load(root / "m0"), "m1": actscope.load(root / "m1")}, lines, repeats,
                               "blocks.*.resid.post", alphas=[0.1, 10, 1000])
    assert expected.best()["site"] == SIMULATED and expected.best()["model"] == "m1"
    run = actscope.open_run(out)
    stored = run.to_pandas("encoding")
    assert list(stored["model"]) == ["m0", "m0", "m1", "m1"] and list(stored["site"]) == ["blocks.0.resid.post", SIMULATED] * 2
    assert np.abs(stored["mean_r2"].to_numpy() - expected.to_table()["mean_r2"]).max() < 1e-9
    assert np.abs(stored["mean_normalized_r2"].to_numpy() - expected.to_table()["mean_normalized_r2"]).max() < 1e-9
    assert len(run.to_pandas("encoding_channels")) == 4 * 6
    assert run.manifest["kind"] == "encode" and run.manifest["responses"]["repeats"] == 3
    page = (out / "report.html").read_text()
    assert 'data-chart="encoding"' in page and 'id="encoding"' in page and page.count('class="bar"') == 2 * 4  # R², R² / ceiling


@pytest.mark.parametrize("change,message", [
    (lambda root, tmp: ["--responses", str(tmp / "missing.npy")], "no responses file at"),
    (lambda root, tmp: ["--responses", str(_write(tmp / "bad.parquet", b"\x00garbage"))], "cannot read"),
    (lambda root, tmp: ["--responses", str(_write(tmp / "words.csv", b"a,b\nx,y\n"))], "no numeric channel columns"),
    (lambda root, tmp: ["--responses", str(_save(tmp / "short.npy", np.zeros((39, 2))))], "holds 40 stimuli (non-empty documents)"),
    (lambda root, tmp: ["--responses", str(_savez(tmp / "two.npz"))], "name the responses array 'responses'"),
    (lambda root, tmp: ["--responses", str(_write(tmp / "r.txt", b"1 2"))], "use .npy, .npz, .csv or .parquet"),
    (lambda root, tmp: ["--alphas", "1,-2"], "--alphas must be positive numbers"),
    (lambda root, tmp: ["--folds", "1"], "folds must be a whole number from 2"),
    (lambda root, tmp: ["--pool", "tokens"], "--pool must be mean or last"),
])
def test_encode_command_refuses_bad_input_with_exit_2(encode_files, tmp_path, change, message):
    from typer.testing import CliRunner

    from actscope.cli.main import app

    root, _, _ = encode_files
    base = {"--stimuli": str(root / "stimuli.txt"), "--responses": str(root / "responses.npy")}
    extra = change(root, tmp_path)
    base.update(dict(zip(extra[::2], extra[1::2])))
    args = ["encode", str(root / "m0"), *[part for pair in base.items() for part in pair]]
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _save(path, array):
    np.save(path, array)
    return path


def _savez(path):
    np.savez(path, a=np.zeros((40, 2)), b=np.zeros((40, 2)))
    return path
