"""Activation codes: codes, constant-unit dropping, redundancy and categorisation vs naive."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import actscope
from actscope.metrics import codes as codes_module
from actscope.metrics.codes import activation_codes, cluster_purity, hamming_distances, knn_hamming_predict
from actscope.zoo.tiny import tiny_model
from conftest import hook_count


# -- a tiny ReLU MLP with known constant units --------------------------------------------
def relu_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU())
    with torch.no_grad():
        net[0].weight[0], net[0].bias[0] = 0.0, -1.0  # unit 0 of layer 1: never fires
        net[0].weight[1], net[0].bias[1] = 0.0, 1.0  # unit 1 of layer 1: always fires
        net[2].weight[4], net[2].bias[4] = 0.0, -1.0  # unit 4 of layer 2: never fires
    return net.eval()


def mlp_inputs() -> torch.Tensor:
    # 2-D inputs on a coarse grid, some repeated: several examples share a linear region.
    grid = torch.linspace(-1, 1, 5)
    points = torch.cartesian_prod(grid, grid)  # [25, 2]
    return torch.cat([points, points[:7]])  # [32, 2]


def naive_mlp_bits(net: torch.nn.Sequential, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        first = net[1](net[0](x))
        second = net[3](net[2](first))
    return torch.cat([first > 0, second > 0], dim=1).numpy()  # [N, 11]


@pytest.fixture(scope="module")
def mlp_codes():
    net, x = relu_mlp(), mlp_inputs()
    before = hook_count(net)
    codes = activation_codes(net, x, "module:1@output,module:3@output", batch_size=5)  # 32 = 6·5 + 2
    assert hook_count(net) == before
    return codes, naive_mlp_bits(net, x)


def test_redundancy_matches_a_set_of_tuples(mlp_codes):
    codes, bits = mlp_codes
    distinct = {tuple(row) for row in bits.tolist()}
    assert codes.n_codes == 32
    assert codes.n_distinct == len(distinct)
    assert 0 < codes.n_distinct < 32  # the test data do share codes
    assert codes.redundancy_ratio == pytest.approx((32 - len(distinct)) / 32, rel=1e-12)
    groups = Counter(tuple(row) for row in bits.tolist())
    shared_by = codes.to_table()["shared_by"]
    np.testing.assert_array_equal(shared_by, [groups[tuple(row)] for row in bits.tolist()])
    same = codes.code_id[:, None] == codes.code_id[None, :]
    np.testing.assert_array_equal(same, (bits[:, None, :] == bits[None, :, :]).all(axis=2))


def test_constant_units_are_dropped(mlp_codes):
    codes, bits = mlp_codes
    varies = bits.any(axis=0) & ~bits.all(axis=0)
    assert not varies[[0, 1, 10]].any()  # the three units built to be constant
    assert codes.dropped_constant == int((~varies).sum())
    assert codes.n_bits == int(varies.sum()) == 11 - codes.dropped_constant
    np.testing.assert_array_equal(codes.kept, varies)
    assert codes.site_bits == (6, 5)
    assert codes.codes.dtype == np.uint8 and codes.codes.shape == (32, (codes.n_bits + 7) // 8)
    np.testing.assert_array_equal(codes.bits(), bits[:, varies])
    np.testing.assert_array_equal(codes.example, np.arange(32))


def test_all_constant_units_give_one_empty_code():
    x = torch.ones(6, 3)  # identical inputs: every bit constant
    codes = activation_codes(torch.nn.Sequential(torch.nn.Identity()), x, "module:0@output")
    assert (codes.n_bits, codes.dropped_constant, codes.n_distinct) == (0, 3, 1)
    assert codes.redundancy_ratio == pytest.approx(5 / 6, rel=1e-12)
    with pytest.raises(actscope.InputError, match="constant"):
        codes.categorise([0, 1, 0, 1, 0, 1])


# -- CNNs and sequence models: what one code is ------------------------------------------
def test_cnn_example_code_is_every_channel_at_every_position():
    torch.manual_seed(1)
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU()).eval()
    x = torch.randn(9, 2, 5, 5)
    codes = activation_codes(conv, x, "module:1@output", batch_size=4)
    with torch.no_grad():
        maps = conv(x)  # [9, 3, 3, 3]
    bits = (maps > 0).permute(0, 2, 3, 1).reshape(9, -1).numpy()  # position-major, channel-minor
    varies = bits.any(axis=0) & ~bits.all(axis=0)
    assert codes.site_bits == (27,)
    np.testing.assert_array_equal(codes.bits(), bits[:, varies])
    assert codes.n_distinct == len({tuple(r) for r in bits.tolist()})


@pytest.fixture(scope="module")
def gpt2_padded():
    model, inputs = tiny_model("gpt2")
    mask = inputs["attention_mask"].clone()
    mask[1, 4:] = 0  # example 1 has 4 real tokens of 6
    batch = dict(inputs, attention_mask=mask)
    seen = []
    handle = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return model, batch, (seen[0] > 0).numpy(), mask.bool().numpy()  # [2, 6, 64], [2, 6]


def _drop_constant(bits: np.ndarray) -> np.ndarray:
    return bits[:, bits.any(axis=0) & ~bits.all(axis=0)]


def test_per_token_codes_are_real_tokens(gpt2_padded):
    model, batch, fires, mask = gpt2_padded
    codes = activation_codes(model, [batch], "blocks.1.mlp.post", per="token")
    np.testing.assert_array_equal(codes.bits(), _drop_constant(fires[mask]))
    np.testing.assert_array_equal(codes.example, [0] * 6 + [1] * 4)
    np.testing.assert_array_equal(codes.position, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3])


def test_per_last_uses_the_last_real_token(gpt2_padded):
    model, batch, fires, mask = gpt2_padded
    codes = activation_codes(model, [batch], "blocks.1.mlp.post", per="last")
    np.testing.assert_array_equal(codes.position, [5, 3])
    np.testing.assert_array_equal(codes.bits(), _drop_constant(np.stack([fires[0, 5], fires[1, 3]])))


def test_per_example_joins_positions_and_refuses_padding(gpt2_padded):
    model, batch, fires, _ = gpt2_padded
    full = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    with torch.no_grad():
        seen = []
        handle = model.transformer.h[1].mlp.c_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        model(**full)
        handle.remove()
    codes = activation_codes(model, [full], "blocks.1.mlp.post")
    np.testing.assert_array_equal(codes.bits(), _drop_constant((seen[0] > 0).reshape(2, -1).numpy()))
    with pytest.raises(actscope.InputError, match="per='last'"):
        activation_codes(model, [batch], "blocks.1.mlp.post")


# -- categorisation ----------------------------------------------------------------------
def naive_knn(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, k: int = 9) -> list[int]:
    predicted = []
    for query in test:
        distances = [(int((query != row).sum()), index) for index, row in enumerate(train)]
        nearest = [index for _, index in sorted(distances)[:k]]
        votes = Counter(int(y_train[i]) for i in nearest)
        top = max(votes.values())
        predicted.append(min(label for label, count in votes.items() if count == top))
    return predicted


@pytest.mark.parametrize("chunk_bytes", [codes_module.HAMMING_CHUNK_BYTES, 1])  # 1: one test row per block
def test_knn_hamming_matches_naive_numpy(monkeypatch, chunk_bytes):
    monkeypatch.setattr(codes_module, "HAMMING_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(3)
    train_bits, test_bits = rng.random((40, 13)) < 0.5, rng.random((17, 13)) < 0.5  # 13 bits: many ties
    y_train = rng.integers(0, 3, 40)
    train, test = np.packbits(train_bits, axis=1), np.packbits(test_bits, axis=1)
    naive_distance = (test_bits[:, None, :] != train_bits[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(hamming_distances(test, train), naive_distance)
    np.testing.assert_array_equal(knn_hamming_predict(train, y_train, test, 3), naive_knn(train_bits, y_train, test_bits))


def test_categorise_scores_match_naive_on_its_split(mlp_codes):
    from sklearn.linear_model import LogisticRegression

    codes, bits = mlp_codes
    labels = np.where(mlp_inputs()[:, 0].numpy() > 0, "right", "left")
    result = codes.categorise(labels, seed=0)
    train, test = result.train_index, result.test_index
    assert (result.n_train, result.n_test, result.n_classes) == (24, 8, 2)
    np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(32))
    y = (labels == "right").astype(int)  # np.unique order: "left" = 0, "right" = 1
    assert np.bincount(y).tolist() == [22, 10]
    assert np.all(np.abs(np.bincount(y[test]) - 8 * np.array([22, 10]) / 32) < 1)  # stratified
    kept = bits[:, codes.kept]
    expected = np.mean(np.array(naive_knn(kept[train], y[train], kept[test])) == y[test])
    assert result.knn9_hamming_accuracy == pytest.approx(expected, rel=1e-12)
    logistic = LogisticRegression(max_iter=2000, random_state=0).fit(kept[train].astype(float), y[train])
    assert result.logistic_accuracy == pytest.approx(logistic.score(kept[test].astype(float), y[test]), rel=1e-12)
    assert set(result.to_table()) == {"kmeans_purity", "knn9_hamming_accuracy", "logistic_accuracy", "n_train", "n_test", "n_classes"}


def test_purity_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([1, 1, 0, 0, 0, 2])
    assert cluster_purity(clusters, labels) == pytest.approx((2 + 2 + 1) / 6, rel=1e-12)


def test_kmeans_purity_of_two_separated_groups_by_hand():
    # Codes are the input signs (Identity site): group A near 111111000000, group B near
    # 000000111111, each code one flipped bit away from its group's centre.
    centre = np.r_[np.ones(6), -np.ones(6)]
    group_a = np.stack([centre * np.where(np.arange(12) == i, -1, 1) for i in range(8)])
    x = torch.tensor(np.concatenate([group_a, -group_a]), dtype=torch.float32)  # [16, 12]
    labels = [0] * 6 + [1] * 2 + [1] * 7 + [0]  # A: 6 of class 0; B: 7 of class 1
    codes = activation_codes(torch.nn.Sequential(torch.nn.Identity()), x, "module:0@output")
    assert codes.n_distinct == 16
    assert codes.categorise(labels).kmeans_purity == pytest.approx(13 / 16, rel=1e-12)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inputs", "sites", "options", "message"),
    [
        (torch.zeros(0, 2), "module:1@output", {}, "no examples"),
        ([], "module:1@output", {}, "non-empty list"),
        ([torch.zeros(3, 2)], "module:1@output", {}, "must be a dict"),
        (torch.zeros(4, 2), "module:9@output", {}, "no module '9'"),
        (torch.zeros(4, 2), "module:1@output", {"per": "sentence"}, "per='sentence'"),
        (torch.zeros(4, 2), "module:1@output", {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_is_an_input_error(inputs, sites, options, message):
    with pytest.raises(actscope.InputError, match=message):
        activation_codes(relu_mlp(), inputs, sites, **options)


def test_bad_labels_are_input_errors(mlp_codes):
    codes, _ = mlp_codes
    with pytest.raises(actscope.InputError, match="one entry per code"):
        codes.categorise([0, 1] * 10)
    with pytest.raises(actscope.InputError, match="at least 2"):
        codes.categorise([7] * 32)
    with pytest.raises(actscope.InputError, match="at least 2 per class"):
        codes.categorise([0] * 31 + [1])


def test_attention_patterns_are_refused(gpt2_padded):
    model, batch, _, _ = gpt2_padded
    with pytest.raises(actscope.InputError, match="attn.pattern"):
        activation_codes(model, [batch], "blocks.0.attn.pattern", per="token")
