"""Which errors a reward model penalises: on the embedded world's held-out scenes, the share of scenes
where it scores the faithful description ABOVE the same description with one error, per error type.

    python -m benchmarks.rm_errors --reward_model output/rm [--world data/world]

Error types (each the faithful description of a slightly changed scene, training.rm.quality's
`changed_scene`, one type at a time): add (an absent kind added), swap (a kind replaced by an
absent one), count (one count off by one), omit (a present kind left out). A reward model that PPO can
trust ranks the faithful description first for every type; one that prefers `omit` pays the policy
for shorter object lists (lower recall). The factual block is given when the model was trained with it.

    python -m benchmarks.rm_errors --reward_model output/rm --answers output/sft output/ppo [--run_name R]

also ranks models' own answers to the held-out scenes (eval.run_embedded's per-question records,
<model>/eval_embedded[_R].per_question.jsonl, scored on the same --world): the AUROC of its scores for the clean
answers (no hallucinated and no missed object) over the answers with a hallucinated object, and over those that miss
a present one: how well it catches the errors a policy actually makes, not only the constructed ones.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--reward_model", default="output/rm")
    p.add_argument("--world", default="data/world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answers", nargs="*", default=[], metavar="MODEL",
                   help="models whose held-out answers (eval.run_embedded's per-question records) to rank")
    p.add_argument("--run_name", default="", help="the eval.run_embedded --run_name of the --answers records")
    a = p.parse_args(argv)

    from training.data.images import load_image
    from training.data.records import Message
    from training.rm.data import RewardScorer
    from training.rm.model import load_reward_model
    from training.rm.quality import ERRORS, _scene, changed_scene
    from training.world.generate import DESCRIBE
    from training.world.scenes import describe, facts

    world = Path(a.world)
    scenes = [_scene(s) for s in json.loads((world / "world.json").read_text())["scenes"]["heldout"]]
    rm, processor, arch = load_reward_model(a.reward_model)
    scorer = RewardScorer(rm, processor, arch, 512, 64)
    prompt = [Message("user", "<image>\n" + DESCRIBE)]
    images = [[load_image(f"{s.id}.png", str(world / "images"))] for s in scenes]
    good = scorer.score([prompt] * len(scenes), images, [describe(s) for s in scenes], [facts(s) for s in scenes])
    rows = {}
    for error in ERRORS:
        rng = random.Random(f"{a.seed}-{error}")
        bad = [changed_scene(s, error, rng) for s in scenes]
        keep = [i for i, b in enumerate(bad) if b is not None]
        r = scorer.score([prompt] * len(keep), [images[i] for i in keep], [describe(bad[i]) for i in keep],
                         [facts(scenes[i]) for i in keep])
        margin = good[keep] - r
        rows[error] = {"scenes": len(keep), "faithful_preferred": float((margin > 0).float().mean()),
                       "mean_margin": float(margin.mean()), "score_percentiles": percentiles(r)}
    print(f"reward model {a.reward_model} ({'factual' if scorer.factual else 'non-factual'}), "
          f"{len(scenes)} held-out scenes: share ranking the faithful description first")
    print("| error | scenes | faithful preferred | mean margin | scores: 10th, 25th, 50th, 75th, 90th percentile |")
    print("|---|---|---|---|---|")
    print(f"| (none: faithful) | {len(scenes)} | - | - | {fmt(percentiles(good))} |")
    for e, r in rows.items():
        print(f"| {e} | {r['scenes']} | {r['faithful_preferred']:.3f} | {r['mean_margin']:+.3f} | "
              f"{fmt(r['score_percentiles'])} |")
    print("(raw scores, as PPO's --reward_clip clips them before normalising)")
    rows["faithful"] = {"scenes": len(scenes), "score_percentiles": percentiles(good)}
    if a.answers:
        by_id = {s.id: (s, img) for s, img in zip(scenes, images)}
        rows["answers"] = {m: rank_answers(scorer, prompt, m, a.run_name, by_id, a.world) for m in a.answers}
        print("\nthe models' own held-out answers: AUROC of the clean answers' scores over the others'")
        print("| answers | clean | with a hallucinated object | AUROC | missing a present object | AUROC |")
        print("|---|---|---|---|---|---|")
        for m, r in rows["answers"].items():
            print(f"| {m} | {r['clean']} | {r['hallucinated']} | {r['auroc_hallucinated']:.3f} | {r['missed']} | "
                  f"{r['auroc_missed']:.3f} |")
    return rows


def rank_answers(scorer, prompt, model: str, run_name: str, by_id: dict, world: str) -> dict:
    """A model's objhal answers scored with their scenes' facts; AUROC of the clean ones over the others."""
    import torch

    from eval.bootstrap import read_records
    from training.world.scenes import facts

    path, records = read_records(model, run_name)
    other = [q for q in records if q not in by_id]
    if other:
        raise SystemExit(f"{path}: {len(other)} answers to scenes that are not {world}'s held-out ones (the first: "
                         f"{other[0]}): score the model on the same --world")
    rs = list(records.values())
    unanswered = [r["question_id"] for r in rs if not isinstance(r.get("answer"), str)]
    if unanswered:
        raise SystemExit(f"{path}: {len(unanswered)} objhal records without an answer text (the first: "
                         f"{unanswered[0]})")
    scores = scorer.score([prompt] * len(rs), [by_id[r["question_id"]][1] for r in rs], [r["answer"] for r in rs],
                          [facts(by_id[r["question_id"]][0]) for r in rs])
    hal = torch.tensor([bool(r["hallucinated"]) for r in rs])
    miss = torch.tensor([bool(r["missed"]) for r in rs])
    clean = ~hal & ~miss
    return {"clean": int(clean.sum()), "hallucinated": int(hal.sum()), "missed": int(miss.sum()),
            "auroc_hallucinated": auroc(scores[clean], scores[hal]), "auroc_missed": auroc(scores[clean], scores[miss])}


def auroc(pos, neg) -> float:
    """The chance that a random `pos` score exceeds a random `neg` one, ties counting half (the Mann-Whitney U over
    the pairs); NaN when either side is empty."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def percentiles(scores) -> list[float]:
    """The 10th, 25th, 50th, 75th and 90th percentiles of a reward model's raw scores."""
    import torch
    return torch.quantile(scores.float(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()


def fmt(q: list[float]) -> str:
    return ", ".join(f"{x:+.1f}" for x in q)


if __name__ == "__main__":
    main()
