"""A small SAE trainer: ReLU + L1 (``standard``) or top-k, on activations harvested to disk
(:func:`actscope.harvest`) or streamed from the model, saved in the SAELens layout.

Training *(our choices, following SAELens's defaults where it has them)*:

* Inputs are scaled by one constant ``s = √d_in / mean ‖x‖`` estimated on the first buffer
  (SAELens's ``expected_average_only_in``, Anthropic's April 2024 update), so the L1 coefficient
  means the same at every site; ``s`` is folded into the weights at the end (``W_enc · s``,
  ``W_dec / s``, ``b_dec / s``), so the saved SAE reads raw activations (``normalize_activations:
  none``).
* Initialisation (seeded): ``W_dec`` rows uniform (Kaiming) rescaled to norm 0.1 (unit norm for
  top-k), ``W_enc = W_decᵀ``, ``b_enc = 0``, ``b_dec`` the mean of the first buffer.
* Loss: ``‖x̂ − x‖²`` summed over the input and averaged over tokens; ``standard`` adds
  ``λ · Σ_j f_j ‖W_dec[j]‖`` (the decoder-norm-weighted L1 of SAELens's standard SAE), λ rising
  linearly from 0 over the first ``l1_warmup`` of the steps; ``topk`` keeps the ``k`` largest
  pre-activations (ReLU'd) and renormalises ``W_dec``'s rows to unit norm after every step.
* Adam (β = 0.9, 0.999), a constant learning rate; batches of ``batch_size`` tokens drawn from a
  seeded shuffle (a harvested dataset's ``stream(seed=…)``; a buffer of ``buffer`` batches for
  activations streamed from the model, which is run again for more epochs when the data ends).

Everything random comes from ``seed``: the same call gives the same SAE.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from ..errors import DataError, InputError
from ..results import TableResult
from .core import SAE

TRAINABLE = ("standard", "topk")


@dataclass(frozen=True, eq=False)
class TrainedSAE(TableResult):
    """A trained SAE and its training curve (one row per logged step)."""

    table_name: ClassVar[str] = "sae_training"

    sae: SAE
    step: np.ndarray  # [logged] int64
    loss: np.ndarray  # [logged] float64: the training loss (scaled units)
    mse: np.ndarray  # [logged] float64: ‖x̂ − x‖² per token (scaled units)
    l0: np.ndarray  # [logged] float64: features firing per token
    explained_variance: np.ndarray  # [logged] float64: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² on the batch
    tokens: int
    seconds: float
    scale: float  # the input scale s folded into the weights
    path: Path | None = None

    def to_table(self) -> dict[str, np.ndarray]:
        return {"step": self.step, "loss": self.loss, "mse": self.mse, "l0": self.l0, "explained_variance": self.explained_variance}


def train_sae(
    model: Any = None,
    data: Any = None,
    *,
    site: str | None = None,
    activations: Any = None,
    d_sae: int | None = None,
    expansion: int = 8,
    architecture: str = "standard",
    k: int = 32,
    l1: float = 5.0,
    l1_warmup: float = 0.05,
    lr: float = 1e-3,
    steps: int = 2000,
    batch_size: int = 1024,
    buffer: int = 16,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    log_every: int = 50,
    max_tokens: int | None = None,
    doc_batch_size: int = 8,
    max_length: int = 128,
    column: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | None = None,
) -> TrainedSAE:
    """Train an SAE on ``site``'s activations and return it (saved to ``out`` when given).

    Activations come from ``activations`` (a folder :func:`actscope.harvest` wrote, or its
    :func:`actscope.open_activations`), or are streamed from ``model`` run over ``data`` (as for
    :func:`actscope.profile`: ``None`` is the embedded MiniLM and the built-in corpus;
    ``max_tokens``, ``doc_batch_size``, ``max_length``, ``column`` limit and cut the data).
    ``d_sae`` features (default ``expansion · d_in``); ``architecture`` ``"standard"`` (ReLU,
    L1 coefficient ``l1``) or ``"topk"`` (``k``); ``steps`` Adam steps of ``batch_size`` tokens at
    learning rate ``lr``. See the module docstring for the exact recipe.
    """
    _check(architecture, k, l1, l1_warmup, lr, steps, batch_size, buffer, d_sae, expansion, log_every)
    if out is not None:
        from .save import check_target

        check_target(Path(out), overwrite)
    batches, site_name, model_obj = _batches(model, data, site, activations, batch_size, buffer, seed,
                                             dict(max_tokens=max_tokens, batch_size=doc_batch_size, max_length=max_length, column=column),
                                             device)
    try:
        trained = _train(batches, architecture, d_sae, expansion, k, l1, l1_warmup, lr, steps, seed, log_every, progress)
    finally:
        batches.close()  # a stream from the model: its hooks come off now, not when the generator is collected
    sae = _named(trained.sae, site_name, model_obj, activations)
    trained = TrainedSAE(**{**trained.__dict__, "sae": sae})
    if out is None:
        return trained
    from .save import save_sae

    settings = {"training": {"architecture": architecture, "d_sae": sae.d_sae, "k": k if architecture == "topk" else None,
                             "l1": l1 if architecture == "standard" else None, "l1_warmup": l1_warmup, "lr": lr, "steps": steps,
                             "batch_size": batch_size, "seed": seed, "tokens": trained.tokens, "scale": trained.scale,
                             "final_loss": float(trained.loss[-1]) if len(trained.loss) else None}}
    path = save_sae(sae, out, overwrite=overwrite, hook_name=_hook_name(model_obj, site_name, activations), model_name=_model_name(model_obj, activations),
                    extra=settings)
    return TrainedSAE(**{**trained.__dict__, "path": path})


def _check(architecture: str, k: int, l1: float, l1_warmup: float, lr: float, steps: int, batch_size: int, buffer: int,
           d_sae: int | None, expansion: int, log_every: int) -> None:
    if architecture not in TRAINABLE:
        raise InputError(f"architecture {architecture!r} cannot be trained here; choose {' or '.join(TRAINABLE)}")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("buffer", buffer, 1), ("k", k, 1),
                             ("expansion", expansion, 1), ("log_every", log_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"train_sae(): {name} must be a whole number ≥ {low}, got {value!r}")
    if d_sae is not None and (isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1):
        raise InputError(f"train_sae(): d_sae must be a whole number ≥ 1, got {d_sae!r}")
    for name, value in (("l1", l1), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise InputError(f"train_sae(): {name} must be a positive number, got {value!r}")
    if isinstance(l1_warmup, bool) or not isinstance(l1_warmup, (int, float)) or not 0 <= l1_warmup <= 1:
        raise InputError(f"train_sae(): l1_warmup is a share of the steps between 0 and 1, got {l1_warmup!r}")


# -- where the activations come from ----------------------------------------------------------
def _batches(model: Any, data: Any, site: str | None, activations: Any, batch_size: int, buffer: int, seed: int,
             limits: dict, device: str | None) -> tuple[Iterator[torch.Tensor], str, Any]:
    if activations is not None:
        if data is not None:
            raise InputError("train_sae(): give activations= (a harvested dataset) or data= (to run the model on), not both")
        return (*_harvested(activations, site, batch_size, seed), model if model is not None and not isinstance(model, (str, os.PathLike)) else None)
    from ..models import as_model
    from ..sites import plan_sites

    if site is None:
        raise InputError("train_sae(): say which site's activations to train on: site='blocks.3.resid.post'")
    model = as_model(model, device)
    plan = plan_sites(model, site)
    if len(plan.sites) != 1 or plan.sites[0].units is not None or plan.sites[0].heads is not None:
        raise InputError(f"train_sae(): site '{site}' is {len(plan.sites)} sites or a unit selection; give one whole site, e.g. blocks.3.resid.post")
    chosen = plan.sites[0]
    if chosen.hook.layout not in ("units", "flat", "heads"):
        raise InputError(f"train_sae(): {chosen.name} has no vector per token ({chosen.hook.layout}); choose a residual, MLP or attention-output site")
    return _streamed(model, chosen, data, limits, batch_size, buffer, seed), chosen.name, model


def _harvested(activations: Any, site: str | None, batch_size: int, seed: int) -> tuple[Iterator[torch.Tensor], str]:
    from ..store.activations import Activations, open_activations

    dataset = activations if isinstance(activations, Activations) else open_activations(activations)
    labels = list(dataset.sites)
    if site is None and len(labels) == 1:
        site = labels[0]
    if site not in labels:
        raise InputError(f"the activation dataset at {dataset.path} has sites {', '.join(labels)}; choose one with site=" if site is None
                         else f"the activation dataset at {dataset.path} has no site '{site}'; it has {', '.join(labels)}")
    if "[" in site:
        raise InputError(f"{site} is a unit selection; train SAEs on whole sites (harvest the site without [units])")
    if len(dataset) == 0:
        raise DataError(f"the activation dataset at {dataset.path} holds no token")

    def batches() -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            stream = dataset.stream(seed=seed + epoch, batch_size=batch_size)
            for batch in stream:
                yield batch[site].float()
            epoch += 1

    return batches(), site


def _streamed(model: Any, site: Any, data: Any, limits: dict, batch_size: int, buffer: int, seed: int) -> Iterator[torch.Tensor]:
    """Batches of ``site``'s activations from ``model`` run over ``data`` (again for each epoch),
    shuffled within a buffer of ``buffer`` batches by a seeded generator."""
    from ..feeding import calls, source_for
    from ..sites import Plan
    from ..trace import Capture

    generator = torch.Generator().manual_seed(seed)
    capture = Capture(model, Plan((site,)), flat=True, announce=False, max_bytes=1 << 62)
    held: list[torch.Tensor] = []
    count = 0
    while True:
        seen = 0
        with torch.no_grad(), capture.attached():
            for call in calls(model, source_for(model, data, **limits)):
                capture.next_examples = call.examples
                model(**call.inputs)
                rows = capture.tensor(site.label).float()
                capture.readings[site.label] = []
                held.append(rows)
                count += len(rows)
                seen += len(rows)
                while count >= buffer * batch_size:
                    pool = torch.cat(held)
                    order = torch.randperm(len(pool), generator=generator)
                    cut = buffer * batch_size
                    for start in range(0, cut, batch_size):
                        yield pool[order[start:start + batch_size]]
                    held, count = [pool[order[cut:]]], len(pool) - cut
        if seen == 0:
            raise DataError("the data gave no token to train the SAE on; pass some text (data=) or another site")
        if count >= batch_size:  # the epoch's remainder, before the model runs again
            pool = torch.cat(held)
            order = torch.randperm(len(pool), generator=generator)
            whole = len(pool) // batch_size * batch_size
            for start in range(0, whole, batch_size):
                yield pool[order[start:start + batch_size]]
            held, count = [pool[order[whole:]]], len(pool) - whole


# -- training -----------------------------------------------------------------------------------
def _train(batches: Iterator[torch.Tensor], architecture: str, d_sae: int | None, expansion: int, k: int, l1: float,
           l1_warmup: float, lr: float, steps: int, seed: int, log_every: int,
           progress: Callable[[int, int, float], None] | None) -> TrainedSAE:
    clock = time.perf_counter()
    first = next(batches)
    d_in = first.shape[-1]
    scale = math.sqrt(d_in) / max(float(first.norm(dim=-1).mean()), 1e-12)
    params = _initial(d_in, d_sae or expansion * d_in, architecture, first * scale, seed)
    optimizer = torch.optim.Adam(params.values(), lr=lr, betas=(0.9, 0.999))
    logs: dict[str, list[float]] = {"step": [], "loss": [], "mse": [], "l0": [], "explained_variance": []}
    tokens, batch = 0, first
    warm = max(1, int(l1_warmup * steps))
    for step in range(steps):
        x = batch.to(params["W_enc"].device) * scale
        with torch.enable_grad():
            f, x_hat = _forward(params, x, architecture, k)
            mse = (x_hat - x).pow(2).sum(-1).mean()
            loss = mse
            if architecture == "standard":
                coefficient = l1 * min(1.0, (step + 1) / warm) if l1_warmup > 0 else l1
                loss = mse + coefficient * (f * params["W_dec"].norm(dim=-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if architecture == "topk":
            with torch.no_grad():
                params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        tokens += len(x)
        if step % log_every == 0 or step == steps - 1:
            _log(logs, step, loss.detach(), mse.detach(), f.detach(), x, x_hat.detach())
            if progress is not None:
                progress(step + 1, steps, float(loss.detach()))
        if step < steps - 1:
            batch = next(batches)
    sae = _folded(params, architecture, k, scale)
    return TrainedSAE(sae, *(np.asarray(logs[key], dtype=np.int64 if key == "step" else np.float64) for key in logs),
                      tokens=tokens, seconds=time.perf_counter() - clock, scale=scale)


def _initial(d_in: int, d_sae: int, architecture: str, sample: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bound = math.sqrt(6.0 / d_in)  # Kaiming uniform for a [d_sae, d_in] weight
    w_dec = (torch.rand(d_sae, d_in, generator=generator) * 2 - 1) * bound
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * (1.0 if architecture == "topk" else 0.1)
    params = {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": w_dec, "b_dec": sample.mean(0).float()}
    return {key: value.to(sample.device).requires_grad_(True) for key, value in params.items()}


def _forward(params: dict[str, torch.Tensor], x: torch.Tensor, architecture: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    if architecture == "topk":
        top = torch.topk(pre, min(k, pre.shape[-1]), dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        f = torch.relu(pre)
    return f, f @ params["W_dec"] + params["b_dec"]


def _log(logs: dict[str, list[float]], step: int, loss: torch.Tensor, mse: torch.Tensor, f: torch.Tensor, x: torch.Tensor,
         x_hat: torch.Tensor) -> None:
    with torch.no_grad():
        total = (x - x.mean(0)).pow(2).sum()
        logs["step"].append(step)
        logs["loss"].append(float(loss))
        logs["mse"].append(float(mse))
        logs["l0"].append(float((f > 0).sum(-1).float().mean()))
        logs["explained_variance"].append(float(1 - (x - x_hat).pow(2).sum() / total) if total > 0 else float("nan"))


def _folded(params: dict[str, torch.Tensor], architecture: str, k: int, scale: float) -> SAE:
    """The trained SAE for raw (unscaled) activations: ``s`` folded as SAELens folds it."""
    p = {key: value.detach().clone() for key, value in params.items()}
    return SAE(p["W_enc"] * scale, p["b_enc"], p["W_dec"] / scale, p["b_dec"] / scale, architecture=architecture,
               k=k if architecture == "topk" else None)


def _named(sae: SAE, site: str, model: Any, activations: Any = None) -> SAE:
    from dataclasses import replace

    return replace(sae, site=site, hook_name=_hook_name(model, site, activations))


def _hook_name(model: Any, site: str, activations: Any = None) -> str:
    """The TransformerLens name of ``site``: from the model's card, or, trained on harvested
    activations, from the card of the family their manifest names; else the site itself."""
    from ..models import Model
    from .hooknames import hook_for_family, hook_for_site

    if isinstance(model, Model):
        return hook_for_site(model, site)
    if activations is not None:
        return hook_for_family((_manifest(activations).get("model") or {}).get("family"), site)
    return site


def _model_name(model: Any, activations: Any) -> str | None:
    name = getattr(model, "name", None)
    if name is None and activations is not None:
        name = (_manifest(activations).get("model") or {}).get("name")
    return name


def _manifest(activations: Any) -> dict:
    manifest = getattr(activations, "manifest", None)
    if manifest is None:
        from ..store.activations import open_activations

        manifest = open_activations(activations).manifest
    return manifest
