"""Read rows from the containers data comes in, and turn them into validated records.

Containers: JSON, JSONL, parquet, `save_to_disk` folders, Hub ids. Rows come out as plain Python
values, images undecoded (parquet and `datasets` Image columns as {"bytes", "path"} structs).
Row indices are 0-based: the position in a JSON list, the line number minus one in JSONL.

`read_records` runs one format's row parser over every row and validates the images the parser
found: decoded in a thread pool a chunk of rows at a time, then reported or kept in row order, so a
bad row always surfaces with its file, row and field. What each format means is in
`sft_formats.py`, `preference_formats.py` and `prompt_formats.py`.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from training.data.bad_rows import BadRowReport
from training.data.images import ImageError, image_source, is_base64_source, load_image
from training.data.records import RowRef

_DETECT_ROWS = 100  # rows of unknown format read before a file is refused as not of this stage's kind
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
_BATCH = 256
_CHUNK = 256
_WORKERS = min(8, os.cpu_count() or 1)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON spells half of a UTF-16 pair (alone: no character)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a parsed text: a half left alone (a pair is one character)


class DataFormatError(ValueError):
    """A data file that cannot be read at all (as opposed to one bad row in it)."""


class RowProblem(Exception):
    """Raised by a row parser: the row is bad in `field` for `reason`."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field, self.reason = field, reason


@dataclass
class ParsedRow:
    record: Any  # its `images` are filled in once `sources` are validated; a list: records sharing them
    sources: list  # raw image sources
    image_field: str  # named in the report when an image is bad


@dataclass
class Format:
    name: str
    fields: str  # listed in the error when no format matches
    detect: Callable[[dict], bool]  # from the first row's fields
    parse: Callable[[dict, RowRef, dict], ParsedRow]  # (row, where, context); raises RowProblem
    context: tuple[str, ...] = ()  # the context entries `parse` reads; a file given any other is refused


def split_paths(paths: str) -> list[str]:
    """A comma-separated list of paths ("a.json, b.json": spaces around each allowed) -> its paths."""
    return [p.strip() for p in str(paths).split(",") if p.strip()]


def expand_paths(paths: str | os.PathLike | list | tuple) -> list[str]:
    """A path, a comma-separated string or a list -> data sources.

    A plain folder (not one saved with `save_to_disk`) stands for the data files inside it, sorted,
    as in a Hub snapshot of parquet shards.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = split_paths(paths)
    out = []
    for p in map(str, paths):
        if os.path.isdir(p) and not _is_saved_dataset(p):
            found = sorted(str(f) for f in Path(p).rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file())
            if not found:
                raise DataFormatError(f"{p}: folder holds no {', '.join(DATA_SUFFIXES)} files "
                                      "and was not saved with datasets.save_to_disk")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise DataFormatError("no data path given")
    return out


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def read_table(path: str | os.PathLike, bad_lines: bool = False,
               one_row: Callable[[dict], bool] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (row_index, row) from one source; rows are normally dicts (callers check). An invalid
    JSON Lines line stops the read, or with bad_lines comes out as a RowProblem in place of its row.
    one_row: whether a .json file's single object whose values are all lists is one row (TRL's rows
    look like that) rather than a dict of columns; without it, such an object is columns."""
    path = str(path)
    if os.path.isdir(path):
        yield from _read_saved_dataset(path)
    elif os.path.isfile(path):
        suffix = Path(path).suffix.lower()
        if suffix == ".parquet":
            yield from _read_parquet(path)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, bad_lines)
        elif suffix == ".json":
            yield from _read_json(path, bad_lines, one_row)
        else:
            raise DataFormatError(f"{path}: unknown file type '{suffix}' (known: {', '.join(DATA_SUFFIXES)}, "
                                  "a folder saved with datasets.save_to_disk, or a Hub dataset id)")
    else:
        yield from _read_hub(path)


def _read_json(path: str, bad_lines: bool, one_row: Callable[[dict], bool] | None) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark some editors write is not JSON
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); JSON files are UTF-8") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # many published ".json" files are JSON Lines
            yield from _read_jsonl(path, bad_lines)
            return
        raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()) and not (
            one_row and one_row(data)):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataFormatError(f"{path}: a dict of columns needs columns of equal length, got {sorted(lengths)}")
        keys = list(data)
        data = [{k: data[k][i] for k in keys} for i in range(lengths.pop())]
    elif isinstance(data, dict):  # one object: a one-line JSON Lines file named .json
        data = [data]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of rows or a dict of columns, "
                              f"got {type(data).__name__}")
    escaped = _SURROGATE_ESCAPE.search(text) is not None
    yield from ((i, _checked_text(path, f"row {i}", r, bad_lines) if escaped else r) for i, r in enumerate(data))


def _lone_surrogate(obj: Any, field: str = "") -> str | None:
    """The field (as conversations[1].value) of the first text in a parsed JSON row holding a lone surrogate: JSON
    may spell half of a UTF-16 pair alone ("\\ud83d" of an emoji cut in two), which is no character, and tokenizers
    refuse such text with a bare TypeError."""
    if isinstance(obj, str):
        return field or "<row>" if _LONE_SURROGATE.search(obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _lone_surrogate(v, f"{field}[{k}]" if isinstance(k, int) else f"{field}.{k}" if field else str(k))
        if found:
            return found
    return None


def _checked_text(path: str, where: str, row: Any, bad_lines: bool) -> Any:
    """`row`, or where a text in it holds a lone surrogate, its RowProblem (bad_lines) or an error."""
    field = _lone_surrogate(row)
    if field is None:
        return row
    reason = "text with a lone surrogate (a \\ud800-\\udfff escape without its pair): no Unicode character"
    if not bad_lines:
        raise DataFormatError(f"{path}: {where}: field '{field}': {reason}")
    return RowProblem(field, reason)


def _read_jsonl(path: str, bad_lines: bool) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as err:
                if not bad_lines:
                    raise DataFormatError(f"{path}: line {i + 1}: not UTF-8 text ({err.reason})") from None
                yield i, RowProblem("<row>", f"not UTF-8 text ({err.reason}; line {i + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if not bad_lines:
                    raise DataFormatError(f"{path}: line {i + 1}: invalid JSON: {err.msg} "
                                          f"(column {err.colno})") from None
                row = RowProblem("<row>", f"invalid JSON: {err.msg} (line {i + 1}, column {err.colno})")
            # (a line without a surrogate escape holds no lone surrogate: walked only when it has one)
            yield i, _checked_text(path, f"line {i + 1}", row, bad_lines) if _SURROGATE_ESCAPE.search(line) else row


def _read_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataFormatError(f"{path}: cannot read parquet: {err}") from None
    i, batches = 0, pf.iter_batches(batch_size=_BATCH)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a damaged row group or page: pyarrow's OSError / ArrowInvalid
            raise DataFormatError(f"{path}: cannot read parquet rows from row {i} on ({pf.metadata.num_rows} "
                                  f"in all): {err}") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield i, row
            i += 1


def _iter_dataset(ds) -> Iterator[tuple[int, Any]]:
    # Arrow format keeps Image columns as {bytes, path} structs instead of decoding them.
    i = 0
    for table in ds.with_format("arrow").iter(batch_size=_BATCH):
        for row in table.to_pylist():
            yield i, row
            i += 1


def _read_saved_dataset(path: str) -> Iterator[tuple[int, Any]]:
    import datasets

    if not _is_saved_dataset(path):
        raise DataFormatError(f"{path}: a folder, but not one saved with datasets.save_to_disk")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as err:
        raise DataFormatError(f"{path}: cannot load the saved dataset: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataFormatError(f"{path}: saved DatasetDict has splits {list(ds)} and no 'train'; "
                                  "point at one split's folder")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    yield from _iter_dataset(ds)


def _read_hub(path: str) -> Iterator[tuple[int, Any]]:
    parts = path.split("/")
    if path.startswith((".", "/", "~")) or len(parts) > 2 or Path(path).suffix.lower() in DATA_SUFFIXES:
        raise DataFormatError(f"{path}: no such file or folder")
    import datasets

    try:
        ds = datasets.load_dataset(path, split="train")
    except Exception as err:
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
        hint = f" ({' and '.join(offline)} set: only data sets already in the cache can load)" if offline else ""
        raise DataFormatError(f"{path}: not a local file or folder, and loading it as a Hub dataset "
                              f"(train split) failed{hint}: {type(err).__name__}: {err}") from None
    yield from _iter_dataset(ds)


# ---------------------------------------------------------------- rows -> validated records

def _detect(path: str, row_index: int, row: dict, kind: str, kinds: dict[str, list[Format]]) -> Format:
    for fmt in kinds[kind]:
        if fmt.detect(row):
            return fmt
    known = "\n".join(f"  - {f.name}: {f.fields}" for f in kinds[kind])
    other = [k for k, fmts in kinds.items() if k != kind and any(f.detect(row) for f in fmts)]
    hint = f"\nIt looks like {other[0]} data; this stage reads {kind} data." if other else ""
    raise DataFormatError(f"{path}: row {row_index} has fields {sorted(row)}, which match no known {kind} "
                          f"format. Known {kind} formats:\n{known}{hint}")


def _one_row(formats: list[Format], path: str, context: dict) -> Callable[[dict], bool]:
    """Whether a JSON object of lists is one row rather than columns: a format detects it and parses it."""
    def check(obj: dict) -> bool:
        fmt = next((f for f in formats if f.detect(obj)), None)
        try:
            return fmt is not None and fmt.parse(obj, RowRef(path, 0), context) is not None
        except RowProblem:
            return False
    return check


def _check_context(path: str, fmt: Format, context: dict, fmts: list[Format]) -> None:
    """Refuse a file whose format would ignore an input the user gave (e.g. --captions_file)."""
    for key in context:
        if key not in fmt.context:
            users = [f.name for f in fmts if key in f.context]
            raise DataFormatError(f"{path}: {fmt.name} data cannot use the {key} given; only "
                                  f"{' or '.join(users)} data can")


def _kept_source(src: Any, root: str) -> Any:
    """Validate one image (decoding it fully) and return what the record keeps: bytes for bytes,
    {bytes, path} and base64 sources, the resolved absolute path (str) for paths, a PIL image as is."""
    kept = image_source(src, root)
    load_image(kept, None)  # `kept` is already confined to the root
    return str(kept) if isinstance(kept, Path) else kept


def _check_image(src: Any, root: str, cache: dict) -> tuple[bool, Any]:
    path = src.get("path") if isinstance(src, dict) and src.get("bytes") is None else src
    is_path = isinstance(path, os.PathLike) or (isinstance(path, str) and not is_base64_source(path, root))
    key = (root, str(path))
    if is_path and key in cache:  # LLaVA data reuses each COCO image for several rows
        return cache[key]
    try:
        result = (True, _kept_source(src, root))
    except ImageError as err:
        result = (False, f"{err}: {path}" if is_path else str(err))
    if is_path:
        cache[key] = result
    return result


def _flush(chunk: list, root: str, report: BadRowReport, out: list, pool: ThreadPoolExecutor, cache: dict) -> None:
    jobs = [(k, j, src) for k, (_, item) in enumerate(chunk) if isinstance(item, ParsedRow)
            for j, src in enumerate(item.sources)]
    results = pool.map(lambda job: _check_image(job[2], root, cache), jobs)
    checked = {(k, j): result for (k, j, _), result in zip(jobs, results)}
    for k, (ref, item) in enumerate(chunk):
        if isinstance(item, RowProblem):
            report.bad(ref, item.field, item.reason)
            continue
        images = [checked[(k, j)] for j in range(len(item.sources))]
        bad = next((j for j, (ok, _) in enumerate(images) if not ok), None)
        if bad is not None:
            report.bad(ref, f"{item.image_field}[{bad}]" if len(images) > 1 else item.image_field, images[bad][1])
            continue
        for record in item.record if isinstance(item.record, list) else [item.record]:
            record.images = [kept for _, kept in images]
            out.append(record)
    chunk.clear()


def read_records(kinds: dict[str, list[Format]], kind: str, paths, image_root: str | None,
                 report: BadRowReport | None, context: dict) -> list:
    """Records of `kind` from every source in `paths`; bad rows go to `report` (a stopping one if None)."""
    report = report if report is not None else BadRowReport()
    out: list = []
    cache: dict = {}
    with ThreadPoolExecutor(_WORKERS) as pool:
        for path in expand_paths(paths):
            # With no image root, image paths resolve inside the folder that holds the data.
            root = image_root or os.path.dirname(os.path.abspath(path))
            fmt, chunk, n_rows = None, [], 0
            ctx = {**context, "image_root": root}  # the formats' read context (_check_context: `context`'s keys)
            pending: list = []  # objects read before the file's format is known (a bad first row does not decide it)
            # what else the file's first object row reads as, when it is bad (a later bad row of a good file may
            # well read as a looser kind: a broken ranking as a prompt with its reference answer)
            others, first = [(k, f) for k, fs in kinds.items() if k != kind for f in fs], None
            for i, row in read_table(path, bad_lines=True, one_row=_one_row(kinds[kind], path, ctx)):
                n_rows += 1
                if first is None and isinstance(row, dict):
                    first = i
                if fmt is None and isinstance(row, dict):
                    fmt = next((f for f in kinds[kind] if f.detect(row)), None)
                    if fmt is None:
                        pending.append((i, row))
                        if len(pending) >= _DETECT_ROWS:
                            _detect(path, *pending[0], kind, kinds)
                        continue
                    _check_context(path, fmt, context, kinds[kind])
                    chunk = sorted(chunk + [_parse_row(fmt, RowRef(path, j), r, ctx, others if j == first else ())
                                            for j, r in pending],
                                   key=lambda x: x[0].row)  # in file order: the first bad row is the one named
                    pending = []
                # fmt None: a row that is no object
                chunk.append(_parse_row(fmt, RowRef(path, i), row, ctx, others if i == first else ()))
                if len(chunk) >= _CHUNK:
                    _flush(chunk, root, report, out, pool, cache)
            if pending:  # no object of the file is of a known format: name the first
                _detect(path, *pending[0], kind, kinds)
            _flush(chunk, root, report, out, pool, cache)
            if n_rows == 0:
                raise DataFormatError(f"{path}: no rows")
    return out


def _parse_row(fmt: Format | None, ref: RowRef, row, context: dict, others: list = ()) -> tuple:
    """(ref, the parsed row or its RowProblem). A bad first row that another kind's format reads whole says so: SFT
    conversations given to DPO failed as "expected a ranked list" and the message offered --skip_bad_rows, which
    would have skipped every row of the wrong file."""
    if isinstance(row, RowProblem):  # an invalid JSON Lines line
        return ref, row
    if not isinstance(row, dict):
        return ref, RowProblem("<row>", f"row is a {type(row).__name__}, not an object")
    try:
        return ref, fmt.parse(row, ref, context)
    except RowProblem as problem:
        other = next((k for k, f in others if _reads(f, row, ref, context)), None)
        if other is not None:
            problem = RowProblem(problem.field, f"{problem.reason}; the row reads whole as {other} data: is this "
                                 "the file this stage wants?")
        return ref, problem


def _reads(fmt: Format, row: dict, ref: RowRef, context: dict) -> bool:
    try:
        return fmt.detect(row) and fmt.parse(row, ref, context) is not None
    except Exception:  # only a hint: a format that cannot read the row says nothing
        return False
