"""Real English text that every machine with actscope already has: the documentation strings of
the installed Python standard library, numpy and torch.

The model hub is not always reachable, and no text corpus ships with Python, but the docstrings
of these packages are several megabytes of human-written technical English (prose, parameter
lists, examples). :func:`doc_texts` reads them with :mod:`ast` from the source files (nothing is
imported or executed), skips test folders, keeps each docstring of at least ``min_chars``
characters once, whitespace-normalised, in a fixed order. :func:`split_texts` puts every
twentieth text (chosen by a hash of its content, so independent of order and sources) in the
held-out part. :func:`fingerprint` names the exact texts, so a cached model trained on other
package versions is never mistaken for this one.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from actscope.errors import InputError

__all__ = ["SOURCES", "doc_texts", "split_texts", "fingerprint", "source_root"]

SOURCES = ("stdlib", "numpy", "torch")
HELD_OUT_EVERY = 20  # one text in twenty (by content hash) is held out
_SKIPPED_FOLDERS = frozenset({"test", "tests", "testing", "idlelib", "site-packages", "lib2to3"})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def source_root(source: str) -> Path:
    """The folder of ``source``: ``"stdlib"`` or the name of an installed package."""
    if source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(source) if source.isidentifier() else None
    if spec is None or spec.origin is None:
        raise InputError(f"doc_texts: {source!r} is neither 'stdlib' nor an installed package; "
                         f"pass sources from {SOURCES} or install it.")
    return Path(spec.origin).parent


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOCUMENTED))
    return [" ".join(doc.split()) for doc in found if doc]


@lru_cache(maxsize=4)
def doc_texts(sources: Sequence[str] = SOURCES, min_chars: int = 80) -> tuple[str, ...]:
    """Every docstring of at least ``min_chars`` characters in ``sources``, each once, in order of
    source, file path and position."""
    seen: set[str] = set()
    texts: list[str] = []
    for source in sources:
        root = source_root(source)
        for path in sorted(root.rglob("*.py")):
            if _SKIPPED_FOLDERS.intersection(path.relative_to(root).parts[:-1]):
                continue
            for text in _docstrings(path):
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    texts.append(text)
    if not texts:
        raise InputError(f"doc_texts: no docstring of {min_chars}+ characters found in {list(sources)}; "
                         "pass other sources or a smaller min_chars.")
    return tuple(texts)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_texts(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training, held-out): a text is held out when its SHA-256 is divisible by ``HELD_OUT_EVERY``."""
    train, held_out = [], []
    for text in texts:
        (held_out if int.from_bytes(_digest(text)[:8], "big") % HELD_OUT_EVERY == 0 else train).append(text)
    return train, held_out


def fingerprint(texts: Sequence[str]) -> str:
    """A short SHA-256 over the texts in order."""
    h = hashlib.sha256()
    for text in texts:
        h.update(_digest(text))
    return h.hexdigest()[:16]
