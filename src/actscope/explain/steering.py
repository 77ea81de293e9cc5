"""Steering vectors: add a direction to a site's activations while a model generates.

* :func:`steering_vector` — contrastive activation addition (CAA, ActAdd): the mean of a site's
  activations over ``positive`` prompts minus their mean over ``negative`` prompts
  (``tokens="mean"``: every real token of every prompt; ``"last"``: each prompt's last real
  token), one vector per matched site (a selection such as ``blocks.2-4.resid.post`` steers at
  several layers); or a unit (``unit="blocks.3.mlp.post[17]"``: add to that unit alone) or any
  direction (``direction={site: tensor}``, e.g. an SAE feature's decoder row at the SAE's site).
* :func:`steered` — the context that applies ``scale × vector`` through :func:`actscope.edit`
  at the chosen ``positions``: ``"all"`` (every position, prompt and generated), ``"prompt"``
  (the prompt's positions only), ``"new"`` (generated positions only) or a list of prompt
  positions (negative ones count from the prompt's end: ``[-1]`` is its last token). Positions
  are counted across the forward calls of a generation (a KV cache feeds one token a call).
* :func:`steer` — greedy generation with and without steering; :func:`steering_sweep` — one
  generation per scale and prompt with an effect metric: ``targets`` gives the mean over the
  generated steps of ``log Σ_t p(t)`` over the target tokens (how much the model wants to say
  them), ``classifier`` a score of each generated text (any ``str → float`` in Python).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError, SiteError
from ..models import Model, ModelLike
from ..results import TableResult

POSITIONS = ("all", "prompt", "new")


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """``vectors``: one ``[units]`` float32 direction per site (label, as ``edit`` keys take)."""

    vectors: Mapping[str, torch.Tensor]
    source: str  # how it was made, for people: "12 positive − 12 negative prompts (mean)"

    @property
    def sites(self) -> list[str]:
        return list(self.vectors)

    def norm(self) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.vectors.values())))


def steering_vector(model: ModelLike, site: str | None = None, positive: Any = None, negative: Any = None, *,
                    unit: str | None = None, direction: Mapping[str, Any] | None = None, tokens: str = "mean",
                    batch_size: int = 8, max_length: int = 128) -> SteeringVector:
    """A steering vector from contrasting prompt sets, a unit, or a given direction (see above)."""
    from ..models import as_model

    model = as_model(model)
    given = [name for name, value in (("positive/negative", positive is not None or negative is not None), ("unit", unit),
                                      ("direction", direction)) if value]
    if len(given) != 1:
        raise InputError("steering_vector: give exactly one of positive= and negative= prompts, unit='blocks.3.mlp.post[17]', "
                         f"or direction={{site: tensor}}; got {', '.join(given) or 'none'}")
    if unit is not None:
        return _unit_vector(model, unit)
    if direction is not None:
        vectors = {}
        for name, vector in direction.items():
            _check_steerable(model, name)
            vectors[name] = torch.as_tensor(vector, dtype=torch.float32).detach().reshape(-1).cpu()
        return SteeringVector(vectors, "a given direction")
    if site is None or positive is None or negative is None:
        raise InputError("steering_vector: contrastive steering needs site=, positive= and negative= prompts")
    if tokens not in ("mean", "last"):
        raise InputError(f"steering_vector: tokens must be 'mean' (every real token) or 'last' (each prompt's last), got {tokens!r}")
    labels = [s.label for s in _steerable_sites(model, site)]
    plus = _mean_activations(model, labels, positive, tokens, batch_size, max_length)
    minus = _mean_activations(model, labels, negative, tokens, batch_size, max_length)
    vectors = {label: (plus[label][0] - minus[label][0]).float() for label in labels}
    return SteeringVector(vectors, f"{plus[labels[0]][1]} positive − {minus[labels[0]][1]} negative prompts ({tokens})")


def _unit_vector(model: Model, unit: str) -> SteeringVector:
    from ..sites import plan_sites

    sites = plan_sites(model, unit).sites
    if len(sites) != 1 or sites[0].units is None or len(sites[0].units) != 1:
        raise InputError(f"steering_vector: unit must name one unit of one site, e.g. 'blocks.3.mlp.post[17]'; got {unit!r}")
    _check_steerable(model, sites[0].label)
    return SteeringVector({sites[0].label: torch.ones(1)}, f"unit {sites[0].label}")


def _steerable_sites(model: Model, selection: str) -> list[Any]:
    from ..sites import plan_sites

    sites = plan_sites(model, selection).sites
    for site in sites:
        _check_steerable(model, site.label)
    return sites


def _check_steerable(model: Model, label: str) -> None:
    from ..interventions.context import _check_editable
    from ..sites import plan_sites

    for site in plan_sites(model, label).sites:
        _check_editable(site)
        if site.hook.layout not in ("units", "auto"):
            raise SiteError(f"{site.label}: steering adds a vector along the site's last axis; choose a residual "
                            "or MLP site (blocks.{i}.resid.post, blocks.{i}.mlp.post, …), not a per-head one")


def _mean_activations(model: Model, labels: list[str], prompts: Any, tokens: str, batch_size: int,
                      max_length: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Per site, the mean activation over the prompts (float64) and the number of prompts."""
    from ..data import load_corpus
    from ..feeding import feed
    from ..trace import Capture, split_token_id

    corpus = load_corpus(list(prompts) if isinstance(prompts, (list, tuple)) else prompts)
    capture = Capture(model, labels, flat=True, announce=False)
    feed(capture, corpus, batch_size=batch_size, max_length=max_length)
    out = {}
    for label in labels:
        values = torch.cat([r.values for r in capture.readings[label]]).double()  # [n, units]
        doc, pos = split_token_id(torch.cat([r.tok for r in capture.readings[label]]))
        per_prompt = []
        for d in torch.unique(doc).tolist():
            rows = (doc == d).nonzero().squeeze(1)
            chosen = rows[pos[rows].argmax()].reshape(1) if tokens == "last" else rows
            per_prompt.append(values[chosen].mean(0))
        out[label] = (torch.stack(per_prompt).mean(0), len(per_prompt))
    return out


# -- applying it -------------------------------------------------------------------------------
class _Adder:
    """``x + scale · vector`` at the chosen positions of ``x`` ``[..., pos, units]``; positions
    are counted across calls (a generation's first call holds the prompt, later ones one token)."""

    def __init__(self, vector: torch.Tensor, scale: float, positions: Any, prompt_length: int | None) -> None:
        self.vector, self.scale, self.positions, self.prompt_length = vector, float(scale), positions, prompt_length
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = x.shape[-2] if x.dim() >= 2 else 1  # the first call holds the prompt
        if x.shape[-1] != self.vector.shape[0]:
            raise SiteError(f"the steering vector has {self.vector.shape[0]} units but the site has {x.shape[-1]}; "
                            "make the vector at this site")
        count = x.shape[-2] if x.dim() >= 2 else 1
        where = self._where(torch.arange(self.seen, self.seen + count))
        self.seen += count
        delta = self.scale * self.vector.to(x.device, x.dtype)
        if where is None:
            return x + delta
        mask = where.to(x.device, x.dtype)[:, None]  # [pos, 1]
        return x + mask * delta

    def _where(self, index: torch.Tensor) -> torch.Tensor | None:
        if self.positions == "all":
            return None
        prompt = self.prompt_length
        if self.positions == "prompt":
            return index < prompt
        if self.positions == "new":
            return index >= prompt
        chosen = {p if p >= 0 else prompt + p for p in self.positions}
        return torch.tensor([int(i) in chosen for i in index])


def check_positions(positions: Any) -> Any:
    if isinstance(positions, str):
        if positions in POSITIONS:
            return positions
        try:
            return [int(p) for p in positions.split(",") if p.strip()]
        except ValueError:
            pass
        raise InputError(f"positions must be one of {', '.join(POSITIONS)} or prompt positions such as '0,-1', got {positions!r}")
    if isinstance(positions, Sequence) and positions and all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        return list(positions)
    raise InputError(f"positions must be one of {', '.join(POSITIONS)} or a list of prompt positions such as [0, -1], got {positions!r}")


@contextmanager
def steered(model: ModelLike, vector: SteeringVector, scale: float = 1.0, *, positions: Any = "all",
            prompt_length: int | None = None) -> Iterator[None]:
    """Inside the block, every forward call adds ``scale × vector`` at ``positions`` (through
    :func:`actscope.edit`; counting starts at the block's first call, whose length is the
    prompt's unless ``prompt_length`` says otherwise)."""
    from ..interventions import edit
    from ..models import as_model

    positions = check_positions(positions)
    model = as_model(model)
    with edit(model, {site: _Adder(v, scale, positions, prompt_length) for site, v in vector.vectors.items()}):
        yield


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    logprob: float = math.nan  # mean over generated steps of log Σ p(targets); NaN without targets


def generate(model: ModelLike, prompt: str, *, vector: SteeringVector | None = None, scale: float = 0.0, positions: Any = "all",
             max_new_tokens: int = 20, targets: Sequence[str] | None = None) -> Generation:
    """Greedy continuation of ``prompt``, steered by ``scale × vector`` (unsteered without one)."""
    from ..models import as_model

    model = as_model(model)
    _check_generator(model)
    inputs = model.tokenizer(prompt, return_tensors="pt").to(model.device)
    length = int(inputs["input_ids"].shape[1])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if vector is None:
            out = model.module.generate(**inputs, **options)
        else:
            with steered(model, vector, scale, positions=positions, prompt_length=length):
                out = model.module.generate(**inputs, **options)
    new = model.continuation(out.sequences, length)[0]
    text = model.tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, tuple(new.tolist()), _target_logprob(model, out.logits, targets))


def _target_logprob(model: Model, logits: Sequence[torch.Tensor], targets: Sequence[str] | None) -> float:
    if not targets:
        return math.nan
    ids = sorted({_single_token(model, t) for t in targets})
    steps = [torch.logsumexp(torch.log_softmax(step[0].double(), -1)[ids], 0) for step in logits]
    return float(torch.stack(steps).mean()) if steps else math.nan


def _single_token(model: Model, text: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(f"target {text!r} is {len(ids)} tokens for this tokenizer; give words that are one token each "
                         "(mind the leading space: ' word')")
    return int(ids[0])


def _check_generator(model: Model) -> None:
    if model.tokenizer is None:
        raise DataError(f"{model.name} has no tokenizer; steering reads prompts and prints text, so it needs one")
    model.require_generator("steering")


@dataclass(frozen=True)
class Steered:
    """Unsteered and steered continuations of one prompt."""

    prompt: str
    unsteered: Generation
    steered: Generation
    scale: float


def steer(model: ModelLike, vector: SteeringVector, prompt: str, *, scale: float = 1.0, positions: Any = "all",
          max_new_tokens: int = 20, targets: Sequence[str] | None = None) -> Steered:
    """Greedy generation of ``prompt`` without and with ``scale × vector`` added."""
    base = generate(model, prompt, max_new_tokens=max_new_tokens, targets=targets)
    moved = generate(model, prompt, vector=vector, scale=scale, positions=positions, max_new_tokens=max_new_tokens, targets=targets)
    return Steered(prompt, base, moved, float(scale))


@dataclass(frozen=True, eq=False)
class SteeringSweep(TableResult):
    """One row per (scale, prompt): the steered continuation and its effect metric(s)."""

    table_name: ClassVar[str] = "steering"

    scale: np.ndarray  # [rows] float64
    prompt: np.ndarray  # [rows] object
    text: np.ndarray  # [rows] object, the greedy continuation
    logprob: np.ndarray  # [rows] float64: mean over steps of log Σ p(targets); NaN without targets
    score: np.ndarray  # [rows] float64: classifier(text); NaN without a classifier
    site: str = ""
    positions: str = "all"
    source: str = ""
    targets: tuple[str, ...] = field(default=())

    def to_table(self) -> dict[str, np.ndarray]:
        rows = len(self.scale)
        return {"scale": self.scale, "prompt": self.prompt, "text": self.text, "logprob": self.logprob, "score": self.score,
                "site": np.array([self.site] * rows, dtype=object), "positions": np.array([self.positions] * rows, dtype=object)}

    def summary(self) -> dict[float, tuple[float, float]]:
        """Per scale, the mean ``logprob`` and mean ``score`` over the prompts."""
        out = {}
        for scale in dict.fromkeys(self.scale.tolist()):
            rows = self.scale == scale
            out[scale] = (_mean(self.logprob[rows]), _mean(self.score[rows]))
        return out


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def steering_sweep(model: ModelLike, vector: SteeringVector, prompts: str | Sequence[str], scales: Sequence[float], *,
                   positions: Any = "all", max_new_tokens: int = 20, targets: Sequence[str] | None = None,
                   classifier: Callable[[str], float] | None = None) -> SteeringSweep:
    """Generate every prompt at every scale and measure the effect (see the module docstring)."""
    from ..models import as_model

    model = as_model(model)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    scales = [float(s) for s in scales]
    if not prompts or not scales:
        raise InputError("steering_sweep: give at least one prompt and one scale")
    check_positions(positions)
    rows: dict[str, list] = {"scale": [], "prompt": [], "text": [], "logprob": [], "score": []}
    for scale in scales:
        for prompt in prompts:
            result = generate(model, prompt, vector=vector, scale=scale, positions=positions, max_new_tokens=max_new_tokens, targets=targets)
            rows["scale"].append(scale)
            rows["prompt"].append(prompt)
            rows["text"].append(result.text)
            rows["logprob"].append(result.logprob)
            rows["score"].append(float(classifier(result.text)) if classifier is not None else math.nan)
    return SteeringSweep(np.array(rows["scale"], dtype=np.float64), np.array(rows["prompt"], dtype=object),
                         np.array(rows["text"], dtype=object), np.array(rows["logprob"], dtype=np.float64),
                         np.array(rows["score"], dtype=np.float64), site=",".join(vector.sites),
                         positions=positions if isinstance(positions, str) else ",".join(map(str, positions)),
                         source=vector.source, targets=tuple(targets or ()))
