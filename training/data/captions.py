"""Fact-RLHF's per-image captions (LLaVA-RLHF's image_to_caption.json: image -> captions) as a row's facts."""
from __future__ import annotations

import os
from pathlib import Path

from training.data.images import is_base64_source
from training.data.readers import RowProblem


def caption_facts(images: list, field: str, ctx: dict) -> list[str]:
    """Fact-RLHF's captions of a row's (first) image from the captions file in ctx (none without one): looked up by
    the image's path, file name or stem, as LLaVA-RLHF keys image_to_caption.json."""
    captions = ctx.get("captions")
    if captions is None or not images:
        return []
    src = images[0]
    src = src.get("path") if isinstance(src, dict) else src  # parquet's / datasets' {bytes, path}: by its path
    named = isinstance(src, (str, os.PathLike)) and str(src).strip()
    if not named or is_base64_source(str(src), ctx.get("image_root")):  # bytes or base64 text: no name
        raise RowProblem(field, "the image has no file name to look its captions up by in the captions file")
    key = str(src)
    found = next((captions[k] for k in (key, Path(key).name, Path(key).stem) if k in captions), None)
    if found is None:
        raise RowProblem(field, f"no captions for image {key!r} in the captions file")
    found = [found] if isinstance(found, str) else found
    if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
        raise RowProblem(field, f"the captions file's entry for image {key!r} is not a caption or a list of captions")
    return found
