"""Files written whole: a reader (another rank, another chunk's process, a resumed run) sees the old contents or the
new, never half of them, and a write killed part-way leaves the old file as it was."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, named for this process, then rename it onto `path`
    (atomic on one file system); concurrent writers never share a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
