"""Object HalBench / CHAIR (RLAIF-V `eval/eval_gpt_obj_halbench.py`, after LisaAnne/Hallucination).

Objects in a text: lowercase, tokenize, lemmatize every token as a noun, merge two-word phrases
greedily left to right ("baby dog" -> dog, "passenger jet" -> jet, "toilet seat" -> toilet, every
multi-word synonym to itself, "home plate" / "train track" to themselves so "plate" / "train" do
not fire), drop "seat" when "toilet" is present, keep words in the synonym list and map each to its
canonical COCO class (first word of its line in data/coco_synonyms.txt). Every mention counts.

Ground-truth objects of an image: its COCO instance categories plus the objects its GT captions
mention (the same extraction), or a file mapping image_id -> objects. A warning (printed and kept
in the results' details) says when only one of the two COCO sources is given, and when images have
no ground-truth object at all (every object mentioned for them then counts as hallucinated).

Metrics over responses:
  CHAIRs        = responses with >= 1 hallucinated mention / all responses
  CHAIRs_refine = the same / responses mentioning >= 1 object (RLAIF-V's and OPA-DPO's "CHAIR_s")
  CHAIRi        = hallucinated mentions / all mentions
  obj_rec       = sum over responses of |distinct correct classes| / sum of |GT classes|
An empty denominator gives 0.0 (the reference divides by zero).

The optional LLM extractor (RLAIF-V's --use_gpt: gpt-3.5-turbo-0613, temperature 0.2, 512 tokens,
its prompt as the system message) asks the judge for the objects in each answer (answers of <= 3
words have none; an unparsable reply is asked again, up to 3 times) and maps each extracted
phrase to COCO objects: the two-word rule first; otherwise the whole lemmatized phrase when it is a
synonym, else its last word. RLAIF-V keeps the runs of nouns spaCy tags in the phrase; without
spaCy the phrase's last word stands in for its head noun ("tennis ball": RLAIF-V finds no object,
this finds sports ball).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

from eval.answers import read_json
from eval.nouns import lemmatize, tokenize

SYNONYMS = Path(__file__).parent / "data" / "coco_synonyms.txt"
EXTRACT_PROMPT = Path(__file__).parent / "prompts" / "objhal_extract.txt"
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLES = ("jet", "train")


class CocoObjects:
    """The COCO synonym list and the rules that turn text into COCO object mentions."""

    def __init__(self, synonyms_file: str | Path = SYNONYMS,
                 tokenizer: Callable[[str], list[str]] = tokenize,
                 lemmatizer: Callable[[str], str] = lemmatize):
        lines = [line.strip().split(", ") for line in Path(synonyms_file).read_text().splitlines() if line.strip()]
        self.canonical: dict[str, str] = {}
        for synonyms in lines:
            for s in (s.strip() for s in synonyms):
                self.canonical[s] = synonyms[0].strip()
        self.objects = frozenset(self.canonical)
        doubles = [w for w in self.canonical if len(w.split(" ")) >= 2] + ["home plate", "train track"]
        self.double = {w: w for w in doubles}
        for a in _ANIMALS:
            self.double[f"baby {a}"] = a
            self.double[f"adult {a}"] = a
        for v in _VEHICLES:
            self.double[f"passenger {v}"] = v
        self.double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        self._tokenize, self._lemmatize = tokenizer, lemmatizer

    def _merge_pairs(self, words: list[str], keep_single: bool = True) -> list[str]:
        out, i = [], 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in self.double:
                out.append(self.double[pair])
                i += 2
            else:
                if keep_single:
                    out.append(words[i])
                i += 1
        return out

    def _to_objects(self, words: list[str]) -> list[tuple[str, str]]:
        if "toilet" in words and "seat" in words:  # "the seat of the toilet" is not a chair
            words = [w for w in words if w != "seat"]
        return [(w, self.canonical[w]) for w in words if w in self.objects]

    def lemmas(self, text: str) -> list[str]:
        return [self._lemmatize(w) for w in self._tokenize(text.lower())]

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word, COCO class) for every object mention in `text`, in order, repeats kept."""
        return self._to_objects(self._merge_pairs(self.lemmas(text)))

    def from_phrases(self, phrases: list[str]) -> list[tuple[str, str]]:
        """Mentions from an LLM's extracted object phrases (see the module docstring)."""
        refined: list[str] = []
        for phrase in phrases:
            words = self.lemmas(f"a {phrase}")
            doubles = self._merge_pairs(words, keep_single=False)
            if doubles:
                refined += doubles
                continue
            whole = " ".join(words[1:])
            if whole:
                refined.append(whole if whole in self.objects else words[-1])
        unique = list(dict.fromkeys(refined))
        return self._to_objects(unique)


def chair_metrics(texts: list[str], mentions: list[list[tuple[str, str]]],
                  gt: list[set[str]]) -> tuple[dict, list[dict]]:
    """RLAIF-V's compute_chair over responses: overall metrics and one record per response."""
    n_caps = n_obj_caps = n_hal_caps = n_hal_words = n_words = n_correct_cls = n_gt = n_tokens = 0
    per = []
    for text, ms, truth in zip(texts, mentions, gt):
        hal = [(w, c) for w, c in ms if c not in truth]
        correct = {c for _, c in ms if c in truth}
        n_caps += 1
        n_obj_caps += bool(ms)
        n_hal_caps += bool(hal)
        n_hal_words += len(hal)
        n_words += len(ms)
        n_correct_cls += len(correct)
        n_gt += len(truth)
        n_tokens += len(text.strip().split(" "))
        per.append({"mentions": ms, "hallucinated": hal, "gt_objects": sorted(truth),
                    "CHAIRs": int(bool(hal)), "CHAIRi": len(hal) / len(ms) if ms else 0.0})

    def ratio(a, b):
        return a / b if b else 0.0
    return {"CHAIRs": ratio(n_hal_caps, n_caps), "CHAIRs_refine": ratio(n_hal_caps, n_obj_caps),
            "CHAIRi": ratio(n_hal_words, n_words), "obj_rec": ratio(n_correct_cls, n_gt),
            "sentence_num": n_caps, "coco_sentence_num": n_obj_caps, "mentions": n_words,
            "hallucinated_mentions": n_hal_words, "correct_classes": n_correct_cls, "gt_classes": n_gt,
            "avg_word_len": ratio(n_tokens, n_caps)}, per


# ---------------------------------------------------------------- ground truth

def image_id_of(row: dict) -> int:
    """`image_id`, else the number in a COCO file name (COCO_val2014_000000310196.jpg -> 310196)."""
    if row.get("image_id") is not None:
        try:
            return int(row["image_id"])
        except (TypeError, ValueError):
            raise ValueError(f"image_id {row['image_id']!r} is not a COCO image number") from None
    name = row.get("image") if isinstance(row.get("image"), str) and len(row.get("image", "")) < 300 else ""
    m = re.search(r"(\d+)\.\w+$", name or "")
    if not m:
        raise ValueError("question has no image_id and no COCO image file name")
    return int(m.group(1))


def load_gt_objects(coco: CocoObjects, image_ids, instances=(), captions=(), gt_file=None) -> dict[int, set[str]]:
    """image_id -> COCO classes, from COCO instances / captions JSON files or a GT mapping file.

    gt_file: JSON {image_id: [object names]} (names are mapped through the synonym list)."""
    wanted = {int(i) for i in image_ids}
    gt: dict[int, set[str]] = {i: set() for i in wanted}
    for path in instances:
        data = read_json(path)
        names = {c["id"]: c["name"] for c in data["categories"]}
        for a in data["annotations"]:
            if a["image_id"] in gt:
                gt[a["image_id"]].add(coco.canonical[names[a["category_id"]]])
    for path in captions:
        for a in read_json(path)["annotations"]:
            if a["image_id"] in gt:
                gt[a["image_id"]].update(c for _, c in coco.mentions(a["caption"]))
    if gt_file:
        for k, objs in read_json(gt_file).items():
            if int(k) in gt:
                for o in objs:
                    o = o.lower().strip()
                    gt[int(k)].update([coco.canonical[o]] if o in coco.canonical else
                                      [c for _, c in coco.mentions(o)])
    return gt


def coco_annotation_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """instances_*2014.json and captions_*2014.json in a COCO annotations folder (val first)."""
    folder = Path(folder)
    inst = sorted(folder.glob("instances_*2014.json"), key=lambda p: "val" not in p.name)
    caps = sorted(folder.glob("captions_*2014.json"), key=lambda p: "val" not in p.name)
    if not inst or not caps:
        raise FileNotFoundError(f"{folder}: needs instances_val2014.json and captions_val2014.json "
                                "(COCO 2014 annotations)")
    return inst, caps


# ---------------------------------------------------------------- LLM extractor

def parse_object_list(content: str) -> list[str]:
    """A ```json fenced list, else the last line when it holds '["' (RLAIF-V's parse)."""
    m = re.search(r"```json\n(.*?)\n```", content, re.DOTALL)
    try:
        if m:
            out = json.loads(m.group(1))
        elif '["' in content:
            out = json.loads(content.strip().split("\n")[-1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError("content is not a JSON list") from None
    if not isinstance(out, list):
        raise ValueError("content is not a JSON list")
    return [str(o) for o in out]


def llm_objects(judge, question: str, answer: str, decoding: dict, tries: int = 3) -> list[str]:
    """Object phrases the judge extracts from one answer ([] for answers of <= 3 words)."""
    if len(answer.strip().split()) <= 3:
        return []
    fill = {"question": question, "answer": answer}  # one pass, as str.format: a '{answer}' in the question stays
    prompt = re.sub(r"\{(question|answer)\}", lambda m: fill[m.group(1)], EXTRACT_PROMPT.read_text())
    for attempt in range(tries):
        reply = judge.chat([{"role": "system", "content": prompt}], attempt=attempt, **decoding)
        try:
            return parse_object_list(reply)
        except ValueError:
            continue
    raise ValueError(f"the judge's object list could not be parsed in {tries} tries: {reply[:200]!r}")


def _question_objects(judge, q: dict, answer: str, decoding: dict) -> list[str]:
    try:
        return llm_objects(judge, q["text"], answer, decoding)
    except ValueError as err:  # the judge's replies are cached: a rerun asks again only for what was not answered
        raise ValueError(f"question {q['question_id']!r} (image {q['image_id']}): {err}") from None


# ---------------------------------------------------------------- benchmark adapter

NAME = "objhal"
DEFAULT_DECODING = {"num_beams": 3, "max_new_tokens": 1024}  # RLAIF-V: temperature 0, 3 beams, 1024 tokens
EXTRACTOR_MODEL = "gpt-3.5-turbo-0613"


def add_args(p) -> None:
    g = p.add_argument_group("objhal (Object HalBench / CHAIR)")
    g.add_argument("--coco_annotations", default="", help="COCO annotations folder (instances/captions_*2014.json)")
    g.add_argument("--coco_instances", nargs="*", default=[], help="COCO instances JSON file(s)")
    g.add_argument("--coco_captions", nargs="*", default=[], help="COCO captions JSON file(s)")
    g.add_argument("--gt_objects", default="", help="JSON {image_id: [objects]} instead of / besides COCO files")
    g.add_argument("--synonyms", default=str(SYNONYMS), help="80-line COCO synonym list")
    g.add_argument("--objhal_extractor", choices=["rule", "llm"], default="rule",
                   help="rule: the synonym rules; llm: the judge extracts objects first (RLAIF-V --use_gpt)")


def needs_judge(args) -> bool:
    return args.objhal_extractor == "llm"


JUDGE_MODEL = EXTRACTOR_MODEL
JUDGE_DECODING = {"temperature": 0.2, "max_tokens": 512}  # RLAIF-V gpt4_grpc.Chat defaults


def data_files(args) -> list[Path]:
    inst, caps = gt_sources(args)
    return [Path(args.data), *map(Path, inst), *map(Path, caps)] + ([Path(args.gt_objects)] if args.gt_objects else [])


def questions(args) -> dict[str, list[dict]]:
    from eval.answers import need
    from training.data.formats import read_table
    from training.data.prompt_formats import question_id

    out = []
    for i, r in read_table(args.data):
        key = next((k for k in ("question", "text", "query") if isinstance(r, dict) and k in r), "question")
        if isinstance(r, dict) and r.get(key) is None:
            raise ValueError(f"{args.data}: row {i} has no question / text")
        text = need(r, key, f"{args.data}: row {i}", text=True)
        try:
            image_id = image_id_of(r)
        except ValueError as err:
            raise ValueError(f"{args.data}: row {i}: {err}") from None
        out.append({"question_id": question_id(r, i), "image": r.get("image", r.get("image_path")),
                    "text": text, "image_id": image_id})
    return {"": out}


def gt_sources(args) -> tuple[list, list]:
    inst, caps = list(args.coco_instances), list(args.coco_captions)
    if args.coco_annotations:
        i2, c2 = coco_annotation_files(args.coco_annotations)
        inst, caps = inst + i2, caps + c2
    if not (inst or caps or args.gt_objects):
        raise ValueError("objhal needs ground truth: --coco_annotations DIR, --coco_instances/--coco_captions "
                         "FILES, or --gt_objects FILE")
    return inst, caps


def gt_warnings(inst, caps, gt: dict[int, set[str]]) -> list[str]:
    """Ground truth that is incomplete by the definition (instances + captions), said plainly."""
    out = []
    if bool(inst) != bool(caps):
        have, lack = ("instances", "captions") if inst else ("captions", "instances")
        out.append(f"objhal: ground truth from COCO {have} only (no --coco_{lack}); the reference uses instance "
                   "categories plus caption objects, so correct objects may count as hallucinated")
    empty = sorted(i for i, objs in gt.items() if not objs)
    if empty:
        out.append(f"objhal: {len(empty)} of {len(gt)} images have no ground-truth objects (every object mentioned "
                   f"for them counts as hallucinated): image_id {', '.join(map(str, empty[:5]))}"
                   + (", ..." if len(empty) > 5 else "") + "; are they in the COCO files / --gt_objects?")
    return out


def score(args, qs: dict[str, list[dict]], answers: dict[str, dict[str, str]], judge=None, decoding=None):
    coco = CocoObjects(args.synonyms)
    items = qs[""]
    inst, caps = gt_sources(args)
    gt = load_gt_objects(coco, {q["image_id"] for q in items}, inst, caps, args.gt_objects or None)
    warnings = gt_warnings(inst, caps, gt)
    for msg in warnings:
        print(f"warning: {msg}", file=sys.stderr)
    texts = [answers[""][q["question_id"]].replace("Assistant:", "").strip() for q in items]
    if args.objhal_extractor == "llm":
        mentions = [coco.from_phrases(_question_objects(judge, q, t, decoding)) for q, t in zip(items, texts)]
    else:
        mentions = [coco.mentions(t) for t in texts]
    metrics, per = chair_metrics(texts, mentions, [gt[q["image_id"]] for q in items])
    for q, p in zip(items, per):
        p.update(question_id=q["question_id"], image_id=q["image_id"])
    return metrics, {"extractor": args.objhal_extractor, "warnings": warnings}, per
