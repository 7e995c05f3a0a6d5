"""OPA-DPO data: per prompt, the ground truth, the policy's rollout and the expert's revision, their
per-sentence weights, and a masked copy of the image; as two GroupItems for the DPO machinery.

    row 2i   (real image)   responses [ground truth, revised (score w), rollout (score w), revised (type w)]
    row 2i+1 (masked image) responses [ground truth, revised (type w)]

so the four pairs are 1 = (2i,0) > (2i,2); 2 = (2i,1) > (2i,2) weighted; 3 = (2i,0) > (2i+1,0);
4 = (2i,3) > (2i+1,1) weighted. File (opa_pairs.json): one object per prompt with id, image, question,
gt, rollout, revised, rollout_weights / revised_score_weights / revised_type_weights ([sentence, w]
lists covering the text) and the expert's report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data.images import load_image
from training.data.records import Message, RowRef
from training.dpo.data import GroupItem, encode_group
from training.dpo.opa.expert import SCORE_WEIGHT, TYPE_WEIGHT, split_sentences
from training.templates.chat import PromptTooLong

ROWS_PER_ITEM = 2


def mask_image(image: Image.Image, ratio: float, seed: int) -> Image.Image:
    """CoPO's corrupted image: `ratio` of the pixels (seeded) set to the image's mean colour."""
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
        text = (r["rewritten_content"] if bad else r["copied_content"]).strip()
        if not text:
            continue
        sw = SCORE_WEIGHT[r["score"]]
        tw = TYPE_WEIGHT.get(r["error_type"], 1.0) if bad else 1.0
        for s in split_sentences(text):
            pieces.append(s.strip())
            score_w.append([s.strip(), sw])
            type_w.append([s.strip(), tw])
    return " ".join(pieces), score_w, type_w


def rollout_weights(report: list[dict]) -> list:
    return [[r["copied_content"], SCORE_WEIGHT[r["score"]]] for r in report]


def token_weights(tokenizer, text: str, sentence_weights: list, response_ids: list[int]) -> torch.Tensor:
    """Per-token weights of one encoded response: each token of `text` gets its sentence's weight (found by
    character offsets), located inside the response ids (the template may add tokens around it, which
    keep weight 1). A tokenizer that merges across the template boundary leaves all weights at 1."""
    w = torch.ones(len(response_ids))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n = len(ids)
    start = next((j for j in range(len(response_ids) - n + 1) if response_ids[j:j + n] == ids), None)
    if start is None or n == 0:
        return w
    spans, pos = [], 0
    for sentence, weight in sentence_weights:
        s = text.find(sentence.strip(), pos)
        if s < 0:
            continue
        spans.append((s, s + len(sentence.strip()), float(weight)))
        pos = s + len(sentence.strip())
    for t, (a, _) in enumerate(offsets):
        for s, e, weight in spans:
            if s <= a < e:
                w[start + t] = weight
                break
    return w


class OPADataset(torch.utils.data.Dataset):
    rows_per_item = ROWS_PER_ITEM

    def __init__(self, rows: list[dict], encoder, image_root: str, report, mask_ratio: float = 0.3, seed: int = 0,
                 source: str = "opa_pairs.json"):
        self.rows, self.encoder, self.image_root, self.report = rows, encoder, image_root, report
        self.source = source
        self.mask_ratio, self.seed = mask_ratio, seed
        self.tokenizer = encoder.tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> list[GroupItem] | None:
        r = self.rows[i]
        image = load_image(r["image"], self.image_root)
        masked = mask_image(image, self.mask_ratio, self.seed * 1_000_003 + i)
        prompt = [Message("user", "<image>\n" + r["question"])]
        texts = [r["gt"], r["revised"], r["rollout"], r["revised"]]
        sw = [None, r["revised_score_weights"], r["rollout_weights"], r["revised_type_weights"]]
        try:
            real = encode_group(self.encoder, prompt, texts, [image], ROWS_PER_ITEM * i)
            mask = encode_group(self.encoder, prompt, [r["gt"], r["revised"]], [masked], ROWS_PER_ITEM * i + 1)
        except PromptTooLong as e:
            self.report.bad(RowRef(self.source, i), "question", str(e), item=(self, i))
            return None
        real.weights = [None if w is None else token_weights(self.tokenizer, t, w, ids.tolist())
                        for t, w, ids in zip(texts, sw, real.responses)]
        mask.weights = [None, token_weights(self.tokenizer, r["revised"], r["revised_type_weights"],
                                            mask.responses[1].tolist())]
        return [real, mask]


def read_opa(path: str) -> list[dict]:
    rows = json.loads(Path(path).read_text())
    need = {"image", "question", "gt", "rollout", "revised", "rollout_weights", "revised_score_weights",
            "revised_type_weights"}
    for k, r in enumerate(rows):
        missing = need - set(r)
        if missing:
            raise ValueError(f"{path}, row {k}: not an OPA-DPO pairs file (missing {sorted(missing)}); "
                             "make it with run_opa_dpo.sh")
    return rows

