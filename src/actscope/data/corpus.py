"""Text corpora: what a profiling run reads, loaded from a list, a file or a saved dataset.

Heavy libraries (pyarrow, datasets) are imported only inside the readers that need them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

from actscope.errors import DataError

TEXT_SUFFIXES = ("", ".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SUPPORTED_FORMATS = (
    "text files (.txt, .md or no suffix: one document per line, or blank-line-separated "
    "paragraphs), .jsonl, .json, .csv, .tsv, .parquet, or a directory saved with "
    "datasets' save_to_disk"
)

_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


@dataclass(frozen=True)
class Corpus:
    """An ordered, immutable collection of text documents.

    ``name`` is a short label (file stem, "builtin", "list"); ``source`` says where the
    documents came from (a path, "builtin" or "list").
    """

    documents: tuple[str, ...]
    name: str
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.documents, tuple):
            object.__setattr__(self, "documents", tuple(self.documents))
        for index, doc in enumerate(self.documents):
            if not isinstance(doc, str):
                raise DataError(
                    f"Corpus document {index} is a {type(doc).__name__} ({doc!r:.60}), "
                    "not a string; pass only strings as documents."
                )

    def __len__(self) -> int:
        return len(self.documents)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of the documents; each is length-prefixed so boundaries count."""
        digest = hashlib.sha256()
        digest.update(len(self.documents).to_bytes(8, "big"))
        for doc in self.documents:
            data = doc.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
        return digest.hexdigest()


SourceLike = Union[None, str, Path, Sequence[str], Corpus]


def load_corpus(source: SourceLike = None, column: str | None = None) -> Corpus:
    """Load a corpus from ``source``.

    ``None`` gives the built-in corpus; a list/tuple of strings is used as is; a Corpus is
    returned unchanged; a str/Path is read as a file or saved dataset directory.
    ``column`` names the text column of tabular sources (.jsonl, .json, .csv, .tsv,
    .parquet, datasets). Whitespace-only documents are dropped; an empty result raises
    :class:`DataError`.
    """
    if source is None:
        return builtin_corpus()
    if isinstance(source, Corpus):
        return source
    if isinstance(source, (list, tuple)):
        return _corpus_from_list(source)
    if isinstance(source, (str, Path)):
        return _corpus_from_path(source, column)
    raise DataError(
        f"Cannot load a corpus from a {type(source).__name__} ({source!r:.60}); pass a file "
        "or directory path, a list of strings, or nothing for the built-in corpus."
    )


@functools.lru_cache(maxsize=1)
def builtin_corpus() -> Corpus:
    """The corpus shipped with actscope: a few hundred varied English sentences."""
    text = resources.files("actscope.data").joinpath("builtin.txt").read_text("utf-8")
    return Corpus(tuple(_split_text(text)), name="builtin", source="builtin")


def _corpus_from_list(items: Sequence[Any]) -> Corpus:
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise DataError(
                f"Item {index} of the document list is a {type(item).__name__} ({item!r:.60}), "
                "not a string; pass a list of strings."
            )
    return _finish(items, name="list", source="list", where="the document list")


def _corpus_from_path(source: str | Path, column: str | None) -> Corpus:
    if isinstance(source, str) and source == "builtin" and not Path(source).exists():
        return builtin_corpus()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"Data source {str(source)!r} does not exist; check the path "
            "(or omit it to use the built-in corpus)."
        )
    if path.is_dir():
        documents = _read_directory(path, column)
    else:
        documents = _read_file(path, column)
    return _finish(documents, name=path.stem or path.name, source=str(path), where=str(path))


def _finish(documents: Sequence[str], name: str, source: str, where: str) -> Corpus:
    kept = tuple(doc for doc in documents if _has_text(doc))
    if not kept:
        raise DataError(
            f"{where} has no text documents (it is empty or holds only whitespace, NUL bytes or "
            "other control characters); point at a source with some text."
        )
    return Corpus(kept, name=name, source=source)


def _has_text(document: str) -> bool:
    """At least one visible character: not whitespace, NUL, control or format characters."""
    return any(char.isprintable() and not char.isspace() for char in document)


# ---------------------------------------------------------------- files


def _read_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + TABLE_SUFFIXES:
        raise DataError(
            f"Unsupported data file format {suffix!r} for {path}; supported: "
            f"{SUPPORTED_FORMATS}."
        )
    try:
        if path.stat().st_size == 0:
            return []
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err}; check that it is readable.") from err
    if suffix in TEXT_SUFFIXES:
        return _split_text(_read_utf8(path))
    if suffix == ".jsonl":
        return _records_text(_parse_jsonl(path), column, path)
    if suffix == ".json":
        return _json_text(path, column)
    if suffix == ".parquet":
        return _table_text(_read_parquet(path), column, path)
    return _table_text(_read_csv(path, "\t" if suffix == ".tsv" else ","), column, path)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to "
            "UTF-8 or choose a supported format."
        ) from err
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err}; check that it is readable.") from err


def _split_text(text: str) -> list[str]:
    """Blank-line-separated paragraphs if the text has blank lines, else one per line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if _BLANK_LINE.search(text):
        paragraphs = _BLANK_LINE.split(text)
        return [" ".join(line.strip() for line in p.split("\n") if line.strip()) for p in paragraphs]
    return [line.strip() for line in text.split("\n") if line.strip()]


def _parse_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {number} is not valid JSON ({err.msg}); fix that line so each "
                "line holds one JSON object."
            ) from err
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {number} holds a {type(record).__name__}, not a JSON object; "
                'write one object per line, e.g. {"text": "..."}.'
            )
        records.append(record)
    return records


def _json_text(path: Path, column: str | None) -> list[str]:
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as err:
        hint = " If it holds one object per line, rename it to .jsonl." if "Extra data" in err.msg else ""
        raise DataError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file.{hint}"
        ) from err
    if isinstance(data, list) and all(isinstance(item, str) for item in data):
        return data
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return _records_text(data, column, path)
    raise DataError(
        f"{path} must hold a JSON list of strings or a list of objects, not "
        f"{_describe_json(data)}; reshape the file or use .jsonl."
    )


def _describe_json(data: Any) -> str:
    if isinstance(data, list):
        kinds = sorted({type(item).__name__ for item in data})
        return f"a list mixing {', '.join(kinds)}"
    return f"a {type(data).__name__}"


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(
            f"Cannot read {path} as Parquet ({err}); check that it is a valid Parquet file."
        ) from err


def _read_csv(path: Path, delimiter: str):
    import pyarrow.csv as pacsv

    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        )
        table.column_names  # header names are decoded lazily: a non-UTF-8 header fails here
        return table
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, decode errors
        raise DataError(
            f"Cannot read {path} as {kind} ({err}); check that it is UTF-8 {kind} with a "
            "header row."
        ) from err


# ---------------------------------------------------------------- directories


def _read_directory(path: Path, column: str | None) -> list[str]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / marker).is_file() for marker in markers):
        raise DataError(
            f"{path} is a directory but not a saved dataset (no {', '.join(markers)}); "
            f"point at a file or a dataset directory. Supported: {SUPPORTED_FORMATS}."
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for broken directories
        raise DataError(
            f"Cannot load the dataset saved in {path} ({err}); re-save it with save_to_disk."
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, path)
    return _table_text(loaded.with_format("arrow")[:], column, path)


def _pick_split(dataset_dict, path: Path):
    splits = list(dataset_dict.keys())
    if "train" in splits:
        return dataset_dict["train"]
    if len(splits) == 1:
        return dataset_dict[splits[0]]
    raise DataError(
        f"The dataset in {path} has splits {', '.join(splits)} and none is 'train'; save the "
        "split you want on its own (e.g. dataset_dict['validation'].save_to_disk(...))."
    )


# ---------------------------------------------------------------- columns


def _table_text(table, column: str | None, where: Path) -> list[str]:
    import pyarrow as pa

    def is_text(name: str) -> bool:
        kind = table.schema.field(name).type
        return pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind)

    names = list(table.column_names)
    repeated = sorted({repr(n) for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"{where} has several columns named {', '.join(repeated)}; give every column of the "
            "header row its own name."
        )
    chosen = _choose_column(names, [n for n in names if is_text(n)], column, where)
    kind = table.schema.field(chosen).type
    if not (is_text(chosen) or pa.types.is_null(kind)):
        raise DataError(
            f"Column {chosen!r} of {where} holds {kind} values, not text; pass --column with "
            "a text column."
        )
    return [value for value in table.column(chosen).to_pylist() if value is not None]


def _is_string_view(kind) -> bool:
    import pyarrow as pa

    check = getattr(pa.types, "is_string_view", None)
    return bool(check and check(kind))


def _records_text(records: list[dict], column: str | None, where: Path) -> list[str]:
    if not records:
        return []
    names = list(dict.fromkeys(key for record in records for key in record))
    text_names = [n for n in names if _all_text([r.get(n) for r in records])]
    chosen = _choose_column(names, text_names, column, where)
    documents = []
    for number, record in enumerate(records, start=1):
        value = record.get(chosen)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"Record {number} of {where} has a {type(value).__name__} in column {chosen!r} "
                f"({value!r:.60}), not text; pass --column with a text column."
            )
        documents.append(value)
    return documents


def _all_text(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, str) for v in present)


def _choose_column(names: list[str], text_names: list[str], column: str | None, where: Path) -> str:
    available = ", ".join(names) if names else "(none)"
    if column is not None:
        if column not in names:
            raise DataError(
                f"Column {column!r} is not in {where}; available columns: {available}. "
                "Pass --column with one of them."
            )
        return column
    if "text" in names:
        return "text"
    if len(text_names) == 1:
        return text_names[0]
    found = ", ".join(text_names) if text_names else "none"
    raise DataError(
        f"Cannot tell which column of {where} holds the text: columns {available} "
        f"(text columns: {found}). Pass --column NAME to choose one."
    )
