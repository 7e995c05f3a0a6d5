"""OPA-DPO data: per prompt, the ground truth, the policy's rollout and the expert's revision, their
per-sentence weights, and a masked copy of the image (masked on the model input, as the released code
does; see mask_pixels); as two GroupItems for the DPO machinery.

    row 2i   (real image)   responses [ground truth, revised (score w), rollout (score w), revised (type w)]
    row 2i+1 (masked image) responses [ground truth, revised (type w)]

so the four pairs are 1 = (2i,0) > (2i,2); 2 = (2i,1) > (2i,2) weighted; 3 = (2i,0) > (2i+1,0);
4 = (2i,3) > (2i+1,1) weighted. File (opa_pairs.json): one object per prompt with id, image, question,
gt, rollout, revised, rollout_weights / revised_score_weights / revised_type_weights ([sentence, w]
lists covering the text) and the expert's report. Its images are paths relative to the image root (the
file's folder when none is given) or base64 text (`image_field`), checked when the dataset is built.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data.bad_rows import cut_alike
from training.data.images import ImageError, decode_base64, image_source, is_base64_text, load_image
from training.data.readers import DataFormatError
from training.data.records import IMAGE_PLACEHOLDER, Message, RowRef
from training.data.span_weights import missing_span
from training.dpo.data import GroupItem, encode_group
from training.dpo.weights import WeightsNotPlaced, weighted_responses
from training.dpo.opa.expert import SCORE_WEIGHT, TYPE_WEIGHT, split_sentences
from training.templates.chat import RowNotEncodable

ROWS_PER_ITEM = 2
TEXT_FIELDS = ("question", "gt", "rollout", "revised")
WEIGHT_FIELDS = ("rollout_weights", "revised_score_weights", "revised_type_weights")
WEIGHT_TEXT = {"rollout_weights": "rollout", "revised_score_weights": "revised", "revised_type_weights": "revised"}
WEIGHTED = ("", "revised_score_weights", "rollout_weights", "revised_type_weights")  # the real row's responses' weights


def image_field(source, image_root: str) -> str:
    """A JSON-safe image source that load_image(it, image_root) opens as the same image: a file as its path
    relative to image_root (it must lie inside), bytes, {bytes, path} structs and PIL images as base64 text.
    Raises ImageError like load_image."""
    kept = image_source(source, image_root)
    if isinstance(kept, Path):
        return os.path.relpath(kept, os.path.realpath(image_root)) if image_root else str(kept)
    if isinstance(kept, Image.Image):
        buf = io.BytesIO()
        kept.save(buf, format="PNG")
        kept = buf.getvalue()
    return base64.b64encode(kept).decode("ascii")


def mask_pixels(pixel_values, ratio: float, seed: int) -> torch.Tensor | None:
    """CoPO's corrupted image as the released code makes it (mask_single_image, 'random'), on the model input
    (..., C, H, W): in each image or tile, int(ratio * H * W) pixel positions (seeded), all channels, set to
    its mean over channels and pixels. None where pixel values are no such images (Qwen2-VL's flattened
    patches): the image is masked before the processor then (mask_image), the only place left."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() < 4 or pixel_values.shape[-3] not in (1, 3):
        return None
    c, h, w = pixel_values.shape[-3:]
    g = torch.Generator().manual_seed(seed)  # deterministic: the reference log-probs of the masked rows are cached
    out = pixel_values.clone().reshape(-1, c, h * w)
    for img in out:  # (C, H*W)
        img[:, torch.randperm(h * w, generator=g)[:int(h * w * ratio)]] = img.mean()
    return out.reshape(pixel_values.shape)


def mask_image(image: Image.Image, ratio: float, seed: int) -> Image.Image:
    """CoPO's corrupted image before the processor (the fallback of mask_pixels): `ratio` of the pixels
    (seeded) set to the image's mean colour. The processor's resize then blurs and dilutes the mask."""
    a = np.asarray(image.convert("RGB")).copy()
    h, w, _ = a.shape
    rng = np.random.default_rng(seed)
    idx = rng.choice(h * w, size=int(round(ratio * h * w)), replace=False)
    flat = a.reshape(-1, 3)
    flat[idx] = a.reshape(-1, 3).mean(0).round().astype(a.dtype)
    return Image.fromarray(flat.reshape(h, w, 3))


def revised_with_weights(report: list[dict]) -> tuple[str, list, list]:
    """The revised text and its [sentence, weight] lists (sentence-score and error-type weights)."""
    pieces, score_w, type_w = [], [], []
    for r in report:
        bad = r["score"] < 4
        # a sentence the rollout lacked (the release's "Added": nothing copied) is its rewritten text
        text = (r["rewritten_content"] if bad or not r["copied_content"].strip() else r["copied_content"]).strip()
        if not text:
            continue
        sw = SCORE_WEIGHT[r["score"]]
        tw = TYPE_WEIGHT.get(r["error_type"], 1.0) if bad else 1.0
        for s in split_sentences(text):
            pieces.append(s.strip())
            score_w.append([s.strip(), sw])
            type_w.append([s.strip(), tw])
    return " ".join(pieces), score_w, type_w


def corrected(report: list[dict]) -> bool:
    """Whether the expert changed the rollout: a sentence scored below 4, or one it added (the release's "Added":
    nothing copied, a score of 4)."""
    return any(r["score"] < 4 or not r["copied_content"].strip() and r["rewritten_content"].strip() for r in report)


def rollout_weights(report: list[dict]) -> list:
    return [[r["copied_content"], SCORE_WEIGHT[r["score"]]] for r in report if r["copied_content"].strip()]


def opa_prompt(r: dict) -> list[Message]:
    """The prompt a row's answers respond to: the messages its rollout was sampled from (run_opa_dpo.sh keeps
    them: earlier turns, a system message, where the image stands), else its question with the image first
    unless the question places it (a published query: "<image>\n...")."""
    if r.get("prompt"):
        return [Message(m["role"], m["content"]) for m in r["prompt"]]
    q = r["question"]
    return [Message("user", q if IMAGE_PLACEHOLDER in q else f"{IMAGE_PLACEHOLDER}\n{q}")]


class OPADataset(torch.utils.data.Dataset):
    rows_per_item = ROWS_PER_ITEM

    def __init__(self, rows: list[dict], encoder, image_root: str, report, mask_ratio: float = 0.3, seed: int = 0,
                 source: str = "opa_pairs.json"):
        """rows from read_opa (each knows its file and row; `source` names the file of rows that do not).
        Every image is opened here, inside image_root (default: the row's file's folder); a bad one is a
        bad row of `report` (an error unless it skips, then counted)."""
        self.encoder, self.image_root, self.report = encoder, image_root, report
        self.mask_ratio, self.seed = mask_ratio, seed
        self.tokenizer = encoder.tokenizer
        self.rows, self.refs = [], []
        for i, r in enumerate(rows):
            where = r.get("_where") or RowRef(source, i)
            try:
                load_image(r["image"], self._root(where))
            except ImageError as err:
                src = r["image"]
                report.bad(where, "image", f"{err}: {src}" if isinstance(src, str) and not is_base64_text(src)
                           else str(err))
                continue
            empty = next((k for k in ("gt", "revised") if not r[k].strip()), None)
            if empty:  # the correct step makes no pairs of these: the policy would learn to answer nothing
                report.bad(where, empty, "empty answer: OPA-DPO's pairs need a ground truth and a revised answer")
                continue
            missing = next(((k, j) for k in WEIGHT_FIELDS for j in [missing_span(r[WEIGHT_TEXT[k]], r[k])]
                            if j is not None), None)
            if missing:  # its weight would be lost: a sentence is weighed where it stands in its answer
                k, j = missing
                report.bad(where, f"{k}[{j}]", f"{r[k][j][0]!r:.60} is not in the {WEIGHT_TEXT[k]} after the "
                                               "sentences before it")
                continue
            self.rows.append(r)
            self.refs.append(where)

    def _root(self, where: RowRef) -> str:
        return self.image_root or os.path.dirname(os.path.abspath(where.file))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> list[GroupItem] | None:
        r, where = self.rows[i], self.refs[i]
        try:
            image = load_image(r["image"], self._root(where))
        except ImageError as err:  # changed on disk since it was checked
            self.report.bad(where, "image", str(err), item=(self, i))
            return None
        seed = self.seed * 1_000_003 + i
        prompt = opa_prompt(r)
        texts = [r["gt"], r["revised"], r["rollout"], r["revised"]]
        sw = [None, r["revised_score_weights"], r["rollout_weights"], r["revised_type_weights"]]
        try:
            real = encode_group(self.encoder, prompt, texts, [image], ROWS_PER_ITEM * i)
            pixels = mask_pixels(real.vision.get("pixel_values"), self.mask_ratio, seed)
            masked = image if pixels is not None else mask_image(image, self.mask_ratio, seed)
            mask = encode_group(self.encoder, prompt, [r["gt"], r["revised"]], [masked], ROWS_PER_ITEM * i + 1)
        except RowNotEncodable as e:
            self.report.bad(where, "question", str(e), item=(self, i))
            return None
        if pixels is not None:  # the same image and prompt: the real row's vision inputs, masked
            mask.vision = {**mask.vision, "pixel_values": pixels}
        if real.truncated and cut_alike(texts, real.responses):
            self.report.bad(where, "rollout", "responses (gt, revised, rollout) identical once cut at max_seq_len="
                                              f"{self.encoder.max_seq_len}", item=(self, i))
            return None
        try:
            real.weights = weighted_responses(self.encoder, prompt, texts, sw, real.responses, WEIGHTED)
            mask.weights = weighted_responses(self.encoder, prompt, [r["gt"], r["revised"]], [None, sw[3]],
                                              mask.responses, ("", WEIGHTED[3]))
        except WeightsNotPlaced as err:
            self.report.bad(where, err.field, str(err), item=(self, i))
            return None
        if real.truncated or mask.truncated:  # kept: the loss covers the kept tokens, each with its weight
            self.report.truncated(where, (self, i))
        return [real, mask]


ROLES = ("system", "user", "assistant")


def _field_problem(r) -> tuple[str, str] | None:
    """(field, reason) of the first field of an opa_pairs.json row that is missing or of the wrong type."""
    if not isinstance(r, dict):
        return "<row>", f"row is a {type(r).__name__}, not an object"
    for k in ("image",) + TEXT_FIELDS + WEIGHT_FIELDS:
        if k not in r:
            return k, "missing"
    if not isinstance(r["image"], str) or not r["image"].strip():
        return "image", f"expected a path or base64 text, got {r['image']!r:.60}"
    for k in TEXT_FIELDS:
        if not isinstance(r[k], str):
            return k, f"expected text, got {type(r[k]).__name__}"
    prompt = r.get("prompt")
    if prompt is not None and not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt)
            and prompt[-1]["role"] == "user"):
        return "prompt", f"expected the rollout's messages ([{{role, content}}, ...], the last a user's): {prompt!r:.60}"
    for k in WEIGHT_FIELDS:
        if not isinstance(r[k], list):
            return k, f"expected a list of [sentence, weight], got {type(r[k]).__name__}"
        for j, x in enumerate(r[k]):
            if not (isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                    and isinstance(x[1], (int, float)) and not isinstance(x[1], bool) and math.isfinite(x[1])
                    and x[1] >= 0):  # as a preference row's: a negative weight turns its tokens' log-probs around
                return f"{k}[{j}]", f"expected [sentence, finite weight >= 0], got {x!r:.80}"
    return None


# the published OPA-DPO set (datasets saved to disk): the OPA set's fields + the rollout and the expert's report
PUBLISHED_FIELDS = ("queries", "image_bytes", "standard_response", "original_generate_response", "AI_json_report")
PUBLISHED_TEXT = ("queries", "standard_response", "original_generate_response")  # question, gt, rollout


def _from_published(row: dict, ref: RowRef) -> dict:
    """An opa_pairs.json row from a row of the published OPA-DPO set: question, ground truth, the rollout and the
    expert's per-sentence report (the revised answer and every weight come from the report, as
    run_opa_dpo.sh's correct step makes them from its expert; AI_pseudo_response is that revision as text).
    A bad field raises RowProblem."""
    from training.data.readers import RowProblem
    from training.dpo.opa.expert import parse_report

    for k in PUBLISHED_FIELDS:
        if k not in row:
            raise RowProblem(k, f"missing (the OPA-DPO set has {', '.join(PUBLISHED_FIELDS)})")
    for k in PUBLISHED_TEXT:  # named as the set names them: the pairs' fields they become are not in its rows
        if not isinstance(row[k], str):
            raise RowProblem(k, f"expected text, got {type(row[k]).__name__}")
    image = row["image_bytes"]
    image = image.get("bytes") if isinstance(image, dict) else image  # a datasets Image column: {bytes, path}
    if not isinstance(image, (bytes, bytearray, memoryview, str)):
        raise RowProblem("image_bytes", f"expected the image's bytes or base64 text, got {type(image).__name__}")
    report = row["AI_json_report"]
    try:
        # the released set keeps base64 text (its make_opadpo_dataset.py encodes the bytes)
        image = image_field(decode_base64(image) if isinstance(image, str) else bytes(image), "")
        report = parse_report(report if isinstance(report, str) else json.dumps(report))
    except (ValueError, TypeError) as err:  # ImageError is a ValueError
        raise RowProblem("image_bytes" if isinstance(err, ImageError) else "AI_json_report", str(err)) from None
    revised, score_w, type_w = revised_with_weights(report)
    question = row["queries"].replace(IMAGE_PLACEHOLDER, "").strip()
    key = next((row[k] for k in ("idx", "id") if row.get(k) is not None), ref.row)  # a null idx (a table's gap)
    return {"id": str(key), "image": image, "question": question,
            "gt": row["standard_response"], "rollout": row["original_generate_response"], "revised": revised,
            "rollout_weights": rollout_weights(report), "revised_score_weights": score_w,
            "revised_type_weights": type_w, "report": report}


def read_opa(path: str, report=None) -> list[dict]:
    """The rows of run_opa_dpo.sh's opa_pairs.json, or of the published OPA-DPO set (rows with its expert report,
    PUBLISHED_FIELDS), from any table read_table reads (JSON, JSONL, parquet, a save_to_disk folder), each with
    "_where" (its RowRef); a row with a field missing or of the wrong type is an error naming file, row and field,
    or with a BadRowReport `report`, its bad row (skipped and counted when it skips)."""
    from training.data.readers import RowProblem, read_table
    rows = []
    for k, r in read_table(path, bad_lines=report is not None):  # k: the row's index as every reader numbers it
        where = RowRef(str(path), k)
        try:
            if isinstance(r, RowProblem):  # a JSON Lines line that is no JSON (read so only with a report)
                raise r
            # the published set's (its report or its query, which opa_pairs rows call question); others opa_pairs'
            published = isinstance(r, dict) and ("AI_json_report" in r or "queries" in r)
            r = _from_published(r, where) if published else r
            problem = _field_problem(r)
            if problem:
                raise RowProblem(problem[0], f"{problem[1]} (not an OPA-DPO pairs file? make it with run_opa_dpo.sh)")
        except RowProblem as bad:
            if report is None:
                raise DataFormatError(f"{path}: row {k}: field '{bad.field}': {bad.reason}") from None
            report.bad(where, bad.field, bad.reason)
            continue
        r["_where"] = where
        rows.append(r)
    return rows
