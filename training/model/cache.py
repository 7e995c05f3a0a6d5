"""This user's cache of built models (the embedded tiny VLM, merged LoRA checkpoints).

$VLM_ALIGN_CACHE, else $XDG_CACHE_HOME/vlm_align, else ~/.cache/vlm_align. Models load from here
without any check of their contents, so the folder must be this user's alone: it is created 0700, and
one that another user owns or that others can write to is refused (a model planted there would load
in place of the one we build; a shared /tmp folder allowed exactly that).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

ENV = "VLM_ALIGN_CACHE"


def cache_root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlm_align"


def cache_dir(*parts: str) -> Path:
    """<cache root>/<parts...>, created if missing, after checking the root is private to this user."""
    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = root.resolve()  # checked and used as one folder: a link to it re-pointed after the check leads nowhere
    st = root.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{root}: the model cache belongs to another user (uid {st.st_uid}); set {ENV} to "
                              "a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{root}: others can write to the model cache (mode {stat.filemode(st.st_mode)}); "
                              f"`chmod go-w {root}` or set {ENV} to a private folder")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
