"""Feature visualisation: images that maximise a unit, a channel or a direction of a site.

:func:`visualize` runs activation maximisation — gradient ascent on the input — with the usual
regularisers, each a field of :class:`VisConfig`:

* **parameterisation**: the image is ``sigmoid(C · irfft2(S · w))``: ``w`` the learned spectrum,
  ``S`` scales frequency f by ``1 / max(f, 1/size)^decay`` (a decorrelated Fourier basis: every
  frequency starts with equal energy in the image, so low frequencies are not drowned out), ``C``
  a colour decorrelation (the Cholesky factor of the data's colour covariance, normalised; the
  identity without data or for grey images). ``fourier=False`` optimises pixels directly;
* **transformations**, drawn afresh each step: a translation of up to ``jitter`` pixels, a scale
  from ``scales``, a rotation from ``angles`` (degrees), applied in one affine resampling;
* **total variation** of the image in 0..1, weighted by ``tv``.

The objective (:class:`Target`) is read from the site's tensor: for a feature map ``[b, C, H, W]``
``"channel"`` is the mean of channel c over positions, ``"unit"`` channel c at the centre position,
``"direction"`` the mean over positions of the projection on a vector; for ``[b, T, U]`` (a ViT's
patches) the same over tokens. All randomness comes from one ``torch.Generator`` seeded with
``seed``: the same seed gives the same image, bit for bit on one machine.

:func:`facets` is multifaceted visualisation (Nguyen, Yosinski & Clune 2016): the unit's
top-activating images are clustered (k-means on their codes at ``code_site``, a higher layer) and
one image is optimised per cluster, starting from the mean of its images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..feeding import image_key
from ..models import Model, as_model
from ..sites import plan_sites

KINDS = ("channel", "unit", "direction")


@dataclass(frozen=True)
class VisConfig:
    steps: int = 256
    lr: float = 0.05
    jitter: int = 1
    scales: tuple[float, ...] = (0.95, 1.0, 1.05)
    angles: tuple[float, ...] = (-5.0, 0.0, 5.0)
    tv: float = 0.01
    fourier: bool = True
    decay: float = 1.0
    seed: int = 0

    def checked(self) -> "VisConfig":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"--steps must be a whole number of at least 1, got {self.steps!r}")
        if not self.lr > 0 or self.tv < 0 or self.jitter < 0 or not self.scales or not self.angles:
            raise InputError("--lr must be positive; --tv and --jitter at least 0; scales and angles need one value each")
        return self


@dataclass(frozen=True)
class Target:
    """What to maximise at ``site``: ``kind`` (channel, unit, direction), ``index`` or ``vector``."""

    site: str
    kind: str = "channel"
    index: int | None = None
    vector: Any = None

    def checked(self) -> "Target":
        if self.kind not in KINDS:
            raise InputError(f"the target kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "direction" and self.vector is None:
            raise InputError("a direction target needs its vector (one value per unit of the site)")
        if self.kind != "direction" and (isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0):
            raise InputError(f"a {self.kind} target needs a unit index of at least 0, got {self.index!r}")
        return self


@dataclass(frozen=True, eq=False)
class Visualization:
    """The optimised image ``[C, H, W]`` in 0..1, the objective at each step, and the final one
    (measured on the untransformed image)."""

    image: torch.Tensor
    trace: np.ndarray
    value: float
    target: Target
    config: VisConfig = field(default_factory=VisConfig)


# -- the objective -------------------------------------------------------------------------
def objective(model: Model, target: Target, pixels: torch.Tensor, site: Any = None) -> torch.Tensor:
    """The target's value for each of a batch of model inputs ([batch]), with gradients.
    ``site``: the target's planned site, when the caller planned it once already."""
    return _reduce(site_tensor(model, site or plan_sites(model, target.site).sites[0], pixels), target)


def unit_means(model: Model, site: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Every unit's value averaged over positions ([batch, units]), with gradients."""
    x = site_tensor(model, site, pixels)
    return x.flatten(2).mean(-1) if x.dim() == 4 else (x.mean(1) if x.dim() == 3 else x)


def site_tensor(model: Model, site: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The planned ``site``'s tensor for a batch of model inputs, with gradients."""
    from ..hooks import hooks
    from ..models.adapters.base import HookCall, ReadContext

    module = model.module.get_submodule(site.path)
    read, ctx, seen = site.hook.reader(), ReadContext(dict(site.index), model.config), {}

    def before(m: Any, a: tuple, k: dict) -> None:
        seen.setdefault("x", read(HookCall(m, a, k), ctx))

    def after(m: Any, a: tuple, k: dict, o: Any) -> None:
        seen.setdefault("x", read(HookCall(m, a, k, o), ctx))

    with hooks(model.module) as registry:
        if site.hook.at == "input":
            registry.before(module, before, with_kwargs=True, name="visualize")
        else:
            registry.after(module, after, with_kwargs=True, name="visualize")
        model(**{image_key(model): pixels})
    return seen["x"]


def _reduce(x: torch.Tensor, target: Target) -> torch.Tensor:
    if x.dim() == 4:  # [b, C, H, W] → [b, positions, C]
        centre = (x.shape[2] // 2) * x.shape[3] + x.shape[3] // 2
        x = x.flatten(2).transpose(1, 2)
    elif x.dim() == 3:
        centre = x.shape[1] // 2
    else:
        x, centre = x[:, None], 0
    if target.kind == "direction":
        vector = torch.as_tensor(np.asarray(target.vector), dtype=x.dtype, device=x.device)
        if vector.shape != (x.shape[-1],):
            raise InputError(f"the direction has {tuple(vector.shape)} values; the site has {x.shape[-1]} units")
        return (x @ vector).mean(1)
    if target.index >= x.shape[-1]:
        raise InputError(f"unit {target.index} is out of range: {target.site} has {x.shape[-1]} units (0–{x.shape[-1] - 1})")
    return x[:, centre, target.index] if target.kind == "unit" else x[..., target.index].mean(1)


# -- the image -----------------------------------------------------------------------------
class Parameterisation:
    """``w`` → image in 0..1 (see the module docstring); ``from_image`` inverts it."""

    def __init__(self, shape: tuple[int, int, int], config: VisConfig, colour: torch.Tensor | None, generator: torch.Generator) -> None:
        channels, height, width = shape
        self.shape, self.fourier = shape, config.fourier
        self.colour = colour if colour is not None and channels == 3 else torch.eye(channels)
        if config.fourier:
            fy = torch.fft.fftfreq(height)[:, None]
            fx = torch.fft.rfftfreq(width)[None, :]
            frequency = torch.sqrt(fx ** 2 + fy ** 2)
            self.scale = 1.0 / frequency.clamp(min=1.0 / max(height, width)) ** config.decay
            self.w = (0.01 * torch.randn(2, channels, height, width // 2 + 1, generator=generator)).requires_grad_(True)
        else:
            self.w = (0.01 * torch.randn(channels, height, width, generator=generator)).requires_grad_(True)

    def image(self) -> torch.Tensor:
        if self.fourier:
            spectrum = torch.complex(self.w[0], self.w[1]) * self.scale
            raw = torch.fft.irfft2(spectrum, s=self.shape[1:], norm="ortho")
        else:
            raw = self.w
        return torch.sigmoid(torch.einsum("ij,jhw->ihw", self.colour, raw))

    def from_image(self, image: torch.Tensor) -> None:
        """Start from ``image`` [C, H, W] in 0..1."""
        raw = torch.logit(image.clamp(0.02, 0.98))
        raw = torch.einsum("ij,jhw->ihw", torch.linalg.inv(self.colour), raw)
        with torch.no_grad():
            if self.fourier:
                spectrum = torch.fft.rfft2(raw, norm="ortho") / self.scale
                self.w.copy_(torch.stack([spectrum.real, spectrum.imag]))
            else:
                self.w.copy_(raw)


def colour_matrix(pixels: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor of the images' colour covariance, scaled to unit largest column norm."""
    if pixels.shape[1] != 3:
        return None
    flat = pixels.permute(1, 0, 2, 3).reshape(3, -1).double()
    cov = torch.cov(flat) + 1e-6 * torch.eye(3, dtype=torch.float64)
    factor = torch.linalg.cholesky(cov)
    return (factor / factor.norm(dim=0).max()).float()


def transform(images: torch.Tensor, config: VisConfig, generator: torch.Generator) -> torch.Tensor:
    """A random translation, scale and rotation of ``images`` [b, C, H, W] (one affine resampling)."""
    b, _, height, width = images.shape
    pick = lambda values: float(values[int(torch.randint(len(values), (1,), generator=generator))])  # noqa: E731
    scale, angle = pick(config.scales), math.radians(pick(config.angles))
    shift = (torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator).float() * 2 / torch.tensor([width, height])
             if config.jitter else torch.zeros(2))
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, float(shift[0])], [sin, cos, float(shift[1])]]).expand(b, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    return (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., :, 1:] - image[..., :, :-1]).abs().mean()


def visualize(model: Any, target: Target, *, shape: tuple[int, int, int], mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
              config: VisConfig | None = None, start: torch.Tensor | None = None, colour: torch.Tensor | None = None) -> Visualization:
    """Optimise one image of ``shape`` (C, H, W) to maximise ``target``; the model sees
    ``(image − mean) / std``. ``start``: an image in 0..1 to begin from (a facet's mean)."""
    model, target, config = as_model(model), target.checked(), (config or VisConfig()).checked()
    generator = torch.Generator().manual_seed(config.seed)
    param = Parameterisation(tuple(shape), config, colour, generator)
    if start is not None:
        param.from_image(start)
    optimiser = torch.optim.Adam([param.w], lr=config.lr)
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    spread = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    trace = []
    site = plan_sites(model, target.site).sites[0]
    training = model.module.training
    model.module.eval()
    try:
        for _ in range(config.steps):
            image = param.image()[None]
            value = objective(model, target, (transform(image, config, generator) - shift) / spread, site).mean()
            loss = -value + config.tv * total_variation(image)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            trace.append(float(value.detach()))
        with torch.no_grad():
            final = param.image()
            value = float(objective(model, target, (final[None] - shift) / spread, site)[0])
    finally:
        model.module.train(training)
        model.module.zero_grad(set_to_none=True)
    return Visualization(final.detach(), np.asarray(trace), value, target, config)


# -- facets ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Facets:
    """One visualisation per facet, the images (indices into the data) of each facet, its mean."""

    images: list[Visualization]
    members: list[np.ndarray]
    means: torch.Tensor  # [facets, C, H, W]
    codes: np.ndarray  # [top images, code units]: what the clustering saw


def codes_of(model: Model, site: str, pixels: torch.Tensor) -> torch.Tensor:
    """Each input's code at ``site``: its tensor averaged over positions ([n, units])."""
    from ..trace import capture

    with torch.no_grad(), capture(model, site, announce=False) as seen:
        for start in range(0, len(pixels), 64):
            model(**{image_key(model): pixels[start:start + 64]})
    x = seen.tensor(plan_sites(model, site).sites[0].label)
    return x.flatten(2).mean(-1) if x.dim() == 4 else (x.mean(1) if x.dim() == 3 else x)


def kmeans() -> Any:
    """scikit-learn's KMeans, or an InputError naming the extra that brings it."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise InputError("clustering images or units needs scikit-learn: pip install 'actscope[vision]'") from None
    return KMeans


def facets(model: Any, target: Target, images: Any, *, k: int = 3, top: int = 60, code_site: str | None = None,
           config: VisConfig | None = None) -> Facets:
    """Multifaceted visualisation of ``target`` over ``images`` (:class:`~actscope.data.images.Images`)."""
    KMeans = kmeans()
    model, target, config = as_model(model), target.checked(), (config or VisConfig()).checked()
    inputs = images.normalised()
    with torch.no_grad():
        scores = torch.cat([objective(model, target, inputs[s:s + 64]) for s in range(0, len(inputs), 64)])
    if top < k or len(images) < top:
        raise InputError(f"facets need at least k={k} top images and top={top} at most the {len(images)} images given")
    best = torch.argsort(scores, descending=True, stable=True)[:top].numpy()
    codes = codes_of(model, code_site or target.site, inputs[best]).double().numpy()
    labels = KMeans(k, n_init=10, random_state=config.seed).fit_predict(codes)
    members = [best[labels == c] for c in range(k)]
    means = torch.stack([images.pixels[m].mean(0) for m in members])
    colour = colour_matrix(images.pixels)
    pre = images.preprocess
    shown = [visualize(model, target, shape=tuple(images.pixels.shape[1:]), mean=pre.mean, std=pre.std, config=config,
                       start=means[c], colour=colour) for c in range(k)]
    return Facets(shown, members, means, codes)
