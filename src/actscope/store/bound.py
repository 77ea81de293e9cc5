"""Files bound to one model's weights (calibrations, CETT thresholds and results): one format,
one pair of verbs, one refusal for other weights.

A bound file is one ``.safetensors`` file: the tensors, and in its metadata (key ``"actscope"``)
a JSON header::

    {"format": "actscope-bound", "version": 1, "kind": "sparse-calibration",
     "model": {"name": "LlamaForCausalLM", "weight_hash": "<sha256 hex>"},
     ...the kind's own fields}

:func:`save_bound` writes it through :func:`~actscope.store.files.atomic_file` (a reader sees
the old file, none or the new one; the umask's permissions; a full disk is a
:class:`~actscope.store.files.StorageFullError`) and replaces an existing file only with
``overwrite`` and only when actscope wrote it. :func:`read_bound` refuses, with the file and the
fix named, anything that is not a bound file of the expected kind and version;
:func:`check_bound_to` is the one refusal of a file made for other weights. A result class
mixes in :class:`WeightBound` and gets ``obj.save(path)`` and ``Cls.load(path, model)``.

:data:`KINDS` is the one table of kinds: what each is called, which loader reads it and what
makes one.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, NamedTuple, NoReturn, Sequence, TypeVar

from actscope.errors import InputError

if TYPE_CHECKING:
    import torch

FORMAT = "actscope-bound"
VERSION = 1
META_KEY = "actscope"
ENVELOPE = ("format", "version", "kind", "model")
_HASH = re.compile(r"[0-9a-f]{64}")


class Kind(NamedTuple):
    noun: str  # what one file holds, for messages ("a {noun}")
    loader: str  # the call that reads it
    remake: str  # what computes one again


KINDS: dict[str, Kind] = {
    "sparse-calibration": Kind("sparse calibration", "actscope.sparse.Calibration.load",
                               "`actscope sparsify` or actscope.sparse.calibrate"),
    "cett-thresholds": Kind("CETT threshold set", "actscope.metrics.cett.CettThresholds.load",
                            "actscope.metrics.cett.cett_sparsity or thresholds_for"),
    "cett-sparsity": Kind("CETT sparsity result", "actscope.metrics.cett.CettSparsity.load "
                          "(its thresholds alone: CettThresholds.load)", "actscope.metrics.cett.cett_sparsity"),
}
# Formats actscope wrote before this one: still ours (``overwrite`` may replace them), no longer read.
OLDER_FORMATS = {"actscope-sparse-calibration": "sparse-calibration"}


@dataclass(frozen=True, eq=False)
class Bound:
    """What one bound file holds: its kind, the model it was made for (name and weight hash),
    the kind's own header fields and its tensors; ``path`` once read from a file."""

    kind: str
    model_name: str
    weight_hash: str
    header: Mapping[str, Any]
    tensors: Mapping[str, "torch.Tensor"] = field(repr=False)
    path: Path | None = None


# -- writing -----------------------------------------------------------------------------------
def save_bound(path: str | os.PathLike, bound: Bound, *, overwrite: bool = False) -> Path:
    """Write ``bound`` to ``path`` (one ``.safetensors`` file), atomically and with the user's
    permissions; ``overwrite`` replaces only a file actscope wrote, never a folder or another file.
    Tensors are stored contiguous, on the CPU and in the dtype given."""
    from safetensors.torch import save_file

    from actscope.store.files import atomic_file

    target = Path(path).expanduser()
    header = _envelope(bound)
    check_target(target, overwrite, "path", kind=bound.kind)
    tensors = _plain_tensors(bound.tensors)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_file(target, size_hint=size) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header)})
    return target


def _envelope(bound: Bound) -> dict[str, Any]:
    """The whole header; refuses (as bugs of the caller) what could never be read back."""
    if bound.kind not in KINDS:
        raise ValueError(f"unknown bound kind {bound.kind!r}; add it to actscope.store.bound.KINDS")
    clash = sorted(set(bound.header) & set(ENVELOPE))
    if clash:
        raise ValueError(f"a {bound.kind} header may not use the envelope's keys {clash}")
    if not _HASH.fullmatch(bound.weight_hash or ""):
        raise InputError(f"cannot save this {KINDS[bound.kind].noun}: it records no weight hash of the model it was "
                         f"made for ({bound.weight_hash!r}), so it could never be loaded; compute it from a model with "
                         f"{KINDS[bound.kind].remake}")
    model = {"name": bound.model_name, "weight_hash": bound.weight_hash}
    return {"format": FORMAT, "version": VERSION, "kind": bound.kind, "model": model, **bound.header}


def _plain_tensors(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Contiguous CPU tensors sharing no storage (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        plain = tensor.detach().to("cpu").contiguous()
        pointer = plain.untyped_storage().data_ptr()
        out[name] = plain.clone() if pointer in seen else plain
        seen.add(pointer)
    return out


def check_target(target: Path, overwrite: bool, what: str = "--out", *, kind: str | None = None) -> None:
    """Refuse, before any long work, a ``target`` that is a folder, exists (without
    ``overwrite``), is a file actscope did not write (never replaced: it may be the user's data),
    or whose folder cannot be written. ``what`` names the option in the messages."""
    from actscope.store.files import check_writable

    target = Path(target).expanduser()
    if target.is_dir():
        known = kind in KINDS
        thing, example = (f"a {KINDS[kind].noun}", f"{kind}.safetensors") if known else ("this", "out.safetensors")
        raise InputError(f"{target} is a directory; actscope saves {thing} as one .safetensors file and never replaces "
                         f"a directory, even with overwrite (it may hold your data): choose another {what}, e.g. "
                         f"{target / example}")
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; pass overwrite=True (--overwrite) or choose another {what}")
    if target.exists() and not is_bound_file(target):
        raise InputError(f"{target} exists and is not a file actscope wrote, so it is not replaced, even with "
                         f"overwrite (it may be your data); choose another {what} or remove that file yourself")
    check_writable(target, what)


def is_bound_file(path: Path) -> bool:
    """Whether ``path`` is a file actscope wrote in this format (any kind or version) or an older one."""
    try:
        header = _parsed(_metadata(path).get(META_KEY, ""))
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    found = header.get("format") if isinstance(header, dict) else None
    return isinstance(found, str) and (found == FORMAT or found in OLDER_FORMATS)


# -- reading -----------------------------------------------------------------------------------
def read_bound(path: str | os.PathLike, kinds: str | Sequence[str]) -> Bound:
    """The file at ``path``, refused unless it is a bound file of one of ``kinds`` (the first is
    the one expected) in this version. Its weights are not checked here: :func:`check_bound_to`."""
    from safetensors.torch import load_file

    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    source = Path(path).expanduser()
    _check_is_file(source, kinds[0])
    header = _read_envelope(source, kinds)
    try:
        tensors = load_file(str(source))
    except Exception as error:  # noqa: BLE001 - a damaged file gets the same advice whatever broke
        _refuse_unreadable(source, kinds[0], error)
    fields = {key: value for key, value in header.items() if key not in ENVELOPE}
    model = header["model"]
    return Bound(header["kind"], model["name"], model["weight_hash"], fields, tensors, source)


def _check_is_file(source: Path, kind: str) -> None:
    noun = KINDS[kind].noun
    if source.is_dir():
        raise InputError(f"{source} is a directory; a {noun} is one .safetensors file: pass that file's path"
                         + _older_directory(source))
    if not source.is_file():
        raise InputError(f"{source} does not exist; pass the file a {noun} was saved to (.save(path), made with "
                         f"{KINDS[kind].remake})")


def _older_directory(source: Path) -> str:
    """A hint for a CETT result saved by an older actscope (a directory with cett.json)."""
    if not (source / "cett.json").is_file():
        return ""
    return (f" ({source} holds CETT thresholds in the directory layout of an older actscope, which this version no "
            f"longer reads: recompute them with {KINDS['cett-sparsity'].remake} and save them again)")


def _read_envelope(source: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    expected = KINDS[kinds[0]]
    try:
        text = _metadata(source).get(META_KEY)
    except Exception as error:  # noqa: BLE001 - a damaged file gets the same advice whatever broke
        _refuse_unreadable(source, kinds[0], error)
    if text is None:
        raise InputError(f"{source} is a safetensors file but not one actscope wrote (its metadata has no "
                         f"'{META_KEY}' header); pass a {expected.noun} saved with .save(), or recompute it with "
                         f"{expected.remake}")
    header = _parsed(text)
    found = header.get("format") if isinstance(header, dict) else None
    if isinstance(found, str) and found in OLDER_FORMATS:
        older = KINDS[OLDER_FORMATS[found]]
        raise InputError(f"{source} is a {older.noun} in an older actscope format ({found!r}), which this version no "
                         f"longer reads; recompute it with {older.remake}")
    if found != FORMAT:
        raise InputError(f"{source} is not a file actscope wrote (its '{META_KEY}' header has format {shown(found)}, "
                         f"expected {FORMAT!r}); pass a {expected.noun} saved with .save(), or recompute it with "
                         f"{expected.remake}")
    _check_version(source, header.get("version"), expected)
    _check_kind(source, header.get("kind"), kinds)
    _check_model(source, header.get("model"), KINDS[header["kind"]])
    return header


def _check_version(source: Path, version: Any, expected: Kind) -> None:
    if version == VERSION and type(version) is int:
        return
    newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
    fix = "upgrade actscope, or recompute it" if newer else "recompute it"
    raise InputError(f"{source} has format version {shown(version)}; this actscope reads version {VERSION}: "
                     f"{fix} with {expected.remake}")


def _check_kind(source: Path, kind: Any, kinds: tuple[str, ...]) -> None:
    if isinstance(kind, str) and kind in kinds:
        return
    expected = KINDS[kinds[0]]
    if isinstance(kind, str) and kind in KINDS:
        raise InputError(f"{source} holds a {KINDS[kind].noun} (kind {kind!r}), not a {expected.noun}; "
                         f"read it with {KINDS[kind].loader}")
    raise InputError(f"{source} holds an actscope file of kind {shown(kind)}, which this version does not know, "
                     f"not a {expected.noun}; read it with the actscope that wrote it, or recompute it with "
                     f"{expected.remake}")


def _check_model(source: Path, model: Any, kind: Kind) -> None:
    if (isinstance(model, dict) and isinstance(model.get("name"), str) and model["name"]
            and isinstance(model.get("weight_hash"), str) and _HASH.fullmatch(model["weight_hash"])):
        return
    refuse(source, kind, f"its header's 'model' is {shown(model)}, expected {{'name': the model's name, "
                         "'weight_hash': 64 hex digits}")


def _metadata(source: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        return handle.metadata() or {}


def _parsed(text: str) -> Any:
    """The JSON header, or None where it is not JSON (then it is not ours)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _refuse_unreadable(source: Path, kind: str, error: Exception) -> NoReturn:
    detail = " ".join(f"{type(error).__name__}: {error}".split())
    raise InputError(f"{source} cannot be read as a safetensors file ({_cut(detail, 120)}); it is damaged or not a "
                     f"{KINDS[kind].noun}: recompute it with {KINDS[kind].remake}") from None


def refuse(source: Path | None, kind: Kind | str, problem: str) -> NoReturn:
    """The refusal of a bound file whose content is not what actscope writes (an edited file)."""
    kind = KINDS[kind] if isinstance(kind, str) else kind
    raise InputError(f"{source} is not a valid {kind.noun}: {problem}; recompute it with {kind.remake} "
                     "(an edited file is not trusted)")


def shown(value: Any) -> str:
    """``value`` as a message quotes it: its repr, cut to 60 characters."""
    return _cut(repr(value), 60)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- the weights -------------------------------------------------------------------------------
def check_bound_to(bound: Bound, model: Any, subject: str | os.PathLike | None = None) -> None:
    """Refuse ``bound`` unless ``model`` (an :class:`actscope.Model`) has exactly the weights it
    was made for (see :func:`check_weights`)."""
    check_weights(bound.kind, bound.model_name, bound.weight_hash, model, subject or bound.path)


def check_weights(kind: str, model_name: str, made_for: str, model: Any, subject: str | os.PathLike | None = None) -> None:
    """The one refusal of something of ``kind`` made for other weights than ``model``'s, naming
    both models and both weight hashes. Reads every weight."""
    from actscope.store.manifest import weight_hash

    actual = weight_hash(model.module)
    if actual == made_for:
        return
    noun, remake = KINDS[kind].noun, KINDS[kind].remake
    raise InputError(
        f"{subject or f'the {noun}'} was made for model '{model_name}' (weight hash {made_for[:12]}…), not for model "
        f"'{model.name}' (weight hash {actual[:12]}…); a {noun} is valid only for the weights it was computed "
        f"on: recompute it for this model with {remake}"
    )


# -- the mixin ---------------------------------------------------------------------------------
Self = TypeVar("Self", bound="WeightBound")  # typing.Self needs Python 3.11


class WeightBound:
    """Mixin for results bound to one model's weights: ``obj.save(path, overwrite=False)`` and
    ``Cls.load(path, model)``. A class names its ``bound_kind`` (a key of :data:`KINDS`), the
    other kinds whose files hold it too (``also_reads``), and implements :meth:`to_bound` and
    :meth:`from_bound`; loading checks the envelope, then the weights, then ``from_bound`` checks
    the content."""

    bound_kind: ClassVar[str]
    also_reads: ClassVar[tuple[str, ...]] = ()

    def to_bound(self) -> Bound:  # pragma: no cover - every class defines it
        raise NotImplementedError

    @classmethod
    def from_bound(cls: type[Self], bound: Bound, model: Any) -> Self:  # pragma: no cover
        raise NotImplementedError

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write to ``path`` (one ``.safetensors`` file), atomically, with the user's permissions;
        ``overwrite`` replaces only a file actscope wrote, never a folder or another file."""
        return save_bound(path, self.to_bound(), overwrite=overwrite)

    @classmethod
    def load(cls: type[Self], path: str | os.PathLike, model: Any) -> Self:
        """Read what :meth:`save` wrote, for ``model`` (an :class:`actscope.Model`, an
        ``nn.Module`` or a model directory); refused for other weights and for an edited file."""
        from actscope.models import as_model

        bound = read_bound(path, (cls.bound_kind, *cls.also_reads))
        model = as_model(model)
        check_bound_to(bound, model)
        return cls.from_bound(bound, model)
