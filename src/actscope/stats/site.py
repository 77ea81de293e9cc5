"""All per-unit statistics of one neuron-like site, fed from one prepared batch."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


from torch import Tensor

from actscope.errors import InputError
from actscope.stats import fused, triton_stats
from actscope.stats._common import check_n_units, check_other, check_state, prepare, state_header
from actscope.stats.histogram import AbsHistogram
from actscope.stats.moments import UnitMoments
from actscope.stats.pages import PageConfig, UnitPages
from actscope.stats.thresholds import DEFAULT_EPS, ThresholdLadder
from actscope.stats.topk import TopExamples

_HIST_KEYS = ("lo", "hi", "bins_per_decade")


class SiteStats:
    """The statistics the profiler keeps for one neuron-like site (e.g. ``blocks.3.mlp.post``).

    Bundles, over the same tokens: ``.moments`` (:class:`UnitMoments`: count, mean, var, min,
    max per unit), ``.ladder`` (:class:`ThresholdLadder`: firing counts, activation ratio,
    dead units), ``.hist`` (:class:`AbsHistogram`: pooled log histogram of ``|a|``) and
    ``.top`` (:class:`TopExamples`: top-k values and token ids per unit), and with ``pages`` the
    unit-page data ``.pages`` (:class:`~actscope.stats.pages.UnitPages`). The input is checked,
    moved and converted to float64 once per update and shared by the four.

    ``update(x, tok)``: ``x`` ``[N, U]`` real tokens, ``tok`` ``[N]`` int64 global token ids
    (required, for the top examples).
    """

    KIND = "actscope.stats.SiteStats"

    def __init__(
        self,
        n_units: int,
        eps: Sequence[float] = DEFAULT_EPS,
        k: int = 8,
        hist_kwargs: Mapping[str, Any] | None = None,
        pages: PageConfig | None = None,
    ):
        self.n_units = check_n_units(n_units, "SiteStats")
        self.moments = UnitMoments(self.n_units)
        self.ladder = ThresholdLadder(self.n_units, eps)
        self.hist = AbsHistogram(**_check_hist_kwargs(hist_kwargs))
        self.top = TopExamples(self.n_units, k)
        # the unit pages' windows, samples and co-firing bits (None: not kept)
        self.pages = UnitPages(self.n_units, k, pages) if pages is not None else None

    def _parts(self) -> dict[str, Any]:
        return {"moments": self.moments, "ladder": self.ladder, "hist": self.hist, "top": self.top}

    def update(self, x: Tensor, tok: Tensor | None = None) -> None:
        """Add the real tokens ``x`` ``[N, U]`` whose global token ids are ``tok`` ``[N]``."""
        self._update_stats(x, tok)
        if self.pages is not None:
            self.pages.update(x, tok, self.top._tok)  # after the top-k table took the batch

    def _update_stats(self, x: Tensor, tok: Tensor | None) -> None:
        if self._fused_fits(x, tok):
            self._update_fused(x, tok)
            return
        if self._triton_fits(x, tok) and triton_stats.update_site(self, x, tok):
            return  # CUDA: the Triton kernel (False: it cannot take the batch, torch does)
        batch = prepare(x, tok, self.n_units, "SiteStats", need_tok=True)
        if batch is None:
            return
        for part in self._parts().values():
            part._update_batch(batch)

    def _fused_fits(self, x: Tensor, tok: Tensor | None) -> bool:
        # Anything unusual (wrong shapes, empty batches, other devices) takes the checked path.
        shaped = isinstance(x, Tensor) and x.dim() == 2 and x.shape[0] > 0 and x.shape[1] == self.n_units
        matched = isinstance(tok, Tensor) and tok.shape == (x.shape[0],) if shaped else False
        return shaped and matched and fused.usable(x)

    def _triton_fits(self, x: Tensor, tok: Tensor | None) -> bool:
        # CUDA batches (usable) of the right shapes; anything else takes the checked torch path.
        shaped = isinstance(x, Tensor) and x.dim() == 2 and x.shape[0] > 0 and x.shape[1] == self.n_units
        matched = isinstance(tok, Tensor) and tok.shape == (x.shape[0],) and not tok.is_floating_point() if shaped else False
        return shaped and matched and triton_stats.usable(x)

    def _update_fused(self, x: Tensor, tok: Tensor) -> None:
        """The CPU fast path: one C pass for moments, ladder, histogram and top-k candidates."""
        part = fused.site_partials(x.detach(), self.ladder.eps, self.hist._edges, top=self.top._kernel_state(tok))
        self.moments._absorb(part)
        self.ladder._absorb(part)
        self.hist._absorb(part)

    def merge(self, other: SiteStats) -> SiteStats:
        """Add ``other``'s statistics (in place; same setup required); returns self."""
        check_other(self, other, ("n_units",))
        # Check every part before changing any, so a failed merge leaves self untouched.
        for name, part in self._parts().items():
            check_other(part, getattr(other, name), part._SETUP)
        if (self.pages is None) != (other.pages is None):
            raise InputError("SiteStats.merge: one side keeps unit-page data and the other does not; build both alike")
        for name, part in self._parts().items():
            part.merge(getattr(other, name))
        if self.pages is not None:
            self.pages.merge(other.pages, self.top._tok)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Nested dicts of plain tensors/ints/lists, one per part."""
        sd = {**state_header(self.KIND), "n_units": self.n_units}
        sd.update({name: part.state_dict() for name, part in self._parts().items()})
        if self.pages is not None:
            sd["pages"] = self.pages.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Replace every part's state by ``sd``'s (same setup required)."""
        check_state(sd, self.KIND, ("n_units", "moments", "ladder", "hist", "top"))
        for name, part in self._parts().items():
            part.load_state_dict(sd[name])
        self.pages = UnitPages.from_state_dict(sd["pages"]) if sd.get("pages") is not None else None

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> SiteStats:
        """A new bundle holding the state ``sd`` (setup read from the state)."""
        check_state(sd, cls.KIND, ("n_units", "moments", "ladder", "hist", "top"))
        ladder, hist, top = sd["ladder"], sd["hist"], sd["top"]
        for part in (ladder, hist, top):
            if not isinstance(part, Mapping):
                raise InputError(
                    f"{cls.KIND}: every part of the state must be a dict, got "
                    f"{type(part).__name__}; the state is corrupt."
                )
        acc = cls(
            sd["n_units"],
            eps=ladder.get("eps", DEFAULT_EPS),
            k=top.get("k", 8),
            hist_kwargs={key: hist[key] for key in _HIST_KEYS if key in hist},
        )
        acc.load_state_dict(sd)
        return acc

    def __repr__(self) -> str:
        return f"SiteStats(n_units={self.n_units}, tokens={self.ladder.n_tokens})"


def _check_hist_kwargs(hist_kwargs: Any) -> dict[str, Any]:
    if hist_kwargs is None:
        return {}
    if not isinstance(hist_kwargs, Mapping):
        raise InputError(
            f"SiteStats: hist_kwargs must be a dict, got {type(hist_kwargs).__name__}; e.g. "
            "hist_kwargs={'lo': 1e-6, 'hi': 1e4, 'bins_per_decade': 8}."
        )
    unknown = sorted(set(hist_kwargs) - set(_HIST_KEYS))
    if unknown:
        raise InputError(
            f"SiteStats: unknown hist_kwargs {unknown}; the histogram takes {list(_HIST_KEYS)}."
        )
    return dict(hist_kwargs)
