"""Answers to a benchmark's questions: generated with training.predict (resumable) or read from files.

For each split `generate` writes the questions as a JSONL question file (`question_id, image,
text`) beside the answers, then calls `training.predict.main.predict`, which skips question_ids
already answered: an interrupted run resumes, and a finished one loads no model at all. A
`<answers>.settings.json` records the model (path and a fingerprint of its weight files: name,
size, mtime), the decoding, the questions, the image folder and the contents of the image files they
name, predict's other flags (maximum length, architecture, precision; not the batch size) and its code
(training.predict.main and the project modules it imports: generation_code) that produced the answers.
Asking for other settings on the same answer file is an error (use --run_name), or with `restart=True` the
stale answers are deleted and generated again: answers from two models or decodings are never mixed.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from training.files import file_sha256
from training.model.fingerprint import model_fingerprint


CODE_ROOT = Path(__file__).resolve().parents[1]
GENERATION = ("training.predict.main",)  # the module that answers; with those it imports, the code of the answers


def generation_code() -> str:
    """SHA-256 over the files of the code that generates answers (GENERATION and every project module it reaches,
    as the pipeline follows a stage's imports): answers of an unchanged model made by other code are stale."""
    from training.pipeline import imported_files, tree_digest
    return tree_digest(sorted(f.relative_to(CODE_ROOT) for f in imported_files(list(GENERATION), CODE_ROOT)),
                       CODE_ROOT)


class AnswersMismatch(ValueError):
    """An answer file was generated with other settings than the ones asked for now."""


def _image_field(src):
    """JSON-safe image source: raw bytes (parquet/datasets structs) become base64 text."""
    if isinstance(src, dict):
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(src)).decode("ascii")
    return src


def read_answers(path: str | Path) -> dict[str, str]:
    """question_id -> answer text from predict's JSONL (`question_id, text`), AMBER's JSON list
    (`id, response`) or MMHal's response JSON (`model_answer`, keyed by position). A row without its
    fields, an unreadable line or a question answered twice is an error naming the file and row."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte order mark some editors write is not JSON
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    if text.lstrip().startswith("["):
        rows = enumerate(read_json(path))  # invalid JSON: an error naming the file, line and column
    else:
        rows = ((n, _json_line(path, n, line)) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    out, where = {}, {}
    for position, (n, r) in enumerate(rows):  # n: the row's index, or in JSON Lines its line
        if not isinstance(r, dict):
            raise ValueError(f"{path}, row {n}: a {type(r).__name__}, not an object (answer rows have question_id "
                             "and text)")
        key, field = (("id", "response") if "response" in r else (None, "model_answer") if "model_answer" in r
                      else ("question_id", "text"))
        for k in (key, field):
            if k is not None and k not in r:
                raise ValueError(f"{path}, row {n}: no '{k}' field (answer rows have question_id and text)")
        qid, answer = str(position) if key is None else str(r[key]), r[field]  # MMHal's: by position, from 0
        if not isinstance(answer, str):  # scoring reads it as text: a bare AttributeError there, naming no row
            raise ValueError(f"{path}, row {n}: field '{field}': expected text, got {type(answer).__name__}")
        if qid in out:
            raise ValueError(f"{path}: question {qid} answered twice (rows {where[qid]} and {n})")
        out[qid], where[qid] = answer, n
    return out


def answers_model_ids(path: str | Path) -> list[str]:
    """The distinct model_id values the rows of a predict answer file carry (none for other formats)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
    if not text.strip() or text.lstrip().startswith("["):
        return []
    rows = (_json_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    return sorted({str(r["model_id"]) for r in rows if isinstance(r, dict) and r.get("model_id") is not None})


def unique_questions(qs: dict[str, list[dict]], where: str) -> None:
    """Every question id once per split: answers are joined by id, so a repeated id would score two
    questions against one answer."""
    for split, items in qs.items():
        seen = set()
        for q in items:
            if q["question_id"] in seen:
                raise ValueError(f"{where}: question_id {q['question_id']!r} appears twice"
                                 + (f" in the {split} split" if split else "") + ": give every question its own id")
            seen.add(q["question_id"])


def need(row, key: str, where: str, text: bool = False):
    """row[key] of a benchmark's data row; a row that is no object, or lacks the field, is an error naming the
    file and row (`where`) and the field, before any answer is generated. text: the field must be text (a number
    there stopped the benchmark on a bare TypeError, or made a question predict refused)."""
    if not isinstance(row, dict) or row.get(key) is None:
        raise ValueError(f"{where}: no '{key}' field" + ("" if isinstance(row, dict) else " (the row is no object)"))
    if text and not isinstance(row[key], str):
        raise ValueError(f"{where}: field '{key}': expected text, got {type(row[key]).__name__}")
    return row[key]


def read_json(path: str | Path):
    """A benchmark's JSON file (annotations, records, rules): invalid JSON is an error naming the file, line and
    column (it was a bare JSONDecodeError naming no file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _json_line(path: Path, n: int, line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError as err:
        raise ValueError(f"{path}, line {n}: not JSON ({err})") from None


def question_lines(items: list[dict]) -> str:
    """The question file `generate` writes for a split's questions; its sha256 is in the answers' settings."""
    return "".join(json.dumps({"question_id": q["question_id"], "image": _image_field(q.get("image")),
                               "text": q["text"]}, ensure_ascii=False) + "\n" for q in items)


def images_digest(items: list[dict], image_folder: str) -> str:
    """SHA-256 over the contents of the image files the questions name (as predict resolves them in image_folder):
    a file rewritten under its old name (a world generated anew) is another question. Images given inline are in
    the question lines already; one that does not resolve is predict's bad row."""
    from training.data.images import ImageError, image_source
    h, done = hashlib.sha256(), {}
    for q in items:
        try:
            src = image_source(_image_field(q.get("image")), image_folder)
            if isinstance(src, Path):
                if src not in done:
                    done[src] = file_sha256(src)
                h.update(f"{q['question_id']}\0{done[src]}\n".encode())
        except (ImageError, OSError):
            continue
    return h.hexdigest()


def check_same_questions(items: list[dict], answer_file: str | Path) -> None:
    """Answers given to score (--answers) were made for these questions: the `<answers>.settings.json` beside them
    (`generate` writes it) records the sha256 of the questions they answer; other questions (another prompt suffix,
    another dataset file) are refused. Answer files without a settings file are scored as they are."""
    sfile = Path(answer_file).with_suffix(".settings.json")
    old = json.loads(sfile.read_text()).get("questions_sha256") if sfile.is_file() else None
    if old is not None and old != hashlib.sha256(question_lines(items).encode()).hexdigest():
        raise AnswersMismatch(f"{answer_file} answers other questions than these ({sfile} records another "
                              "questions_sha256: another prompt suffix, such as --pope_suffix / --amber_disc_suffix, "
                              "or another data file): score them with the options that made them")


def check_complete(items: list[dict], answers: dict[str, str], where: str) -> None:
    missing = [q["question_id"] for q in items if q["question_id"] not in answers]
    if missing:
        raise ValueError(f"{where}: {len(missing)} of {len(items)} questions have no answer (first: {missing[0]})")


def generate(qs: dict[str, list[dict]], out_dir: Path, tag: str, model_path: str, image_folder: str,
             decoding: dict, predict_flags: list[str], restart: bool = False,
             num_processes: int = 1) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Answers per split, generating what is missing (in num_processes processes, one per GPU:
    training.predict.parallel). Returns (answers, answer file per split)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    answers, files, code = {}, {}, generation_code()
    for split, items in qs.items():
        name = f"{tag}_{split}" if split else tag
        qfile, afile = out_dir / f"{name}.questions.jsonl", out_dir / f"{name}.jsonl"
        lines = question_lines(items)
        settings = {"model_path": str(model_path), "model_fingerprint": model_fingerprint(model_path),
                    "decoding": {k: v for k, v in decoding.items() if k != "batch_size"},
                    "questions_sha256": hashlib.sha256(lines.encode()).hexdigest(), "image_folder": str(image_folder),
                    "images_sha256": images_digest(items, image_folder),
                    "predict_flags": _answer_flags(predict_flags), "generation_code": code}
        sfile = out_dir / f"{name}.settings.json"
        if afile.exists() and afile.stat().st_size:
            old = json.loads(sfile.read_text()) if sfile.exists() else None
            if old != settings and restart:
                afile.unlink()
            elif old != settings:
                raise AnswersMismatch(f"{afile} holds answers from other settings ({sfile}: {old}); pass another "
                                      "--run_name or delete the file to generate again")
        sfile.write_text(json.dumps(settings, indent=1))
        qfile.write_text(lines, encoding="utf-8")
        if afile.exists():  # a run killed while writing a batch left half a row: predict answers its question again
            from training.files import locked
            from training.predict.main import drop_unfinished_line
            with locked(afile):
                drop_unfinished_line(afile)
        got = read_answers(afile)
        if any(q["question_id"] not in got for q in items):
            argv = ["--model_path", str(model_path), "--data_path", str(qfile), "--output_file", str(afile),
                    "--image_folder", image_folder, *predict_flags]
            if num_processes > 1:
                from training.predict.parallel import run_chunks
                status = run_chunks(argv, num_processes)
                if status:
                    raise SystemExit(f"answering {qfile} in {num_processes} processes failed (exit status {status}); "
                                     "run again to answer what is missing")
            else:
                from training.predict.main import parse, predict
                predict(parse(argv))
            got = read_answers(afile)
        check_complete(items, got, str(afile))
        answers[split], files[split] = got, str(afile)
    return answers, files


def _answer_flags(flags: list[str]) -> list[str]:
    """The predict flags that can change answers: all but the batch size, the device index (its kind is in
    the decoding) and the progress bar."""
    out, skip = [], False
    for i, f in enumerate(flags):
        if skip:
            skip = False
        elif f in ("--batch_size", "--device"):
            skip = True
        elif f not in ("--progress", "--no-progress"):
            out.append(f)
    return out


def predict_flags(decoding: dict, extra: dict) -> list[str]:
    """training.predict.main flags for a decoding dict (+ model_architecture, max_seq_len, ...)."""
    flags = ["--batch_size", str(decoding["batch_size"]), "--max_new_tokens", str(decoding["max_new_tokens"]),
             "--num_beams", str(decoding["num_beams"]), "--seed", str(decoding["seed"])]
    if decoding.get("do_sample"):
        flags += ["--do_sample", "--temperature", str(decoding["temperature"]), "--top_p", str(decoding["top_p"])]
    for k, v in extra.items():
        if isinstance(v, bool):
            flags.append(f"--{k}" if v else f"--no-{k}")
        elif v not in (None, ""):
            flags += [f"--{k}", str(v)]
    return flags


def file_digest(paths) -> dict[str, str]:
    """sha256 (first 16 hex digits) of each data file: the dataset version actually scored."""
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[str(p)] = h.hexdigest()[:16]
    return out
