"""Corpora ``moe-prepare`` reads: a text file, a folder of text files, JSON Lines, and datasets read through
Hugging Face ``datasets`` from local disk. Each is streamed as ``Piece``s (at most ``TEXT_CHUNK`` bytes of
one document, tagged with its split), so no corpus is ever held in memory whole."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe.data import folder_files
from moe.prepare.errors import PrepareError
from moe.prepare.split import RowSplit, file_split, position_cut

FORMATS = ("auto", "text", "jsonl", "hf_disk", "parquet", "json", "csv", "arrow")
# Formats read by ``datasets.load_dataset(<builder>, data_files=...)``, and the file suffixes each takes
# from a folder.
DATASET_SUFFIXES = {"parquet": (".parquet",), "json": (".json", ".jsonl"), "csv": (".csv",), "arrow": (".arrow",)}
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
TEXT_CHUNK = 1 << 20
ROW_BATCH = 1024
TRAIN, VAL = 0, 1


@dataclass(frozen=True)
class Piece:
    """Consecutive text of one document in one split; ``ends_document`` on its last piece; ``progress``:
    how far the reader moved (input bytes, or rows for datasets)."""

    split: int
    text: str
    ends_document: bool
    progress: int


@dataclass
class Corpus:
    """An opened input: how it was read, which files it is, how it splits, and its pieces (``read()``
    streams them afresh on every call)."""

    format: str
    input: Path
    root: Path
    files: list[Path]
    split_rule: str
    progress_total: int
    progress_unit: str
    text_field: str | None
    read: Callable[[], Iterator[Piece]]


def resolve_format(path: Path, fmt: str) -> str:
    """``fmt``, or for ``auto`` the format the path looks like (a saved dataset, a suffix, else text)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk" if any((path / name).is_file() for name in SAVED_DATASET_MARKERS) else "text"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    return next((name for name, suffixes in DATASET_SUFFIXES.items() if suffix in suffixes), "text")


def _input_files(path: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    if path.is_file():
        return [path]
    files = folder_files(path)
    if suffixes is not None:
        files = [f for f in files if f.suffix.lower() in suffixes]
    if not files:
        wanted = f" with suffix {' or '.join(suffixes)}" if suffixes else ""
        raise PrepareError(f"input folder {str(path)!r} holds no files{wanted} (empty corpus)")
    return files


def _check_readable(files: list[Path]) -> None:
    for path in files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as error:
            raise PrepareError(f"cannot read input file {str(path)!r}: {error.strerror}") from None


def open_corpus(
    path: Path, fmt: str, val_fraction: float, text_field: str, split: str, suffixes: list[str] | None
) -> Corpus:
    """Open ``path`` as format ``fmt`` (see ``FORMATS``) and decide its train/validation split."""
    if not path.exists():
        raise PrepareError(f"input={str(path)!r} does not exist (expected a text file, a folder, or a dataset)")
    fmt = resolve_format(path, fmt)
    if fmt == "text":
        chosen = tuple(s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes) if suffixes else None
        files = _input_files(path, chosen)
        _check_readable(files)
        return _text_corpus(path, files, val_fraction)
    if fmt == "jsonl":
        files = _input_files(path, (".jsonl",))
        _check_readable(files)
        return _jsonl_corpus(path, files, val_fraction, text_field)
    if fmt == "hf_disk" and not path.is_dir():
        raise PrepareError(f"format=hf_disk needs a folder written by datasets' save_to_disk, got file {str(path)!r}")
    files = folder_files(path) if fmt == "hf_disk" else _input_files(path, DATASET_SUFFIXES[fmt])
    _check_readable(files)
    return _dataset_corpus(path, fmt, files, val_fraction, text_field, split)


def _text_chunks(path: Path, start: int, stop: int | None) -> Iterator[tuple[str, int]]:
    """(text, bytes read) of ``path[start:stop]`` in chunks of about ``TEXT_CHUNK`` bytes, each cut after
    its last newline where it has one; UTF-8, strict."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset, read = "", start, 0
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            size = TEXT_CHUNK if stop is None else min(TEXT_CHUNK, stop - offset)
            block = f.read(size) if size > 0 else b""
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise PrepareError(
                    f"input file {str(path)!r} is not UTF-8 text (invalid byte near offset {offset + error.start})"
                ) from None
            offset += len(block)
            read += len(block)
            if not block:
                if text:
                    yield text, read
                return
            cut = text.rfind("\n") + 1 or len(text)
            if cut:
                yield text[:cut], read
                read = 0
            carry = text[cut:]


def _document_pieces(path: Path, split: int, start: int = 0, stop: int | None = None) -> Iterator[Piece]:
    """The pieces of one text document (a whole file or a byte range of one); nothing for empty text."""
    previous = None
    for text, read in _text_chunks(path, start, stop):
        if previous is not None:
            yield Piece(split, previous[0], False, previous[1])
        previous = (text, read)
    if previous is not None:
        yield Piece(split, previous[0], True, previous[1])


def _text_corpus(path: Path, files: list[Path], val_fraction: float) -> Corpus:
    root = path if path.is_dir() else path.parent
    total = sum(f.stat().st_size for f in files)
    if total == 0:
        raise PrepareError(f"input {str(path)!r} holds no text (empty corpus)")
    if len(files) == 1:
        (single,) = files
        cut, rule = position_cut(single, val_fraction)

        def read_single() -> Iterator[Piece]:
            yield from _document_pieces(single, TRAIN, 0, cut)
            yield from _document_pieces(single, VAL, cut, None)

        return Corpus("text", path, root, files, rule, total, "B", None, read_single)
    relative = {f.relative_to(root).as_posix(): f for f in files}
    val, rule = file_split(sorted(relative), val_fraction)

    def read_files() -> Iterator[Piece]:
        for name, file in relative.items():
            yield from _document_pieces(file, VAL if name in val else TRAIN)

    return Corpus("text", path, root, files, rule, total, "B", None, read_files)


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(TEXT_CHUNK), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _record_text(raw: bytes, path: Path, line: int, text_field: str) -> str:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrepareError(f"{str(path)!r} line {line} is not a JSON object in UTF-8: {error}") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise PrepareError(
            f"{str(path)!r} line {line} has no field text_field={text_field!r} (it has {fields}); set text_field="
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise PrepareError(f"{str(path)!r} line {line}: field {text_field!r} is a {type(text).__name__}, not a string")
    return text


def _jsonl_corpus(path: Path, files: list[Path], val_fraction: float, text_field: str) -> Corpus:
    root = path if path.is_dir() else path.parent
    num_rows = sum(_count_lines(f) for f in files)
    if num_rows == 0:
        raise PrepareError(f"input {str(path)!r} holds no JSON lines (empty corpus)")
    split = RowSplit(num_rows, val_fraction)

    def read() -> Iterator[Piece]:
        index = 0
        for file in files:
            with open(file, "rb") as f:
                for line, raw in enumerate(f, 1):
                    row, index = index, index + 1
                    if raw.strip():
                        text = _record_text(raw, file, line, text_field)
                        if text:
                            yield Piece(VAL if split.is_val(row) else TRAIN, text, True, len(raw))

    total = sum(f.stat().st_size for f in files)
    return Corpus("jsonl", path, root, files, split.rule(), total, "B", text_field, read)


def _load_dataset(path: Path, fmt: str, files: list[Path], split_name: str):
    # Only local files are read: never let datasets reach the Hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"format={fmt} needs the datasets package: pip install -e '.[data]'") from None
    try:
        if fmt == "hf_disk":
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    except Exception as error:  # datasets raises many types for a folder or file it cannot read
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PrepareError(f"cannot load {str(path)!r} as format={fmt}: {type(error).__name__}: {first_line}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split_name not in loaded:
            raise PrepareError(f"split={split_name!r} is not in the saved dataset {str(path)!r}; it has {list(loaded)}")
        loaded = loaded[split_name]
    return loaded


def _dataset_corpus(
    path: Path, fmt: str, files: list[Path], val_fraction: float, text_field: str, split_name: str
) -> Corpus:
    dataset = _load_dataset(path, fmt, files, split_name)
    if text_field not in dataset.column_names:
        raise PrepareError(
            f"text_field={text_field!r} is not a column of {str(path)!r}; its columns: {dataset.column_names}"
        )
    dtype = getattr(dataset.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise PrepareError(f"column {text_field!r} of {str(path)!r} holds {dataset.features[text_field]}, not strings")
    if len(dataset) == 0:
        raise PrepareError(f"input {str(path)!r} has no rows (empty corpus)")
    split = RowSplit(len(dataset), val_fraction)
    column = dataset.select_columns([text_field])

    def read() -> Iterator[Piece]:
        index = 0
        for batch in column.iter(batch_size=ROW_BATCH):
            for text in batch[text_field]:
                row, index = index, index + 1
                if text:
                    yield Piece(VAL if split.is_val(row) else TRAIN, text, True, 1)

    root = path if path.is_dir() else path.parent
    return Corpus(fmt, path, root, files, split.rule(), len(dataset), "rows", text_field, read)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(TEXT_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(corpus: Corpus) -> dict:
    """SHA-256 of the source: of the file itself for one file, else of its ``sha256sum``-style manifest
    (one ``<sha256>  <relative path>`` line per file, sorted by path)."""
    if len(corpus.files) == 1 and corpus.input.is_file():
        return {"sha256": file_sha256(corpus.files[0]), "of": "the input file"}
    lines = "".join(f"{file_sha256(f)}  {f.relative_to(corpus.root).as_posix()}\n" for f in corpus.files)
    return {
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "of": "the manifest '<sha256>  <relative path>\\n' of the input's files, sorted by path",
    }
