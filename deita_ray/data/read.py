"""Streaming pool reader: files -> one Ray Data row per record, never the pool in the driver.

:func:`read_pool` expands the given paths on the driver (file names only), then a custom
:class:`~ray.data.datasource.FileBasedDatasource` reads each file inside Ray read tasks and
yields bounded blocks (:data:`BLOCK_ROWS` rows or :data:`BLOCK_CHARS` characters) with the
columns of :data:`READ_SCHEMA`:

- ``record``: the record's JSON text exactly as it appears in the file (a JSON array element
  is the slice of the array text; a Parquet row is serialised with ``json.dumps``); for a
  record that does not decode, its bytes decoded with backslash escapes.
- ``source``: the file path; ``index``: record index within the file (0-based, counting every
  record including bad ones); ``seq``: global input order, ``file rank x 2**40 + index``.
- ``error``: null, or why the record is unusable: ``invalid_json``, ``invalid_utf8``,
  ``record_too_large``, ``not_an_object``, ``unreadable_file``; ``detail``: a human note.

Choices:

- Expansion: each entry of ``paths`` is a file, a directory (searched recursively for
  :data:`POOL_SUFFIXES`, names starting with ``.``/``_`` skipped) or a glob; each entry's
  matches are sorted, entries keep their order, repeated files are read once. The rank of a
  file is its position in this list, so ``seq`` is deterministic.
- ``.json`` files are sniffed: a first non-blank character ``[`` means a JSON array, anything
  else JSON lines. ``.jsonl``/``.ndjson`` (optionally ``.gz``) are JSON lines; blank lines are
  not records. ``.parquet`` rows are records.
- JSON arrays are parsed incrementally with ``json.JSONDecoder.raw_decode`` over a text buffer
  refilled in :data:`CHUNK_BYTES` chunks. When an element does not parse, a small structural
  scanner (strings, brackets) finds where it ends, so a damaged element becomes one
  ``invalid_json`` row and reading goes on with the next one; a truncated array yields every
  complete element, then one ``invalid_json`` row for the damaged tail. Elements larger than
  ``max_record_bytes`` are skipped while scanning (only a prefix is kept for the rejects),
  so a worker never buffers much more than one chunk plus ``max_record_bytes``.
- Bytes that are not UTF-8 make only their own record ``invalid_utf8`` (arrays are decoded with
  ``surrogateescape`` so the damage stays local). A file that cannot be opened or decompressed
  past some point adds one ``unreadable_file`` row after the records read before the failure.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

SEQ_FILE_SHIFT = 40
"""``seq = file_rank << SEQ_FILE_SHIFT | index``: up to 2**40 records per file, 2**23 files."""

POOL_SUFFIXES = (
    ".json",
    ".jsonl",
    ".ndjson",
    ".json.gz",
    ".jsonl.gz",
    ".ndjson.gz",
    ".parquet",
)
"""File name endings that a directory expansion picks up."""

READ_SCHEMA = pa.schema(
    [
        ("record", pa.large_string()),
        ("source", pa.string()),
        ("index", pa.int64()),
        ("seq", pa.int64()),
        ("error", pa.string()),
        ("detail", pa.string()),
    ]
)
"""Columns of :func:`read_pool`'s rows."""

DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1 << 20
BLOCK_ROWS = 4096
BLOCK_CHARS = 32 << 20
RAW_PREFIX_CHARS = 64 * 1024
"""How much of an oversized or unparsable tail is kept as ``record`` for the rejects."""

FILE_FORMATS = ("auto", "json", "jsonl", "parquet")

_WS_SEP = re.compile(r"[\s,]*")
_WS = re.compile(r"\s*")
_STR_SPECIAL = re.compile(r'["\\]')
_STRUCT = re.compile(r'["\[\]{},]')
_SURROGATE = re.compile("[\udc80-\udcff]")

# ---------------------------------------------------------------------------------------------
# Paths


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _pool_file(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith((".", "_")) and base.lower().endswith(POOL_SUFFIXES)


def expand_paths(paths: str | Iterable[str]) -> list[str]:
    """Files of a pool, in reading order (see the module docstring).

    Args:
        paths: a path, a directory, a glob, or a list of them. Local paths become absolute.

    Returns:
        The files, each once.

    Raises:
        FileNotFoundError: an entry matches no file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    seen: set[str] = set()
    for entry in paths:
        entry = os.fspath(entry)
        if entry.startswith("file://"):
            entry = entry[len("file://") :]
        if _is_uri(entry):
            found = _expand_uri(entry)
        elif _has_glob(entry):
            found = sorted(
                os.path.abspath(p)
                for p in glob.glob(os.path.expanduser(entry), recursive=True)
                if os.path.isfile(p)
            )
        elif os.path.isdir(os.path.expanduser(entry)):
            root = os.path.abspath(os.path.expanduser(entry))
            found = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
                found.extend(os.path.join(dirpath, f) for f in filenames if _pool_file(f))
            found.sort()
        elif os.path.isfile(os.path.expanduser(entry)):
            found = [os.path.abspath(os.path.expanduser(entry))]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"input path {entry!r} matches no pool file")
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def _expand_uri(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(path)
    scheme = uri.split("://", 1)[0]
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(
            f"{scheme}://{i.path}"
            for i in infos
            if i.type == pafs.FileType.File and _pool_file(i.path)
        )
    return []


def file_stem(path: str) -> str:
    """File name without its pool suffix (``test.jsonl.gz`` -> ``test``)."""
    base = PurePosixPath(path.replace("\\", "/")).name
    low = base.lower()
    for suffix in sorted(POOL_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return base[: -len(suffix)]
    return PurePosixPath(base).stem


def id_prefixes(files: list[str]) -> dict[str, str]:
    """Per file, the prefix of its synthesized ids ``<prefix>:<index>``.

    The prefix is the file stem (SPEC section 1). When several files of one pool share a stem
    (``a/annotations.json``, ``b/annotations.json``), their prefixes take as many parent
    folder names as needed to differ (``a/annotations``, ``b/annotations``), so synthesized
    ids are unique within the pool and stable as long as the same files are read.
    """
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(file_stem(f), []).append(f)
    out = {}
    for stem, group in by_stem.items():
        if len(group) == 1:
            out[group[0]] = stem
            continue
        parts = {f: PurePosixPath(f.replace("\\", "/")).parent.parts for f in group}
        depth = 1
        while True:
            cand = {f: "/".join([*p[len(p) - depth :], stem]) for f, p in parts.items()}
            if len(set(cand.values())) == len(group) or depth > max(map(len, parts.values())):
                break
            depth += 1
        out.update(cand)
    return out


def file_kind(path: str, file_format: str = "auto") -> str:
    """``json`` (array or lines, sniffed), ``jsonl`` or ``parquet`` for one file."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if file_format != "auto":
        return file_format
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    return "json"


# ---------------------------------------------------------------------------------------------
# Record iterators (pure: bytes in, (text, error, detail) out)

Item = tuple[str, "str | None", "str | None"]


def _escaped(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return data.decode("utf-8", "backslashreplace")


def _check_parsed(text: str, obj: Any, max_bytes: int, dirty: bool) -> Item:
    if len(text) * 4 > max_bytes:  # cheap bound first: a char is at most 4 UTF-8 bytes
        nbytes = len(text.encode("utf-8", "surrogateescape"))
        if nbytes > max_bytes:
            return (
                _escaped(text[:RAW_PREFIX_CHARS]),
                "record_too_large",
                f"{nbytes} bytes > max_record_bytes {max_bytes} (record holds a prefix)",
            )
    if dirty and _SURROGATE.search(text):
        return _escaped(text), "invalid_utf8", "bytes that are not UTF-8 inside the record"
    if not isinstance(obj, dict):
        return text, "not_an_object", f"record is a JSON {type(obj).__name__}, not an object"
    return text, None, None


def iter_jsonl(
    chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[Item]:
    """Records of a JSON-lines byte stream; blank lines are skipped (not records)."""
    pending = b""
    skipping = False  # inside a line longer than max_bytes: count it, keep only a prefix
    skip_prefix = b""
    skip_len = 0
    for chunk in chunks:
        if skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                skip_len += len(chunk)
                continue
            skip_len += cut
            yield _too_large_line(skip_prefix, skip_len, max_bytes)
            skipping = False
            chunk = chunk[cut + 1 :]
        data = pending + chunk if pending else chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            item = _jsonl_line(line, max_bytes)
            if item is not None:
                yield item
        if len(pending) > max_bytes:
            skipping, skip_prefix, skip_len = True, pending[: RAW_PREFIX_CHARS * 4], len(pending)
            pending = b""
    if skipping:
        yield _too_large_line(skip_prefix, skip_len, max_bytes)
    elif pending:
        item = _jsonl_line(pending, max_bytes)
        if item is not None:
            yield item


def _too_large_line(prefix: bytes, nbytes: int, max_bytes: int) -> Item:
    return (
        _escaped(prefix)[:RAW_PREFIX_CHARS],
        "record_too_large",
        f"{nbytes} bytes > max_record_bytes {max_bytes} (record holds a prefix)",
    )


def _jsonl_line(line: bytes, max_bytes: int) -> Item | None:
    line = line.strip()
    if line.startswith(b"\xef\xbb\xbf"):  # a byte order mark at the start of the file
        line = line[3:].lstrip()
    if not line:
        return None
    if len(line) > max_bytes:
        return _too_large_line(line[: RAW_PREFIX_CHARS * 4], len(line), max_bytes)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _escaped(line), "invalid_utf8", str(e)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return text, "invalid_json", str(e)[:500]
    if not isinstance(obj, dict):
        return text, "not_an_object", f"record is a JSON {type(obj).__name__}, not an object"
    return text, None, None


class _Scanner:
    """Finds the end of one JSON value by tracking strings and bracket depth (resumable)."""

    __slots__ = ("i", "depth", "in_str")

    def __init__(self, i: int):
        self.i, self.depth, self.in_str = i, 0, False

    def scan(self, buf: str) -> int:
        """End index of the value (exclusive), or -1 when ``buf`` ends first."""
        i, n = self.i, len(buf)
        while i < n:
            if self.in_str:
                m = _STR_SPECIAL.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                if buf[j] == "\\":
                    if j + 1 >= n:
                        i = j  # the escaped char is in the next chunk
                        break
                    i = j + 2
                    continue
                self.in_str, i = False, j + 1
                if self.depth == 0:
                    self.i = i
                    return i
                continue
            m = _STRUCT.search(buf, i)
            if m is None:
                i = n
                break
            j = m.start()
            c = buf[j]
            if c == '"':
                self.in_str, i = True, j + 1
            elif c in "[{":
                self.depth, i = self.depth + 1, j + 1
            elif c in "]}":
                if self.depth == 0:  # a scalar ended by the enclosing array's ']'
                    self.i = j
                    return j
                self.depth, i = self.depth - 1, j + 1
                if self.depth == 0:
                    self.i = i
                    return i
            else:  # ','
                if self.depth == 0:
                    self.i = j
                    return j
                i = j + 1
        self.i = i
        return -1


class _TextBuffer:
    """Decoded text of a byte stream, refilled chunk by chunk, compacted on each refill."""

    def __init__(self, chunks: Iterator[bytes], first: bytes = b""):
        self._chunks = chunks
        self._dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.eof = False
        self.dirty = False  # some text so far held non-UTF-8 bytes
        if first:
            self._add(first)

    def _add(self, data: bytes, final: bool = False) -> None:
        text = self._dec.decode(data, final)
        if not self.dirty and _SURROGATE.search(text):
            self.dirty = True
        self.buf += text

    def fill(self, keep_from: int) -> int | None:
        """Drop text before ``keep_from``, append a chunk; return the shift, None at EOF."""
        if self.eof:
            return None
        chunk = next(self._chunks, None)
        self.buf = self.buf[keep_from:]
        if chunk is None:
            self._add(b"", final=True)
            self.eof = True
            return keep_from
        self._add(chunk)
        return keep_from


def iter_json_array(
    chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_RECORD_BYTES, first: bytes = b""
) -> Iterator[Item]:
    """Elements of a JSON array byte stream, parsed incrementally (see the module docstring)."""
    tb = _TextBuffer(iter(chunks), first)
    decode = json.JSONDecoder().raw_decode
    pos = 0
    # Opening bracket (after an optional BOM).
    while True:
        pos = _WS.match(tb.buf, pos).end()
        if pos < len(tb.buf) and tb.buf[pos] == "\ufeff":
            pos += 1
            continue
        if pos < len(tb.buf):
            break
        shift = tb.fill(pos)
        if shift is None:
            return  # empty file
        pos -= shift
        if tb.eof and not tb.buf[pos:].strip():
            return
    if tb.buf[pos] != "[":
        yield _escaped(tb.buf[pos : pos + RAW_PREFIX_CHARS]), "invalid_json", "not a JSON array"
        return
    pos += 1
    while True:
        buf = tb.buf
        pos = _WS_SEP.match(buf, pos).end()
        if pos >= len(buf):
            shift = tb.fill(pos)
            if shift is None:
                return  # array not closed, but no element was damaged
            pos -= shift
            continue
        c = buf[pos]
        if c == "]":
            pos += 1
            pos = _WS.match(buf, pos).end()
            while pos >= len(tb.buf) and not tb.eof:
                pos -= tb.fill(pos)
                pos = _WS.match(tb.buf, pos).end()
            if pos >= len(tb.buf):
                return
            if tb.buf[pos] == "[":  # concatenated arrays: read on
                pos += 1
                continue
            yield _trailing(tb, pos)
            return
        try:
            obj, end = decode(buf, pos)
            ok = True
        except (ValueError, RecursionError):
            ok = False
        # Objects, arrays and strings end with their own delimiter; a number or literal is
        # complete only when a separator (or the end of the file) follows it.
        if ok and (c in '{["' or tb.eof or (end < len(buf) and buf[end] in " \t\r\n,]")):
            yield _check_parsed(buf[pos:end], obj, max_bytes, tb.dirty)
            pos = end
            continue
        if ok and end >= len(buf):  # the number may continue in the next chunk
            shift = tb.fill(pos)
            pos -= shift or 0
            continue
        item, pos = _resolve_failed(tb, pos, max_bytes)
        yield item
        if pos < 0:
            return


def _resolve_failed(tb: _TextBuffer, pos: int, max_bytes: int) -> tuple[Item, int]:
    """An element that did not parse from the buffer: incomplete, damaged or too large.

    Returns the row for it and the position after it (-1 when the file ended inside it).
    """
    scanner = _Scanner(pos)
    prefix = None  # set once the element is known to be too large
    skipped = 0
    while True:
        end = scanner.scan(tb.buf)
        if end >= 0:
            break
        if prefix is None and scanner.i - pos > max_bytes:
            prefix = tb.buf[pos : pos + RAW_PREFIX_CHARS]
        if prefix is not None:  # drop what was scanned; only the prefix is kept
            skipped += scanner.i - pos
            pos = scanner.i
        shift = tb.fill(pos)
        if shift is None:
            tail = tb.buf[pos:]
            if prefix is not None:
                return _too_large(prefix, skipped + len(tail), max_bytes, truncated=True), -1
            return (
                _escaped(tail[:RAW_PREFIX_CHARS]),
                "invalid_json",
                f"truncated: the file ends inside this element ({len(tail)} chars)",
            ), -1
        pos -= shift
        scanner.i -= shift
    if end == pos:  # a stray '}' where an element should start: consume it, always progress
        end = pos + 1
    if prefix is not None:
        return _too_large(prefix, skipped + end - pos, max_bytes), end
    text = tb.buf[pos:end]
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return (_escaped(text[: max_bytes + 1]), "invalid_json", str(e)[:500]), end
    return _check_parsed(text, obj, max_bytes, tb.dirty), end


def _too_large(prefix: str, nchars: int, max_bytes: int, truncated: bool = False) -> Item:
    note = ", truncated at end of file" if truncated else ""
    return (
        _escaped(prefix),
        "record_too_large",
        f"{nchars} chars > max_record_bytes {max_bytes}{note} (record holds a prefix)",
    )


def _trailing(tb: _TextBuffer, pos: int) -> Item:
    kept = tb.buf[pos : pos + RAW_PREFIX_CHARS]
    total = len(tb.buf) - pos
    while not tb.eof:
        tb.fill(len(tb.buf))
        total += len(tb.buf)
        if len(kept) < RAW_PREFIX_CHARS:
            kept += tb.buf[: RAW_PREFIX_CHARS - len(kept)]
    return _escaped(kept), "invalid_json", f"{total} chars of trailing data after the JSON array"


def iter_parquet(f: Any, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Item]:
    """Rows of a Parquet file as JSON object text (values json.dumps cannot encode use str())."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            text = json.dumps(row, ensure_ascii=False, default=str)
            yield _check_parsed(text, row, max_bytes, False)


def iter_records(f: Any, kind: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Item]:
    """Records of one open binary file of the given kind (``json``, ``jsonl``, ``parquet``)."""
    if kind == "parquet":
        yield from iter_parquet(f, max_bytes)
        return
    chunks = iter(lambda: f.read(CHUNK_BYTES), b"")
    if kind == "jsonl":
        yield from iter_jsonl(chunks, max_bytes)
        return
    # json: sniff array vs lines from the first non-blank byte
    first = b""
    for chunk in chunks:
        first += chunk
        if first.lstrip(b" \t\r\n\xef\xbb\xbf"):
            break
    head = first.lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip(b" \t\r\n")
    if head.startswith(b"["):
        yield from iter_json_array(chunks, max_bytes, first=first)
    else:
        yield from iter_jsonl(_prepend(first, chunks), max_bytes)


def _prepend(first: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from chunks


# ---------------------------------------------------------------------------------------------
# Ray Data datasource


class PoolDatasource(FileBasedDatasource):
    """Reads pool files into blocks of :data:`READ_SCHEMA` rows (one read task per file group)."""

    def __init__(
        self,
        files: list[str],
        *,
        file_format: str = "auto",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        block_rows: int = BLOCK_ROWS,
    ):
        super().__init__(files)
        self._file_format = file_format
        self._max_record_bytes = max_record_bytes
        self._block_rows = block_rows
        self._ranks = {os.path.normpath(f) if not _is_uri(f) else f: r for r, f in enumerate(files)}

    def _rank(self, path: str) -> int:
        if path in self._ranks:
            return self._ranks[path]
        for key in (os.path.normpath(path), os.path.abspath(path)):
            if key in self._ranks:
                return self._ranks[key]
        for key, rank in self._ranks.items():  # URIs come back without their scheme
            if key.endswith("://" + path.lstrip("/")) or key.endswith(path):
                return rank
        raise KeyError(f"file {path!r} was not in the expanded pool")

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if file_kind(path, self._file_format) == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        base = self._rank(path) << SEQ_FILE_SHIFT
        kind = file_kind(path, self._file_format)
        cols: dict[str, list] = {"record": [], "index": [], "error": [], "detail": []}
        chars = 0
        index = 0
        items = iter_records(f, kind, self._max_record_bytes)
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except Exception as e:  # corrupt gzip/Parquet, I/O failure: count it, go on
                item = ("", "unreadable_file", f"{type(e).__name__}: {e}"[:1000])
                items = iter(())
            text, error, detail = item
            cols["record"].append(text)
            cols["index"].append(index)
            cols["error"].append(error)
            cols["detail"].append(detail)
            index += 1
            chars += len(text)
            if len(cols["index"]) >= self._block_rows or chars >= BLOCK_CHARS:
                yield _block(cols, path, base)
                cols = {k: [] for k in cols}
                chars = 0
        if cols["index"]:
            yield _block(cols, path, base)


def _block(cols: dict[str, list], path: str, base: int) -> pa.Table:
    import numpy as np

    index = np.asarray(cols["index"], dtype=np.int64)
    n = len(index)
    return pa.Table.from_arrays(
        [
            pa.array(cols["record"], pa.large_string()),
            pa.array([path] * n, pa.string()),
            pa.array(index),
            pa.array(index + base),
            pa.array(cols["error"], pa.string()),
            pa.array(cols["detail"], pa.string()),
        ],
        schema=READ_SCHEMA,
    )


def read_pool(
    paths: str | list[str],
    file_format: str = "auto",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    *,
    block_rows: int = BLOCK_ROWS,
) -> Any:
    """Stream a pool as a Ray Dataset of :data:`READ_SCHEMA` rows, one per record.

    Args:
        paths: a file, several files, a directory, a glob, or a list of them.
        file_format: ``auto`` (by extension; ``.json`` sniffed), ``json``, ``jsonl`` or
            ``parquet`` for every file.
        max_record_bytes: records larger than this become ``record_too_large`` rows.
        block_rows: rows per output block.

    Returns:
        A lazy ``ray.data.Dataset``; nothing is read until it executes.
    """
    import ray

    files = expand_paths(paths)
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    source = PoolDatasource(
        files, file_format=file_format, max_record_bytes=max_record_bytes, block_rows=block_rows
    )
    return ray.data.read_datasource(source)
