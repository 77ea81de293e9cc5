"""EigenScore (INSIDE) and the Efficient EigenScore (SeND) of K sampled answers' embeddings.

What is computed, exactly. ``Z`` is ``[K, d]``: one embedding per sampled answer. Following
INSIDE, each embedding is centred over its own d features, ``J_d = I_d − 1·1ᵀ/d``, and

    Σ = Z · J_d · Zᵀ / (d − 1)            # [K, K]; the same as torch.cov(Z) / numpy.cov(Z)
    EigenScore = (1/K) · log det(Σ + α·I_K) = mean_k log λ_k(Σ + α·I_K)

with the natural logarithm and α = 1e-3. (The INSIDE paper writes Σ without the 1/(d − 1);
its reference code uses ``torch.cov`` (with it) and ``log10``: divide our score by ln 10 to
compare with numbers from that code.) Higher means the answers' embeddings spread over more
directions, which INSIDE reads as the model being less sure (more likely hallucinating).

Which embedding. By default the one INSIDE uses: the hidden state of each answer's last token
at the middle layer, i.e. Hugging Face's ``hidden_states[(L + 1) // 2]`` of an L-block model
(the output of block ``(L + 1) // 2 − 1``; block 15 of a 32-block Llama), read in one forward
pass over prompt + answer. ``site=``/``pool=`` choose another: ``pool="mean"`` with the last
block's ``resid.post`` is the mean-pooled last-layer variant (:data:`MEAN_LAST_LAYER`).

:func:`eigenscore_exact` takes the eigenvalues. :func:`eigenscore_efficient` never does:

* It works on the smaller of the two Gram matrices. With ``B = Z·J_d/√(d−1)`` (``[K, d]``),
  ``BBᵀ`` and ``BᵀB`` share their non-zero eigenvalues, so for K > d
  ``log det(α·I_K + BBᵀ) = (K − d)·log α + log det(α·I_d + BᵀB)`` (exact).
* The spectrum of ``A = Gram + α·I`` lies in ``[a, b]`` with ``a = α`` (the Gram matrix is
  positive semi-definite, and duplicate answers really do put eigenvalues at α) and ``b`` the
  smaller of the Gershgorin bound (largest absolute row sum) and the Frobenius norm, both
  guaranteed upper bounds of the largest eigenvalue.
* Mapped to ``t ∈ [−1, 1]``, log has a closed-form Chebyshev series: with
  ``r = (√b − √a)/(√b + √a)``, ``log λ = 2·log((√a + √b)/2) − 2·Σ_{k≥1} (−r)^k/k · T_k(t)``.
  Truncated after n terms its error is at most ``2·r^{n+1}/((n+1)(1 − r))`` for every
  eigenvalue at once; by default n is the smallest that makes this ≤ 1e-3. n grows like
  ``√(b/α)``: a few thousand for a tiny LM's un-normalised hidden states.
* The traces ``tr T_k(Ã)`` for k ≥ 3 come from Hutchinson's estimator with Rademacher probes
  ``v`` (``tr M ≈ mean_v vᵀMv``), by the three-term recurrence on the block of probes (one
  ``[m, m] @ [m, probes]`` product per moment). Those for k ≤ 2 are exact and cheap (``m``,
  ``tr Ã``, ``2‖Ã‖_F² − m``); they carry the largest coefficients, and using them halves the
  sampling error on random tests. This is the kernel-polynomial (density-of-states) method
  without a damping kernel: log is smooth on the interval, so plain truncation is more
  accurate.

The estimate's error is the Hutchinson sampling error (shrinking as 1/√probes) plus at most
1e-3 from truncation. At the sizes EigenScore is used at (K of 10–20 answers) and up to
K = 256, :func:`eigenscore_exact` is the faster of the two (``examples/send_sensitivity.py``
measures both); the estimate is here to reproduce SeND's metric.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult
from ..models import Model

DEFAULT_ALPHA = 1e-3
DEFAULT_PROBES = 128
MOMENT_TOLERANCE = 1e-3  # bound on the truncation error of the log series, in log units
MAX_AUTO_MOMENTS = 50_000  # cost: one [m, m] @ [m, probes] product per moment
SINGLE_THREAD_SIZE = 512  # the moment recurrence runs on one thread up to this matrix size
POOLS = ("mean", "last")
MEAN_LAST_LAYER = {"site": "last", "pool": "mean"}  # eigenscore(model, prompt, **MEAN_LAST_LAYER)


# -- scores of given embeddings -------------------------------------------------------
def eigenscore_exact(embeddings: Any, alpha: float = DEFAULT_ALPHA) -> float:
    """Mean of ``log λ`` over the eigenvalues of ``Σ + α·I`` (Σ: K×K covariance of the
    feature-centred embeddings ``[K, d]``; see the module docstring). Float64."""
    _check_alpha(alpha)
    centred = _centred(_checked_embeddings(embeddings))  # [K, d]
    covariance = centred @ centred.T  # [K, K]
    eigenvalues = torch.linalg.eigvalsh(covariance + alpha * torch.eye(len(covariance), dtype=torch.float64))
    return float(eigenvalues.log().mean())


def eigenscore_efficient(
    embeddings: Any,
    alpha: float = DEFAULT_ALPHA,
    moments: int | None = None,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> float:
    """The same quantity as :func:`eigenscore_exact`, estimated with a Chebyshev expansion of
    log and Hutchinson probes (no eigendecomposition). ``moments``: terms of the expansion
    (default: enough for a truncation error ≤ 1e-3); ``probes``: Rademacher vectors, drawn
    from ``seed`` (the result is deterministic given the seed)."""
    _check_alpha(alpha)
    _check_count("probes", probes)
    if moments is not None:
        _check_count("moments", moments)
    centred = _centred(_checked_embeddings(embeddings))  # [K, d]
    size, features = centred.shape
    gram = centred.T @ centred if size > features else centred @ centred.T  # [m, m], m = min(K, d)
    matrix = gram + alpha * torch.eye(len(gram), dtype=torch.float64)
    dropped = size - len(gram)  # eigenvalues of the K×K form that are exactly α
    trace_log = _trace_log(matrix, alpha, moments, probes, seed)
    return (dropped * math.log(alpha) + trace_log) / size


def _trace_log(matrix: torch.Tensor, low: float, moments: int | None, probes: int, seed: int) -> float:
    """Hutchinson–Chebyshev estimate of ``tr log(matrix)`` for a spectrum inside ``[low, b]``."""
    high = _upper_bound(matrix)
    if high <= low * (1 + 1e-12):  # the whole spectrum is α: no expansion needed
        return len(matrix) * math.log(low)
    ratio = (math.sqrt(high) - math.sqrt(low)) / (math.sqrt(high) + math.sqrt(low))  # r in (0, 1)
    terms = moments if moments is not None else _moments_needed(ratio, low, high)
    scaled = (2 * matrix - (high + low) * torch.eye(len(matrix), dtype=torch.float64)) / (high - low)  # spectrum in [-1, 1]
    traces = _chebyshev_traces(scaled, terms, probes, seed)  # [terms + 1]
    k = torch.arange(1, terms + 1, dtype=torch.float64)
    coefficients = -2 * (-ratio) ** k / k
    return float(2 * math.log((math.sqrt(low) + math.sqrt(high)) / 2) * traces[0] + coefficients @ traces[1:])


def _upper_bound(matrix: torch.Tensor) -> float:
    """A guaranteed bound on the largest eigenvalue of a symmetric matrix."""
    gershgorin = float(matrix.abs().sum(dim=1).max())
    frobenius = float(torch.linalg.matrix_norm(matrix))
    return min(gershgorin, frobenius)


def _moments_needed(ratio: float, low: float, high: float) -> int:
    """Smallest n with the truncation bound 2·r^{n+1}/((n+1)(1−r)) ≤ MOMENT_TOLERANCE."""
    n = 1
    while 2 * ratio ** (n + 1) / ((n + 1) * (1 - ratio)) > MOMENT_TOLERANCE:
        n += 1
        if n > MAX_AUTO_MOMENTS:
            raise InputError(
                f"the covariance spectrum spans [{low:g}, {high:g}] (condition number {high / low:.3g}); a Chebyshev "
                f"expansion of log within {MOMENT_TOLERANCE:g} needs more than {MAX_AUTO_MOMENTS} moments. Raise alpha, "
                "pass moments=N explicitly (accepting the truncation error), or use eigenscore_exact"
            )
    return n


def _chebyshev_traces(scaled: torch.Tensor, terms: int, probes: int, seed: int) -> torch.Tensor:
    """Estimates of ``tr T_k(scaled)`` for k = 0..terms (``[terms + 1]``): exact for k ≤ 2
    (``m``, the trace, ``2‖·‖_F² − m``: cheap, and they carry the largest coefficients, so
    this removes much of the sampling error), Hutchinson with Rademacher probes beyond."""
    size = len(scaled)
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randint(0, 2, (size, probes), generator=generator).to(torch.float64) * 2 - 1  # [m, probes]
    traces = torch.empty(terms + 1, dtype=torch.float64)
    exact = torch.stack([torch.tensor(float(size), dtype=torch.float64), scaled.trace(), 2 * (scaled * scaled).sum() - size])
    traces[: min(terms + 1, 3)] = exact[: terms + 1]
    # Thousands of small products: with several threads, each one waits on the others (up to
    # ~100x slower when the cores are shared), so small matrices run on one thread.
    threads = torch.get_num_threads()
    if size <= SINGLE_THREAD_SIZE:
        torch.set_num_threads(1)
    try:
        previous, current = vectors, scaled @ vectors  # T_0 v, T_1 v
        for k in range(2, terms + 1):
            previous, current = current, 2 * (scaled @ current) - previous  # T_k = 2·x·T_{k-1} − T_{k-2}
            if k >= 3:
                traces[k] = (vectors * current).sum() / probes
    finally:
        torch.set_num_threads(threads)
    return traces


def _checked_embeddings(embeddings: Any) -> torch.Tensor:
    values = embeddings.detach() if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
    if values.dim() != 2 or values.shape[0] < 2 or values.shape[1] < 2:
        raise InputError(
            f"embeddings must be [K, d] with K >= 2 answers and d >= 2 features, got shape {tuple(values.shape)}"
        )
    values = values.to(torch.float64).cpu()
    if not bool(torch.isfinite(values).all()):
        raise InputError("embeddings contain NaN or infinite values; check the model's activations")
    return values


def _centred(values: torch.Tensor) -> torch.Tensor:
    """``Z·J_d/√(d−1)``: each embedding minus its own feature mean (``[K, d]``)."""
    return (values - values.mean(dim=1, keepdim=True)) / math.sqrt(values.shape[1] - 1)


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0 or not math.isfinite(alpha):
        raise InputError(f"alpha (the ridge added to the covariance) must be a positive number, got {alpha!r}; e.g. 1e-3")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")


# -- scores of a model's sampled answers ----------------------------------------------
@dataclass(frozen=True, eq=False)
class EigenScore(TableResult):
    """Both scores of K answers sampled for one prompt, with the answers and embeddings."""

    table_name: ClassVar[str] = "eigenscore"

    prompt: str
    site: str
    pool: str
    alpha: float
    exact: float
    efficient: float
    answers: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]  # generated tokens, through the first end-of-sequence
    embeddings: np.ndarray  # [K, d] float64

    def to_table(self) -> dict[str, np.ndarray]:
        return {
            "answer": np.arange(len(self.answers), dtype=np.int64),
            "text": np.array(self.answers, dtype=object),
            "tokens": np.array([len(ids) for ids in self.answer_ids], dtype=np.int64),
            "embedding_norm": np.linalg.norm(self.embeddings, axis=1),
        }


def eigenscore(
    model: Model,
    prompt: str,
    k: int = 10,
    *,
    site: str | None = None,
    pool: str = "last",
    alpha: float = DEFAULT_ALPHA,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    moments: int | None = None,
    probes: int = DEFAULT_PROBES,
    tokenizer: Any = None,
) -> EigenScore:
    """Sample ``k`` answers to ``prompt`` from a causal LM and score their spread.

    Answers come from ``generate(do_sample=True)`` (``temperature``/``top_p``/``top_k``; 0
    disables top-k) with the global RNG untouched (a forked one seeded with ``seed``). An
    answer is the generated tokens through the first end-of-sequence token (kept, so an
    empty answer still has one token). Its embedding is the ``pool`` (the ``last`` answer
    token, or the ``mean`` over the answer tokens) of ``site``, read in one forward pass over
    prompt + answer. The defaults are INSIDE's: the last token at the middle layer
    (``blocks.{(L + 1) // 2 - 1}.resid.post``); ``site="last"`` names the last block's
    ``resid.post`` (``**MEAN_LAST_LAYER``: mean-pooled there). ``model``: a directory,
    an ``nn.Module`` or an actscope ``Model``; a tokenizer is required.
    """
    _check_count("k", k)
    if k < 2:
        raise InputError(f"k must be at least 2 answers (a covariance of one answer is empty), got {k}")
    _check_count("max_new_tokens", max_new_tokens)
    _check_sampling(temperature, top_p, top_k)
    _check_alpha(alpha)  # the scoring options too, before any sampling work
    _check_count("probes", probes)
    if moments is not None:
        _check_count("moments", moments)
    if pool not in POOLS:
        raise InputError(f"pool must be one of {POOLS}, got {pool!r}")
    model = _as_model(model, tokenizer)
    label = _answer_site(model, site)
    prompt_ids = _prompt_ids(model.tokenizer, prompt)  # [1, P]
    sequences = _sample(model, prompt_ids, k, max_new_tokens, temperature, top_p, top_k, seed)  # [k, P + N]
    answer_ids = _answers(sequences[:, prompt_ids.shape[1]:], _eos_ids(model))
    embeddings = _embed(model, prompt_ids, answer_ids, label, pool)  # [k, d]
    return EigenScore(
        prompt=prompt,
        site=label,
        pool=pool,
        alpha=float(alpha),
        exact=eigenscore_exact(embeddings, alpha),
        efficient=eigenscore_efficient(embeddings, alpha, moments, probes, seed),
        answers=tuple(model.tokenizer.decode(list(ids), skip_special_tokens=True) for ids in answer_ids),
        answer_ids=answer_ids,
        embeddings=embeddings.numpy(),
    )


def _check_sampling(temperature: Any, top_p: Any, top_k: Any) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise InputError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InputError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")


def _as_model(model: Model, tokenizer: Any) -> Any:
    from ..models import Model, load, wrap

    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    elif isinstance(model, torch.nn.Module):
        model = wrap(model, tokenizer)
    elif not isinstance(model, Model):
        raise InputError(f"model must be a directory, an nn.Module or an actscope Model, got {type(model).__name__}")
    if tokenizer is not None and model.tokenizer is not tokenizer:
        model = Model(model.module, tokenizer, name=model.name, source=model.source)
    if model.tokenizer is None:
        raise InputError(f"eigenscore samples text answers, so it needs a tokenizer: {model.name} has none; pass tokenizer=...")
    if not callable(getattr(model.module, "generate", None)):
        raise InputError(
            f"eigenscore needs a causal LM with generate(); {model.name} ({type(model.module).__name__}) has none. "
            "Load it as a causal LM (e.g. its *ForCausalLM class)"
        )
    return model


def _answer_site(model: Model, site: str | None) -> str:
    from ..sites import plan_sites

    if site is None or site == "last":
        if not model.n_layers:
            raise InputError(f"{model.name} has no known blocks, so there is no default site; pass site=...")
        block = (model.n_layers + 1) // 2 - 1 if site is None else model.n_layers - 1
        site = f"blocks.{block}.resid.post"
    plan = plan_sites(model, site)
    if len(plan.sites) != 1:
        raise InputError(f"site {site!r} selects {len(plan.sites)} sites; name exactly one")
    return plan.sites[0].label


def _prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise InputError(f"the prompt {prompt!r} encodes to no tokens; pass a non-empty prompt")
    return torch.tensor([ids], dtype=torch.long)


def _eos_ids(model: Model) -> set[int]:
    config = getattr(model.module, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _sample(model: Model, prompt_ids: torch.Tensor, k: int, new: int, temperature: float, top_p: float, top_k: int, seed: int) -> torch.Tensor:
    module = model.module
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    # A model split over GPUs samples on the last one: fork the RNG of every GPU it uses.
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            ids = prompt_ids.to(device)
            return module.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=k,
                max_new_tokens=new, temperature=temperature, top_p=top_p, top_k=top_k, pad_token_id=pad,
            ).cpu()
    finally:
        module.train(was_training)


def _answers(generated: torch.Tensor, eos: set[int]) -> tuple[tuple[int, ...], ...]:
    """Each row's generated tokens through its first end-of-sequence token."""
    answers = []
    for row in generated.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        answers.append(tuple(row[:end]))
    return tuple(answers)


def _embed(model: Model, prompt_ids: torch.Tensor, answer_ids: tuple[tuple[int, ...], ...], site: str, pool: str) -> torch.Tensor:
    """``[k, d]``: ``site`` pooled over each answer's tokens, one forward over prompt + answer."""
    from ..trace import capture, split_token_id

    start = prompt_ids.shape[1]
    width = start + max(len(ids) for ids in answer_ids)
    ids = torch.zeros((len(answer_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, answer in enumerate(answer_ids):  # right padding: positions stay 0..len-1
        ids[row, :start] = prompt_ids[0]
        ids[row, start:start + len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[row, :start + len(answer)] = 1
    module = model.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), capture(model, site, flat=True, announce=False) as captured:
            module(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
    finally:
        module.train(was_training)
    values = captured.tensor(site).to(torch.float64)  # [real tokens, d]
    examples, positions = split_token_id(captured.token_ids(site))
    return torch.stack([_pool(values, (examples == row) & (positions >= start), positions, pool) for row in range(len(answer_ids))])


def _pool(values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, pool: str) -> torch.Tensor:
    if not bool(rows.any()):
        raise InputError("the site has no rows at the answer tokens (not a per-token site?); pass a per-token site such as blocks.0.resid.post")
    if pool == "mean":
        return values[rows].mean(dim=0)
    last = positions.masked_fill(~rows, -1).argmax()  # the answer row with the largest position
    return values[last]


__all__ = ["MEAN_LAST_LAYER", "EigenScore", "eigenscore", "eigenscore_efficient", "eigenscore_exact"]
