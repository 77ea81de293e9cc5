"""Hugging Face hub ids: :func:`resolve` turns ``org/name`` (and a revision) into a snapshot
directory of the local Hugging Face cache, downloading only when the caller allows it.

Everything about the cache goes through huggingface_hub itself (``try_to_load_from_cache``,
``snapshot_download``, ``scan_cache_dir``), so ``HF_HOME``, ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` mean here what they mean to every other Hugging Face tool. huggingface_hub
reads those variables once, when it is imported, into ``huggingface_hub.constants``; the cache
folder is read from there once per call and passed explicitly to every function (some of them
bound the value at import), so one call sees one cache.

Without ``download=True`` nothing reaches the network: the id is looked up in the cache only.
With it (and ``HF_HUB_OFFLINE`` unset), only what loading reads is fetched: config.json, the
generation config, the tokenizer files, and the one weight format ``from_pretrained`` will read
(the shards a sharded index names); ``*.py`` files only with ``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from fnmatch import fnmatch
from glob import escape
from pathlib import Path
from typing import Any, Sequence

from ..errors import ModelLoadError

DOWNLOAD_FIX = "pass download=True to actscope.load (CLI: --download) to fetch its config, weights and tokenizer into that cache"
# Top-level files that loading reads besides the weights (config, generation config, every
# tokenizer format transformers reads). Matched with fnmatch against the repository's file names.
LOADING_READS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*",
)

log = logging.getLogger("actscope")


@dataclass(frozen=True)
class Snapshot:
    """One revision of a hub model in the local cache."""

    repo_id: str
    commit: str  # the 40-hex commit the snapshot folder is named after
    directory: Path

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.commit}"


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid hub repository id (``org/name``, or ``name`` alone), as
    huggingface_hub validates it. Paths that say they are paths (``./x``, ``~/x``, ``/x``) are not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "~", "/")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve(
    repo_id: str, *, revision: str | None, download: bool, trust_remote_code: bool, weight_files: Sequence[str]
) -> Snapshot:
    """The snapshot of ``repo_id`` at ``revision`` (default: main): from the cache, or, with
    ``download=True``, fetched into it; ``weight_files`` are the weight file names loading reads,
    in its order of preference. Every failure is a :class:`ModelLoadError` with the fix."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    if download and not constants.HF_HUB_OFFLINE:
        return _downloaded(repo_id, revision, cache, trust_remote_code, weight_files)
    cached = _cached(repo_id, revision, cache)
    if cached is not None:
        return cached
    if download:  # HF_HUB_OFFLINE=1 beats download=True: the cache only
        at = "" if revision is None else f" at revision '{revision}'"
        raise ModelLoadError(
            f"'{repo_id}'{at} is not a local directory and not in the local Hugging Face cache ({cache}); downloading "
            "it was allowed (download=True / --download), but HF_HUB_OFFLINE=1 in the environment forbids any "
            "download. Unset HF_HUB_OFFLINE (or set it to 0), or pass a local model directory (e.g. after "
            f"{_hf_download(repo_id, revision)})"
        )
    return _refuse_uncached(repo_id, revision, cache)


# --- the cache ---------------------------------------------------------------------------------


def _cached(repo_id: str, revision: str | None, cache: Path) -> Snapshot | None:
    """The cached snapshot (its config.json must be there), or None. Reads the disk only."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
    if not isinstance(config, str):  # None, or the "known not to exist" marker
        return None
    directory = Path(config).parent
    return Snapshot(repo_id, directory.name, directory)


def _refuse_uncached(repo_id: str, revision: str | None, cache: Path) -> Snapshot:
    known = _cached_revisions(repo_id, cache)
    if known:
        raise ModelLoadError(
            f"revision '{revision or 'main'}' of '{repo_id}' is not in the local Hugging Face cache ({cache}); cached: "
            f"{known}. Pass one of those (--revision; revision= in Python), or {DOWNLOAD_FIX}"
        )
    at = "" if revision is None else f" at revision '{revision}'"
    raise ModelLoadError(
        f"'{repo_id}' is not a local directory, and the Hugging Face model '{repo_id}'{at} is not in the local "
        f"cache ({cache}); nothing was downloaded. Either pass a local model directory (e.g. after "
        f"{_hf_download(repo_id, revision)}), or {DOWNLOAD_FIX}"
    )


def _cached_revisions(repo_id: str, cache: Path) -> str:
    """The cached revisions of ``repo_id`` in words ('main → <commit>; <commit>'), '' if none."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - only for the message: no cache folder at all, or an unreadable one
        return ""
    words = []
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
                refs = ", ".join(sorted(rev.refs))
                words.append(f"{refs} → {rev.commit_hash}" if refs else rev.commit_hash)
    return "; ".join(words)


def _hf_download(repo_id: str, revision: str | None = None) -> str:
    flag = "" if revision is None else f" --revision {revision}"
    return f"`hf download {repo_id}{flag} --local-dir ./{repo_id.rsplit('/', 1)[-1]}`"


# --- downloading -------------------------------------------------------------------------------


def _downloaded(
    repo_id: str, revision: str | None, cache: Path, trust_remote_code: bool, weight_files: Sequence[str]
) -> Snapshot:
    """Fetch what loading reads into the cache (files already there are not fetched again)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        listed = [name for name in HfApi().list_repo_files(repo_id, revision=revision) if "/" not in name]
        directory = _fetch(repo_id, revision, cache, [name for name in listed if _loading_reads(name, trust_remote_code)])
        commit = directory.name  # the later fetches name this commit: every file comes from one revision
        weights = _weight_file(directory, listed, weight_files)
        if weights is not None:
            _fetch(repo_id, commit, cache, [weights])
            if weights.endswith(".index.json"):
                _fetch(repo_id, commit, cache, _shards(directory / weights, listed))
    except RevisionNotFoundError:
        raise ModelLoadError(
            f"'{repo_id}' has no revision '{revision}' on the Hugging Face hub; pass an existing branch, tag or "
            "commit (--revision; revision= in Python)"
        ) from None
    except RepositoryNotFoundError:  # also a gated or private one without access
        raise ModelLoadError(
            f"'{repo_id}' is not a local directory, and the Hugging Face hub has no model '{repo_id}' you can access "
            "(a typo, or a private or gated repository: log in with `hf auth login` and accept its terms on the hub); "
            "check the id, or pass a local model directory"
        ) from None
    except Exception as error:  # noqa: BLE001 - the network, the hub or the disk failed: not the model's fault
        cached = _cached(repo_id, revision, cache)
        if cached is None:
            raise ModelLoadError(
                f"cannot download '{repo_id}' from the Hugging Face hub ({_said(error)}), and it is not in the local "
                f"cache ({cache}); check the network, or pass a local model directory (e.g. after "
                f"{_hf_download(repo_id, revision)} on a machine with network)"
            ) from None
        log.warning("actscope: cannot reach the Hugging Face hub (%s); using the cached snapshot %s", _said(error), cached.source)
        return cached
    return Snapshot(repo_id, commit, directory)


def _loading_reads(name: str, trust_remote_code: bool) -> bool:
    return any(fnmatch(name, pattern) for pattern in LOADING_READS) or (trust_remote_code and name.endswith(".py"))


def _fetch(repo_id: str, revision: str | None, cache: Path, names: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    # Exact names as patterns: a file name with [ ] * ? in it matches only itself.
    patterns = [escape(name) for name in names] or ["config.json"]
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns))


def _weight_file(directory: Path, listed: list[str], weight_files: Sequence[str]) -> str | None:
    """The weight file from_pretrained will read among ``listed``: config.json's
    ``transformers_weights``, else the first of ``weight_files`` (loading's order of preference)."""
    config = _json(directory / "config.json")
    explicit = config.get("transformers_weights") if isinstance(config, dict) else None
    return next((name for name in ([explicit] if isinstance(explicit, str) else weight_files) if name in listed), None)


def _shards(index: Path, listed: list[str]) -> list[str]:
    """The shards a sharded index names (a broken index fetches none: loading then names the file)."""
    data = _json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    return sorted(name for name in names if isinstance(name, str) and name in listed)


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
