"""The logit lens and a tuned lens: what each layer's residual stream would predict.

* **Logit lens** (nostalgebraist 2020): block l's output ``h_l`` (``blocks.{l}.resid.post``) is
  read out as if it were the last one: through the family card's readout (``model.adapter
  .readout``: the final norm, OPT's ``project_out``; none for post-norm encoders) and the
  unembedding (the output embedding module with its bias, else the tied input embeddings), as
  :mod:`actscope.explain.decode` does for neurons, but with the real modules, so the last
  layer's lens is exactly the model's logits: what a config says the model does to its logits
  after the head is done too (:data:`LOGIT_TRANSFORMS`: Gemma 2/3's soft-capping, Granite's
  ``logits_scaling``, Cohere's ``logit_scale``).
* **Tuned lens** (Belrose et al. 2023): an affine translator per layer, ``T_l(h) = h + h·A_l + b_l``,
  trained so that the lens of ``T_l(h_l)`` matches the final distribution: fitted here on the
  user's data (the first 80 % of the documents; the rest held out), first by ridge regression of
  ``h_{L-1} − h_l`` on ``[h_l, 1]`` (closed form), then ``steps`` Adam steps minimising
  ``KL(p_final ‖ p_lens)`` on minibatches of ``batch_tokens`` tokens drawn by a generator seeded
  with ``seed``: the same data and seed give the same lens. The last layer's translator is the
  identity. Gradients are taken for the translators only (``torch.autograd.grad``), so the
  model's parameters and their ``.grad`` are never touched.

:func:`logit_lens` returns, for every layer and position of a prompt, the ``top`` tokens and
their probabilities and ``kl``, the KL divergence (nats) from the final distribution;
:func:`lens_kl` the mean KL per layer over a data set's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError
from ..models import Model, ModelLike
from ..results import TableResult

RESID = "blocks.*.resid.post"
CHUNK = 256  # tokens whose [tokens, vocab] distributions are held at once


@dataclass(frozen=True, eq=False)
class LensResult(TableResult):
    """One row per (layer, position, rank): a predicted token, its probability, and the KL of
    that layer's distribution at that position from the final one."""

    table_name: ClassVar[str] = "lens"

    kind: str  # "logit" or "tuned"
    inputs: tuple[str, ...]  # the prompt's tokens (text pieces)
    layer: np.ndarray  # [rows] int64
    position: np.ndarray  # [rows] int64
    rank: np.ndarray  # [rows] int64, 0 = most likely
    token_id: np.ndarray  # [rows] int64
    token: np.ndarray  # [rows] object
    prob: np.ndarray  # [rows] float64
    kl: np.ndarray  # [rows] float64, KL(final ‖ this layer) at the row's position (nats)

    def to_table(self) -> dict[str, np.ndarray]:
        rows = len(self.layer)
        return {"kind": np.array([self.kind] * rows, dtype=object), "layer": self.layer, "position": self.position,
                "input": np.array([self.inputs[p] for p in self.position.tolist()], dtype=object), "rank": self.rank,
                "token_id": self.token_id, "token": self.token, "prob": self.prob, "kl": self.kl}

    def grid(self) -> list[list[str]]:
        """The most likely token of every layer (rows) at every position (columns)."""
        layers = sorted(set(self.layer.tolist()))
        table = {(l, p): t for l, p, r, t in zip(self.layer.tolist(), self.position.tolist(), self.rank.tolist(), self.token) if r == 0}
        return [[table[(layer, p)] for p in range(len(self.inputs))] for layer in layers]


@dataclass(frozen=True, eq=False)
class TunedLens:
    """An affine translator per layer (``A`` ``[layers, d, d]``, ``b`` ``[layers, d]``, float32)
    and how it was fitted; ``held_out`` maps ``"logit"``/``"tuned"`` to the mean KL per layer
    on the held-out documents."""

    A: torch.Tensor
    b: torch.Tensor
    seed: int
    steps: int
    tokens: int
    held_out: dict[str, list[float]]

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        a, b = self.A[layer].to(h.device, h.dtype), self.b[layer].to(h.device, h.dtype)
        return h + h @ a + b


# -- readout -----------------------------------------------------------------------------------
# What Hugging Face models do to their logits after the head, by the config field that says so
# (set and not None): whichever family carries the field, the transformation is the same.
LOGIT_TRANSFORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "final_logit_softcapping": lambda z, cap: torch.tanh(z / cap) * cap,  # Gemma 2, Gemma 3
    "logits_scaling": lambda z, s: z / s,  # Granite, GraniteMoE
    "logit_scale": lambda z, s: z * s,  # Cohere
}


def _logit_transforms(config: Any) -> list[tuple[Callable[[torch.Tensor, float], torch.Tensor], float]]:
    """The (transformation, value) pairs ``config`` sets, in :data:`LOGIT_TRANSFORMS` order."""
    values = ((LOGIT_TRANSFORMS[name], getattr(config, name, None)) for name in LOGIT_TRANSFORMS)
    return [(f, float(v)) for f, v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def readout(model: Model) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h [..., d] → logits [..., vocab]``: the card's final modules, the unembedding, then what
    the config says the model does to its logits (:data:`LOGIT_TRANSFORMS`)."""
    from ..models.adapters import Readout
    from ..models.adapters.base import resolve_module

    root = model.module
    card = model.adapter.readout if model.adapter is not None else Readout()
    finals = [] if card.post_norms is not None else [found[1] for path in card.final if (found := resolve_module(root, path))]
    head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        embeddings = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise InputError(f"{model.name} has neither an output nor an input embedding matrix, so a lens cannot read tokens out")
        head = lambda h: h @ weight.T  # noqa: E731 - tied embeddings (encoders such as MiniLM)

    after = _logit_transforms(getattr(root, "config", None))

    def apply(h: torch.Tensor) -> torch.Tensor:
        for module in finals:
            h = module(h)
        logits = head(h)
        for transform, value in after:
            logits = transform(logits, value)
        return logits

    return apply


def _residuals(model: Model, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Every block's output ``[batch, pos, d]`` for one forward call, and the model's output."""
    from ..trace import Capture

    model.require_card("the logit lens", "every block's residual stream (blocks.*.resid.post)")
    capture = Capture(model, RESID, announce=False)
    with torch.no_grad(), capture.attached():
        out = model(**inputs)
    return [capture.tensors[site.label][0] for site in capture.plan.sites], out


# -- the lens of one prompt --------------------------------------------------------------------
def logit_lens(model: ModelLike, prompt: str, *, top: int = 5, lens: TunedLens | None = None, max_length: int = 128) -> LensResult:
    """The ``top`` tokens each layer predicts at every position of ``prompt`` (``lens``: through
    a tuned lens's translators, else the plain logit lens)."""
    from ..feeding import tokenize
    from ..models import as_model

    model = as_model(model)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top must be a whole number of at least 1, got {top!r}")
    ids = tokenize(model, [prompt], max_length)[0]
    inputs = {"input_ids": torch.tensor([ids], device=model.device)}
    residuals, out = _residuals(model, inputs)
    read = readout(model)
    with torch.no_grad():
        final = torch.log_softmax(_final_logits(out, read, residuals[-1])[0].double(), -1)  # [pos, vocab]
        parts = []
        for layer, h in enumerate(residuals):
            h = lens.translate(layer, h) if lens is not None else h
            logp = torch.log_softmax(read(h)[0].double(), -1)  # [pos, vocab]
            kl = (final.exp() * (final - logp)).sum(-1)  # [pos]
            prob, token_id = torch.topk(logp.exp(), min(top, logp.shape[-1]), dim=-1)  # [pos, top]
            parts.append((layer, prob.cpu(), token_id.cpu(), kl.cpu()))
    return _lens_rows(model, "tuned" if lens is not None else "logit", ids, parts)


def _final_logits(out: Any, read: Callable, last: torch.Tensor) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 3 else read(last)


def _lens_rows(model: Model, kind: str, ids: list[int], parts: list) -> LensResult:
    positions, top = parts[0][1].shape
    columns: dict[str, list] = {"layer": [], "position": [], "rank": [], "token_id": [], "prob": [], "kl": []}
    for layer, prob, token_id, kl in parts:
        columns["layer"].append(np.full(positions * top, layer))
        columns["position"].append(np.repeat(np.arange(positions), top))
        columns["rank"].append(np.tile(np.arange(top), positions))
        columns["token_id"].append(token_id.reshape(-1).numpy())
        columns["prob"].append(prob.reshape(-1).numpy())
        columns["kl"].append(np.repeat(kl.numpy(), top))
    arrays = {key: np.concatenate(value) for key, value in columns.items()}
    texts = {i: _piece(model, i) for i in set(arrays["token_id"].tolist()) | set(ids)}
    return LensResult(kind, tuple(texts[i] for i in ids), arrays["layer"].astype(np.int64), arrays["position"].astype(np.int64),
                      arrays["rank"].astype(np.int64), arrays["token_id"].astype(np.int64),
                      np.array([texts[i] for i in arrays["token_id"].tolist()], dtype=object),
                      arrays["prob"].astype(np.float64), arrays["kl"].astype(np.float64))


def _piece(model: Model, token_id: int) -> str:
    return model.tokenizer.decode([token_id]) if model.tokenizer is not None else str(token_id)


# -- fitting a tuned lens ------------------------------------------------------------------------
def fit_tuned_lens(model: ModelLike, data: Any = None, *, seed: int = 0, steps: int = 100, lr: float = 1e-3,
                   batch_tokens: int = 256, max_tokens: int = 8192, ridge: float = 1e-2, held_out: float = 0.2,
                   batch_size: int = 8, max_length: int = 128) -> TunedLens:
    """Fit a tuned lens on ``data`` (text: a path, a list of strings, None for the built-in
    corpus) as described in the module docstring; evaluate both lenses on the held-out part."""
    from ..data import load_corpus
    from ..feeding import split_held_out
    from ..models import as_model

    model = as_model(model)
    for name, value, low in (("steps", steps, 0), ("batch_tokens", batch_tokens, 1), ("max_tokens", max_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be a whole number of at least {low}, got {value!r}")
    fit_docs, held_docs = split_held_out(list(load_corpus(data).documents), held_out)
    hidden = _stacked_residuals(model, fit_docs, max_tokens, batch_size, max_length)  # [layers, n, d]
    A, b = _ridge(hidden, ridge)
    A, b = _refine(model, hidden, A, b, seed=seed, steps=steps, lr=lr, batch_tokens=batch_tokens)
    lens = TunedLens(A.float(), b.float(), seed, steps, hidden.shape[1], {})
    held = _stacked_residuals(model, held_docs, max_tokens, batch_size, max_length)
    lens.held_out.update({"logit": _mean_kl(model, held, None), "tuned": _mean_kl(model, held, lens)})
    return lens


def _stacked_residuals(model: Model, docs: Sequence[str], max_tokens: int, batch_size: int, max_length: int) -> torch.Tensor:
    """``[layers, n, d]`` float32 residuals of the real tokens of ``docs`` (at most ``max_tokens``)."""
    from ..feeding import feed
    from ..trace import Capture

    model.require_card("the tuned lens", "every block's residual stream (blocks.*.resid.post)")
    capture = Capture(model, RESID, flat=True, announce=False)
    feed(capture, list(docs), batch_size=batch_size, max_length=max_length, max_tokens=max_tokens)
    layers = [torch.cat([r.values for r in capture.readings[site.label]]).float() for site in capture.plan.sites]
    if not layers or not len(layers[0]):
        raise DataError("the lens data produced no token; pass more text")
    return torch.stack(layers)


def _ridge(hidden: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the least-squares map of ``[h_l, 1]`` onto ``h_{L-1} − h_l`` (ridge ``λ``
    relative to the mean squared activation), float64; the last layer's is zero."""
    layers, n, d = hidden.shape
    A, b = torch.zeros(layers, d, d, dtype=torch.float64), torch.zeros(layers, d, dtype=torch.float64)
    last = hidden[-1].double()
    for layer in range(layers - 1):
        x = torch.cat([hidden[layer].double(), torch.ones(n, 1, dtype=torch.float64)], 1)  # [n, d + 1]
        gram = x.T @ x
        penalty = ridge * float(gram.diagonal()[:d].mean()) * torch.eye(d + 1, dtype=torch.float64)
        penalty[d, d] = 0.0  # the bias is not shrunk
        w = torch.linalg.solve(gram + penalty, x.T @ (last - hidden[layer].double()))  # [d + 1, d]
        A[layer], b[layer] = w[:d], w[d]
    return A, b


def _refine(model: Model, hidden: torch.Tensor, A: torch.Tensor, b: torch.Tensor, *, seed: int, steps: int, lr: float,
            batch_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` seeded Adam steps on the mean over layers of KL(final ‖ lens)."""
    if steps == 0 or hidden.shape[0] < 2:
        return A, b
    read = readout(model)
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    params = [A[:-1].float().to(device).requires_grad_(True), b[:-1].float().to(device).requires_grad_(True)]
    optimiser = torch.optim.Adam(params, lr=lr)
    layers, n, _ = hidden.shape
    for _ in range(steps):
        rows = torch.randint(0, n, (min(batch_tokens, n),), generator=generator)
        batch = hidden[:, rows].to(device)  # [layers, B, d]
        with torch.no_grad():
            target = torch.log_softmax(read(batch[-1]).float(), -1)  # [B, vocab]
        translated = batch[:-1] + torch.einsum("lbd,lde->lbe", batch[:-1], params[0]) + params[1][:, None, :]
        logp = torch.log_softmax(read(translated).float(), -1)  # [layers - 1, B, vocab]
        loss = (target.exp() * (target - logp)).sum(-1).mean()
        grads = torch.autograd.grad(loss, params)  # the translators only: the model is never touched
        for param, grad in zip(params, grads):
            param.grad = grad
        optimiser.step()
    A, b = A.clone(), b.clone()
    A[:-1], b[:-1] = params[0].detach().double().cpu(), params[1].detach().double().cpu()
    return A, b


def _mean_kl(model: Model, hidden: torch.Tensor, lens: TunedLens | None) -> list[float]:
    """Per layer, the mean over tokens of KL(final ‖ lens of that layer), in nats."""
    read = readout(model)
    layers, n, _ = hidden.shape
    totals = torch.zeros(layers, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, CHUNK):
            batch = hidden[:, start:start + CHUNK].to(model.device)
            final = torch.log_softmax(read(batch[-1]).float(), -1)
            for layer in range(layers):
                h = lens.translate(layer, batch[layer]) if lens is not None else batch[layer]
                logp = torch.log_softmax(read(h).float(), -1)
                totals[layer] += float((final.exp() * (final - logp)).sum(-1).double().sum())
    return (totals / n).tolist()


def lens_kl(model: ModelLike, data: Any = None, lens: TunedLens | None = None, *, max_tokens: int = 8192, batch_size: int = 8,
            max_length: int = 128) -> list[float]:
    """Mean KL (nats) of each layer's lens from the final distribution over ``data``'s tokens."""
    from ..data import load_corpus
    from ..models import as_model

    model = as_model(model)
    hidden = _stacked_residuals(model, list(load_corpus(data).documents), max_tokens, batch_size, max_length)
    return _mean_kl(model, hidden, lens)
