"""Published VLM data formats -> canonical records (see /work/shared/reference/data_formats.md).

Each file's format is detected from the fields of its first row of a known format (rows before it are
bad rows of that format; a file with none in its first 100 objects is refused); each format is a row parser
(`sft_formats`, `preference_formats`, `prompt_formats`, on the shared pieces of `row_parts`), run by
`readers.read_records`. Every row either becomes a record or is reported through
`BadRowReport.bad` with its file, row and field: nothing is dropped silently. Every image is decoded
once to validate it, but records keep the *source*: bytes for bytes / {bytes, path} / base64
sources, the resolved absolute path for path sources (any consumer opens it with `load_image`).

Placeholders: in the records the user text holds "<image>" exactly once per image (see `row_parts`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from training.data.bad_rows import BadRowReport
from training.data.preference_formats import PREFERENCE_FORMATS
from training.data.prompt_formats import PROMPT_FORMATS
from training.data.readers import DataFormatError, read_records, read_table
from training.data.records import ConversationRecord, PreferenceRecord, PromptRecord
from training.data.sft_formats import SFT_FORMATS

__all__ = ["read_sft", "read_preferences", "read_prompts", "read_table", "DataFormatError", "write_jsonl"]

KINDS = {"SFT": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}


def read_sft(paths, image_root: str | None, report: BadRowReport | None = None) -> list[ConversationRecord]:
    """SFT conversations: LLaVA-Instruct or TRL `messages` files (preference files are refused)."""
    return read_records(KINDS, "SFT", paths, image_root, report, {})


def read_captions(captions_file: str | None) -> dict:
    """The read context of a captions file (Fact-RLHF image_to_caption.json: image -> captions), or {}."""
    if not captions_file:
        return {}
    try:
        with open(captions_file, encoding="utf-8-sig") as f:
            captions = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:  # OSError: missing, a folder, unreadable
        raise DataFormatError(f"{captions_file}: not a JSON file of captions ({err})") from None
    if not isinstance(captions, dict):
        raise DataFormatError(f"{captions_file}: expected a JSON object image id -> list of captions")
    return {"captions": captions}


def read_preferences(paths, image_root: str | None, report: BadRowReport | None = None,
                     captions_file: str | None = None) -> list[PreferenceRecord]:
    """Ranked responses, best first. `captions_file` (Fact-RLHF image_to_caption.json: image -> captions)
    adds each LLaVA-RLHF row's captions to its facts; a file of any other format is refused with it,
    as no other format can use them."""
    return read_records(KINDS, "preference", paths, image_root, report, read_captions(captions_file))


def read_prompts(paths, image_root: str | None, report: BadRowReport | None = None,
                 captions_file: str | None = None) -> list[PromptRecord]:
    """Prompts for PPO rollouts and prediction (optional reference answer, facts, benchmark meta).
    `captions_file`: for conversation rows (LLaVA-RLHF's PPO prompts), each image's captions and a multiple-choice
    row's "correct answer: <option>" join its facts, as read_preferences gives them to the reward model's training;
    a file of any other format is refused with it."""
    return read_records(KINDS, "prompt", paths, image_root, report, read_captions(captions_file))


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
