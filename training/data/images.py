"""Open an image from any source a data file may hold, and refuse paths outside the image root.

Sources: a path (str or Path), raw bytes, a {"bytes": ..., "path": ...} struct (what parquet and
`datasets` store for an Image column; bytes win), base64 text or a "data:image/...;base64," URI,
or a PIL image. Every image is fully decoded here (`.load()`), so a truncated file fails in the
reader that validates it, with its file and row, not later inside a collate function.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

# Base64 text has no '.', and any real image encodes to well over 32 characters; a path almost
# always has an extension. That is how a string is told apart from a path, unless it names a file
# (an extension-less name such as a hex digest looks like base64): see is_base64_source.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]{32,}")
_BASE64_BYTES = re.compile(rb"[A-Za-z0-9+/=\s]{32,}")
# Netpbm's plain formats (P1 bitmap, P2 greymap, P3 pixmap) are images written in ASCII digits: "P3", whitespace
_PLAIN_PNM = re.compile(rb"P[1-3]\s")
# Formats Pillow decodes by running another program on the file, whatever its name: refused (Pillow's security
# handbook: block EPS input unless strictly required)
RUNS_PROGRAMS = {"EPS": "Pillow renders PostScript (a program) with Ghostscript, which would run the file's code; "
                        "convert it to PNG or JPEG first"}


class ImageError(ValueError):
    """An image that cannot be used; str(err) is a short reason for the bad-row report."""


def is_base64_text(text: str) -> bool:
    return text.startswith("data:") or ("." not in text and _BASE64_TEXT.fullmatch(text) is not None)


def is_base64_source(text: str, image_root: str | os.PathLike | None) -> bool:
    """Whether a string source is base64 text: it looks like it and names no existing file. A file
    outside the root counts as a path too, so resolve_image_path refuses it by name."""
    return is_base64_text(text) and not os.path.isfile(os.path.join(image_root or "", text))


def decode_base64(text: str) -> bytes:
    """Base64 text or a data URI -> bytes."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("data URI is not base64")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"bad base64 text: {err}") from None


def resolve_image_path(path: str | os.PathLike, image_root: str | os.PathLike | None) -> Path:
    """The real path of an image file (symlinks and '..' resolved), which must lie in image_root.

    With no image_root the path is taken as given (relative to the working directory) and not
    confined: readers always pass a root (the data file's folder when the user gave none).
    """
    if "\0" in str(path):
        raise ImageError("bad path: contains a NUL character")
    if os.sep == "/" and "\\" in str(path) and not os.path.isabs(path) and not os.path.lexists(
            os.path.join(image_root or "", path)):
        path = str(path).replace("\\", "/")  # a Windows relative path (coco\\train2017\\a.jpg)
    try:
        if image_root:
            root = Path(os.path.realpath(image_root))
            full = Path(os.path.realpath(root / path))  # an absolute `path` replaces the root here
            if full != root and root not in full.parents:
                inside = Path(os.path.normpath(root / path))
                if inside == root or root in inside.parents:  # '..'-free and inside: a symbolic link leads out
                    raise ImageError(f"path escapes the image root through a symbolic link (it resolves to {full}); "
                                     "links out of the image root are not followed: give the folder they point "
                                     "into as the image folder")
                raise ImageError("path escapes the image root")
        else:
            full = Path(os.path.realpath(path))
        if not full.exists():
            raise ImageError("file not found")
        if not full.is_file():
            raise ImageError("not a file")
    except ImageError:
        raise
    except (OSError, ValueError) as err:  # a name too long for the file system, one no file system can encode
        raise ImageError(f"cannot open: {err}") from None
    return full


def image_source(source: Any, image_root: str | os.PathLike | None) -> bytes | Path | Image.Image:
    """What a source stands for, undecoded: its bytes, its file (resolved, inside image_root), or a
    PIL image. Readers keep this in the records; raises ImageError like load_image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageError("empty image bytes")
        if _BASE64_BYTES.fullmatch(source) and not _PLAIN_PNM.match(source):
            # base64 text stored in a binary column; the only images all in ASCII are plain Netpbm ones
            return decode_base64(bytes(source).decode("ascii"))
        return bytes(source)
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return image_source(source["bytes"], image_root)
        if source.get("path"):
            return image_source(str(source["path"]), image_root)
        raise ImageError("image struct has neither bytes nor path")
    if isinstance(source, str):
        if not source.strip():
            raise ImageError("empty image path")
        if is_base64_source(source, image_root):
            try:
                return decode_base64(source)
            except ImageError as err:
                if source.startswith("data:"):
                    raise
                raise ImageError(f"{err} (and no such file under the image root)") from None
    if isinstance(source, (str, os.PathLike)):
        return resolve_image_path(source, image_root)
    raise ImageError(f"unsupported image source of type {type(source).__name__}")


def load_image(source: Any, image_root: str | os.PathLike | None) -> Image.Image:
    """Decode `source` into a fully loaded RGB PIL image, or raise ImageError(short reason)."""
    src = image_source(source, image_root)
    try:
        if isinstance(src, Image.Image):
            src.load()
            return src.convert("RGB")
        with warnings.catch_warnings():  # past Pillow's pixel limit (MAX_IMAGE_PIXELS) it only warns up to 2x:
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, never decoded
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                if img.format in RUNS_PROGRAMS:  # opening read the header only; decoding would run the program
                    raise ImageError(f"{img.format} images are not read: {RUNS_PROGRAMS[img.format]}")
                img.load()  # decode every pixel now: truncated files raise here
                return img.convert("RGB")
    except ImageError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad files
        raise ImageError(f"cannot decode image: {err}") from None
