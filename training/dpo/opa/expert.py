"""OPA-DPO's expert: reviews each sentence of a rollout and returns the per-sentence report

    {copied_content, score (1-4), error_type, object, rewritten_content, reason}

and the revised response is the rollout with its bad sentences rewritten. Two experts:

  GroundTruthReviser  uses the ground truth the data carries (the embedded world's facts: which object
                      kinds are present, how many): exact, offline, free.
  ChatExpert          any OpenAI-compatible chat endpoint (GPT-4V in the paper), configured by URL,
                      model name and the NAME of an environment variable holding the API key. Retries
                      with backoff; every answer is cached on disk by a hash of the endpoint URL and the
                      request (never the key), so a rerun makes no second call.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

from training.chat_api import chat_completions_url, check_key_env, endpoint_key, post_chat, reply_text
from training.files import write_text_atomic

SCORE_WEIGHT = {1: 2.5, 2: 2.0, 3: 1.5, 4: 1.0}  # sentence score -> token weight (pair 2)
TYPE_WEIGHT = {"image_recognition_error": 3.0, "correct": 1.0, "language_comprehension_error": 1.0}  # pair 4
NO_SENTENCE = "expert answer reviews no sentence of the rollout (an empty report)"


def split_sentences(text: str) -> list[str]:
    """Sentences with their trailing punctuation; the pieces concatenate back to the text. A sentence ends at
    punctuation followed by whitespace or the end: a point inside one ("3.5 km") is kept in it."""
    parts = re.findall(r".*?[.!?]+(?:\s+|\Z)|.+", text, flags=re.S)
    return [p for p in parts if p.strip()] or [text]


def revise(report: list[dict]) -> str:
    """The revised response: each sentence's copy, or its rewrite where the expert found an error."""
    out = []
    for r in report:
        piece = r["rewritten_content"] if r["score"] < 4 else r["copied_content"]
        if piece and piece.strip():
            out.append(piece.strip())
    return " ".join(out)


# ---- ground truth (embedded world) -----------------------------------------------------------

def _truth(facts: list[str], reference: str) -> tuple[set[str], dict[str, int]]:
    from eval.embedded import first_number, mentioned_kinds
    kinds, counts = set(), {}
    for f in facts or []:
        if re.search(r"\bno\b", f.lower()):
            continue
        for k in mentioned_kinds(f):
            kinds.add(k)
            n = first_number(f)
            if n is not None:
                counts[k] = n
    if not kinds:
        kinds = set(mentioned_kinds(reference))
    return kinds, counts


def _stated_counts(sentence: str) -> dict[str, int]:
    """{kind: n} for each "<number> [colour] <kind>" in the sentence; words as the scorer splits them
    (eval.nouns), so "two star-shaped crosses" counts crosses, not stars."""
    from eval.nouns import tokenize
    from eval.embedded import NOUN_KIND as nouns
    from training.world.scenes import NUMBERS
    words = tokenize(sentence.lower())
    out = {}
    for i, w in enumerate(words):
        if w in NUMBERS:
            noun = next((nouns[x] for x in words[i + 1:i + 3] if x in nouns), None)
            if noun:
                out.setdefault(noun, NUMBERS.index(w))
    return out


REVISIONS = ("reference", "minimal")


class GroundTruthReviser:
    """Reviews a rollout against the ground truth: a sentence naming an absent kind scores 1 (object
    hallucination), a wrong count 2, a faithful sentence 4; a faithful response that leaves out present
    kinds gets its last sentence scored 3.

    revision "reference" (the default): the first bad sentence is rewritten as the reference answer and later bad
    ones are dropped. "minimal" (the paper's expert keeps what is right): each bad sentence is corrected in place
    where every sentence naming an object reads as a list of objects and the facts give each kind's phrase
    (training.dpo.opa.gt_edit; wrong colours then score 2 as well), else as "reference". On a validation world
    "minimal" gave the higher CHAIR_i (benchmarks/results_history.md, "Stop 42")."""

    def __init__(self, revision: str = "reference"):
        if revision not in REVISIONS:
            raise ValueError(f"revision must be one of {REVISIONS}, not {revision!r}")
        self.revision = revision

    def review(self, response: str, reference: str, facts: list[str] | None, **_) -> list[dict]:
        from eval.embedded import mentioned_kinds
        kinds, counts = _truth(facts or [], reference)
        if self.revision == "minimal":
            report = _minimal_report(response, kinds, facts or [])
            if report is not None:
                return report
        report, used_reference = [], False
        for s in split_sentences(response):
            hall = [k for k in mentioned_kinds(s) if k not in kinds]
            wrong = [k for k, n in _stated_counts(s).items() if k in counts and counts[k] != n]
            if hall:
                entry = (1, "image_recognition_error", hall[0], f"{hall[0]} is not in the image")
            elif wrong:
                entry = (2, "image_recognition_error", wrong[0], f"the image holds {counts[wrong[0]]} {wrong[0]}(s)")
            else:
                entry = (4, "correct", "", "supported by the image")
            score, etype, obj, reason = entry
            rewrite = ""
            if score < 4:  # one rewrite (the reference) replaces the first bad sentence; later bad ones go
                rewrite, used_reference = ("" if used_reference else reference), True
            report.append({"copied_content": s, "score": score, "error_type": etype, "object": obj,
                           "rewritten_content": rewrite if score < 4 else s, "reason": reason})
        missing = kinds - {k for r in report if r["score"] == 4 for k in mentioned_kinds(r["copied_content"])}
        if missing and not used_reference and report:
            last = report[-1]
            last.update(score=3, error_type="image_recognition_error", object=sorted(missing)[0],
                        rewritten_content=reference, reason=f"leaves out {', '.join(sorted(missing))}")
            for r in report[:-1]:  # the reference restates everything: drop the other copies
                if r["score"] == 4:
                    r.update(score=3, rewritten_content="", reason="restated by the rewrite")
        return report


def _entry(sentence: str, score: int, obj: str, rewrite: str, reason: str) -> dict:
    return {"copied_content": sentence, "score": score, "error_type": "correct" if score == 4 else
            "image_recognition_error", "object": obj, "rewritten_content": rewrite, "reason": reason}


def _minimal_report(response: str, kinds: set[str], facts: list[str]) -> list[dict] | None:
    """The report with each bad sentence corrected in place (gt_edit); kinds the response never names are added
    to its last listing sentence. None when a sentence naming an object does not read as a list."""
    from eval.embedded import mentioned_kinds
    from training.dpo.opa.gt_edit import correct_sentence, fact_phrases, read_items
    from training.world.scenes import KINDS
    phrases = fact_phrases(facts)
    if not phrases:
        return None
    sentences = split_sentences(response)
    missing = sorted(kinds - set(mentioned_kinds(response)), key=KINDS.index)
    last = max((i for i, s in enumerate(sentences) if read_items(s) is not None), default=None)
    if missing and last is None:
        return None
    fixed = [correct_sentence(s, kinds, phrases, add=missing if i == last else ()) for i, s in enumerate(sentences)]
    report = []
    for s, f in zip(sentences, fixed):
        if f is None:
            if mentioned_kinds(s):
                return None
            report.append(_entry(s, 4, "", s, "names no object"))
        elif not f[1]:
            report.append(_entry(s, 4, "", s, "supported by the image"))
        else:
            score, obj, _ = min(f[1], key=lambda e: e[0])
            report.append(_entry(s, score, obj, f[0], "; ".join(e[2] for e in f[1])))
    return report


# ---- any OpenAI-compatible chat endpoint -------------------------------------------------------

PROMPT = """You are an expert annotator of image descriptions. Review the response below sentence by sentence
against the image. Return ONLY a JSON list with one object per sentence, in order, with the keys:
copied_content (the sentence, verbatim), score (1 = severe hallucination, 2 = minor error, 3 = acceptable
but imprecise, 4 = fully correct), error_type (one of "correct", "image_recognition_error",
"language_comprehension_error"), object (the object involved, or ""), rewritten_content (the sentence
corrected; the same sentence when the score is 4), reason (one short phrase).

Question: {question}
Response: {response}"""


class ChatExpert:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", cache_dir: str | Path = ".",
                 retries: int = 4, timeout: float = 120.0, backoff: float = 2.0):
        check_key_env(api_key_env, "--expert_api_key_env")
        self.url = chat_completions_url(url)
        self.model, self.api_key_env = model, api_key_env
        self.cache = Path(cache_dir)
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.calls = 0  # network requests made (a cached answer makes none)

    def _body(self, question: str, response: str, image) -> dict:
        content = [{"type": "text", "text": PROMPT.format(question=question, response=response)}]
        if image is not None:
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        return {"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": content}]}

    def _post(self, body: dict) -> str:
        def sent():
            self.calls += 1
        out = post_chat(self.url, body, self.api_key_env, retries=self.retries, backoff_s=self.backoff,
                        timeout_s=self.timeout, who="expert", url_flag="--expert_url", on_request=sent,
                        require_text=False)  # a refusal (no text) is the rollout's bad row, not asked again
        return reply_text(out)

    def review(self, response: str, reference: str = "", facts=None, question: str = "", image=None) -> list[dict]:
        body = self._body(question, response, image)
        key = hashlib.sha256(json.dumps({"url": endpoint_key(self.url), "body": body}, sort_keys=True).encode()
                             ).hexdigest()
        path = self.cache / f"{key}.json"
        try:
            report = parse_report(json.loads(path.read_text())["content"])
            if report or not response.strip():  # (an older version cached answers that review nothing)
                return report
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            pass  # not cached, or an entry an older version left half-written: asked again
        text = self._post(body)
        report = parse_report(text)  # a malformed answer is not cached, nor one that reviews nothing
        if not report and response.strip():
            raise ValueError(NO_SENTENCE)
        self.cache.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"content": text}))  # a killed write leaves no half-written entry
        return report


def _first_json_list(text: str) -> list:
    """The first JSON list of objects in the text, decoded from a '[' on (so prose before or after it, brackets
    included, is ignored); else the first JSON list, whose entries the caller refuses."""
    lists = []
    for m in re.finditer(r"\[", text):
        try:
            rows, _ = json.JSONDecoder().raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if rows and all(isinstance(r, dict) for r in rows):  # ("[]" in prose before the report is not it)
            return rows
        lists.append(rows)
    if not lists:
        raise ValueError(f"expert answer holds no JSON list: {text[:200]!r}")
    return lists[0]


DESCRIPTION_KEYS = ("image_description", "image description")


def _report_entries(text: str) -> list:
    """The sentence entries of a report: the first JSON list of objects in an expert's answer, or the whole answer as
    a JSON object in the OPA-DPO release's layout ({"image_description": ..., "0": {...}, "1": {...}, ...,
    "Added": {...}}; its pseudo_rollout_coco prompt): the entries in their order, the image description left out,
    "Added" a sentence the rollout lacked (rewritten only, weight 1: a score of 4, "correct")."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError:
            whole = None
        release = isinstance(whole, dict) and any(k.isdigit() or k == "Added" or k in DESCRIPTION_KEYS for k in whole)
        if release:  # other objects ({"sentences": [...]}) hold their list inside: the first list of objects below
            out = []
            for key, r in whole.items():
                if key in DESCRIPTION_KEYS:
                    continue
                if key == "Added" and isinstance(r, dict):
                    r = {"copied_content": "", "score": 4, "error_type": "correct",
                         "rewritten_content": _field(r, "rewritten_content") or "", "reason": _field(r, "reason")}
                out.append(r)
            return out
    return _first_json_list(text)


def _field(r: dict, name: str):
    """A report field by its name or with a space for the underscore ("copied content"), as the release has both."""
    return r.get(name, r.get(name.replace("_", " ")))


def _score(x) -> int:
    """A score 1-4 (clamped): an integer, or a number or text that is one ("3", 3.0); anything else is an error."""
    try:
        if not isinstance(x, bool) and float(x) == int(float(x)):
            return min(4, max(1, int(float(x))))
    except (TypeError, ValueError, OverflowError):
        pass
    raise ValueError(f"score {x!r} is not an integer 1-4")


def _text(r: dict, field: str, default: str) -> str:
    """A text field by either spelling (`_field`); `default` when it is absent, "" when it is not text."""
    x = _field(r, field) if field in r or field.replace("_", " ") in r else default
    return x if isinstance(x, str) else ""  # JSON null (or a number) is no text: was the text "None"


def parse_report(text) -> list[dict]:
    """The per-sentence report in an expert's answer (_report_entries: a JSON list of objects, or the OPA-DPO
    release's JSON object). A text field that is not a string (null, the release's list of objects) becomes ""; a
    missing score is 4 (a score written as text, "2", is that score: the release's loader gave it weight 1).
    Anything else is a ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expert answer has no text (content {text!r:.40})")
    out = []
    for k, r in enumerate(_report_entries(text)):
        if not isinstance(r, dict):
            raise ValueError(f"expert answer: sentence {k} is a {type(r).__name__}, not an object: {r!r:.80}")
        try:
            score = _score(r.get("score", 4))
        except ValueError as e:
            raise ValueError(f"expert answer: sentence {k}: {e}") from None
        copied = _text(r, "copied_content", "")
        # lowercase: the release's prompt offers "Image_recognition_error", which its loader's table then missed
        etype = _text(r, "error_type", "correct").strip().lower()
        out.append({"copied_content": copied, "score": score, "error_type": etype,
                    "object": _text(r, "object", ""), "rewritten_content": _text(r, "rewritten_content", copied),
                    "reason": _text(r, "reason", "")})
    return out
