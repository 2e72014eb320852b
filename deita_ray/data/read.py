"""Streaming pool reader: files -> one Ray Data row per record, never the pool in the driver.

:func:`read_pool` expands the given paths on the driver (file names only), then a custom
:class:`~ray.data.datasource.FileBasedDatasource` reads each file inside Ray read tasks and
yields bounded blocks (:data:`BLOCK_ROWS` rows or :data:`BLOCK_CHARS` characters) with the
columns of :data:`READ_SCHEMA`:

- ``record``: the record's JSON text exactly as it appears in the file (a JSON array element
  is the slice of the array text; a Parquet row is serialised with ``json.dumps``); for a
  reject, the bytes of its range decoded as UTF-8 with invalid bytes backslash-escaped.
- ``source``: the file path; ``index``: row index within the file (0-based, counting every
  row including rejects); ``seq``: global input order, ``file rank x 2**40 + index``.
- ``error``: null, or why the row is unusable (see *Reasons*); ``detail``: a human note.
- ``range_start``, ``range_end``, ``range_unit``: the part of the input the row stands for,
  ``[range_start, range_end)`` in ``range_unit``: ``bytes`` (offsets in the file),
  ``decompressed_bytes`` (offsets in the decompressed stream of a ``.gz`` file) or ``rows``
  (row numbers of a Parquet file, 0-based across its row groups).

Accounting (every byte and every Parquet row lands somewhere):

- JSON and JSON lines: a record's range is its text without surrounding whitespace (a line
  longer than ``max_record_bytes``: the whole line). The rows' ranges are disjoint and in
  file order; the bytes between them are JSON syntax only (whitespace, ``,``, ``[``, ``]``,
  blank lines, a byte order mark). The reader checks both for every file: a range that skips
  or overlaps, or non-syntax bytes between ranges, stops the read task with an error (a
  reader bug, never bad input). So ``sum(range lengths) + syntax bytes == file size``. Bytes
  that cannot be read (an I/O error) are one ``unreadable_file`` row with an empty ``record``
  over the unread range, up to the file's size on disk.
- ``.gz``: the same in ``decompressed_bytes`` over the decompressed stream (every member,
  to the last byte zlib yields before any damage); compressed bytes that cannot be
  decompressed become ``unreadable_file`` rejects with ``bytes`` ranges (offsets in the
  ``.gz`` file, from the failing byte, or from the start of a member that yielded nothing,
  to the end of the file), so compressed bytes decoded + rejected == file size.
- Parquet: the unit is the row. Each record's range is ``[i, i + 1)``; the ranges cover
  ``[0, rows in the footer)``. A file whose footer cannot be read is rejected whole, as
  ``bytes`` ranges covering the file.
- Per file the read task reports its counts (rows emitted, file bytes accounted, stream size,
  bytes in ranges, syntax bytes) to a :class:`ReadLedger` when one is given, or as one
  :data:`FILE_END` row after the file's rows (``file_ends=True``, for a stage that keeps them
  on disk to resume by file), so a stage can count its input independently of what it writes
  (:func:`check_file_counts`).

Reasons (``error``):

- ``invalid_json``, ``invalid_utf8``, ``not_an_object``: one record (line or array element)
  that does not decode; ``invalid_json`` also for an element the file ends inside (an
  uncompressed file cut short) and for data after the closing ``]``; ``record_too_large``:
  a record longer than ``max_record_bytes``.
- ``truncated_file``: a ``.gz`` stream that ends before its end marker (a partial download):
  every complete record before the cut is kept; the incomplete tail is this reject.
- ``unreadable_file``: bytes that cannot be read or decompressed (a read error, corrupt gzip
  data, a failed gzip CRC check, data after the end of a gzip stream, a Parquet file whose
  footer does not read). When a stream fails, the incomplete record before the failure
  takes the failure's reason.
- ``unreadable_row_group``: a Parquet row whose row group fails to decode (corrupt page,
  checksum mismatch); ``record`` holds the row's columns that still decode, as JSON.

Raw pieces: a reject of the JSON readers never holds more than :data:`RAW_PIECE_BYTES` bytes
of input; a longer reject (a damaged tail, an oversized record, a corrupt compressed region)
is split into consecutive pieces, each a row with its own range and the same reason. When a
stream fails at a record boundary (nothing is left to reject), one row with an empty range
at the point of failure carries the reason. A Parquet row larger than ``max_record_bytes``
keeps only its first :data:`RAW_PIECE_BYTES` characters (its row number locates it).

Choices:

- Expansion: each entry of ``paths`` is a file, a directory (searched recursively for
  :data:`POOL_SUFFIXES`, names starting with ``.``/``_`` skipped) or a glob; each entry's
  matches are sorted, entries keep their order, repeated files are read once. The rank of a
  file is its position in this list, so ``seq`` is deterministic.
- ``.json`` files are sniffed: a first non-blank character ``[`` means a JSON array, anything
  else JSON lines. ``.jsonl``/``.ndjson`` (optionally ``.gz``) are JSON lines; blank lines are
  not records. ``.parquet`` rows are records. Names ending in ``.gz`` are decompressed by the
  reader itself (multi-member streams included); other codecs that Arrow detects from the
  name are decompressed by Arrow, and only their decompressed stream is accounted.
- JSON arrays are parsed incrementally with ``json.JSONDecoder.raw_decode`` over a text buffer
  refilled in :data:`CHUNK_BYTES` chunks. When an element does not parse, a small structural
  scanner (strings, brackets) finds where it ends, so a damaged element becomes one
  ``invalid_json`` reject (in pieces if long) and reading goes on with the next one; a
  truncated array yields
  every complete element, then the damaged tail. Elements larger than ``max_record_bytes``
  go out in pieces while they are scanned, so a worker never buffers much more than one
  chunk plus ``max_record_bytes``; JSON lines likewise.
- Bytes that are not UTF-8 make only their own record ``invalid_utf8`` (arrays are decoded with
  ``surrogateescape`` so the damage stays local).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from deita_ray.data.rejects import INPUT_RANGE

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
        *INPUT_RANGE,
    ]
)
"""Columns of :func:`read_pool`'s rows."""

FILE_END = "_file_end"
"""``error`` of the row that follows a file's rows when the datasource is asked for it: its
``index`` is the number of rows the file gave, its ``detail`` the file's counts as JSON; it is
no record and no reject."""

UNIT_BYTES = "bytes"
UNIT_DECOMPRESSED = "decompressed_bytes"
UNIT_ROWS = "rows"
RANGE_UNITS = (UNIT_BYTES, UNIT_DECOMPRESSED, UNIT_ROWS)

DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1 << 20
BLOCK_ROWS = 4096
BLOCK_CHARS = 32 << 20
RAW_PIECE_BYTES = 64 * 1024
"""Most input bytes one reject row of the JSON readers holds (longer rejects go in pieces)."""
GZIP_PIECE_BYTES = 16 * 1024
"""Compressed bytes fed to zlib at a time (bounds the output of one call to about 16 MiB)."""

FILE_FORMATS = ("auto", "json", "jsonl", "parquet")

_WS_SEP = re.compile(r"[\s,]*")
_WS = re.compile(r"\s*")
_LEAD = re.compile("[\\s\ufeff]*")
_STR_SPECIAL = re.compile(r'["\\]')
_STRUCT = re.compile(r'["\[\]{},]')
_SURROGATE = re.compile("[\udc80-\udcff]")
_SYNTAX_TEXT = re.compile("[\\s,\\[\\]\ufeff]*")
_SYNTAX_BYTES = re.compile(rb"(?:[\s,\[\]]|\xef\xbb\xbf)*")

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

    The prefix is the file stem (docs/data.md). When several files of one pool share a stem
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


def file_size(path: str) -> int:
    """Size in bytes of a local file or a URI, from the filesystem (not from reading it)."""
    if _is_uri(path):
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        return int(fs.get_file_info(inner).size)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------
# Spans of a byte stream (pure: chunks in, spans out; every byte in exactly one span)


class Span(NamedTuple):
    """A consecutive part of a stream: a record, a reject (or a piece of one), or syntax."""

    start: int
    end: int
    text: Any  # record text or escaped raw (str); for syntax the syntax itself (str or bytes)
    error: str | None = None
    detail: str | None = None
    syntax: bool = False


class Row(NamedTuple):
    """One row of the reader: a record or a reject, and the part of the input it stands for."""

    record: str
    error: str | None
    detail: str | None
    start: int
    end: int
    unit: str


_BOM = b"\xef\xbb\xbf"


def _escaped(data: bytes | str) -> str:
    """Input as text: UTF-8, with bytes that are not UTF-8 backslash-escaped (``\\xff``)."""
    if isinstance(data, str):
        if data.isascii():
            return data
        data = data.encode("utf-8", "surrogateescape")
    return data.decode("utf-8", "backslashreplace")


def _utf8_len(text: str) -> int:
    """Bytes of text decoded with ``surrogateescape`` (escapes count one byte each)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


def _text_piece(head: str) -> int:
    """Chars of the longest prefix of ``head`` (at most RAW_PIECE_BYTES chars) that fits
    RAW_PIECE_BYTES bytes."""
    if _utf8_len(head) <= RAW_PIECE_BYTES:
        return len(head)
    lo, hi = 0, len(head)  # prefix of lo chars fits, of hi chars does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _utf8_len(head[:mid]) <= RAW_PIECE_BYTES:
            lo = mid
        else:
            hi = mid
    return lo


class _Reject:
    """A reject on its way out, possibly in several pieces (rows) of RAW_PIECE_BYTES at most."""

    __slots__ = ("error", "detail", "start", "pieces", "end_note")

    def __init__(self, error: str, detail: str, start: int):
        self.error, self.detail, self.start, self.pieces = error, detail, start, 0
        self.end_note = ""  # added to the last piece's detail

    def span(self, raw: str, start: int, end: int, last: bool) -> Span:
        self.pieces += 1
        detail = self.detail + self.end_note if last else self.detail
        if not (last and self.pieces == 1):
            detail = f"{detail} [piece {self.pieces} of the reject from byte {self.start}]"
        return Span(start, end, raw, self.error, detail)

    def blame(self, source: Any) -> None:
        """Name the stream's failure (a cut or corrupt file) as the cause of this tail."""
        failure = getattr(source, "failure", None)
        if failure and not self.pieces:
            self.error, self.detail = failure[0], f"{failure[1]}; {self.detail}"
            source.reported = True


def _byte_pieces(data: bytes, off: int, rej: _Reject, final: bool) -> Iterator[Span]:
    """Reject spans for ``data`` (at stream offset ``off``), cut at UTF-8 character boundaries;
    unless ``final``, only the pieces whose end is already known. Returns the bytes emitted."""
    i, n, size = 0, len(data), RAW_PIECE_BYTES
    while i < n:
        if n - i > size:
            cut = i + size
            while cut > i + size - 3 and 0x80 <= data[cut] < 0xC0:  # inside a character
                cut -= 1
        elif final:
            cut = n
        else:
            break
        yield rej.span(_escaped(data[i:cut]), off + i, off + cut, final and cut == n)
        i = cut
    return i


def _bytes_rest(chunks: Iterable[bytes], off: int, rej: _Reject) -> Iterator[Span]:
    """Every remaining byte of ``chunks`` as reject pieces, streamed."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        done = yield from _byte_pieces(pending, off, rej, final=False)
        off += done
        pending = pending[done:]
    yield from _byte_pieces(pending, off, rej, final=True)


def iter_jsonl(
    chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_RECORD_BYTES, source: Any = None
) -> Iterator[Span]:
    """Spans of a JSON-lines byte stream: one record span per non-blank line, syntax spans for
    whitespace, newlines and blank lines. ``source`` (optional) has ``failure``: why the
    stream ended early, which then names the damaged last line."""
    loads = json.loads
    off = 0  # stream offset of pending[0]
    pending = b""
    big: _Reject | None = None  # a line longer than max_bytes, going out in pieces
    for chunk in chunks:
        if big is not None:
            cut = chunk.find(b"\n")
            pending += chunk if cut < 0 else chunk[:cut]
            if cut >= 0:
                big.end_note = f"; {off + len(pending) - big.start} bytes in all"
            done = yield from _byte_pieces(pending, off, big, final=cut >= 0)
            off += done
            pending = pending[done:]
            if cut < 0:
                continue
            yield Span(off, off + 1, b"\n", syntax=True)
            off += 1
            big = None
            chunk = chunk[cut + 1 :]
        data = pending + chunk if pending else chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            n = len(line)
            if 1 < n <= max_bytes and line[0] == 123 and line[-1] == 125:  # {...}: fast path
                try:
                    text = line.decode("utf-8")
                    good = type(loads(text)) is dict
                except (ValueError, RecursionError):
                    good = False
                if good:
                    yield Span(off, off + n, text)
                    yield Span(off + n, off + n + 1, b"\n", syntax=True)
                    off += n + 1
                    continue
            yield from _line_spans(line, off, max_bytes, True, None)
            off += n + 1
        if len(pending) > max_bytes:
            big = _Reject(
                "record_too_large", f"a line longer than max_record_bytes {max_bytes}", off
            )
            done = yield from _byte_pieces(pending, off, big, final=False)
            off += done
            pending = pending[done:]
    if big is not None:
        big.blame(source)
        yield from _byte_pieces(pending, off, big, final=True)
    elif pending:
        yield from _line_spans(pending, off, max_bytes, False, source)


def _line_spans(
    line: bytes, off: int, max_bytes: int, newline: bool, source: Any
) -> Iterator[Span]:
    """Spans of one line (without its ``\\n``; ``newline``: one follows) at offset ``off``."""
    n = len(line)
    nl = b"\n" if newline else b""
    if n > max_bytes:
        rej = _Reject("record_too_large", f"a line longer than max_record_bytes {max_bytes}", off)
        rej.end_note = f"; {n} bytes in all"
        if not newline:
            rej.blame(source)
        yield from _byte_pieces(line, off, rej, final=True)
        if newline:
            yield Span(off + n, off + n + 1, nl, syntax=True)
        return
    left = line.lstrip()
    if left.startswith(_BOM):  # a byte order mark at the start of the file
        left = left[3:].lstrip()
    core = left.rstrip()
    if not core:
        if n or newline:
            yield Span(off, off + n + len(nl), line + nl, syntax=True)
        return
    a = n - len(left)
    b = a + len(core)
    if a:
        yield Span(off, off + a, line[:a], syntax=True)
    error = None
    try:
        text = core.decode("utf-8")
    except UnicodeDecodeError as e:
        error, detail = "invalid_utf8", str(e)
    else:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            error, detail = "invalid_json", str(e)[:500]
        else:
            if not isinstance(obj, dict):
                error = "not_an_object"
                detail = f"record is a JSON {type(obj).__name__}, not an object"
    if error is None:
        yield Span(off + a, off + b, text)
    else:
        rej = _Reject(error, detail, off + a)
        if not newline:
            rej.blame(source)
        yield from _byte_pieces(core, off + a, rej, final=True)
    if b < n or newline:
        yield Span(off + b, off + n + len(nl), line[b:] + nl, syntax=True)


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
    """Decoded text of a byte stream, refilled chunk by chunk.

    ``mark`` is the position up to which spans have gone out and ``mark_byte`` its offset in
    the stream; each refill drops the text before ``mark``.
    """

    def __init__(self, chunks: Iterator[bytes], first: bytes = b""):
        self._chunks = chunks
        self._dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.mark = 0
        self.mark_byte = 0
        self.eof = False
        self.dirty = False  # some text so far held non-UTF-8 bytes
        if first:
            self._add(first)

    def _add(self, data: bytes, final: bool = False) -> None:
        text = self._dec.decode(data, final)
        if not self.dirty and _SURROGATE.search(text):
            self.dirty = True
        self.buf += text

    def fill(self) -> int | None:
        """Drop the text before ``mark``, append a chunk; return the shift, None at EOF."""
        if self.eof:
            return None
        chunk = next(self._chunks, None)
        shift = self.mark
        if shift:
            self.buf = self.buf[shift:]
            self.mark = 0
        if chunk is None:
            self._add(b"", final=True)
            self.eof = True
        else:
            self._add(chunk)
        return shift

    def take(
        self, p: int, nbytes: int | None = None, text: str | None = None
    ) -> tuple[str, int, int]:
        """Text from ``mark`` to ``p`` with its stream offsets; ``mark`` moves to ``p``
        (``nbytes`` and ``text``, when the caller has them, are that text's size and slice)."""
        if text is None:
            text = self.buf[self.mark : p]
        start = self.mark_byte
        self.mark_byte += _utf8_len(text) if nbytes is None else nbytes
        self.mark = p
        return text, start, self.mark_byte

    def syntax(self, p: int) -> Span | None:
        if p <= self.mark:
            return None
        text, start, end = self.take(p)
        return Span(start, end, text, syntax=True)

    def skip(self, pattern: re.Pattern, pos: int) -> Generator[Span, None, int | None]:
        """Move past what ``pattern`` matches from ``pos``, refilling the buffer as needed;
        yields the syntax spans passed over, returns where the next character is (None at the
        end of the stream)."""
        while True:
            pos = pattern.match(self.buf, pos).end()
            if pos < len(self.buf):
                return pos
            if sp := self.syntax(pos):
                yield sp
            shift = self.fill()
            if shift is None:
                return None
            pos -= shift

    def pieces(self, p: int, rej: _Reject, final: bool) -> Iterator[Span]:
        """Reject spans for the text from ``mark`` to ``p``; unless ``final``, only the
        pieces whose end is already known (so pieces never depend on chunk boundaries)."""
        while self.mark < p:
            head = self.buf[self.mark : min(p, self.mark + RAW_PIECE_BYTES)]
            k = _text_piece(head)
            if not final and k == len(head) and k < RAW_PIECE_BYTES:
                return  # this piece may still grow
            text, start, end = self.take(self.mark + k)
            yield rej.span(_escaped(text), start, end, final and self.mark >= p)


def iter_json_array(
    chunks: Iterable[bytes],
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    first: bytes = b"",
    source: Any = None,
) -> Iterator[Span]:
    """Spans of a JSON array byte stream, parsed incrementally (see the module docstring)."""
    tb = _TextBuffer(iter(chunks), first)
    decode = json.JSONDecoder().raw_decode
    pos = yield from tb.skip(_LEAD, 0)  # whitespace and byte order marks before the "["
    if pos is None:
        return  # empty file
    if tb.buf[pos] != "[":
        if sp := tb.syntax(pos):
            yield sp
        yield from _text_rest(tb, _Reject("invalid_json", "not a JSON array", tb.mark_byte))
        return
    pos += 1
    while True:
        buf = tb.buf
        pos = _WS_SEP.match(buf, pos).end()
        if pos >= len(buf):
            if sp := tb.syntax(pos):
                yield sp
            shift = tb.fill()
            if shift is None:
                return  # array not closed, but no element was cut
            pos -= shift
            continue
        c = buf[pos]
        if c == "]":
            pos = yield from tb.skip(_WS, pos + 1)  # whitespace after the array
            if pos is None:
                return
            if tb.buf[pos] == "[":  # concatenated arrays: read on
                pos += 1
                continue
            if sp := tb.syntax(pos):
                yield sp
            yield from _text_rest(
                tb, _Reject("invalid_json", "trailing data after the JSON array", tb.mark_byte)
            )
            return
        if pos > tb.mark:
            yield tb.syntax(pos)
        try:
            obj, end = decode(buf, pos)
            ok = True
        except (ValueError, RecursionError):
            ok = False
        # Objects, arrays and strings end with their own delimiter; a number or literal is
        # complete only when a separator (or the end of the file) follows it.
        if ok and (c in '{["' or tb.eof or (end < len(buf) and buf[end] in " \t\r\n,]")):
            text = buf[pos:end]
            if type(obj) is dict and not (tb.dirty and _SURROGATE.search(text)):
                nbytes = len(text) if text.isascii() else _utf8_len(text)
                if nbytes <= max_bytes:  # a good record (the common case, inlined)
                    start = tb.mark_byte
                    tb.mark, tb.mark_byte = end, start + nbytes
                    yield Span(start, start + nbytes, text)
                    pos = end
                    continue
            yield from _element(tb, end, obj, max_bytes)
            pos = end
            continue
        if ok and end >= len(buf):  # the number may continue in the next chunk
            shift = tb.fill()
            pos -= shift or 0
            continue
        pos = yield from _resolve_failed(tb, max_bytes, source)
        if pos < 0:
            return


def _element(tb: _TextBuffer, end: int, obj: Any, max_bytes: int) -> Iterator[Span]:
    """The parsed element from ``tb.mark`` to ``end``: a record span or a reject."""
    text = tb.buf[tb.mark : end]
    nbytes = _utf8_len(text)
    if nbytes > max_bytes:
        big = _Reject("record_too_large", _too_large(max_bytes), tb.mark_byte)
        big.end_note = f"; {nbytes} bytes in all"
        yield from tb.pieces(end, big, final=True)
        return
    if tb.dirty and _SURROGATE.search(text):
        error, detail = "invalid_utf8", "bytes that are not UTF-8 inside the record"
    elif not isinstance(obj, dict):
        error, detail = "not_an_object", f"record is a JSON {type(obj).__name__}, not an object"
    else:
        text, start, stop = tb.take(end, nbytes, text)
        yield Span(start, stop, text)
        return
    yield from tb.pieces(end, _Reject(error, detail, tb.mark_byte), final=True)


def _resolve_failed(tb: _TextBuffer, max_bytes: int, source: Any) -> Iterator[Span]:
    """The element at ``tb.mark`` did not parse from the buffer: incomplete, damaged or too
    large. Yields its spans; returns the position after it (-1 when the stream ended in it)."""
    scanner = _Scanner(tb.mark)
    big: _Reject | None = None  # set once the element is known to be too large
    while True:
        end = scanner.scan(tb.buf)
        if end >= 0:
            break
        if big is None and scanner.i - tb.mark > max_bytes:  # chars <= bytes
            big = _Reject("record_too_large", _too_large(max_bytes), tb.mark_byte)
        if big is not None:
            yield from tb.pieces(scanner.i, big, final=False)
        shift = tb.fill()
        if shift is None:  # the stream ends inside this element
            if big is not None:
                big.detail += "; the file ends inside this element"
            rej = big or _Reject(
                "invalid_json", "truncated: the file ends inside this element", tb.mark_byte
            )
            rej.blame(source)
            yield from tb.pieces(len(tb.buf), rej, final=True)
            return -1
        scanner.i -= shift
    if big is None and end == tb.mark:  # a stray '}' where an element starts: consume it
        end += 1
    text = tb.buf[tb.mark : end]
    nbytes = _utf8_len(text)
    if big is None and nbytes > max_bytes:  # too large whether it parses or not
        big = _Reject("record_too_large", _too_large(max_bytes), tb.mark_byte)
    if big is not None:
        big.end_note = f"; {tb.mark_byte + nbytes - big.start} bytes in all"
        yield from tb.pieces(end, big, final=True)
        return end
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        yield from tb.pieces(end, _Reject("invalid_json", str(e)[:500], tb.mark_byte), True)
        return end
    yield from _element(tb, end, obj, max_bytes)
    return end


def _too_large(max_bytes: int) -> str:
    return f"an element longer than max_record_bytes {max_bytes}"


def _text_rest(tb: _TextBuffer, rej: _Reject) -> Iterator[Span]:
    """Everything from ``tb.mark`` to the end of the stream as one reject, in pieces."""
    while True:
        yield from tb.pieces(len(tb.buf), rej, final=False)
        if tb.fill() is None:
            break
    yield from tb.pieces(len(tb.buf), rej, final=True)


def iter_spans(
    chunks: Iterable[bytes], kind: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES, source=None
) -> Iterator[Span]:
    """Spans of a ``json`` (array or lines, sniffed) or ``jsonl`` byte stream."""
    chunks = iter(chunks)
    if kind == "jsonl":
        yield from iter_jsonl(chunks, max_bytes, source)
        return
    first = b""
    for chunk in chunks:
        first += chunk
        if first.lstrip(b" \t\r\n\xef\xbb\xbf"):
            break
    head = first.lstrip(b" \t\r\n")
    if head.startswith(_BOM):
        head = head[3:].lstrip(b" \t\r\n")
    if head.startswith(b"["):
        yield from iter_json_array(chunks, max_bytes, first, source)
    else:
        yield from iter_jsonl(_prepend(first, chunks), max_bytes, source)


def _prepend(first: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from chunks


# ---------------------------------------------------------------------------------------------
# Byte streams of one file: raw bytes, or a gzip stream decompressed here


class _RawStream:
    """A binary file as chunks, counting bytes; a read error ends it (``failure``)."""

    def __init__(self, f: Any, chunk_bytes: int = CHUNK_BYTES):
        self._f = f
        self._chunk_bytes = chunk_bytes
        self.nbytes = 0
        self.failure: tuple[str, str] | None = None
        self.reported = False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                data = self._f.read(self._chunk_bytes)
            except Exception as e:  # an I/O failure is the file's, never the job's
                self.failure = (
                    "unreadable_file",
                    f"read failed at byte {self.nbytes}: {type(e).__name__}: {e}"[:1000],
                )
                return
            if not data:
                return
            self.nbytes += len(data)
            yield data


class _GunzipStream:
    """The decompressed chunks of a gzip file (every member), keeping all output before damage.

    Compressed input goes to zlib :data:`GZIP_PIECE_BYTES` at a time; when a piece fails, it is
    fed again byte by byte from a copy of the decompressor taken before it, so the output up to
    the exact failing byte is kept and ``rest_at`` is that byte's offset. ``decoded``: compressed
    bytes decoded; ``nbytes``: decompressed bytes produced; ``failure``: why it stopped early.
    """

    def __init__(self, raw: _RawStream):
        self.raw = raw
        self._it = iter(raw)
        self.nbytes = 0
        self.decoded = 0
        self.failure: tuple[str, str] | None = None
        self.reported = False
        self.rest_at: int | None = None
        self._rest_head = b""

    def __iter__(self) -> Iterator[bytes]:
        d = None
        buf, i = b"", 0
        pos = 0  # compressed offset of buf[i]
        member_at = member_out = 0  # compressed offset of the current member, its output
        member_head: bytes | None = b""  # its bytes while it has no output (None: too many)
        while True:
            if i >= len(buf):
                buf, i = next(self._it, b""), 0
                if not buf:
                    break
            if d is None:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer
                member_at, member_out, member_head = pos, 0, b""
            piece = buf[i : i + GZIP_PIECE_BYTES]
            i += len(piece)
            before = d.copy()
            try:
                out = d.decompress(piece)
            except zlib.error as e:
                out, used = _gunzip_until_error(before, piece)
                if out:
                    self.nbytes += len(out)
                    member_out += len(out)
                    yield out
                self.failure = ("unreadable_file", _gzip_error(e, pos + used))
                if not member_out and member_head is not None:
                    # nothing of this member decoded: the reject holds all of it
                    self._rest_head = member_head + piece + buf[i:]
                    self.decoded = self.rest_at = member_at
                else:
                    self._rest_head = piece[used:] + buf[i:]
                    self.decoded = self.rest_at = pos + used
                return
            if out:
                self.nbytes += len(out)
                member_out += len(out)
                yield out
            elif not member_out and member_head is not None:
                # no output yet (a header): keep the bytes in case the member proves corrupt
                member_head = member_head + piece if len(member_head) < RAW_PIECE_BYTES else None
            if d.eof:  # end of a member: what follows is the next member (or not gzip)
                unused = len(d.unused_data)  # the end of this piece
                pos += len(piece) - unused
                i -= unused
                d = None
            else:
                pos += len(piece)
        self.decoded = pos
        if self.raw.failure:
            self.failure = self.raw.failure
        elif d is not None:  # the input ended inside a member
            out = d.flush()
            if out:
                self.nbytes += len(out)
                yield out
            self.failure = (
                "truncated_file",
                f"the gzip stream ends before its end marker, after {pos} compressed bytes "
                "(a partial download?)",
            )

    def rest(self) -> Iterator[bytes]:
        """The compressed bytes from ``rest_at`` to the end of the file."""
        if self._rest_head:
            yield self._rest_head
        yield from self._it


def _gunzip_until_error(d: Any, piece: bytes) -> tuple[bytes, int]:
    """Feed ``piece`` byte by byte: (output before the failing byte, bytes used before it)."""
    out = []
    for k in range(len(piece)):
        try:
            out.append(d.decompress(piece[k : k + 1]))
        except zlib.error:
            return b"".join(out), k
        if d.eof:
            return b"".join(out), k + 1
    return b"".join(out), len(piece)


def _gzip_error(e: Exception, at: int) -> str:
    msg = str(e)
    if "incorrect data check" in msg or "incorrect length check" in msg:
        return (
            f"gzip check failed at compressed byte {at} ({msg}): the member's data is damaged "
            "somewhere before it"
        )
    return f"gzip data unreadable from compressed byte {at}: {msg}"


# ---------------------------------------------------------------------------------------------
# One file -> rows, with its counts


class FileReader:
    """The rows of one open file, and the counts that show every part of it is accounted.

    Iterate once; then :attr:`counts` holds ``rows`` (rows yielded), ``unit`` (the unit of the
    file's ranges), ``stream`` (its size in that unit: file bytes, decompressed bytes, or rows
    in the Parquet footer), ``covered`` (sum of the rows' ranges in that unit), ``syntax``
    (bytes between them that are JSON syntax), ``file_bytes`` (bytes of the file decoded or
    rejected; None when Arrow decompressed the file) and ``decompressed`` (for ``.gz``). The
    reader raises ``RuntimeError`` when its own spans skip or overlap (a bug, never bad input).

    Args:
        f: the open binary file (random access for Parquet).
        kind: ``json``, ``jsonl`` or ``parquet``.
        max_record_bytes: records larger than this are ``record_too_large`` rejects.
        gzip: decompress the file here (``.gz``).
        arrow_decompressed: ``f`` is already a decompressed stream (another codec).
        size: the file's size when a read fails part way (for the unreadable remainder).
    """

    def __init__(
        self,
        f: Any,
        kind: str,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        *,
        gzip: bool = False,
        arrow_decompressed: bool = False,
        size: Callable[[], int | None] | None = None,
    ):
        self.f, self.kind, self.max_bytes = f, kind, max_record_bytes
        self.gzip, self.arrow_decompressed = gzip, arrow_decompressed
        self._size = size or (lambda: None)
        self.counts: dict[str, Any] = {}

    def __iter__(self) -> Iterator[Row]:
        if self.kind == "parquet":
            yield from self._parquet()
            return
        raw = _RawStream(self.f)
        stream: Any = _GunzipStream(raw) if self.gzip else raw
        unit = UNIT_DECOMPRESSED if self.gzip or self.arrow_decompressed else UNIT_BYTES
        rows = covered = syntax = at = 0
        for sp in iter_spans(stream, self.kind, self.max_bytes, stream):
            if sp.start != at or sp.end < sp.start:
                raise RuntimeError(f"reader bug: span [{sp.start}, {sp.end}) after byte {at}")
            at = sp.end
            if sp.syntax:
                pattern = _SYNTAX_BYTES if type(sp.text) is bytes else _SYNTAX_TEXT
                if pattern.fullmatch(sp.text) is None:
                    raise RuntimeError(f"reader bug: bytes [{sp.start}, {sp.end}) are not syntax")
                syntax += sp.end - sp.start
                continue
            covered += sp.end - sp.start
            rows += 1
            yield Row(sp.text, sp.error, sp.detail, sp.start, sp.end, unit)
        if at != stream.nbytes:
            raise RuntimeError(f"reader bug: spans cover {at} of {stream.nbytes} stream bytes")
        file_bytes = stream.decoded if self.gzip else raw.nbytes
        reported = stream.reported
        if self.gzip and stream.rest_at is not None:  # compressed bytes that do not decompress
            rej = _Reject(*stream.failure, stream.rest_at)
            for sp in _bytes_rest(stream.rest(), stream.rest_at, rej):
                file_bytes += sp.end - sp.start
                rows += 1
                yield Row(sp.text, sp.error, sp.detail, sp.start, sp.end, UNIT_BYTES)
            reported = True
        stream_bytes = stream.nbytes
        if raw.failure:  # the bytes that could not be read: one row without raw text
            size = self._size()
            if size is not None and size > raw.nbytes:
                detail = f"{raw.failure[1]} (bytes to the end of the file not read)"
                rows += 1
                yield Row("", raw.failure[0], detail, raw.nbytes, size, UNIT_BYTES)
                file_bytes += size - raw.nbytes
                if not self.gzip:  # part of the (uncompressed) stream
                    covered += size - raw.nbytes
                    stream_bytes += size - raw.nbytes
                reported = True
        if stream.failure and not reported:  # failed at a record boundary: say so
            rows += 1
            yield Row("", stream.failure[0], stream.failure[1], at, at, unit)
        self.counts = {
            "rows": rows,
            "unit": unit,
            "stream": stream_bytes,
            "covered": covered,
            "syntax": syntax,
            "file_bytes": None if self.arrow_decompressed else file_bytes,
            "decompressed": stream.nbytes if self.gzip else None,
        }

    def _parquet(self) -> Iterator[Row]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.f, page_checksum_verification=True)
            meta = pf.metadata
        except Exception as e:  # no readable footer: the whole file is one reject, in pieces
            yield from self._unreadable_parquet(
                f"not a readable Parquet file: {type(e).__name__}: {e}"
            )
            return
        rows = covered = at = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            done = 0
            try:
                for batch in pf.iter_batches(batch_size=1024, row_groups=[g], use_threads=False):
                    for row in batch.to_pylist():
                        if done >= n:
                            raise ValueError(f"more rows than the {n} of the footer")
                        text = json.dumps(row, ensure_ascii=False, default=str)
                        error, detail, text = _parquet_record(text, self.max_bytes)
                        yield Row(text, error, detail, at + done, at + done + 1, UNIT_ROWS)
                        done += 1
                        rows += 1
                        covered += 1
                if done < n:
                    raise ValueError(f"the row group ended after {done} of its {n} rows")
            except Exception as e:  # a corrupt page or checksum: the rest of the group
                for k, (raw, detail) in enumerate(_salvage_row_group(pf, g, done, n, e)):
                    r = at + done + k
                    yield Row(raw, "unreadable_row_group", detail, r, r + 1, UNIT_ROWS)
                    rows += 1
                    covered += 1
            at += n
        self.counts = {
            "rows": rows,
            "unit": UNIT_ROWS,
            "stream": meta.num_rows,
            "covered": covered,
            "syntax": 0,
            "file_bytes": self.f.size(),  # the footer read: the file is read as a whole
            "decompressed": None,
        }

    def _unreadable_parquet(self, detail: str) -> Iterator[Row]:
        self.f.seek(0)
        raw = _RawStream(self.f, RAW_PIECE_BYTES)
        rows = covered = 0
        for sp in _bytes_rest(raw, 0, _Reject("unreadable_file", detail, 0)):
            rows += 1
            covered += sp.end - sp.start
            yield Row(sp.text, sp.error, sp.detail, sp.start, sp.end, UNIT_BYTES)
        size = self.f.size()
        if raw.failure and size > raw.nbytes:
            rows += 1
            covered += size - raw.nbytes
            yield Row("", raw.failure[0], raw.failure[1], raw.nbytes, size, UNIT_BYTES)
        self.counts = {
            "rows": rows,
            "unit": UNIT_BYTES,
            "stream": size,
            "covered": covered,
            "syntax": 0,
            "file_bytes": covered,
            "decompressed": None,
        }


def _parquet_record(text: str, max_bytes: int) -> tuple[str | None, str | None, str]:
    if len(text) * 4 > max_bytes:  # cheap bound first: a char is at most 4 UTF-8 bytes
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        if nbytes > max_bytes:
            return (
                "record_too_large",
                f"{nbytes} bytes > max_record_bytes {max_bytes} (record holds a prefix)",
                text[:RAW_PIECE_BYTES],
            )
    return None, None, text


def _salvage_row_group(
    pf: Any, group: int, first: int, n: int, error: Exception
) -> Iterator[tuple[str, str]]:
    """Rows ``first``..``n-1`` of a row group that failed: per row, its columns that still
    decode, as JSON, and a detail naming the error and the columns lost."""
    cols: dict[str, list] = {}
    lost = []
    for name in pf.schema_arrow.names:
        try:
            col = pf.read_row_group(group, columns=[name], use_threads=False).column(0)
            if len(col) != n:
                raise ValueError(f"{len(col)} values for {n} rows")
            cols[name] = col.slice(first).to_pylist()
        except Exception:
            lost.append(name)
    detail = (
        f"row group {group} does not decode ({type(error).__name__}: {error}); columns lost: {lost}"
    )[:1000]
    for i in range(n - first):
        row = {name: values[i] for name, values in cols.items()}
        yield json.dumps(row, ensure_ascii=False, default=str), detail


# ---------------------------------------------------------------------------------------------
# Per-file counts, reported by the read tasks


class _LedgerActor:
    def __init__(self) -> None:
        self._files: dict[int, dict] = {}

    def put(self, rank: int, counts: dict) -> None:
        self._files[rank] = counts  # a retried read task replaces its file's counts

    def get(self) -> dict[int, dict]:
        return self._files


def check_file_counts(files: list[str], counts: Mapping[str, dict]) -> int:
    """Rows read from ``files`` in all, after checking each file's counts (by path).

    Raises:
        RuntimeError: a file was not read, its ranges and syntax do not add up to its
            stream, or the bytes it accounts for differ from its size on disk.
    """
    problems = []
    for path in files:
        c = counts.get(path)
        if c is None:
            problems.append(f"{path}: no counts (the file was not read)")
            continue
        if c["covered"] + c["syntax"] != c["stream"]:
            problems.append(
                f"{path}: ranges {c['covered']} + syntax {c['syntax']} != {c['stream']} {c['unit']}"
            )
        size = file_size(path)
        if c["file_bytes"] is not None and c["file_bytes"] != size:
            problems.append(f"{path}: {c['file_bytes']} bytes accounted, {size} on disk")
    if problems:
        raise RuntimeError("read accounting broken: " + "; ".join(problems[:5]))
    return sum(counts[path]["rows"] for path in files)


class ReadLedger:
    """What the read tasks of :func:`read_pool` counted, per file (a small Ray actor).

    Each read task reports one file's :attr:`FileReader.counts` when it finishes the file; rows
    never pass through it. After the dataset has run, :meth:`check` verifies every file and
    returns the rows read, a count independent of what the stage writes.
    """

    def __init__(self) -> None:
        from deita_ray.runtime import driver_side_actor

        self.actor = driver_side_actor(_LedgerActor)
        self.files: list[str] = []  # set by read_pool

    def counts(self) -> dict[str, dict]:
        """Counts per file path (files not read yet are missing)."""
        import ray

        got = ray.get(self.actor.get.remote())
        return {self.files[rank]: c for rank, c in sorted(got.items())}

    def check(self) -> int:
        """Rows read in all, after checking each file's counts (:func:`check_file_counts`)."""
        return check_file_counts(self.files, self.counts())

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


# ---------------------------------------------------------------------------------------------
# Ray Data datasource


class PoolDatasource(FileBasedDatasource):
    """Reads pool files into blocks of :data:`READ_SCHEMA` rows (one read task per file group).

    Args:
        files: the files to read.
        ranks: each file's rank in the whole pool, when only some of the pool's files are read
            (a resumed ingest); by default a file's rank is its position in ``files``.
        file_ends: follow each file's rows with its :data:`FILE_END` row.
    """

    def __init__(
        self,
        files: list[str],
        *,
        file_format: str = "auto",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        block_rows: int = BLOCK_ROWS,
        ledger: ReadLedger | None = None,
        ranks: Mapping[str, int] | None = None,
        file_ends: bool = False,
    ):
        super().__init__(files)
        self._file_format = file_format
        self._max_record_bytes = max_record_bytes
        self._block_rows = block_rows
        self._ledger = ledger.actor if ledger is not None else None
        self._file_ends = file_ends
        if ranks is None:
            ranks = {f: r for r, f in enumerate(files)}
        self._ranks = {os.path.normpath(f) if not _is_uri(f) else f: r for f, r in ranks.items()}

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

    def resolve_compression(self, path: str, open_args: dict[str, Any]) -> str | None:
        codec = super().resolve_compression(path, open_args)
        return None if codec == "gzip" else codec  # gzip: decompressed by FileReader

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if file_kind(path, self._file_format) == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access
        return super()._open_input_source(filesystem, path, **open_args)

    def _file_size(self, path: str) -> int | None:
        try:
            return int(self._filesystem.get_file_info(path).size)
        except Exception:
            return None

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rank = self._rank(path)
        base = rank << SEQ_FILE_SHIFT
        kind = file_kind(path, self._file_format)
        gz = kind != "parquet" and path.lower().endswith(".gz")
        other_codec = kind != "parquet" and self.resolve_compression(path, {}) is not None
        reader = FileReader(
            f,
            kind,
            self._max_record_bytes,
            gzip=gz,
            arrow_decompressed=other_codec,
            size=lambda: self._file_size(path),
        )
        cols: dict[str, list] = {k: [] for k in ("record", "error", "detail", "start", "end")}
        units: list[str] = []
        chars = 0
        index = 0
        for row in reader:
            cols["record"].append(row.record)
            cols["error"].append(row.error)
            cols["detail"].append(row.detail)
            cols["start"].append(row.start)
            cols["end"].append(row.end)
            units.append(row.unit)
            chars += len(row.record)
            if len(units) >= self._block_rows or chars >= BLOCK_CHARS:
                yield _block(cols, units, path, base, index)
                index += len(units)
                cols = {k: [] for k in cols}
                units = []
                chars = 0
        if units or not index:  # a file without rows still gives a block with the schema
            yield _block(cols, units, path, base, index)
            index += len(units)
        if self._file_ends:
            end = {"record": [""], "error": [FILE_END], "detail": [json.dumps(reader.counts)]}
            yield _block({**end, "start": [None], "end": [None]}, [None], path, base, index)
        if self._ledger is not None:
            import ray

            ray.get(self._ledger.put.remote(rank, reader.counts))


def _block(cols: dict[str, list], units: list[str], path: str, base: int, first: int) -> pa.Table:
    import numpy as np

    n = len(units)
    index = np.arange(first, first + n, dtype=np.int64)
    return pa.Table.from_arrays(
        [
            pa.array(cols["record"], pa.large_string()),
            pa.array([path] * n, pa.string()),
            pa.array(index),
            pa.array(index + base),
            pa.array(cols["error"], pa.string()),
            pa.array(cols["detail"], pa.string()),
            pa.array(cols["start"], pa.int64()),
            pa.array(cols["end"], pa.int64()),
            pa.array(units, pa.string()),
        ],
        schema=READ_SCHEMA,
    )


def read_pool(
    paths: str | list[str],
    file_format: str = "auto",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    *,
    block_rows: int = BLOCK_ROWS,
    ledger: ReadLedger | None = None,
) -> Any:
    """Stream a pool as a Ray Dataset of :data:`READ_SCHEMA` rows, one per record or reject.

    Args:
        paths: a file, several files, a directory, a glob, or a list of them.
        file_format: ``auto`` (by extension; ``.json`` sniffed), ``json``, ``jsonl`` or
            ``parquet`` for every file.
        max_record_bytes: records larger than this become ``record_too_large`` rows.
        block_rows: rows per output block.
        ledger: receives each file's counts from the read tasks (see :class:`ReadLedger`).

    Returns:
        A lazy ``ray.data.Dataset``; nothing is read until it executes.
    """
    import ray

    files = expand_paths(paths)
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if ledger is not None:
        ledger.files = files
    source = PoolDatasource(
        files,
        file_format=file_format,
        max_record_bytes=max_record_bytes,
        block_rows=block_rows,
        ledger=ledger,
    )
    return ray.data.read_datasource(source)
