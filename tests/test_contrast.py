"""contrast() against naive per-prompt loops; ablation_effect and token_probability by hand."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import actscope
from actscope.errors import InputError
from actscope.explain.contrast import (
    Target, ablation_effect, contrast, effect_sizes, permutation_p_values, token_probability,
)
from actscope.interventions.experts import experts
from actscope.zoo.tiny import tiny_model
from conftest import model_state, word_tokenizer

PERMUTATIONS = 300


def prompts(low: int, high: int, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """``n`` token-id prompts of varying length from ``[low, high)``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (length - i % 3,), generator=generator) for i in range(n)]


def as_batches(rows: list[torch.Tensor], size: int = 3) -> list[dict[str, torch.Tensor]]:
    """Right-padded model-input dicts (padding with id 0, masked out)."""
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        ids = torch.zeros(len(chunk), max(len(r) for r in chunk), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def naive_per_prompt(module, rows, layer_modules):
    """Per prompt (run alone, no padding): {name: [items] mean over its tokens} via plain hooks."""
    values = {name: [] for name in layer_modules}
    for row in rows:
        seen = {}
        handles = [mod.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args))
                   for name, (mod, _) in layer_modules.items()]
        with torch.no_grad():
            module(input_ids=row[None])
        for handle in handles:
            handle.remove()
        for name, (_, reduce) in layer_modules.items():
            values[name].append(reduce(seen[name]).double().mean(dim=0))
    return {name: torch.stack(v).numpy() for name, v in values.items()}


def naive_stats(b: np.ndarray, c: np.ndarray, item: int) -> tuple[float, float]:
    xb, xc = [float(v) for v in b[:, item]], [float(v) for v in c[:, item]]
    mb, mc = sum(xb) / len(xb), sum(xc) / len(xc)
    ssb, ssc = sum((v - mb) ** 2 for v in xb), sum((v - mc) ** 2 for v in xc)
    pooled = math.sqrt((ssb + ssc) / (len(xb) + len(xc) - 2))
    return mb - mc, (mb - mc) / pooled


def naive_p_value(b: np.ndarray, c: np.ndarray, item: int, n_permutations: int, seed: int, two_sided: bool) -> float:
    both = [float(v) for v in np.concatenate([b[:, item], c[:, item]])]
    observed = sum(both[:len(b)]) / len(b) - sum(both[len(b):]) / len(c)
    slack = 1e-9 * max(abs(v) for v in both)
    rng = np.random.default_rng(seed)
    count = 0
    for _ in range(n_permutations):
        order = rng.permutation(len(both))
        group = [both[i] for i in order[:len(b)]]
        rest = [both[i] for i in order[len(b):]]
        diff = sum(group) / len(group) - sum(rest) / len(rest)
        count += (abs(diff) >= abs(observed) - slack) if two_sided else (diff >= observed - slack)
    return (1 + count) / (1 + n_permutations)


def row_of(result, site: str, index: int) -> dict:
    table = result.to_table()
    where = np.flatnonzero((table["site"] == site) & (table["index"] == index))
    assert len(where) == 1
    return {name: column[where[0]] for name, column in table.items()}


def check_against_naive(result, naive_b, naive_c, site, items):
    for item in range(items):
        row = row_of(result, site, item)
        np.testing.assert_allclose(row["behaviour_mean"], naive_b[:, item].mean(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(row["control_mean"], naive_c[:, item].mean(), rtol=1e-6, atol=1e-7)
        difference, d = naive_stats(naive_b, naive_c, item)
        np.testing.assert_allclose(row["difference"], difference, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row["effect_size"], d, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama_sets():
    module, _ = tiny_model("llama")
    behaviour, control = prompts(1, 64, 7, 6, seed=1), prompts(64, 128, 8, 6, seed=2)
    result = contrast(module, as_batches(behaviour), as_batches(control), "blocks.1.mlp.post,blocks.0.attn.z",
                      n_permutations=PERMUTATIONS, seed=3)
    layer = module.model.layers
    d_head = module.config.hidden_size // module.config.num_attention_heads
    reducers = {
        "mlp": (layer[1].mlp.down_proj, lambda args: args[0][0]),
        "heads": (layer[0].self_attn.o_proj, lambda args: args[0][0].reshape(args[0].shape[1], -1, d_head).norm(dim=-1)),
    }
    return module, result, naive_per_prompt(module, behaviour, reducers), naive_per_prompt(module, control, reducers)


def test_unit_and_head_ranking_equals_naive_loops(llama_sets):
    module, result, naive_b, naive_c = llama_sets
    check_against_naive(result, naive_b["mlp"], naive_c["mlp"], "blocks.1.mlp.post", module.config.intermediate_size)
    check_against_naive(result, naive_b["heads"], naive_c["heads"], "blocks.0.attn.z", module.config.num_attention_heads)
    table = result.to_table()
    assert list(table["rank"]) == list(range(1, len(table["rank"]) + 1))
    assert np.all(np.diff(table["effect_size"]) <= 0)
    assert set(table["kind"]) == {"unit", "head"}
    assert result.n_behaviour == 7 and result.n_control == 8


def test_rank_by_difference_orders_by_the_raw_gap():
    module, _ = tiny_model("llama")
    behaviour, control = as_batches(prompts(1, 64, 5, 5, seed=1)), as_batches(prompts(64, 128, 5, 5, seed=2))
    by_d = contrast(module, behaviour, control, "blocks.0.mlp.post", n_permutations=20).to_table()
    by_gap = contrast(module, behaviour, control, "blocks.0.mlp.post", n_permutations=20, rank_by="difference").to_table()
    assert np.all(np.diff(by_gap["difference"]) <= 0)
    assert sorted(zip(by_gap["index"], by_gap["p_value"])) == sorted(zip(by_d["index"], by_d["p_value"]))
    assert list(by_gap["index"]) != list(by_d["index"])


def test_p_values_equal_a_naive_permutation_loop(llama_sets):
    module, result, naive_b, naive_c = llama_sets
    for item in (0, 5, 17, 40):
        row = row_of(result, "blocks.1.mlp.post", item)
        assert row["p_value"] == naive_p_value(naive_b["mlp"], naive_c["mlp"], item, PERMUTATIONS, 3, False)


def test_two_sided_p_values_equal_the_naive_loop():
    generator = np.random.default_rng(0)
    b, c = generator.normal(0.3, 1, (6, 5)), generator.normal(0, 1, (9, 5))
    got = permutation_p_values(b, c, 150, 11, "two-sided")
    assert [float(p) for p in got] == [naive_p_value(b, c, i, 150, 11, True) for i in range(5)]


def test_expert_routing_frequency_equals_the_models_own_routing():
    module, _ = tiny_model("mixtral")
    behaviour, control = prompts(1, 64, 6, 6, seed=4), prompts(64, 128, 6, 6, seed=5)
    result = contrast(module, as_batches(behaviour), as_batches(control), "blocks.*.moe.router", n_permutations=PERMUTATIONS)
    experts_count = module.config.num_local_experts

    def frequency(args):  # the experts module's own top_k_index [tokens, k] → [tokens, experts] 0/1
        return torch.nn.functional.one_hot(args[1], experts_count).sum(dim=1)

    reducers = {f"layer{i}": (layer.mlp.experts, frequency) for i, layer in enumerate(module.model.layers)}
    naive_b, naive_c = naive_per_prompt(module, behaviour, reducers), naive_per_prompt(module, control, reducers)
    for i in range(len(module.model.layers)):
        check_against_naive(result, naive_b[f"layer{i}"], naive_c[f"layer{i}"], f"blocks.{i}.moe.router", experts_count)
        for e in range(experts_count):  # frequencies tie often: the slack must count ties exactly
            row = row_of(result, f"blocks.{i}.moe.router", e)
            assert row["p_value"] == naive_p_value(naive_b[f"layer{i}"], naive_c[f"layer{i}"], e, PERMUTATIONS, 0, False)


class Planted(torch.nn.Module):
    """Embedding → Linear → ReLU where only token 1 drives unit 3 (and strongly)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 6)
        self.act = torch.nn.ReLU()
        with torch.no_grad():
            self.embed.weight[:, 7] = 0.0
            self.embed.weight[1, 7] = 5.0
            self.proj.weight[3] = 0.0
            self.proj.weight[3, 7] = 1.0
            self.proj.bias[3] = 0.0

    def forward(self, input_ids, attention_mask=None):
        return self.act(self.proj(self.embed(input_ids)))


def test_planted_differential_unit_ranks_first_with_the_smallest_p_value():
    model = actscope.wrap(Planted())
    behaviour = [torch.cat([torch.tensor([1]), row]) for row in prompts(2, 16, 10, 5, seed=6)]
    control = prompts(2, 16, 10, 6, seed=7)
    result = contrast(model, as_batches(behaviour), as_batches(control), "module:act@output", n_permutations=PERMUTATIONS)
    first = result.top(1)[0]
    assert (first.kind, first.site, first.index) == ("unit", "module:act@output", 3)
    assert result.to_table()["p_value"][0] == 1 / (1 + PERMUTATIONS)
    assert result.to_table()["effect_size"][0] > 2 * result.to_table()["effect_size"][1]


def test_zero_pooled_variance_gives_infinite_or_zero_effect():
    same, ones, zeros = np.array([[2.0], [2.0]]), np.ones((3, 1)), np.zeros((2, 1))
    assert effect_sizes(ones, zeros)["effect_size"][0] == np.inf
    assert effect_sizes(zeros, ones)["effect_size"][0] == -np.inf
    assert effect_sizes(same, same)["effect_size"][0] == 0.0


def test_ablation_effect_equals_metrics_computed_by_hand():
    module, inputs = tiny_model("mixtral")
    before = model_state(module)

    def metric(model):
        return float(module(**inputs).logits.softmax(-1)[..., 5].mean())

    ranking = [Target("expert", "blocks.0.moe.router", 0, e) for e in (2, 0, 1, 3)]
    ranking += [Target("unit", "blocks.1.mlp.out", 1, u) for u in (4, 9, 11)]
    top = ranking[:1] + ranking[4:5]
    ordered = ranking[:1] + ranking[4:5] + ranking[1:4] + ranking[5:]
    effect = ablation_effect(module, metric, ordered, 2, random_seed=5, draws=3)
    by_hand = copy.deepcopy(module)
    with torch.no_grad():
        baseline = float(by_hand(**inputs).logits.softmax(-1)[..., 5].mean())
    assert effect.baseline == pytest.approx(baseline, rel=1e-6)
    with torch.no_grad(), experts(module, off={0: [2]}), actscope.edit(module, {"blocks.1.mlp.out[4]": actscope.interventions.zero()}):
        assert effect.top == pytest.approx(metric(module), rel=1e-6)
    rng = np.random.default_rng(5)
    for draw in range(3):
        unit = [ranking[5:][i] for i in sorted(rng.choice(2, size=1, replace=False))]  # kinds in order: units first
        expert = [ranking[1:4][i] for i in sorted(rng.choice(3, size=1, replace=False))]
        assert effect.random_targets[draw] == tuple(unit + expert)
    assert effect.top_targets == tuple(top)
    assert effect.top != pytest.approx(effect.baseline, rel=1e-4)
    table = effect.to_table()
    assert list(table["set"]) == ["baseline", "top", "random", "random", "random"]
    np.testing.assert_allclose(table["change"], table["metric"] - effect.baseline)
    assert model_state(module) == before


def test_switching_off_heads_equals_zeroed_output_projection_columns():
    module, inputs = tiny_model("llama")
    d_head = module.config.hidden_size // module.config.num_attention_heads
    by_hand = copy.deepcopy(module)
    for head in (1, 3):
        by_hand.model.layers[0].self_attn.o_proj.weight.data[:, head * d_head:(head + 1) * d_head] = 0

    def metric(model):
        return float(model(**inputs).logits[..., 2].mean())

    heads = [Target("head", "blocks.0.attn.z", 0, h) for h in (3, 1, 0, 2)]
    effect = ablation_effect(module, metric, heads, 2, draws=2)
    with torch.no_grad():
        assert effect.top == pytest.approx(metric(by_hand), rel=1e-5)
    assert {t.index for draw in effect.random_targets for t in draw} == {0, 2}


def test_token_probability_equals_softmax_of_each_prompt_alone():
    module, _ = tiny_model("llama")
    words = ["<pad>", "<s>"] + [f"w{i}" for i in range(126)]
    model = actscope.wrap(module, tokenizer=word_tokenizer(words, bos="<s>", pad_token="<pad>"))
    texts = ["w3 w9 w4", "w7 w7", "w50 w2 w9 w11"]
    metric = token_probability(texts, ["w5", "w6", "w7"], batch_size=2)
    expected = []
    with torch.no_grad():
        for text, target in zip(texts, (7, 8, 9)):
            ids = torch.tensor([[1] + [words.index(w) for w in text.split()]])
            expected.append(float(module(input_ids=ids).logits[0, -1].softmax(-1)[target]))
    assert metric(model) == pytest.approx(sum(expected) / 3, rel=1e-6)
    ids_metric = token_probability([[1, 5, 11, 6], [1, 9, 9]], 7)
    assert ids_metric(module) == pytest.approx(ids_metric(model), rel=1e-12)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_permutations": 0}, "n_permutations"),
    ({"alternative": "less"}, "alternative"),
    ({"rank_by": "p_value"}, "rank_by"),
    ({"sites": "blocks.0.attn.pattern"}, "use attn.z"),
])
def test_bad_options_are_refused(kwargs, message):
    module, _ = tiny_model("llama")
    sets = as_batches(prompts(1, 64, 3, 4, seed=0))
    with pytest.raises(InputError, match=message):
        contrast(module, sets, sets, **{"sites": "blocks.0.mlp.post", **kwargs})


def test_one_prompt_is_not_a_set():
    module, _ = tiny_model("llama")
    with pytest.raises(InputError, match="at least 2"):
        contrast(module, as_batches(prompts(1, 64, 1, 4, seed=0)), as_batches(prompts(1, 64, 3, 4, seed=1)), "blocks.0.mlp.post")


def test_two_tasks_follow_their_rules_and_training_is_cached_atomically(tmp_path):
    from actscope.zoo.moe_tasks import FIRST_SYMBOL, SEP, TwoTasks, read_meta, task_of, train_moe_tasks

    tasks = TwoTasks(n_symbols=8, length=5, seed=3)
    a, b = tasks.sample("A", 4, seed=1), tasks.sample("B", 4, seed=1)
    x = a[:, 2:7] - FIRST_SYMBOL
    assert torch.equal(a[:, 7], torch.full((4,), SEP))
    assert torch.equal(a[:, 8:] - FIRST_SYMBOL, x.flip(1))
    for row in range(4):
        for i in range(5):
            assert int(b[row, 8 + i]) - FIRST_SYMBOL == int(tasks.permutation[int(b[row, 2 + i]) - FIRST_SYMBOL])
    assert sorted(tasks.permutation.tolist()) == list(range(8))
    assert tasks.scored == slice(7, 12)  # SEP predicts y1, the position before the last predicts y5

    target = tmp_path / "moe"
    path = train_moe_tasks(steps=3, out_dir=target)
    assert path == target and read_meta(path)["config"]["steps"] == 3 and task_of(path) == TwoTasks()
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]  # no temporary sibling left behind
    stamp = (path / "actscope_zoo.json").stat().st_mtime_ns
    assert train_moe_tasks(steps=3, out_dir=target) == path
    assert (path / "actscope_zoo.json").stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(InputError, match="task must be one of"):
        tasks.sample("C", 2)
