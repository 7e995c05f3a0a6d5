"""Files shared by processes: written whole (a reader -- another rank, another chunk's process, a resumed run -- sees
the old contents or the new, never half of them, and a write killed part-way leaves the old file as it was),
locked while one process works on them, and resumed only with the settings that wrote them (check_settings)."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (what a settings record holds of a file it depends on)."""
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, named for this process, then rename it onto `path`
    (atomic on one file system); concurrent writers never share a temporary file. The text reaches the disk before
    the rename and the rename before the return (fsync), so a power loss cannot leave a name over unwritten data."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def umask_mode(*paths: str | Path) -> None:
    """Give files the mode a new file gets from open() or torch.save: 0666 less the umask. safetensors (0.8) writes
    through a temporary file of mode 0600 that it renames into place, so a model saved with it (transformers' and
    peft's save_pretrained, save_file) could be read by its owner alone, beside a config.json and tokenizer that
    everyone the umask allows could read: another user on a shared file system could not load it."""
    mask = _umask()
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def save_tensors(tensors: dict, path: str | Path) -> None:
    """safetensors' save_file, the file then given the umask's mode (umask_mode: save_file writes 0600)."""
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    umask_mode(path)


def _umask() -> int:
    """This process's umask: from /proc where there is one (setting it to read it back changes it for every thread
    meanwhile), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def sync_folder(folder: str | Path) -> None:
    """fsync a folder (its entries: a rename into it), where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system or platform that does not sync folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: str | Path):
    """An exclusive lock (flock) on `path`, created if missing, held until the block ends; other processes (and other
    opens in this one) wait for it. Without one where fcntl is missing (not POSIX) or the file system refuses it (some
    network mounts), with a warning in the second case."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            print(f"warning: cannot lock {path} ({err}); going on without the lock", file=sys.stderr)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_settings(out: Path, done, settings: dict, suffix: str = ".predict.json",
                   remedy: str = "pass another --output_file, or delete the file to answer again") -> None:
    """`out`'s record of the settings that wrote it (`<out stem><suffix>` beside it: for predict's answers the model
    and a fingerprint of its weight files, the question file, decoding, seed, ...; for OPA-DPO's rollouts the
    policy and its sampling). `done`: what `out` already holds. Resuming it with other settings would mix two
    models' or decodings' rows in one file: refused. A file written before its record existed is resumed as it
    is. The record is (re)written."""
    side = out.with_name(out.stem + suffix)
    if done and side.exists():
        old = json.loads(side.read_text())
        diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
        if diff:
            raise SystemExit(f"{out} holds answers written with other settings ({', '.join(diff)} differ; see {side}): "
                             f"{remedy}")
    elif done:
        print(f"{out}: answers without a record of their settings ({side}); resuming as they are")
    write_text_atomic(side, json.dumps(settings, indent=1))  # chunk processes write it too
