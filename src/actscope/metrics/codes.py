"""Activation codes: a network read as a hash encoder (METHODS.md, "Activation codes").

The code of an input is the binary pattern ``[a_j > 0]`` over every unit of the chosen sites,
concatenated over sites in plan order. Units whose bit is the same for every code of the data
set are dropped (they tell no two inputs apart). For a ReLU network whose sites are all its
ReLU outputs, two inputs share a code exactly when they lie in the same linear region.

* **Redundancy ratio** = (N − number of distinct codes) / N: near 0 means almost every
  example has a region of its own.
* **Categorisation** (given labels): k-means purity, 9-NN accuracy with Hamming distance and
  logistic-regression accuracy on the codes; see :meth:`ActivationCodes.categorise`.

What one code is, ``per`` (our choice; the paper uses image classifiers, where it is moot):

* ``"example"`` (default) — all units at all positions of one example: for an MLP the units
  of the site, for a CNN every channel at every spatial position, for a sequence model every
  unit at every real token. Every example must then have the same number of positions
  (images, fixed-size vectors, unpadded equal-length sequences); this is the exact
  linear-region code of the network.
* ``"token"`` — one code per real (non-padding) token: that token's units.
* ``"last"`` — one code per example from its last real token (what a causal LM or a
  last-token classifier reads out).

Codes are streamed batch by batch and kept bit-packed (``numpy.packbits``, 8 units per
byte), so N examples × B bits cost N·B/8 bytes, never the float activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..sites import Plan
from ..trace import POS_BITS, Reading, Tracer, flatten
from ..results import TableResult
from ..models import Model

PER_CHOICES = ("example", "token", "last")
KNN_K = 9
TEST_FRACTION = 0.25  # held-out share of the categorisation split
UNSUPPORTED_LAYOUTS = ("pattern", "tokens")  # no per-unit value for every token
HAMMING_CHUNK_BYTES = 1 << 26  # bound on the [test, train, bytes] XOR block of the k-NN
POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)  # numpy < 2 has no bitwise_count


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CodeCategorisation(TableResult):
    """How well the codes sort the labelled examples into their classes.

    ``train_index`` / ``test_index`` are the rows of the codes used to fit / score the k-NN
    and the logistic regression; ``kmeans_purity`` uses every code.
    """

    table_name: ClassVar[str] = "code_categorisation"

    kmeans_purity: float
    knn9_hamming_accuracy: float
    logistic_accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    train_index: np.ndarray  # [n_train] int64
    test_index: np.ndarray  # [n_test] int64

    def to_table(self) -> dict[str, np.ndarray]:
        """One row: the three scores and the split sizes."""
        return {
            "kmeans_purity": np.array([self.kmeans_purity]),
            "knn9_hamming_accuracy": np.array([self.knn9_hamming_accuracy]),
            "logistic_accuracy": np.array([self.logistic_accuracy]),
            "n_train": np.array([self.n_train], dtype=np.int64),
            "n_test": np.array([self.n_test], dtype=np.int64),
            "n_classes": np.array([self.n_classes], dtype=np.int64),
        }


@dataclass(frozen=True, eq=False)
class ActivationCodes(TableResult):
    """One binary code per example (or token), constant units dropped, bit-packed.

    ``codes`` is ``numpy.packbits(bits, axis=1)`` of the kept bits, ``[N, ceil(n_bits / 8)]``
    uint8 (the unused low bits of the last byte are 0). ``kept`` marks, over all
    ``sum(site_bits)`` units of the sites in ``sites`` order, the ones that vary.
    ``example`` / ``position`` say where each code comes from (position −1 for
    ``per="example"``); ``code_id`` numbers the distinct codes.
    """

    table_name: ClassVar[str] = "activation_codes"

    codes: np.ndarray  # [N, ceil(n_bits / 8)] uint8
    n_bits: int
    dropped_constant: int
    redundancy_ratio: float
    n_distinct: int
    code_id: np.ndarray  # [N] int64, index of the row's distinct code
    example: np.ndarray  # [N] int64
    position: np.ndarray  # [N] int64
    sites: tuple[str, ...]
    site_bits: tuple[int, ...]
    kept: np.ndarray  # [sum(site_bits)] bool
    per: str

    @property
    def n_codes(self) -> int:
        return int(self.codes.shape[0])

    def bits(self) -> np.ndarray:
        """The codes unpacked: ``[N, n_bits]`` bool."""
        return np.unpackbits(self.codes, axis=1, count=self.n_bits).astype(bool)

    def categorise(self, labels: Sequence[Any] | np.ndarray, seed: int = 0) -> CodeCategorisation:
        """k-means purity, 9-NN Hamming accuracy and logistic accuracy of the codes.

        ``labels`` has one entry per code (any hashable values, ≥ 2 classes). The split is a
        fixed-seed stratified split (scikit-learn ``train_test_split``, ``random_state=seed``,
        a quarter held out, our choice): the 9-NN (Hamming distance on the codes; ties in
        distance go to the lower training row, ties in the vote to the smaller class) and the
        logistic regression (scikit-learn defaults, L2 with C = 1, lbfgs) are fitted on the
        training part and scored on the held-out part. k-means (k = number of classes, or the
        number of distinct codes when fewer; 10 inits, seeded) clusters every code, and its
        purity is Σ_clusters max_class |cluster ∩ class| / N.
        """
        return categorise_codes(self, labels, seed)

    def to_table(self) -> dict[str, np.ndarray]:
        """One row per code: where it comes from, its distinct-code id, how many share it."""
        shared_by = np.bincount(self.code_id, minlength=self.n_distinct)[self.code_id]  # [N]
        return {
            "example": self.example,
            "position": self.position,
            "code_id": self.code_id,
            "shared_by": shared_by.astype(np.int64),
        }


# -- the measurement --------------------------------------------------------------------
def activation_codes(
    model: Model,
    inputs: torch.Tensor | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    sites: str | Sequence[str] | Plan,
    *,
    per: str = "example",
    batch_size: int = 256,
) -> ActivationCodes:
    """Run ``model`` over ``inputs`` and return the activation code of every example.

    ``model``: an actscope ``Model`` or any ``nn.Module`` (wrapped with ``actscope.wrap``).
    It is run as it is (put it in eval mode first, or dropout makes the codes random).
    ``inputs``: a tensor ``[N, ...]``, cut into batches of ``batch_size`` along the first axis
    and passed positionally (MLPs, CNNs); or a list of dicts, each the keyword arguments of
    one forward call (e.g. ``input_ids`` and ``attention_mask``; padding is excluded).
    ``sites``: any site selection (``module:relu1@output``, ``blocks.*.mlp.post``); attention
    patterns and MoE expert sites are refused. ``per``: what one code is (module docstring).
    """
    if per not in PER_CHOICES:
        raise InputError(f"per={per!r} is not a code granularity; use one of {', '.join(PER_CHOICES)}")
    calls = _forward_calls(inputs, batch_size)
    tracer = _CodeTracer(model, sites, per)
    stream = _CodeStream()
    with tracer.attached(), torch.no_grad():
        for args, kwargs in calls:
            device = tracer.model.device
            tracer.model(*_to_device(args, device), **_to_device(kwargs, device))
            stream.add(*tracer.take())
    return stream.finish(tracer.plan, tracer.site_bits, per)


# -- inputs -----------------------------------------------------------------------------
def _forward_calls(inputs: Any, batch_size: int) -> Iterator[tuple[tuple, dict]]:
    """Validate ``inputs`` now, then yield (args, kwargs) of each forward call."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise InputError(
                f"inputs is a tensor of shape {tuple(inputs.shape)}: no examples to encode; "
                "pass a tensor [N, ...] with N ≥ 1 examples along the first axis"
            )
        return (((inputs[start:start + batch_size],), {}) for start in range(0, inputs.shape[0], batch_size))
    calls = [inputs] if isinstance(inputs, Mapping) else inputs
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)) or not calls:
        raise InputError(
            f"inputs must be a tensor [N, ...] or a non-empty list of dicts of model inputs, got "
            f"{type(inputs).__name__}{' (empty)' if isinstance(calls, Sequence) else ''}"
        )
    for number, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise InputError(
                f"inputs[{number}] is a {type(call).__name__}; each item of the list must be a dict "
                "of keyword arguments for one forward call, e.g. {'input_ids': ..., 'attention_mask': ...}"
            )
    return (((), dict(call)) for call in calls)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to_device(v, device) for key, v in value.items()}
    return value


# -- hooks → per-call bits --------------------------------------------------------------
class _CodeTracer(Tracer):
    """Turns each site's reading into code rows; ``take()`` joins the sites of one call."""

    def __init__(self, model: Model, sites: Any, per: str) -> None:
        super().__init__(model, sites)
        _check_layouts(self.plan)
        self.per = per
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {s.label: [] for s in self.plan.sites}
        self.site_bits: tuple[int, ...] = ()  # bits each site adds to one code

    def on_site(self, site: Any, value: Any, module: torch.nn.Module) -> None:
        reading = flatten(site, value, self._batch_info(), module)
        self.pending[site.label].append(_code_rows(reading, self.per, site.label))

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fires [n, bits of all sites], example [n], position [n]) of the last call."""
        parts, widths = [], []
        for label, rows in self.pending.items():
            if not rows:
                raise InputError(
                    f"site {label} produced no activation during a forward call; pick sites the "
                    "model actually runs (`actscope sites` lists them)"
                )
            parts.extend(rows)  # a module run twice in one call contributes both readings
            widths.append(sum(fires.shape[1] for fires, _, _ in rows))
            rows.clear()
        self.site_bits = tuple(widths)
        example, position = parts[0][1], parts[0][2]
        for fires, other_example, other_position in parts[1:]:
            if not (np.array_equal(example, other_example) and np.array_equal(position, other_position)):
                raise InputError(
                    f"the sites {', '.join(self.pending)} do not see the same tokens, so their bits cannot "
                    "be joined into one code per row; choose sites of one granularity (per-token or per-example)"
                )
        return np.concatenate([p[0] for p in parts], axis=1), example, position


def _check_layouts(plan: Plan) -> None:
    for site in plan.sites:
        if site.hook.layout in UNSUPPORTED_LAYOUTS:
            raise InputError(
                f"site {site.label} has layout '{site.hook.layout}' (attention probabilities or "
                "routed expert tokens), which gives no unit value for every token; use unit sites "
                "such as blocks.*.mlp.post or module:PATH@output"
            )


def _code_rows(reading: Reading, per: str, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One site's (fires [codes, bits], example [codes], position [codes]) for one call."""
    fires = (reading.values > 0).cpu().numpy()  # [tokens, units] bool
    tok = reading.tok.cpu().numpy().astype(np.int64)  # [tokens]
    example, position = tok >> POS_BITS, tok & ((1 << POS_BITS) - 1)
    if per == "token":
        return fires, example, position
    # flatten() keeps rows example-major, positions ascending: each example is one run.
    starts = np.flatnonzero(np.r_[True, example[1:] != example[:-1]]) if len(example) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(example)])
    if per == "last":
        last = starts + counts - 1
        return fires[last], example[last], position[last]
    if len(counts) and (counts != counts[0]).any():
        raise InputError(
            f"per='example' joins every position of an example into one code, but at {label} the examples "
            f"have {sorted(set(counts.tolist()))} real positions; use per='last' or per='token' for padded sequences"
        )
    width = int(counts[0]) * fires.shape[1] if len(counts) else 0
    return fires.reshape(len(starts), width), example[starts], np.full(len(starts), -1, np.int64)


# -- streaming: packed codes and the constant-unit mask ---------------------------------
class _CodeStream:
    """Keeps packed codes per batch and which bits were ever on and ever off."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []  # [n_batch, ceil(width / 8)] uint8
        self.examples: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.ever_on: np.ndarray | None = None  # [width] bool
        self.ever_off: np.ndarray | None = None
        self.width: int | None = None

    def add(self, fires: np.ndarray, example: np.ndarray, position: np.ndarray) -> None:
        if self.width is None:
            self.width = fires.shape[1]
            self.ever_on = np.zeros(self.width, dtype=bool)
            self.ever_off = np.zeros(self.width, dtype=bool)
        elif fires.shape[1] != self.width:
            raise InputError(
                f"codes of one batch have {fires.shape[1]} bits but earlier ones had {self.width}; every "
                "example must have the same positions for per='example' (use per='last' or 'token')"
            )
        self.ever_on |= fires.any(axis=0)
        self.ever_off |= ~fires.all(axis=0)
        self.chunks.append(np.packbits(fires, axis=1))
        self.examples.append(example)
        self.positions.append(position)

    def finish(self, plan: Plan, site_bits: tuple[int, ...], per: str) -> ActivationCodes:
        n = sum(len(chunk) for chunk in self.chunks)
        if n == 0:
            raise InputError("the inputs produced no codes (no examples, or only padding); pass at least one example")
        kept = self.ever_on & self.ever_off  # constant units carry no information
        codes = np.concatenate([_repack(chunk, self.width, kept) for chunk in self.chunks])
        n_distinct, code_id = distinct_codes(codes)
        return ActivationCodes(
            codes=codes,
            n_bits=int(kept.sum()),
            dropped_constant=int(self.width - kept.sum()),
            redundancy_ratio=(n - n_distinct) / n,
            n_distinct=n_distinct,
            code_id=code_id,
            example=np.concatenate(self.examples),
            position=np.concatenate(self.positions),
            sites=tuple(plan.names),
            site_bits=site_bits,
            kept=kept,
            per=per,
        )


def _repack(chunk: np.ndarray, width: int, kept: np.ndarray) -> np.ndarray:
    return np.packbits(np.unpackbits(chunk, axis=1, count=width)[:, kept], axis=1)


def distinct_codes(codes: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of distinct rows, [N] id of each row's distinct row) of packed codes."""
    n, width = codes.shape
    if width == 0:  # every unit constant: all codes are the same empty code
        return (1 if n else 0), np.zeros(n, dtype=np.int64)
    rows = np.ascontiguousarray(codes).view(np.dtype((np.void, width))).ravel()  # one opaque item per row
    _, code_id = np.unique(rows, return_inverse=True)
    return int(code_id.max()) + 1, code_id.astype(np.int64).ravel()


# -- categorisation ---------------------------------------------------------------------
def categorise_codes(codes: ActivationCodes, labels: Any, seed: int = 0) -> CodeCategorisation:
    """See :meth:`ActivationCodes.categorise`."""
    y, n_classes = _class_indices(labels, codes.n_codes)
    if codes.n_bits == 0:
        raise InputError("every unit is constant over the data, so the codes have no bits to categorise; choose other sites")
    train, test = _stratified_split(y, n_classes, seed)
    bits = codes.bits().astype(np.float32)  # [N, n_bits] 0/1 features
    predicted = knn_hamming_predict(codes.codes[train], y[train], codes.codes[test], n_classes, KNN_K)
    return CodeCategorisation(
        kmeans_purity=_kmeans_purity(bits, y, n_classes, min(n_classes, codes.n_distinct), seed),
        knn9_hamming_accuracy=float(np.mean(predicted == y[test])),
        logistic_accuracy=_logistic_accuracy(bits, y, train, test, seed),
        n_train=len(train),
        n_test=len(test),
        n_classes=n_classes,
        train_index=train,
        test_index=test,
    )


def _class_indices(labels: Any, n: int) -> tuple[np.ndarray, int]:
    values = np.asarray(labels)
    if values.ndim != 1 or len(values) != n:
        raise InputError(
            f"labels must have one entry per code: got shape {values.shape} for {n} codes; "
            "with per='token' give one label per real token"
        )
    classes, y = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"labels hold {len(classes)} class ({classes.tolist()}); categorisation needs at least 2")
    return y.astype(np.int64).ravel(), len(classes)


def _stratified_split(y: np.ndarray, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    smallest = int(np.bincount(y).min())
    if smallest < 2:
        raise InputError(f"a class has {smallest} example; the stratified split needs at least 2 per class")
    try:
        train, test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=seed)
    except ValueError as exc:
        raise InputError(f"cannot split {len(y)} codes of {n_classes} classes into train and test ({exc}); use more examples") from None
    if len(train) < KNN_K:
        raise InputError(f"the 9-NN needs at least {KNN_K} training codes, got {len(train)}; use more examples")
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def hamming_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """[q, r] Hamming distances between packed codes (popcount of the XOR)."""
    blocks = list(_hamming_blocks(queries, references))
    return np.concatenate(blocks) if blocks else np.zeros((0, len(references)), np.int64)


def _hamming_blocks(queries: np.ndarray, references: np.ndarray) -> Iterator[np.ndarray]:
    """Distances for successive row blocks of ``queries``, the XOR block kept to ~64 MiB."""
    rows = max(1, HAMMING_CHUNK_BYTES // max(1, references.size))
    for start in range(0, len(queries), rows):
        block = queries[start:start + rows, None, :] ^ references[None, :, :]  # [rows, r, bytes]
        yield POPCOUNT[block].sum(axis=2, dtype=np.int64)  # [rows, r]


def knn_hamming_predict(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, n_classes: int, k: int = KNN_K) -> np.ndarray:
    """Majority class of the k nearest training codes (Hamming) for each packed test code.

    Distance ties go to the lower training row (stable sort), vote ties to the smaller class.
    """
    predicted = []
    for distances in _hamming_blocks(test, train):  # block by block: never the whole [test, train]
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]  # [rows, k]
        votes = (y_train[nearest][:, :, None] == np.arange(n_classes)).sum(axis=1)  # [rows, classes]
        predicted.append(votes.argmax(axis=1))
    return np.concatenate(predicted) if predicted else np.zeros(0, np.int64)


def cluster_purity(clusters: np.ndarray, y: np.ndarray) -> float:
    """Σ over clusters of the size of its largest class, over N."""
    total = sum(int(np.bincount(y[clusters == c]).max()) for c in np.unique(clusters))
    return total / len(y)


def _kmeans_purity(bits: np.ndarray, y: np.ndarray, n_classes: int, k: int, seed: int) -> float:
    from sklearn.cluster import KMeans

    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(bits)
    return cluster_purity(clusters, y)


def _logistic_accuracy(bits: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000, random_state=seed).fit(bits[train], y[train])
    return float(classifier.score(bits[test], y[test]))


__all__ = [
    "ActivationCodes",
    "CodeCategorisation",
    "activation_codes",
    "categorise_codes",
    "cluster_purity",
    "distinct_codes",
    "hamming_distances",
    "knn_hamming_predict",
]
