"""Top-activating examples of units, read back from a run, with the activating token marked.

A run's ``examples`` table (written by ``profile``) holds, for every unit of every *unit* site it
observed, the top-k tokens by activation with their context (``left``, ``token``, ``right``).
That covers MLP neurons, the head×d_head units of per-head sites (``attn.z``, ``attn.v``: unit
``h·d_head + j`` is component j of head h), MoE experts' neurons (``moe.experts.{e}.post``) and
the router (``moe.router``: unit e is expert e, so its examples are the tokens with the highest
router logit for that expert). A run holds **no** top examples for attention-pattern sites
(``attn.pattern``: only the per-head summary in the ``heads`` table) and none for a head as a
whole; this module says so instead of returning nothing.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import InputError
from ..results import TableResult

MARK_OPEN, MARK_CLOSE = "[[", "]]"  # plain-text markers around the activating token
COLUMNS = ("site", "layer", "unit", "rank", "value", "doc", "pos", "left", "token", "right")


@dataclass(frozen=True, eq=False)
class TopExamples(TableResult):
    """One row per (site, unit, rank): an activating token in its context. ``text`` is the
    context in plain text with the token between ``[[`` and ``]]``."""

    table_name: ClassVar[str] = "top_examples"

    site: np.ndarray  # [rows] object
    layer: np.ndarray  # [rows] int64
    unit: np.ndarray  # [rows] int64
    rank: np.ndarray  # [rows] int64, 0 = strongest
    value: np.ndarray  # [rows] float64
    doc: np.ndarray  # [rows] int64
    pos: np.ndarray  # [rows] int64
    left: np.ndarray  # [rows] object
    token: np.ndarray  # [rows] object
    right: np.ndarray  # [rows] object

    @property
    def text(self) -> np.ndarray:
        return np.array([marked(l, t, r) for l, t, r in zip(self.left, self.token, self.right)], dtype=object)

    def to_table(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS} | {"text": self.text}

    def rich_text(self, row: int) -> Any:
        """Row ``row``'s context as a ``rich.text.Text``, the activating token highlighted
        (literal text: brackets in the data are never read as markup)."""
        from rich.text import Text

        return Text.assemble(_one_line(self.left[row]), (_one_line(self.token[row]), "bold reverse"), _one_line(self.right[row]))


def marked(left: str, token: str, right: str) -> str:
    """``left[[token]]right`` on one line (newlines shown as ⏎)."""
    return f"{_one_line(left)}{MARK_OPEN}{_one_line(token)}{MARK_CLOSE}{_one_line(right)}"


def _one_line(text: str) -> str:
    return str(text).replace("\r", "").replace("\n", "⏎")


def top_examples(run: Any, site: str, units: int | Sequence[int] | None = None, *, top: int | None = None) -> TopExamples:
    """The top-activating examples of ``site`` in ``run`` (a Run or a run directory).

    ``site``: a site name as profiled, a glob (``blocks.*.mlp.post``), optionally with a unit
    selection (``blocks.3.mlp.post[17,42]``); ``units`` adds one unit or a list; ``top`` keeps
    ranks below it. Rows are ordered by site, unit and rank.
    """
    from ..sites import ITEM, _indices

    table = _examples_table(run)
    match = ITEM.match(site.strip()) if isinstance(site, str) else None
    if match is None:
        raise InputError(f"cannot parse site {site!r}; write e.g. blocks.3.mlp.post or blocks.3.mlp.post[17]")
    base, select = match.group("base").strip(), match.group("select")
    if select is not None and "=" in select:
        raise InputError(f"'{site}': the run keeps examples per unit, not per head; select units, e.g. {base}[0:16] for the first 16 units")
    rows = _site_rows(table, base)
    wanted = set(_indices(select, site)) if select and select.strip() else set()
    wanted |= {units} if isinstance(units, int) else set(units or ())
    if wanted:
        rows = _unit_rows(table, rows, wanted, base)
    if top is not None:
        rows = rows[np.asarray(table["rank"])[rows] < top]
    order = np.lexsort((np.asarray(table["rank"])[rows], np.asarray(table["unit"])[rows], np.asarray(table["site"], dtype=object)[rows].astype(str)))
    rows = rows[order]
    return TopExamples(**{name: np.asarray(table[name], dtype=object if name in ("site", "left", "token", "right") else None)[rows] for name in COLUMNS})


def _examples_table(run: Any) -> dict[str, Any]:
    from ..run import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    if "examples" not in run.tables:
        raise InputError(f"this run has no examples table (it has: {', '.join(run.tables)}); profile again with `actscope profile`")
    return run.examples.to_pydict()


def _site_rows(table: dict[str, Any], base: str) -> np.ndarray:
    names = np.asarray(table["site"], dtype=object)
    bases = np.array([name.split("[")[0] for name in names], dtype=object)
    rows = np.flatnonzero([fnmatch.fnmatchcase(b, base) for b in bases])
    if rows.size:
        return rows
    available = sorted(set(bases.tolist()))
    if base.split(".")[-1] == "pattern":
        raise InputError(
            f"the run keeps no top examples for attention-pattern sites ('{base}': only the per-head summary in its heads table); "
            "profile blocks.{i}.attn.z to get examples for its head×d_head units"
        )
    import difflib

    close = difflib.get_close_matches(base, available, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise InputError(f"the run has no examples for site '{base}'.{hint} It has: {', '.join(available) or 'none'}")


def _unit_rows(table: dict[str, Any], rows: np.ndarray, wanted: set[int], base: str) -> np.ndarray:
    present = np.asarray(table["unit"], dtype=np.int64)[rows]
    missing = sorted(wanted - set(present.tolist()))
    if missing:
        have = sorted(set(present.tolist()))
        raise InputError(
            f"the run has no examples for unit(s) {missing[:5]} of '{base}'; it has units {have[0]}-{have[-1]} ({len(have)} units); "
            "pick one of those or profile that unit"
        )
    return rows[np.isin(present, sorted(wanted))]
