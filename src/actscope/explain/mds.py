"""Most discriminative stimuli (Burg et al. 2024): cluster a site's units by the stimuli that tell
the clusters apart, alternating stimulus optimisation with reassignment, as in EM.

The definition used here (our reading of the paper; the temperature, the normalisation and the
start are our choices):

* A unit's **response** r_n(x) is its value averaged over positions, **standardised** with its
  mean and standard deviation over the data images: z_n(x) = (r_n(x) − μ_n) / σ_n.
* **Start**: k-means (seeded) on the units' standardised responses to the data images.
* **M-step**: the k stimuli x_1 … x_k are optimised together (the parameterisation and
  transformations of :mod:`.visualize`) to maximise
  ``Σ_k mean_{n ∈ C_k} log softmax_j(z_n(x_j) / τ)[k]``: each cluster's units should respond to
  their own cluster's stimulus more than to every other cluster's: the stimulus is
  *discriminative*, not merely exciting.
* **E-step**: every unit moves to the cluster whose stimulus it responds to most,
  ``argmax_j z_n(x_j)``. A cluster left empty keeps its stimulus but no units.
* Rounds repeat until no unit moves or ``rounds`` are done.

:func:`discriminative_stimuli` returns the stimuli, the final clusters and each round's changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..models import as_model
from ..sites import plan_sites
from .visualize import Parameterisation, VisConfig, colour_matrix, kmeans, total_variation, transform, unit_means


@dataclass(frozen=True, eq=False)
class Stimuli:
    """``images [k, C, H, W]`` in 0..1, ``clusters [units]`` (cluster of each unit), the clusters
    k-means started from, the units that moved in each round, and ``responses [units, k]``: the
    standardised response of each unit to each stimulus."""

    images: torch.Tensor
    clusters: np.ndarray
    start: np.ndarray
    moved: list[int]
    responses: np.ndarray


def discriminative_stimuli(model, site: str, images, *, k: int = 4, rounds: int = 4, temperature: float = 1.0,
                           config: VisConfig | None = None, start: np.ndarray | None = None) -> Stimuli:
    """The most discriminative stimuli of ``site``'s units over ``images`` (see the module docstring);
    ``start``: the clusters to start from (one per unit) instead of k-means'."""
    KMeans = kmeans()
    model, config = as_model(model), (config or VisConfig(steps=128)).checked()
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InputError(f"k must be a whole number of at least 2 clusters, got {k!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"rounds must be a whole number of at least 1 (optimise, then reassign), got {rounds!r}")
    planned = plan_sites(model, site).sites[0]
    with torch.no_grad():
        data = torch.cat([unit_means(model, planned, images.normalised(slice(s, s + 64))) for s in range(0, len(images), 64)]).double()
    mu, sigma = data.mean(0), data.std(0).clamp(min=1e-6)
    if data.shape[1] < k:
        raise InputError(f"{site} has {data.shape[1]} units, fewer than k={k} clusters")
    standard = ((data - mu) / sigma).T.numpy()  # [units, images]
    if start is None:
        start = KMeans(k, n_init=10, random_state=config.seed).fit_predict(standard)
    start = np.asarray(start, dtype=np.int64)
    if start.shape != (standard.shape[0],) or start.min() < 0 or start.max() >= k:
        raise InputError(f"start must give each of the {standard.shape[0]} units a cluster in 0..{k - 1}")
    clusters, moved = start.copy(), []
    generator = torch.Generator().manual_seed(config.seed)
    shape = tuple(images.pixels.shape[1:])
    params = [Parameterisation(shape, config, colour_matrix(images.pixels), generator) for _ in range(k)]
    scale = (images.preprocess.mean, images.preprocess.std)
    for _ in range(rounds):
        _optimise(model, planned, params, clusters, (mu, sigma), scale, temperature, config, generator)
        z = _standard_responses(model, planned, params, (mu, sigma), scale)
        updated = z.argmax(1)
        moved.append(int((updated != clusters).sum()))
        clusters = updated
        if moved[-1] == 0:
            break
    with torch.no_grad():
        final = torch.stack([p.image() for p in params])
    return Stimuli(final, clusters, start, moved, _standard_responses(model, planned, params, (mu, sigma), scale))


def _model_input(images: torch.Tensor, scale: tuple) -> torch.Tensor:
    mean = torch.tensor(scale[0], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(scale[1], dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def _optimise(model, planned, params, clusters, norm, scale, temperature, config, generator) -> None:
    optimiser = torch.optim.Adam([p.w for p in params], lr=config.lr)
    members = [torch.as_tensor(np.flatnonzero(clusters == c)) for c in range(len(params))]
    mu, sigma = (t.float() for t in norm)
    training = model.module.training
    model.module.eval()
    try:
        for _ in range(config.steps):
            stimuli = torch.stack([p.image() for p in params])
            z = (unit_means(model, planned, _model_input(transform(stimuli, config, generator), scale)) - mu) / sigma  # [k, units]
            log_p = torch.log_softmax(z.T / temperature, dim=1)  # [units, k]: which stimulus each unit prefers
            terms = [log_p[m, c].mean() for c, m in enumerate(members) if len(m)]
            loss = -torch.stack(terms).sum() + config.tv * total_variation(stimuli)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        model.module.train(training)
        model.module.zero_grad(set_to_none=True)


def _standard_responses(model, planned, params, norm, scale) -> np.ndarray:
    with torch.no_grad():
        stimuli = torch.stack([p.image() for p in params])
        z = (unit_means(model, planned, _model_input(stimuli, scale)).double() - norm[0]) / norm[1]
    return z.T.numpy()  # [units, k]
