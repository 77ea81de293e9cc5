"""Neuron → vocabulary decoding: planted weights come back, the bulk result equals a naive
per-unit loop written from the definition, and decode_agreement counts matches exactly."""
from __future__ import annotations

import types

import numpy as np
import pyarrow as pa
import pytest
import torch

import actscope
from actscope.explain.decode import DecodedNeurons, decode, decode_agreement
from actscope.zoo.tiny import tiny_model

F64 = torch.float64


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Random rows (the padding row of an embedding is all zeros), centred and scaled to norm 1:
    then a row scores highest against itself (through any centring norm too), so a planted
    direction has exactly one top token."""
    random = torch.randn(matrix.shape, generator=torch.Generator().manual_seed(3))
    centred = random - random.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True)


PLANTED = {3: 17, 10: 99, 40: 5}  # unit → token


def plant(down_weight: torch.Tensor, unembed: torch.Tensor, scale: float = 4.0) -> None:
    """W_out[:, unit] = ±scale · W_U[token]: unit 40 suppresses its token, the others promote."""
    with torch.no_grad():
        for unit, token in PLANTED.items():
            sign = -1.0 if unit == 40 else 1.0
            down_weight[:, unit] = sign * scale * unembed[token]


def check_planted(decoded: DecodedNeurons, site: str) -> None:
    for unit, token in PLANTED.items():
        direction = "suppressed" if unit == 40 else "promoted"
        keep = (decoded.site == site) & (decoded.unit == unit) & (decoded.direction == direction) & (decoded.rank == 0)
        assert decoded.token_id[keep].tolist() == [token], (unit, direction)


def test_llama_planted_tokens_come_back():
    module, _ = tiny_model("llama")
    with torch.no_grad():
        module.lm_head.weight.copy_(unit_rows(module.lm_head.weight))
        module.model.norm.weight.fill_(1.0)
    plant(module.model.layers[1].mlp.down_proj.weight, module.lm_head.weight)
    decoded = decode(module, "blocks.1.mlp.post", top=5)
    check_planted(decoded, "blocks.1.mlp.post")
    assert decoded.target == "next"
    assert len(decoded.site) == 2 * 64 * 5


@pytest.mark.parametrize("family", ["gpt2", "gemma", "bert"])
def test_tied_embeddings_planted_tokens_come_back(family):
    module, _ = tiny_model(family)
    embed = module.get_input_embeddings().weight
    with torch.no_grad():
        embed.copy_(unit_rows(embed))
        if family == "gemma":
            module.model.norm.weight.fill_(0.0)  # Gemma's RMSNorm scales by 1 + weight
    if family == "gpt2":
        down = module.transformer.h[0].mlp.c_proj.weight.T  # Conv1D keeps [d_ff, d_model]
    elif family == "gemma":
        down = module.model.layers[0].mlp.down_proj.weight
    else:
        down = module.encoder.layer[0].output.dense.weight
    plant(down, embed)
    decoded = decode(module, "blocks.0.mlp.post[3,10,40]", top=3)
    check_planted(decoded, "blocks.0.mlp.post")
    assert sorted(set(decoded.unit.tolist())) == [3, 10, 40]
    assert decoded.target == ("same" if family == "bert" else "next")


def naive_scores(family, module, layer, unit):
    """The definition, written out for one unit of each family."""
    if family == "llama":
        d = module.model.layers[layer].mlp.down_proj.weight[:, unit].double()
        d = module.model.norm.weight.double() * d
        return module.lm_head.weight.double() @ d
    if family == "gpt2":
        d = module.transformer.h[layer].mlp.c_proj.weight[unit, :].double()
        d = module.transformer.ln_f.weight.double() * (d - d.mean())
        return module.transformer.wte.weight.double() @ d
    if family == "bert":
        layers = module.encoder.layer
        d = layers[layer].output.dense.weight[:, unit].double()
        norms = [layers[layer].output.LayerNorm] + [n for j in range(layer + 1, len(layers)) for n in (layers[j].attention.output.LayerNorm, layers[j].output.LayerNorm)]
        for norm in norms:
            d = norm.weight.double() * (d - d.mean())
        return module.embeddings.word_embeddings.weight.double() @ d
    if family == "mixtral":
        d = module.model.layers[layer].mlp.experts.down_proj[2][:, unit].double()
        d = module.model.norm.weight.double() * d
        return module.lm_head.weight.double() @ d
    raise AssertionError(family)


@pytest.mark.parametrize(("family", "site"), [
    ("llama", "blocks.1.mlp.post"), ("gpt2", "blocks.0.mlp.post"), ("bert", "blocks.0.mlp.post"),
    ("mixtral", "blocks.1.moe.experts.2.post"),
])
def test_bulk_equals_a_naive_per_unit_loop(family, site):
    module, _ = tiny_model(family)
    with torch.no_grad():  # make the norms' gains matter
        for name, p in module.named_parameters():
            if "norm" in name.lower() and p.dim() == 1 and name.endswith("weight"):
                p.copy_(torch.linspace(0.5, 1.5, p.numel()))
    top = 4
    decoded = decode(module, site, top=top)
    layer = int(site.split(".")[1])
    units = sorted(set(decoded.unit.tolist()))
    assert units == list(range(len(units))) and len(units) in (48, 64)
    for unit in units:
        scores = naive_scores(family, module, layer, unit).detach()
        for direction, order in (("promoted", torch.argsort(scores, descending=True)), ("suppressed", torch.argsort(scores))):
            keep = (decoded.unit == unit) & (decoded.direction == direction)
            assert decoded.rank[keep].tolist() == list(range(top))
            assert decoded.token_id[keep].tolist() == order[:top].tolist()
            np.testing.assert_allclose(decoded.score[keep], scores[order[:top]].numpy(), rtol=1e-6, atol=1e-12)


def test_norm_as_linear_map_ranks_like_the_real_norm():
    """For one direction, the module itself gives g ⊙ (d − mean d) / σ + b: minus b it is our map
    times a positive number, so it ranks the vocabulary the same way."""
    module, _ = tiny_model("gpt2")
    decoded = decode(module, "blocks.1.mlp.post[7]", top=6)
    d = module.transformer.h[1].mlp.c_proj.weight[7, :].detach()
    ln = module.transformer.ln_f
    mapped = (ln(d[None])[0] - ln.bias).detach().double()
    order = torch.argsort(module.transformer.wte.weight.detach().double() @ mapped, descending=True)
    assert decoded.token_id[decoded.direction == "promoted"].tolist() == order[:6].tolist()


def test_minilm_decodes_words(minilm):
    decoded = decode(minilm, "blocks.5.mlp.post[0,1]", top=5)
    assert decoded.target == "same"
    assert len(decoded.site) == 2 * 2 * 5
    tokens = decoded.tokens("blocks.5.mlp.post", 0)
    assert len(tokens) == 5 and all(isinstance(t, str) and t for t in tokens)
    embed = minilm.module.embeddings.word_embeddings.weight.double()
    ln = minilm.module.encoder.layer[5].output.LayerNorm
    d = minilm.module.encoder.layer[5].output.dense.weight[:, 0].double()
    d = ln.weight.double() * (d - d.mean())
    scores = embed @ d
    scores[minilm.tokenizer.all_special_ids] = -torch.inf  # [PAD], [UNK], [CLS], [SEP], [MASK] are skipped
    expected = torch.argsort(scores, descending=True)[:5]
    assert decoded.token_id[(decoded.unit == 0) & (decoded.direction == "promoted")].tolist() == expected.tolist()
    assert tokens == [minilm.tokenizer.decode([i]) for i in expected.tolist()]


def test_special_tokens_are_skipped_unless_asked():
    from conftest import word_tokenizer

    module, _ = tiny_model("llama")
    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(125)]
    tokenizer = word_tokenizer(words, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    with torch.no_grad():
        module.lm_head.weight.copy_(unit_rows(module.lm_head.weight))
        module.model.norm.weight.fill_(1.0)
        for unit, token in ((3, 0), (4, 1), (5, 2)):  # pad, unk, eos
            module.model.layers[0].mlp.down_proj.weight[:, unit] = 4.0 * module.lm_head.weight[token]
    model = actscope.wrap(module, tokenizer=tokenizer)
    first = lambda decoded: decoded.token_id[(decoded.rank == 0) & (decoded.direction == "promoted")].tolist()  # noqa: E731
    kept = first(decode(model, "blocks.0.mlp.post[3,4,5]", top=2))
    assert kept[0] not in (0, 1) and kept[1] not in (0, 1) and kept[2] == 2  # EOS is predicted, so it stays
    assert first(decode(model, "blocks.0.mlp.post[3,4,5]", top=2, skip_special=False)) == [0, 1, 2]
    assert decode(model, "blocks.0.mlp.post[3]", top=2).tokens("blocks.0.mlp.post", 3)[0].startswith("w")


@pytest.mark.parametrize(("site", "top", "message"), [
    ("blocks.0.attn.z", 3, "MLP neuron site"),
    ("blocks.0.mlp.post[64]", 3, "unit 64 is out of range"),
    ("blocks.0.mlp.post", 0, "top must be"),
    ("blocks.9.mlp.post", 3, "unknown site"),
])
def test_bad_input_is_refused(site, top, message):
    module, _ = tiny_model("llama")
    with pytest.raises(actscope.InputError, match=message):
        decode(module, site, top=top)


def fake_decoded(target="next") -> DecodedNeurons:
    rows = [  # (unit, direction, rank, token)
        (3, "promoted", 0, " cat"), (3, "promoted", 1, "Ġdog"), (3, "suppressed", 0, "fish"),
        (5, "promoted", 0, "sun"), (5, "promoted", 1, "moon"), (8, "promoted", 0, "x"),
    ]
    n = len(rows)
    return DecodedNeurons(
        site=np.array(["blocks.0.mlp.post"] * n, dtype=object), layer=np.zeros(n, dtype=np.int64),
        unit=np.array([r[0] for r in rows]), direction=np.array([r[1] for r in rows], dtype=object),
        rank=np.array([r[2] for r in rows]), token_id=np.arange(n), token=np.array([r[3] for r in rows], dtype=object),
        score=np.zeros(n), target=target,
    )


def fake_run():
    examples = [  # (site, unit, token, right)
        ("blocks.0.mlp.post", 3, "a", " cat sat down"), ("blocks.0.mlp.post", 3, "b", "dog"),
        ("blocks.0.mlp.post", 3, "c", "fish cat"), ("blocks.0.mlp.post", 3, "d", "catalog"),
        ("blocks.0.mlp.post", 5, "moon", "sun"), ("blocks.0.mlp.post", 5, "x", ""),
        ("blocks.1.mlp.post", 8, "x", "x"),
    ]
    table = pa.table({
        "site": [e[0] for e in examples], "unit": [e[1] for e in examples],
        "token": [e[2] for e in examples], "right": [e[3] for e in examples],
    })
    return types.SimpleNamespace(examples=table)


def test_decode_agreement_counts_next_word_matches():
    agreement = decode_agreement(fake_decoded(), fake_run())
    table = {int(u): (int(e), int(m), a) for u, e, m, a in zip(agreement.unit, agreement.examples, agreement.matches, agreement.agreement)}
    assert table[3][:2] == (4, 2) and table[3][2] == pytest.approx(0.5)  # "cat", "dog"; not "fish", "catalog"
    assert table[5][:2] == (2, 1) and table[5][2] == pytest.approx(0.5)
    assert table[8][:2] == (0, 0) and np.isnan(table[8][2])  # unit 8 has examples only at another site
    top1 = decode_agreement(fake_decoded(), fake_run(), top=1)
    assert top1.matches[top1.unit == 3].tolist() == [1]


def test_decode_agreement_same_token_for_encoders():
    agreement = decode_agreement(fake_decoded(target="same"), fake_run())
    assert agreement.matches[agreement.unit == 5].tolist() == [1]  # the activating token "moon"
    assert agreement.matches[agreement.unit == 3].tolist() == [0]
    with pytest.raises(actscope.InputError, match="target must be"):
        decode_agreement(fake_decoded(), fake_run(), target="previous")
