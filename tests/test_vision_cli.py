"""The vision commands end to end: profile on an image folder, examples --sheet, visualize."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from actscope.cli.main import app

PIL = pytest.importorskip("PIL.Image", reason="Pillow is missing: pip install 'actscope[vision]'")
runner = CliRunner(env={"COLUMNS": "160"})


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A saved tiny ViT with its preprocessing, and a folder of images in two classes."""
    import transformers

    from actscope.models.adapters.vit import TINY

    root = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(TINY.config()).save_pretrained(root / "model")
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_normalize": True}))
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(3):
            PIL.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / "images" / label / f"{i}.png")
    return root


def test_profile_an_image_folder_then_a_contact_sheet(vit, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["profile", str(vit / "model"), "--data", str(vit / "images"), "--sites", "blocks.0.mlp.post",
                                 "--out", str(out), "--top-k", "2", "--no-report"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["documents"] == 6 and manifest["data"]["images"] == [3, 32, 32]
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["examples", str(out), "--site", "blocks.0.mlp.post[0,5]", "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    image = np.asarray(PIL.open(sheet))
    assert image.shape[:2] == (2 + 2 * 50, 2 + 2 * 50)  # 2 units × 2 ranks of 48-pixel tiles, 2 apart
    again = runner.invoke(app, ["examples", str(out), "--site", "blocks.0.mlp.post[0]", "--sheet", str(sheet)])
    assert again.exit_code == 2 and "pass --overwrite" in again.output


def test_visualize_writes_a_png_and_never_replaces_a_users_file(vit, tmp_path):
    out = tmp_path / "unit.png"
    args = ["visualize", str(vit / "model"), "--site", "blocks.1.mlp.post", "--unit", "3", "--steps", "4", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert np.asarray(PIL.open(out)).shape == (32, 32, 3)
    mine = tmp_path / "mine.png"
    PIL.fromarray(np.zeros((4, 4), np.uint8)).save(mine)
    refused = runner.invoke(app, args[:-1] + [str(mine), "--overwrite"])
    assert refused.exit_code == 2 and "was not written by actscope" in refused.output
    facets = runner.invoke(app, args[:-1] + [str(tmp_path / "facets.png"), "--data", str(vit / "images"), "--facets", "2"])
    assert facets.exit_code == 0, facets.output
    assert np.asarray(PIL.open(tmp_path / "facets.png")).shape == (2 + 34, 2 + 2 * 34, 3)


@pytest.mark.parametrize("flags, message", [
    (["--spatial", "median"], "--spatial must be one of positions, max, mean"),
    (["--image-mean", "half"], "--image-mean takes numbers separated by commas"),
])
def test_bad_image_flags_name_the_fix(vit, tmp_path, flags, message):
    result = runner.invoke(app, ["profile", str(vit / "model"), "--data", str(vit / "images"), "--out", str(tmp_path / "r"), *flags])
    assert result.exit_code == 2 and message in result.output


def test_image_flags_on_text_data_are_refused(vit, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello there\n")
    result = runner.invoke(app, ["profile", str(vit / "model"), "--data", str(text), "--image-size", "16", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "apply to image data" in result.output


def test_filters_prints_the_table_and_the_divergence(tmp_path):
    import torch
    import transformers

    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    for seed in (0, 1):
        torch.manual_seed(seed)
        transformers.ResNetModel(config).save_pretrained(tmp_path / f"m{seed}")
    result = runner.invoke(app, ["filters", str(tmp_path / "m0"), "--compare", str(tmp_path / "m1")])
    assert result.exit_code == 0, result.output
    import actscope
    from actscope.metrics.filters import filter_stats, pooled_divergence

    first, second = (filter_stats(actscope.load(tmp_path / f"m{seed}")) for seed in (0, 1))
    assert all(f"{value:.3f}" in result.output for value in first.variance_entropy) and len(first.layer) == 4
    assert f"KL(MODEL ‖ --compare) = {pooled_divergence(first, second):.4f}" in result.output


def _table_rows(output: str) -> dict[int, list[str]]:
    """The body rows of a rich table in ``output``, by their first cell (a whole number)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_discriminate_writes_the_stimuli_and_the_summary_of_the_python_call(vit, tmp_path):
    import actscope
    from actscope.explain.mds import discriminative_stimuli
    from actscope.explain.visualize import VisConfig
    from actscope.feeding import images_for

    out = tmp_path / "new" / "mds.png"  # a missing folder is made, as visualize makes it
    result = runner.invoke(app, ["discriminate", str(vit / "model"), "--site", "blocks.1.mlp.post", "--data", str(vit / "images"),
                                 "--k", "3", "--rounds", "2", "--steps", "3", "--seed", "5", "--temperature", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = actscope.load(vit / "model")
    found = discriminative_stimuli(model, "blocks.1.mlp.post", images_for(model, vit / "images"), k=3, rounds=2, temperature=0.5,
                                   config=VisConfig(steps=3, seed=5))
    sheet = np.asarray(PIL.open(out)).astype(np.float64) / 255
    assert sheet.shape == (2 + 32 + 2, 2 + 3 * (32 + 2), 3)  # three 32-pixel stimuli, 2 pixels apart
    for c in range(3):
        tile = sheet[2:34, 2 + 34 * c:34 + 34 * c]
        assert np.abs(tile - found.images[c].permute(1, 2, 0).double().numpy()).max() <= 1 / 255 + 1e-9
    rows = _table_rows(result.output)
    assert sorted(rows) == [0, 1, 2]
    for c, cells in rows.items():
        members = np.flatnonzero(found.clusters == c)
        assert cells[1] == str(len(members))
        if not len(members):
            assert cells[3:] == ["—", "—", "—"]
            continue
        assert cells[2].split(", ")[:3] == [str(u) for u in members[:3]]
        own = np.mean([found.responses[n, c] for n in members])
        others = {j: np.mean([found.responses[n, j] for n in members]) for j in range(3) if j != c}
        best = max(others, key=others.get)
        assert cells[3:] == [f"{own:.3f}", f"{others[best]:.3f}", str(best)]
    assert "units moved per round: " + ", ".join(map(str, found.moved)) in result.output


def test_discriminate_refuses_bad_input_and_writes_nothing(vit, tmp_path):
    from actscope.drawing.png import png_bytes

    notes, mine, ours = tmp_path / "notes.txt", tmp_path / "mine.png", tmp_path / "ours.png"
    notes.write_text("hello\n")
    PIL.fromarray(np.zeros((4, 4), np.uint8)).save(mine)
    ours.write_bytes(png_bytes(np.zeros((4, 4)), marked=True))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    base = ["discriminate", str(vit / "model"), "--site", "blocks.1.mlp.post", "--data", str(vit / "images"), "--steps", "2"]
    cases = [
        (["--k", "1", "--out", str(tmp_path / "a.png")], "--k must be at least 2"),
        (["--site", "blocks.1.mlp.pots", "--out", str(tmp_path / "a.png")], "Did you mean: blocks.1.mlp.post"),
        (["--data", str(notes), "--out", str(tmp_path / "a.png")], f"{notes} is not a folder of images"),
        (["--out", str(notes / "a.png")], "is a file, not a folder; choose another --out"),
        (["--out", str(mine), "--overwrite"], "was not written by actscope, so it is never replaced"),
        (["--out", str(ours)], "exists; pass --overwrite to replace it"),
    ]
    for flags, message in cases:
        result = runner.invoke(app, base + flags)
        assert result.exit_code == 2 and message in result.output, (flags, result.output)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing left half-written
