"""Sensitive neurons (SeND): units whose representation of a fixed input moves most across
training checkpoints.

For one input, take one representation at successive checkpoints ``E_t`` (the paper: the
penultimate layer's output at the second-to-last token). Per unit ``i``::

    sensitivity_i = Σ_{t=0}^{T-2} |E_{t+1,i} − E_{t,i}| · Var_t(E_{t,i})

``Var_t`` is the population variance (divide by T) of the unit over all T checkpoints; it does
not depend on ``t``, so the sum is that variance times the unit's total variation. The top
fraction of units by sensitivity are the *sensitive* ones.

The paper scores one input at a time. :func:`neuron_sensitivity` takes several inputs,
computes the sensitivity of every unit for each input separately and averages over inputs
*(our choice)*; ``per_input`` keeps the unaveraged values.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..results import TableResult
from ..models import Model

AUTO_SITE = "auto"
DEFAULT_POSITION = -2  # the second-to-last real token, as in the paper
DEFAULT_TOP = 0.1
DEFAULT_BATCH_SIZE = 32


def sensitivity_from_trajectory(trajectory: torch.Tensor) -> torch.Tensor:
    """Sensitivity of every unit from its values at T successive checkpoints.

    ``trajectory`` is ``[T, units]`` (or ``[T, *rest]``: each trailing entry is a unit of its
    own); returns ``[units]`` (``rest``). Needs T ≥ 2. Computed in float64.
    """
    if not isinstance(trajectory, torch.Tensor):
        trajectory = torch.as_tensor(np.asarray(trajectory))
    if trajectory.dim() < 2 or trajectory.shape[0] < 2:
        raise InputError(
            f"sensitivity needs a trajectory [T, units] with T >= 2 checkpoints, got shape {tuple(trajectory.shape)}; "
            "pass the representations of at least two checkpoints"
        )
    values = trajectory.detach().to(torch.float64)  # [T, units]
    total_variation = (values[1:] - values[:-1]).abs().sum(dim=0)  # [units]
    variance = values.var(dim=0, correction=0)  # population variance over checkpoints, [units]
    return total_variation * variance


@dataclass(frozen=True, eq=False)
class Sensitivity(TableResult):
    """Per-unit sensitivity of one site's representation across checkpoints.

    ``sensitivity`` is ``[units]`` (averaged over inputs), ``per_input`` ``[inputs, units]``,
    ``representations`` the captured ``E`` as ``[checkpoints, inputs, units]``;
    ``is_sensitive`` marks the ``top`` fraction of units with the largest sensitivity.
    """

    table_name: ClassVar[str] = "sensitivity"

    site: str
    position: int
    top: float
    sensitivity: np.ndarray  # [units] float64
    is_sensitive: np.ndarray  # [units] bool
    per_input: np.ndarray  # [inputs, units] float64
    representations: np.ndarray  # [checkpoints, inputs, units] float64

    @property
    def n_checkpoints(self) -> int:
        return int(self.representations.shape[0])

    @property
    def n_inputs(self) -> int:
        return int(self.representations.shape[1])

    def top_units(self, k: int | None = None) -> np.ndarray:
        """Indices of the ``k`` most sensitive units, most sensitive first (default: the
        sensitive ones). Ties keep the lower unit index first."""
        count = int(self.is_sensitive.sum()) if k is None else k
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= len(self.sensitivity):
            raise InputError(f"top_units: k must be an int in 0..{len(self.sensitivity)}, got {k!r}")
        return _ranking(self.sensitivity)[:count]

    def to_table(self) -> dict[str, np.ndarray]:
        units = len(self.sensitivity)
        rank = np.empty(units, dtype=np.int64)
        rank[_ranking(self.sensitivity)] = np.arange(units)
        return {
            "site": np.array([self.site] * units, dtype=object),
            "unit": np.arange(units, dtype=np.int64),
            "sensitivity": self.sensitivity,
            "rank": rank,
            "is_sensitive": self.is_sensitive,
        }


def sensitive_mask(sensitivity: np.ndarray, top: float) -> np.ndarray:
    """Boolean mask of the ``top`` fraction of units (``top × units`` rounded half up, at
    least one) with the largest sensitivity; ties keep the lower unit index."""
    _check_top(top)
    count = max(1, math.floor(top * len(sensitivity) + 0.5))
    mask = np.zeros(len(sensitivity), dtype=bool)
    mask[_ranking(sensitivity)[:count]] = True
    return mask


def neuron_sensitivity(
    checkpoints: Iterable[Any],
    inputs: Any,
    site: str = AUTO_SITE,
    position: int = DEFAULT_POSITION,
    top: float = DEFAULT_TOP,
    *,
    tokenizer: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Sensitivity:
    """Sensitivity of every unit of ``site`` across ``checkpoints`` (same architecture).

    ``checkpoints``: model directories, ``nn.Module``s or actscope ``Model``s, in training
    order; directories are loaded one at a time and released before the next (any iterable
    works, so a generator keeps memory to one model). ``inputs``: a string, a list of strings
    (tokenised with ``tokenizer`` or the first checkpoint's), token ids ``[n, pos]``, or a dict
    with ``input_ids`` (and ``attention_mask``). ``site``: ``"auto"`` is
    ``blocks.{L-2}.resid.post`` (the penultimate block's output), or any single site name.
    ``position`` indexes each input's real tokens (``-2``: the second-to-last). Models run in
    eval mode (their mode is restored afterwards).
    """
    _check_top(top)
    if isinstance(position, bool) or not isinstance(position, int):
        raise InputError(f"position must be an int (e.g. -2 for the second-to-last token), got {position!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(checkpoints, (str, os.PathLike, torch.nn.Module)):
        raise InputError("checkpoints must be a list of at least two checkpoints (directories or models), got a single one")
    trajectory, label = _collect(checkpoints, inputs, site, position, tokenizer, batch_size)
    if len(trajectory) < 2:
        raise InputError(f"sensitivity needs at least two checkpoints, got {len(trajectory)}; pass the checkpoints in training order")
    representations = torch.stack(trajectory)  # [T, inputs, units]
    per_input = sensitivity_from_trajectory(representations)  # [inputs, units]
    sensitivity = per_input.mean(dim=0).numpy()  # averaged over inputs (our choice)
    return Sensitivity(
        site=label,
        position=position,
        top=float(top),
        sensitivity=sensitivity,
        is_sensitive=sensitive_mask(sensitivity, top),
        per_input=per_input.numpy(),
        representations=representations.numpy(),
    )


# -- collection --------------------------------------------------------------------------
def _collect(
    checkpoints: Iterable[Any], inputs: Any, site: str, position: int, tokenizer: Any, batch_size: int
) -> tuple[list[torch.Tensor], str]:
    """Each checkpoint's ``[inputs, units]`` representation, loading one model at a time."""
    trajectory: list[torch.Tensor] = []
    batch: dict[str, torch.Tensor] | None = None
    label = ""
    # no enumerate(): it keeps its last (index, item) tuple for reuse, holding the model
    for checkpoint in checkpoints:
        number = len(trajectory)
        model = _as_model(checkpoint, number)
        if batch is None:
            batch = _encode_inputs(inputs, tokenizer if tokenizer is not None else model.tokenizer)
        chosen = _resolve_site(model, site)
        values = _representation(model, batch, chosen, position, batch_size)  # [inputs, units]
        if trajectory and values.shape != trajectory[0].shape:
            raise InputError(
                f"checkpoint {number} gives {chosen} with {values.shape[-1]} units, checkpoint 0 gave "
                f"{trajectory[0].shape[-1]}; every checkpoint must have the same architecture"
            )
        if trajectory and chosen != label:
            raise InputError(f"checkpoint {number} resolves the site to {chosen}, checkpoint 0 to {label}; pass an explicit site")
        trajectory.append(values)
        label = chosen
        del checkpoint, model  # release this checkpoint before the next is loaded or built
    return trajectory, label


def _as_model(checkpoint: Any, number: int) -> Any:
    from ..models import Model, load, wrap

    if isinstance(checkpoint, Model):
        return checkpoint
    if isinstance(checkpoint, torch.nn.Module):
        return wrap(checkpoint)
    if isinstance(checkpoint, (str, os.PathLike)):
        return load(checkpoint)
    raise InputError(
        f"checkpoint {number} is a {type(checkpoint).__name__}; pass model directories, nn.Modules or actscope Models"
    )


def _resolve_site(model: Model, site: str) -> str:
    """``auto`` → the penultimate block's output; anything else must name exactly one site."""
    from ..sites import plan_sites

    if site == AUTO_SITE:
        layers = model.n_layers
        if not layers or layers < 2:
            raise InputError(
                f"site='auto' needs a model with at least two blocks (the penultimate block's output), "
                f"{model.name} has {layers or 'no known'} blocks; pass a site name, e.g. site='module:PATH@output'"
            )
        site = f"blocks.{layers - 2}.resid.post"
    plan = plan_sites(model, site)
    if len(plan.sites) != 1:
        raise InputError(f"site {site!r} selects {len(plan.sites)} sites ({', '.join(plan.names[:4])}…); name exactly one")
    return plan.sites[0].label


def _encode_inputs(inputs: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Inputs → right-padded ``input_ids`` and ``attention_mask`` ``[n, pos]``."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, dict):
        if "input_ids" not in inputs:
            raise InputError(f"an input dict needs 'input_ids', got keys {sorted(inputs)}")
        ids = torch.as_tensor(inputs["input_ids"])
        mask = torch.as_tensor(inputs["attention_mask"]) if "attention_mask" in inputs else torch.ones_like(ids)
        return _checked_ids(ids, mask)
    if isinstance(inputs, torch.Tensor):
        return _checked_ids(inputs, torch.ones_like(inputs))
    if isinstance(inputs, Sequence) and inputs and all(isinstance(text, str) for text in inputs):
        return _tokenize(list(inputs), tokenizer)
    raise InputError(
        f"inputs must be a string, a list of strings, token ids [n, pos] or a dict with input_ids; got {type(inputs).__name__}"
    )


def _checked_ids(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    if ids.dim() == 1:
        ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
    if ids.dim() != 2 or ids.shape != mask.shape or ids.numel() == 0:
        raise InputError(f"input_ids must be [n, pos] with a mask of the same shape; got {tuple(ids.shape)} and {tuple(mask.shape)}")
    return {"input_ids": ids.long(), "attention_mask": mask.long()}


def _tokenize(texts: list[str], tokenizer: Any) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise InputError("text inputs need a tokenizer: the first checkpoint has none; pass tokenizer=... or token ids")
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise InputError(f"input {empty[0]} ({texts[empty[0]]!r}) encodes to no tokens; remove it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # right padding: real tokens keep positions 0..len-1
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _representation(model: Model, batch: dict[str, torch.Tensor], site: str, position: int, batch_size: int) -> torch.Tensor:
    """``[inputs, units]``: ``site`` at the ``position``-th real token of every input."""
    from ..trace import capture, split_token_id

    module = model.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), capture(model, site, flat=True, announce=False) as captured:
            for start in range(0, batch["input_ids"].shape[0], batch_size):
                chunk = {key: value[start:start + batch_size].to(model.device) for key, value in batch.items()}
                module(**chunk)
    finally:
        module.train(was_training)
    values = captured.tensor(site)  # [real tokens, units]
    examples, positions = split_token_id(captured.token_ids(site))
    return torch.stack([_pick(values, examples, positions, n, position, site) for n in range(batch["input_ids"].shape[0])])


def _pick(values: torch.Tensor, examples: torch.Tensor, positions: torch.Tensor, example: int, position: int, site: str) -> torch.Tensor:
    rows = (examples == example).nonzero().squeeze(1)
    rows = rows[positions[rows].argsort()]  # this input's real tokens in order
    if not -len(rows) <= position < len(rows):
        raise InputError(
            f"input {example} has {len(rows)} real token(s) at {site}, so position {position} does not exist; "
            "use longer inputs or another position"
        )
    return values[rows[position]].to(torch.float64)


# -- helpers ----------------------------------------------------------------------------
def _ranking(sensitivity: np.ndarray) -> np.ndarray:
    """Unit indices by decreasing sensitivity; equal values keep the lower index first."""
    return np.argsort(-np.asarray(sensitivity), kind="stable")


def _check_top(top: float) -> None:
    if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0 < top <= 1:
        raise InputError(f"top is the fraction of units called sensitive, in (0, 1]; got {top!r} (e.g. top=0.1 for 10 %)")


__all__ = ["Sensitivity", "neuron_sensitivity", "sensitive_mask", "sensitivity_from_trajectory"]
