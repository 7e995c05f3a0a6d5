"""AMBER (junyangwang0410/AMBER `inference.py`): generative and discriminative hallucination.

Files (AMBER's `data/` folder, downloaded by the user): annotations.json (items `{id, type, truth,
hallu}`, looked up by position id-1), relation.json (word -> associated words: the vocabulary),
safe_words.txt, query/query_all.json (`{id, image, query}`); images in --image_folder.

Generative (ids 1-1004), per response, as inference.py does it:
  nouns -> keep those in the vocabulary (relation keys and values) -> for each noun: a global safe
  word is skipped; a truth object or one of its associates covers that truth object; else it is
  hallucinated, and if it is a hallu target (or associate) it also marks that target.
  CHAIR = hallucinated nouns / candidate nouns; Cover = covered truth objects / truth objects;
  Hal = share of responses with >= 1 hallucinated noun; Cog = marked hallu targets / hallu targets.
Discriminative (ids > 1004): the response must be exactly "Yes" or "No"; the positive class is
"No"; accuracy, precision, recall, F1 overall and for existence / attribute / relation. An answer
that is neither ("Yes, there is a dog.") counts as wrong, as in inference.py; how many there are is
`disc_not_yes_no` in the metrics, and a warning names it. So each discriminative question gets LLaVA's
short-answer instruction (--amber_disc_suffix, as POPE's --pope_suffix; recorded in the results file).
AMBER score = 0.5 * (1 - CHAIR + F1).

Metrics are fractions. `reference_printout` repeats inference.py's printed numbers exactly
(percent, one decimal, its 0.001-initialised denominators and the F1 of rounded P and R).

Without downloaded data (the default, --amber_nlp rule): NLTK's tokenizer, POS tagger and WordNet
lemmatizer are replaced by eval.nouns and a vocabulary filter with three homograph rules ("can" is a
noun only after a determiner, number or container word; a word right after a modal or a subject
pronoun is a verb, and so is one right after "to" unless it is inflected (an infinitive never is:
"to trees", "to people") or the "to" is a preposition by its preceding word ("next to water",
"close to", "due to", "walk to"; _TO_PREPOSITION); "hot" is never a noun), and spaCy's word-vector
similarity (> 0.8, which
also matches near-synonyms) is left out: only exact matches cover or mark. Lemmas are WordNet's, as
inference.py's WordNetLemmatizer gives them (eval.nouns: "sunglasses" -> "sunglass", which the vocabulary lacks,
"men" stays "men"). Numbers can therefore differ from inference.py wherever the tagger or the word vectors
decide. --amber_nlp reference uses
nltk + spaCy en_core_web_lg exactly as inference.py does, when they and their data are installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from eval.answers import need, read_json
from eval.nouns import lemmatize, tokenize
from eval.pope import LLAVA_SUFFIX

_VERB_CONTEXT = {"can", "could", "will", "would", "should", "may", "might", "must", "i", "you", "we",
                 "they", "he", "she"}
_CAN_NOUN_CONTEXT = {"a", "the", "this", "that", "one", "two", "three", "four", "several", "some", "soda",
                     "trash", "garbage", "beer", "tin", "paint", "watering", "metal", "aluminum", "empty", "open"}
_NEVER_NOUN = {"hot"}
# "<word> to X": the "to" is a preposition, X a noun ("next to water", "from left to right", "walk to school");
# "going" is left out: "going to ride" is the future tense
_TO_PREPOSITION = {"next", "close", "closer", "due", "according", "similar", "near", "nearer", "adjacent",
                   "attached", "opposite", "compared", "related", "up", "back", "from", "belonging", "leading",
                   "leads", "walk", "walks", "walking", "walked", "go", "goes", "went", "gone", "headed",
                   "heading", "return", "returns", "returning"}
_DISC_GROUPS = {"discriminative-hallucination": "existence", "discriminative-attribute-state": "attribute",
                "discriminative-attribute-number": "attribute", "discriminative-attribute-action": "attribute"}


class RuleNouns:
    """Vocabulary nouns of a response without downloaded data (see the module docstring)."""

    def __init__(self, vocab: set[str]):
        self.vocab = frozenset(vocab)

    def __call__(self, text: str) -> list[str]:
        tokens = tokenize(text)
        out = []
        for i, tok in enumerate(tokens):
            lemma = lemmatize(tok)
            if lemma not in self.vocab or lemma in _NEVER_NOUN:
                continue
            prev = tokens[i - 1].lower() if i else ""
            if tok.lower() == "can" and prev not in _CAN_NOUN_CONTEXT:
                continue
            if prev in _VERB_CONTEXT:
                continue
            if prev == "to" and lemma == tok and (tokens[i - 2].lower() if i > 1 else "") not in _TO_PREPOSITION:
                continue  # a bare infinitive: "wants to play", "going to ride"
            out.append(lemma)
        return out


class ReferenceNlp:  # pragma: no cover - needs nltk data and spaCy's en_core_web_lg, not installed here
    """inference.py's own extract_nouns and check_synonyms_word (nltk + spaCy), when installed."""

    def __init__(self, threshold: float = 0.8):
        try:
            import nltk
            import spacy
            from nltk.stem import WordNetLemmatizer
            self._nltk, self._lemma, self._nlp = nltk, WordNetLemmatizer(), spacy.load("en_core_web_lg")
            nltk.pos_tag(nltk.word_tokenize("a test"))
        except Exception as err:
            raise RuntimeError("--amber_nlp reference needs nltk with punkt / averaged_perceptron_tagger / "
                               f"wordnet data and spaCy with en_core_web_lg installed: {err}") from None
        self.threshold = threshold

    def nouns(self, text: str) -> list[str]:
        tagged = self._nltk.pos_tag(self._nltk.word_tokenize(text))
        return [self._lemma.lemmatize(w) for w, pos in tagged if pos.startswith("NN")]

    def similar(self, a: str, b: str) -> bool:
        return self._nlp(a).similarity(self._nlp(b)) > self.threshold


def _mark(flags: list[int], j: int, tail: int) -> None:
    """inference.py's marking: an associate marks its object's slot in the last `tail` entries."""
    if j < len(flags) - tail:
        flags[flags[j] + len(flags) - tail] = 1
    else:
        flags[j] = 1


def score_generative(nouns: list[str], truth: list[str], hallu: list[str], association: dict,
                     safe_words: set[str], similar=None) -> tuple[list[int], list[int], list[int]]:
    """(hallucination flag per noun, cover flag per truth object, mark per hallu target)."""
    safe, safe_idx, ha, ha_idx = [], [], [], []
    for idx, w in enumerate(truth):
        safe += association.get(w, [])
        safe_idx += [idx] * len(association.get(w, []))
    for idx, w in enumerate(hallu):
        ha += association.get(w, [])
        ha_idx += [idx] * len(association.get(w, []))
    safe += truth
    safe_idx += [0] * len(truth)
    ha += hallu
    ha_idx += [0] * len(hallu)
    flags = [0] * len(nouns)
    for i, noun in enumerate(nouns):
        if noun in safe_words:
            continue
        if noun in safe:
            _mark(safe_idx, safe.index(noun), len(truth))
            continue
        if noun in ha:
            _mark(ha_idx, ha.index(noun), len(hallu))
        if similar is not None:
            j = next((j for j, w in enumerate(ha) if similar(noun, w)), None)
            if j is not None:
                _mark(ha_idx, j, len(hallu))
            j = next((j for j, w in enumerate(safe) if similar(noun, w)), None)
            if j is not None:
                _mark(safe_idx, j, len(truth))
                continue
        flags[i] = 1
    return flags, safe_idx[len(safe_idx) - len(truth):], ha_idx[len(ha_idx) - len(hallu):]


def _disc(counts: dict) -> dict:
    acc = counts["correct"] / counts["n"] if counts["n"] else 0.0
    p = counts["ans_no_true"] / counts["ans_no"] if counts["ans_no"] else 0.0
    r = counts["no_true"] / counts["no"] if counts["no"] else 0.0
    return {"accuracy": acc, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "n": counts["n"]}


def _printout_disc(c: dict, eps: float = 0.0001, start: float = 0.001) -> dict:
    """inference.py's printed numbers: percent, one decimal, denominators that start at 0.001 (metrics.txt) per
    counter: 0.003 for attribute, the sum of its state, number and action counters."""
    acc = round(c["correct"] / (c["n"] + start) * 100, 1)
    p = round(c["ans_no_true"] / (c["ans_no"] + start) * 100, 1)
    r = round(c["no_true"] / (c["no"] + start) * 100, 1)
    f1 = round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + eps) * 100, 1)
    return {"Accuracy": acc, "Precision": p, "Recall": r, "F1": f1}


def vocabulary(association: dict) -> set[str]:
    """inference.py's hallucination_words: every relation.json key and associated word."""
    return set(association) | {w for ws in association.values() for w in ws}


def amber_metrics(items: list[dict], responses: list[str], annotations: list[dict], association: dict,
                  safe_words: set[str], nouns, similar=None) -> tuple[dict, dict, list[dict]]:
    """items: query rows with integer `id`; responses: the model's answers in the same order;
    nouns: text -> list of noun lemmas; similar: (word, word) -> bool, or None for exact matches only."""
    vocab = vocabulary(association)
    g = dict(chair_score=0, chair_num=0, cover_score=0, cover_num=0, cog_score=0, cog_num=0, non_hal=0, n=0)
    zero = dict(n=0, correct=0, no=0, no_true=0, ans_no=0, ans_no_true=0)
    disc = {k: dict(zero) for k in ("all", "existence", "attribute", "relation")}
    not_yes_no = 0
    per = []
    for item, response in zip(items, responses):
        ann = annotations[item["id"] - 1]
        if ann.get("id", item["id"]) != item["id"]:
            raise ValueError(f"annotations.json: position {item['id'] - 1} holds id {ann['id']}, not {item['id']}")
        if ann["type"] == "generative":
            found = [n for n in nouns(response) if n in vocab]
            flags, cover, cog = score_generative(found, ann["truth"], ann["hallu"], association, safe_words, similar)
            g["chair_score"] += sum(flags)
            g["chair_num"] += len(flags)
            g["cover_score"] += sum(cover)
            g["cover_num"] += len(cover)
            g["cog_score"] += sum(cog)
            g["cog_num"] += len(cog)
            g["non_hal"] += sum(flags) == 0
            g["n"] += 1
            per.append({"id": item["id"], "type": "generative", "nouns": found,
                        "hallucinated": [n for n, f in zip(found, flags) if f]})
        else:
            truth = ann["truth"]
            not_yes_no += response not in ("Yes", "No")
            for k in ("all", _DISC_GROUPS.get(ann["type"], "relation")):
                c = disc[k]
                c["n"] += 1
                c["correct"] += (truth == "yes" and response == "Yes") or (truth != "yes" and response == "No")
                c["no"] += truth != "yes"
                c["no_true"] += truth != "yes" and response == "No"
                c["ans_no"] += response == "No"
                c["ans_no_true"] += response == "No" and truth == "no"
            per.append({"id": item["id"], "type": ann["type"], "truth": truth, "response": response,
                        "yes_no": response in ("Yes", "No")})
    metrics, printout = {}, {}
    if g["n"]:
        def ratio(a, b):
            return a / b if b else 0.0
        metrics.update(CHAIR=ratio(g["chair_score"], g["chair_num"]), Cover=ratio(g["cover_score"], g["cover_num"]),
                       Hal=1 - g["non_hal"] / g["n"], Cog=ratio(g["cog_score"], g["cog_num"]))
        printout["generative"] = {
            "CHAIR": round(g["chair_score"] / (g["chair_num"] + 0.001) * 100, 1),
            "Cover": round(g["cover_score"] / (g["cover_num"] + 0.001) * 100, 1),
            "Hal": round(100 - g["non_hal"] / (g["n"] + 0.001) * 100, 1),
            "Cog": round(g["cog_score"] / (g["cog_num"] + 0.001) * 100, 1)}
    details = {"generative_counts": g, "discriminative": {}, "discriminative_n": disc["all"]["n"]}
    if disc["all"]["n"]:
        d = _disc(disc["all"])
        metrics.update(accuracy=d["accuracy"], precision=d["precision"], recall=d["recall"], F1=d["f1"],
                       disc_not_yes_no=not_yes_no)
        printout["discriminative"] = _printout_disc(disc["all"])
        for k in ("existence", "attribute", "relation"):
            if disc[k]["n"]:
                details["discriminative"][k] = _disc(disc[k])
                metrics[f"{k}_F1"] = details["discriminative"][k]["f1"]
                printout[k] = _printout_disc(disc[k], 0.001 if k == "existence" else 0.0001,
                                            0.003 if k == "attribute" else 0.001)
    if "CHAIR" in metrics and "F1" in metrics:
        metrics["AMBER_score"] = 0.5 * (1 - metrics["CHAIR"] + metrics["F1"])
        printout["AMBER_score"] = round(0.5 * (100 - printout["generative"]["CHAIR"]
                                               + printout["discriminative"]["F1"]), 1)
    details["reference_printout"] = printout
    return metrics, details, per


def load_amber(data: str | Path) -> tuple[list[dict], dict, set[str]]:
    data = Path(data)
    annotations = read_json(data / "annotations.json")
    association = read_json(data / "relation.json")
    safe = {line.split("\n")[0] for line in (data / "safe_words.txt").read_text(encoding="utf-8").splitlines()}
    return annotations, association, safe


# ---------------------------------------------------------------- benchmark adapter

NAME = "amber"
DEFAULT_DECODING = {"num_beams": 1, "max_new_tokens": 1024}
JUDGE_MODEL = None


def add_args(p) -> None:
    g = p.add_argument_group("amber")
    g.add_argument("--amber_query", default="", help="query file (default: <data>/query/query_all.json)")
    g.add_argument("--amber_nlp", choices=["rule", "reference"], default="rule",
                   help="rule: no downloaded data; reference: nltk + spaCy en_core_web_lg as inference.py")
    g.add_argument("--amber_similarity", type=float, default=0.8, help="spaCy similarity threshold (reference)")
    g.add_argument("--amber_disc_suffix", default=LLAVA_SUFFIX,
                   help="appended to discriminative questions, as POPE's (scoring needs answers exactly 'Yes' / "
                        "'No'; without it a chat model's 'Yes, there is...' counts as wrong); recorded in the "
                        "results file")


def needs_judge(args) -> bool:
    return False


def _query_file(args) -> Path:
    return Path(args.amber_query) if args.amber_query else Path(args.data) / "query" / "query_all.json"


def data_files(args) -> list[Path]:
    d = Path(args.data)
    return [d / "annotations.json", d / "relation.json", d / "safe_words.txt", _query_file(args)]


def questions(args) -> dict[str, list[dict]]:
    """The queries, each checked for its fields and its annotation (looked up by position id-1, as inference.py)."""
    qfile, afile = _query_file(args), Path(args.data) / "annotations.json"
    rows, annotations = read_json(qfile), read_json(afile)
    out = []
    for i, r in enumerate(rows):
        where = f"{qfile}, row {i}"
        raw, image, query = (need(r, k, where, text=k == "query") for k in ("id", "image", "query"))
        qid = int(raw) if isinstance(raw, int) or str(raw).strip().isdigit() else 0
        if not 1 <= qid <= len(annotations):
            raise ValueError(f"{where}: id {raw!r} has no annotation in {afile} ({len(annotations)} items, ids from 1)")
        generative = need(annotations[qid - 1], "type", f"{afile}, item {qid - 1}") == "generative"
        out.append({"question_id": str(qid), "id": qid, "image": image,
                    "text": query if generative else query + args.amber_disc_suffix})
    return {"": out}


def score(args, qs, answers, judge=None, decoding=None):
    annotations, association, safe = load_amber(args.data)
    if args.amber_nlp == "reference":  # pragma: no cover
        nlp = ReferenceNlp(args.amber_similarity)
        nouns, similar = nlp.nouns, nlp.similar
    else:
        nouns, similar = RuleNouns(vocabulary(association)), None
    items = qs[""]
    metrics, details, per = amber_metrics(items, [answers[""][q["question_id"]] for q in items], annotations,
                                          association, safe, nouns, similar)
    details.update(nlp=args.amber_nlp, disc_prompt_suffix=args.amber_disc_suffix, warnings=[])
    if metrics.get("disc_not_yes_no"):
        msg = (f"AMBER: {metrics['disc_not_yes_no']} of {details['discriminative_n']} discriminative answers are "
               "not exactly 'Yes' or 'No' and count as wrong (the reference's rule); ask for one word with "
               "--amber_disc_suffix")
        print(f"warning: {msg}", file=sys.stderr)
        details["warnings"].append(msg)
    return metrics, details, per
