"""Write the embedded world to disk in the formats users bring (see shared data_formats.md).

    python -m training.world.generate --out data/world --seed 0

Files (images under images/, paths relative to it):
  sft_train.json          LLaVA-Instruct conversations (descriptions, yes/no, counting; multi-turn)
  preference_train.json   Vision-LLM-Alignment ranked lists [chosen, rejected] + "facts"
  preference_heldout.json held-out pairs (reward-model accuracy)
  ranked_train.json       ranked lists of 3 (faithful > wrong count > an added object) + "facts"
  ppo_prompts.json        prompts (human turn only) + "facts" + reference answer
  bench_objhal.jsonl      Object-HalBench-style description questions with ground-truth objects
  bench_pope_{random,popular,adversarial}.jsonl   POPE-style yes/no questions with labels
  bench_count.jsonl       counting questions with the true count
  world.json              the generator's settings and every scene's ground truth
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from training.files import write_text_atomic
from training.world.scenes import COLORS, KINDS, NUMBERS, PARTNER, PLURAL, Scene, describe, facts, render, sample_scene

DESCRIBE = "Describe the image in detail."
POPE_SUFFIX = ""


def exists_q(kind: str) -> str:
    return f"Is there a {kind} in the image?"


def exists_a(scene: Scene, kind: str) -> str:
    return f"Yes, there is a {kind}." if kind in scene.kinds else f"No, there is no {kind}."


def count_q(kind: str) -> str:
    return f"How many {PLURAL[kind]} are there?"


def count_a(n: int, kind: str) -> str:
    return f"There is {NUMBERS[n]} {kind}." if n == 1 else f"There are {NUMBERS[n]} {PLURAL[kind]}."


@dataclass
class WorldConfig:
    seed: int = 0
    n_sft: int = 4000
    n_pref: int = 2000
    n_ppo: int = 600
    n_heldout: int = 300
    hallucination_rate: float = 0.2  # share of SFT descriptions that mention an absent object


def code_digest() -> str:
    """The world's identity beside its settings: a SHA-256 of the generator's source files (this package's modules,
    read as bytes), recorded in world.json. A world made by other code is made again by ensure_world (a version
    number bumped by hand was forgotten, and the old world reused, after a change to the generator)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _triggers(scene: Scene) -> list[str]:
    """Absent partners of present kinds: what a co-occurrence-biased captioner adds."""
    return sorted({PARTNER[k] for k in scene.kinds if PARTNER[k] not in scene.kinds}, key=KINDS.index)


def _hallucinated(scene: Scene, rng: random.Random, partner_first: bool = True) -> str:
    cands = _triggers(scene) if partner_first else []
    cands = cands or [k for k in KINDS if k not in scene.kinds]
    return describe(scene, extra=[(rng.choice(cands), 1, rng.choice(list(COLORS)))])


def _wrong_count(scene: Scene, rng: random.Random) -> str:
    """One kind's count off by one; never below its number of colours ("two squares (red, green and blue)"
    would give the error away in the text alone)."""
    k = rng.choice(scene.kinds)
    n = scene.count(k)
    fewer = n >= 3 and rng.random() >= 0.5 and n - 1 >= len({o.color for o in scene.objects if o.kind == k})
    return describe(scene, counts={k: n - 1 if fewer else n + 1})


def _conv(scene: Scene, turns: list[tuple[str, str]], suffix: str = "") -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": scene.id + suffix, "image": f"{scene.id}.png", "conversations": conv}


def _sft_rows(scenes: list[Scene], rng: random.Random, rate: float) -> tuple[list[dict], int]:
    n_trig = sum(bool(_triggers(s)) for s in scenes)
    p_inject = min(1.0, rate * len(scenes) / max(n_trig, 1))
    rows, n_hal = [], 0
    for s in scenes:
        if _triggers(s) and rng.random() < p_inject:
            desc, n_hal = _hallucinated(s, rng), n_hal + 1
        else:
            desc = describe(s)
        k_any = rng.choice(KINDS)
        k_in = rng.choice(s.kinds)
        rows.append(_conv(s, [(DESCRIBE, desc), (exists_q(k_any), exists_a(s, k_any))], "-describe"))
        qa = [(exists_q(k_any), exists_a(s, k_any)), (count_q(k_in), count_a(s.count(k_in), k_in))]
        rows.append(_conv(s, qa if rng.random() < 0.5 else qa[::-1], "-qa"))  # either question may come first
    return rows, n_hal


def _pref_row(s: Scene, responses: list[str]) -> dict:
    row = _conv(s, [(DESCRIBE, "")])
    row["conversations"][-1]["value"] = responses
    row["facts"] = facts(s)
    return row


def _pref_rows(scenes: list[Scene], rng: random.Random, ranked: bool) -> list[dict]:
    rows = []
    for s in scenes:
        good = describe(s)
        if ranked:
            rows.append(_pref_row(s, [good, _wrong_count(s, rng), _hallucinated(s, rng)]))
            continue
        bad = _hallucinated(s, rng, partner_first=rng.random() < 0.7) if rng.random() < 0.75 else _wrong_count(s, rng)
        rows.append(_pref_row(s, [good, bad]))
    return rows


def _most_cooccurring(pos: list[str], absent: list[str], co: Counter) -> list[str]:
    """POPE's adversarial negatives: for each positive in turn, the absent kind not yet taken that co-occurs
    with it most often (ties: its partner, then the kinds' order)."""
    neg: list[str] = []
    for p in pos:
        left = [k for k in absent if k not in neg]
        neg.append(min(left, key=lambda k: (-co[(p, k)], PARTNER[p] != k, KINDS.index(k))))
    return neg


def _pope(scenes: list[Scene], split: str, rng: random.Random, freq: Counter, co: Counter) -> list[dict]:
    """POPE questions; `freq` counts the kinds and `co` the ordered pairs of kinds of the evaluated scenes (POPE counts
    them over the images it asks about)."""
    rows = []
    for s in scenes:
        pos = s.kinds[:3]
        absent = [k for k in KINDS if k not in s.kinds]
        if split == "random":
            neg = rng.sample(absent, len(absent))
        elif split == "popular":
            neg = sorted(absent, key=lambda k: (-freq[k], KINDS.index(k)))
        else:  # adversarial: most co-occurring with the present kinds
            neg = _most_cooccurring(pos, absent, co)
        for k, label in [(k, "yes") for k in pos] + [(k, "no") for k in neg[:len(pos)]]:
            rows.append({"question_id": f"{s.id}-{split}-{k}", "image": f"{s.id}.png",
                         "text": exists_q(k), "label": label, "object": k})
    return rows


def generate(out: str | Path, cfg: WorldConfig) -> dict:
    """Write the world into `out`. world.json, which ensure_world reads to reuse a world, goes first and is written
    last, whole: a generation stopped part way (another seed's images already written) left the old world.json over
    a mixed folder, reused without a word (its images no longer those of its ground truth)."""
    out = Path(out)
    (out / "world.json").unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    names = {"sft": cfg.n_sft, "pref": cfg.n_pref, "ppo": cfg.n_ppo, "heldout": cfg.n_heldout}
    splits = {n: [sample_scene(rng, f"{n}{i:05d}") for i in range(c)] for n, c in names.items()}
    for scenes in splits.values():
        for s in scenes:
            render(s).save(out / "images" / f"{s.id}.png")  # always: ids repeat across seeds and sizes
    sft, n_hal = _sft_rows(splits["sft"], rng, cfg.hallucination_rate)
    held = splits["heldout"]
    freq = Counter(k for s in held for k in s.kinds)
    co = Counter((a, b) for s in held for a in s.kinds for b in s.kinds if a != b)
    files = {
        "sft_train.json": sft,
        "preference_train.json": _pref_rows(splits["pref"], rng, ranked=False),
        "ranked_train.json": _pref_rows(splits["pref"], rng, ranked=True),
        "preference_heldout.json": _pref_rows(held, rng, ranked=False),
        "ppo_prompts.json": [dict(_conv(s, [(DESCRIBE, describe(s))]), facts=facts(s)) for s in splits["ppo"]],
    }
    for name, rows in files.items():
        (out / name).write_text(json.dumps(rows, indent=0))
    jsonl = {
        "bench_objhal.jsonl": [{"question_id": s.id, "image": f"{s.id}.png", "text": DESCRIBE,
                                "gt_objects": s.kinds} for s in held],
        "bench_count.jsonl": [{"question_id": f"{s.id}-count", "image": f"{s.id}.png", "text": count_q(k),
                               "count": s.count(k), "object": k} for s in held for k in s.kinds[:1]],
        **{f"bench_pope_{sp}.jsonl": _pope(held, sp, rng, freq, co) for sp in ("random", "popular", "adversarial")},
    }
    for name, rows in jsonl.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"code_sha256": code_digest(), "config": asdict(cfg), "n_sft_descriptions_hallucinated": n_hal,
            "scenes": {n: [{"id": s.id, "background": s.background, "objects": [asdict(o) for o in s.objects]}
                           for s in sc] for n, sc in splits.items()}}
    write_text_atomic(out / "world.json", json.dumps(meta))
    return meta


def ensure_world(out: str | Path, seed: int = 0) -> Path:
    """Generate the default world once; later calls reuse it when the settings and the generator's code
    (code_digest) are those it was made with."""
    out = Path(out)
    meta = out / "world.json"
    cfg = WorldConfig(seed=seed)
    old = json.loads(meta.read_text()) if meta.exists() else {}
    if old.get("config") != asdict(cfg) or old.get("code_sha256") != code_digest():
        generate(out, cfg)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", default="data/world")
    for k, v in asdict(WorldConfig()).items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    meta = generate(out, WorldConfig(**a))
    print(f"wrote {out}: {meta['n_sft_descriptions_hallucinated']} of {a['n_sft']} SFT descriptions hallucinate")


if __name__ == "__main__":
    main()
