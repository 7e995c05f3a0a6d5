"""Which errors a reward model penalises: on the embedded world's held-out scenes, the share of scenes
where it scores the faithful description ABOVE the same description with one error, per error type.

    python -m benchmarks.rm_errors --reward_model output/rm [--world data/world]

Error types (each the faithful description of a slightly changed scene, training.rm.quality's
`changed_scene`, one type at a time): add (an absent kind added), swap (a kind replaced by an
absent one), count (one count off by one), omit (a present kind left out). A reward model that PPO can
trust ranks the faithful description first for every type; one that prefers `omit` pays the policy
for shorter object lists (lower recall). The factual block is given when the model was trained with it.
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
    return {**rows, "faithful": {"scenes": len(scenes), "score_percentiles": percentiles(good)}}


def percentiles(scores) -> list[float]:
    """The 10th, 25th, 50th, 75th and 90th percentiles of a reward model's raw scores."""
    import torch
    return torch.quantile(scores.float(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()


def fmt(q: list[float]) -> str:
    return ", ".join(f"{x:+.1f}" for x in q)


if __name__ == "__main__":
    main()
