"""What a unit's page needs beyond its statistics, gathered in the same streaming pass.

:class:`UnitPages` bundles, for one site: the activation windows of the top examples
(:class:`~actscope.stats.windows.TopWindows`), each unit's sample of the tokens it fires on
(:class:`~actscope.stats.sampling.FiringSample`: examples per quantile bin and the unit's
histogram) and the co-firing sample (:class:`~actscope.stats.sampling.TokenSample`). Memory per
unit with the defaults: 512 + 64 bytes of windows, 768 of firing sample, 128 of co-firing bits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from actscope.errors import InputError
from actscope.stats._common import check_state, state_header
from actscope.stats.sampling import SAMPLE, TOKENS, FiringSample, TokenSample, token_keys
from actscope.stats.windows import AFTER, BEFORE, TopWindows


@dataclass(frozen=True)
class PageConfig:
    """Sizes of the unit-page data: window tokens before/after a top example, firing tokens
    sampled per unit, tokens in the co-firing sample."""

    before: int = BEFORE
    after: int = AFTER
    sample: int = SAMPLE
    cofire: int = TOKENS

    def checked(self) -> "PageConfig":
        for name, value in asdict(self).items():
            low = 1 if name in ("sample", "cofire") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"PageConfig.{name} must be a whole number of at least {low}, got {value!r}")
        return self


class UnitPages:
    """Windows, firing sample and co-firing sample of one site's units (see the module docstring)."""

    KIND = "actscope.stats.UnitPages"

    def __init__(self, n_units: int, k: int, config: PageConfig | None = None):
        self.config = (config or PageConfig()).checked()
        self.n_units, self.k = n_units, k
        self.windows = TopWindows(n_units, k, self.config.before, self.config.after)
        self.sample = FiringSample(n_units, self.config.sample)
        self.cofire = TokenSample(n_units, self.config.cofire)

    def update(self, x: Tensor, tok: Tensor, top_tok: Tensor) -> None:
        """After the site's top-k table took the batch (``top_tok`` its ``[U, k]`` token ids)."""
        if x.shape[0] == 0:
            return
        x = x.detach()
        keys = token_keys(tok)
        self.windows.follow(top_tok, x, tok)
        self.sample.update(x, tok, keys)
        self.cofire.update(x, tok, keys)

    def merge(self, other: "UnitPages", top_tok: Tensor) -> "UnitPages":
        if other.config != self.config or other.n_units != self.n_units:
            raise InputError(f"UnitPages.merge: the setups differ ({self.config} here, {other.config} in the other)")
        self.windows.merge(other.windows, top_tok)
        self.sample.merge(other.sample)
        self.cofire.merge(other.cofire)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {**state_header(self.KIND), "config": asdict(self.config), "windows": self.windows.state_dict(),
                "sample": self.sample.state_dict(), "cofire": self.cofire.state_dict()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> "UnitPages":
        check_state(sd, cls.KIND, ("config", "windows", "sample", "cofire"))
        windows = TopWindows.from_state_dict(sd["windows"])
        pages = cls(windows.n_units, windows.k, PageConfig(**sd["config"]))
        pages.windows, pages.sample, pages.cofire = windows, FiringSample.from_state_dict(sd["sample"]), TokenSample.from_state_dict(sd["cofire"])
        return pages

    def __repr__(self) -> str:
        return f"UnitPages(n_units={self.n_units}, {self.config})"
