"""Reward-model quality benchmark on the embedded world (a command, not a CI test).

    python -m training.rm.quality            # needs output/sft (bash run_sft.sh)

1. Trains the factual and the non-factual reward model from the SFT model with the stage's
   defaults, one after the other in this process, and prints both held-out pairwise accuracies,
   with two controls: the same held-out pairs scored with every pair's IMAGE taken from another
   scene, and (factual) with its FACTS taken from another scene. A reward model that reads the
   image (or the facts) must lose accuracy under its control.
   The world's rejected responses differ from the chosen ones only in their error, but some errors
   show in the text alone (a count of "four" never occurs in a true description; an invented kind
   is often the partner of a present one), so a reward model can rank part of them without the
   image. `--hard_pairs` (default on) therefore also
   trains both on HARD pairs built from the same scenes: the rejected response is the faithful
   description of a slightly different scene (a kind swapped, added or left out, or a count off by
   one; see `hard_rejected`), so mostly only the image or the facts can tell them apart.
2. Hallucination on the embedded Object-HalBench (bench_objhal.jsonl, CHAIR): the SFT model greedy,
   sampled (temperature 1), and best-of-n over the same samples (same seed) with
   - the non-factual reward model: the questions carry no facts, the honest test-time setting;
   - the factual reward model given the scene's ground-truth facts: an ORACLE upper bound (it uses
     the benchmark's ground truth at test time), shown to measure what the factual block buys.
Writes <out>/quality.json and <out>/quality.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def oracle_questions(world: Path, dest: Path) -> Path:
    """bench_objhal.jsonl plus each scene's ground-truth facts (from world.json)."""
    from training.world.scenes import facts

    scenes = json.loads((world / "world.json").read_text())["scenes"]
    by_id = {s["id"]: _scene(s) for split in scenes.values() for s in split}
    rows = [json.loads(x) for x in (world / "bench_objhal.jsonl").read_text().splitlines() if x.strip()]
    dest.write_text("".join(json.dumps({**r, "facts": facts(by_id[r["question_id"]])}) + "\n" for r in rows))
    return dest


def _scene(s: dict):
    from training.world.scenes import Obj, Scene
    return Scene(s["id"], s["background"], tuple(Obj(**o) for o in s["objects"]))


def hard_rejected(scene, rng):
    """The faithful description of a slightly different scene, so that the text alone does not tell:
    one kind swapped for an absent one (same counts and colours), one absent object added, one
    present kind left out (balancing the added one: fewer objects is no cue), or one count off by one."""
    from training.world.scenes import describe

    error = rng.choice(ERRORS)
    if error == "omit" and len(scene.kinds) < 2:
        error = "swap"
    return describe(changed_scene(scene, error, rng))


ERRORS = ("swap", "add", "omit", "count")


def changed_scene(scene, error: str, rng):
    """The scene with one error of the given type (see hard_rejected), or None when it cannot carry it."""
    from dataclasses import replace

    from training.world.scenes import COLORS, KINDS, Obj, Scene

    objs, kinds = list(scene.objects), scene.kinds
    absent = [k for k in KINDS if k not in kinds]
    if error in ("add", "swap") and not absent or error == "omit" and len(kinds) < 2:
        return None
    if error == "swap":
        old, new = rng.choice(kinds), rng.choice(absent)
        objs = [replace(o, kind=new) if o.kind == old else o for o in objs]
    elif error == "add":
        objs.append(Obj(rng.choice(absent), rng.choice(list(COLORS)), 7, 0, 0))
    elif error == "omit":
        gone = rng.choice(kinds)
        objs = [o for o in objs if o.kind != gone]
    else:
        kind = rng.choice(kinds)
        mine = [o for o in objs if o.kind == kind]
        if len(mine) > 1 and rng.random() < 0.5:
            objs.remove(rng.choice(mine))
        else:
            objs.append(replace(rng.choice(mine), x=0, y=0))
    return Scene(scene.id, scene.background, tuple(objs))


def hard_pairs(world: Path, split: str, dest: Path, seed: int) -> Path:
    """World-format preference rows (image, conversations with [chosen, rejected], facts) on `split`'s scenes."""
    import random

    from training.world.generate import DESCRIBE
    from training.world.scenes import describe, facts

    rng = random.Random(f"hard-{split}-{seed}")
    rows = []
    for s in json.loads((world / "world.json").read_text())["scenes"][split]:
        scene = _scene(s)
        rows.append({"id": scene.id, "image": f"{scene.id}.png", "facts": facts(scene), "conversations": [
            {"from": "human", "value": "<image>\n" + DESCRIBE},
            {"from": "gpt", "value": [describe(scene), hard_rejected(scene, rng)]}]})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(rows))
    return dest


def other_rows(n: int, seed: int = 0) -> list[int]:
    """For each of n rows another row (a random cycle through all of them: none is its own), for the controls."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    other = list(range(n))
    for i, k in enumerate(order):
        other[k] = order[(i + 1) % n]
    return other


def controls(rm_dir: Path, heldout: Path, image_root: str) -> dict:
    """Held-out accuracy as is, with each pair's image from another scene, and (factual) with its facts."""
    from training.data.formats import read_preferences
    from training.data.images import load_image
    from training.rm.data import RewardScorer
    from training.rm.model import load_reward_model

    rm, processor, arch = load_reward_model(rm_dir)
    scorer = RewardScorer(rm, processor, arch, 512, 64)
    recs = read_preferences([str(heldout)], image_root)
    images = [[load_image(s, image_root) for s in r.images] for r in recs]
    other = other_rows(len(recs))

    def accuracy(img, fct) -> float:
        flat = [(k, resp) for k, r in enumerate(recs) for resp in r.responses[:2]]
        s = scorer.score([recs[k].prompt for k, _ in flat], [images[img(k)] for k, _ in flat], [x for _, x in flat],
                         [recs[fct(k)].facts for k, _ in flat] if rm.factual else None).view(-1, 2)
        return float((s[:, 0] > s[:, 1]).float().mean())

    out = {"clean": accuracy(lambda k: k, lambda k: k),
           "image_from_other_scene": accuracy(lambda k: other[k], lambda k: k)}
    if rm.factual:
        out["facts_from_other_scene"] = accuracy(lambda k: k, lambda k: other[k])
    return out


def train_rms(sft: str, out: Path, world: Path, sets: dict, extra: list[str], reuse: bool) -> dict:
    from training.rm.main import main as train

    acc = {}
    for data_name, (train_file, heldout) in sets.items():
        for name, flag in (("factual", "--factual"), ("nonfactual", "--no-factual")):
            path = out / f"{data_name}_{name}"
            if not (reuse and (path / "eval_metrics.json").exists()):
                t0 = time.time()
                train(["--from_checkpoint", sft, "--output_dir", str(path), flag, "--data_path", str(train_file),
                       "--eval_data_path", str(heldout), "--image_folder", str(world / "images"), *extra])
                print(f"{path.name}: trained in {time.time() - t0:.0f} s")
            acc[path.name] = {**json.loads((path / "eval_metrics.json").read_text()),
                              "controls": controls(path, heldout, str(world / "images"))}
            print(f"{path.name}: {acc[path.name]['controls']}")
    return acc


def hallucination(sft: str, out: Path, world: Path, rm_sets, n: int, batch_size: int, seed: int) -> dict:
    from eval.embedded import score_answers
    from training.predict.main import parse, predict

    bench = world / "bench_objhal.jsonl"
    oracle = oracle_questions(world, out / "bench_objhal_with_facts.jsonl")
    runs = {
        "SFT greedy": (bench, []),
        "SFT sampled (T=1)": (bench, ["--do_sample"]),
    }
    for data_name in rm_sets:
        runs[f"best-of-{n}, {data_name} non-factual RM"] = (
            bench, ["--best_of_n", str(n), "--reward_model", str(out / f"{data_name}_nonfactual")])
        runs[f"best-of-{n}, {data_name} factual RM + oracle facts"] = (
            oracle, ["--best_of_n", str(n), "--reward_model", str(out / f"{data_name}_factual")])
    results = {}
    for name, (qfile, extra) in runs.items():
        ans = out / "answers" / (name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                                 .replace("=", "").replace("+", "") + ".jsonl")
        ans.unlink(missing_ok=True)
        predict(parse(["--model_path", sft, "--data_path", str(qfile), "--output_file", str(ans), "--image_folder",
                       str(world / "images"), "--batch_size", str(batch_size), "--seed", str(seed),
                       "--temperature", "1.0", "--no-progress", *extra]))
        results[name] = score_answers("objhal", bench, ans)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items() if k != "n"))
    return results


def report(acc: dict, hal: dict) -> str:
    lines = ["| reward model (training pairs, mode) | held-out pairwise accuracy | image from other scene | "
             "facts from other scene | chosen reward | rejected reward |", "|---|---|---|---|---|---|"]
    for name, m in acc.items():
        c = m["controls"]
        lines.append(f"| {name} | {m['eval/accuracy']:.4f} | {c['image_from_other_scene']:.4f} | "
                     f"{c.get('facts_from_other_scene', float('nan')):.4f} | {m['eval/reward_chosen']:.3f} | "
                     f"{m['eval/reward_rejected']:.3f} |")
    lines += ["", "| decoding (SFT model) | CHAIRs | CHAIRi | recall |", "|---|---|---|---|"]
    for name, m in hal.items():
        lines.append(f"| {name} | {m['CHAIRs']:.3f} | {m['CHAIRi']:.3f} | {m['recall']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--sft", default="output/sft")
    p.add_argument("--out", default="output/rm_quality")
    p.add_argument("--world", default="data/world")
    p.add_argument("--best_of_n", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32, help="questions per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep reward models already trained in --out")
    p.add_argument("--hard_pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="also train and evaluate on hard pairs (see above)")
    a, extra = p.parse_known_args(argv)  # anything else goes to both reward-model trainings
    if not (Path(a.sft) / "config.json").is_file():
        raise SystemExit(f"{a.sft}: no SFT model; run `bash run_sft.sh` first")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    world = Path(a.world)
    if not (world / "world.json").exists():
        from training.world.generate import ensure_world
        ensure_world(world)
    sets = {"world": (world / "preference_train.json", world / "preference_heldout.json")}
    if a.hard_pairs:
        sets["hard"] = (hard_pairs(world, "pref", out / "hard_pairs" / "train.json", a.seed),
                        hard_pairs(world, "heldout", out / "hard_pairs" / "heldout.json", a.seed))
    acc = train_rms(a.sft, out, world, sets, ["--no-progress", *extra], a.reuse)
    hal = hallucination(a.sft, out, world, list(sets), a.best_of_n, a.batch_size, a.seed)
    table = report(acc, hal)
    (out / "quality.json").write_text(json.dumps({"rm": acc, "objhal": hal}, indent=1))
    (out / "quality.md").write_text(table + "\n")
    print(table)
    return {"rm": acc, "objhal": hal}


if __name__ == "__main__":
    main()
