"""DPO's two batch layouts on the VLM families beyond LLaVA: the shared-prefix layout (one row per pair: image and
prompt computed once) against the plain layout (one full sequence per response, the layout TRL's DPOTrainer uses),
on each family's tiny VLM with prompts of a few hundred image tokens, as with LLaVA.

    python -m benchmarks.dpo_layouts                        # idefics3, qwen2_vl, qwen2_5_vl; 32 pairs, batch 8
    python -m benchmarks.dpo_layouts --archs qwen2_vl --repeats 5

Each family's tiny checkpoint (training.model.tiny_archs) with its processor set to larger images: Idefics3 /
SmolVLM cut into tiles as the real checkpoints do (37 tiles), Qwen2-VL / 2.5-VL at a fixed pixel count (256 image
tokens). Data: the embedded world's first --pairs preference pairs (data/world, made when missing), as
benchmarks.dpo_speed takes them. Each layout runs one
forward and backward of the policy's per-response log-probs (training.dpo.forward.response_logps) over the same
batches, --repeats times alternating; the median run is reported. Printed per family: prompt and response tokens,
pairs/s of each layout, their ratio, and the largest difference between the two layouts' log-probs.

This times the model's work alone (no optimizer, no reference pass, no encoding); the whole stage against TRL is
benchmarks.dpo_speed, on LLaVA.
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("idefics3", "qwen2_vl", "qwen2_5_vl")


def larger_images(arch: str, processor) -> None:
    """Set a tiny family's processor to prompts of a few hundred image tokens."""
    ip = processor.image_processor
    if arch in ("idefics3", "smolvlm"):  # 192 px on the long side in 32 px tiles: 36 tiles + the whole image
        ip.do_image_splitting, ip.size, ip.max_image_size = True, {"longest_edge": 192}, {"longest_edge": 32}
    elif arch in ("qwen2_vl", "qwen2_5_vl"):  # 32 x 32 patches, merged 2 x 2: 256 tokens
        px = (16 * ip.patch_size * ip.merge_size) ** 2
        ip.size = {"shortest_edge": px, "longest_edge": px}


def run_family(arch: str, work: Path, data: Path, images: Path, batch: int, repeats: int) -> dict:
    import torch

    from training.config import LoraArgs, ModelArgs
    from training.data.images import load_image
    from training.data.records import Message
    from training.dpo.data import PREFIX_ARCHS, collate_groups, encode_group
    from training.dpo.forward import response_logps
    from training.model.builder import load_model_and_processor
    from training.model.tiny_archs import make_tiny_checkpoint

    if arch not in PREFIX_ARCHS:
        raise SystemExit(f"{arch}: the shared-prefix layout does not cover it (training/dpo/data.py: PREFIX_ARCHS)")
    path = make_tiny_checkpoint(arch, work / arch)
    model, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=str(path)), LoraArgs(),
                                                 for_training=False)
    larger_images(arch, proc)
    from training.templates.chat import ChatEncoder
    enc = ChatEncoder(proc, spec, 4096)
    items = []
    for i, r in enumerate(json.loads(data.read_text())):  # the world's rows: [human, gpt [chosen, rejected]]
        human, gpt = r["conversations"][0]["value"], r["conversations"][1]["value"]
        items.append(encode_group(enc, [Message("user", human)], list(gpt[:2]), [load_image(r["image"], str(images))],
                                  i))
    batches = [items[i:i + batch] for i in range(0, len(items) - batch + 1, batch)]
    params = [p.requires_grad_(True) for p in model.parameters()]
    pad = proc.tokenizer.pad_token_id

    def one_run(fast: bool) -> tuple[float, list]:
        sums, t0 = [], time.perf_counter()
        for b in batches:
            lp = response_logps(model, collate_groups(b, pad, spec.name, fast=fast)).sum
            torch.autograd.grad(lp.sum(), params, allow_unused=True)
            sums.append(lp.detach())
        return time.perf_counter() - t0, sums

    one_run(True), one_run(False)  # warm-up: first calls allocate
    times = {True: [], False: []}
    for _ in range(repeats):
        for fast in (True, False):
            t, sums = one_run(fast)
            times[fast].append(t)
            if fast:
                fast_sums = sums
            else:
                plain_sums = sums
    n = len(batches) * batch
    diff = max(float((a - b).abs().max()) for a, b in zip(fast_sums, plain_sums))
    fast_s, plain_s = st.median(times[True]), st.median(times[False])
    return {"arch": arch, "pairs": n, "prompt_tokens": st.mean(len(it.prompt_ids) for it in items),
            "response_tokens": st.mean(len(r) for it in items for r in it.responses),
            "fast_pairs_s": n / fast_s, "plain_pairs_s": n / plain_s, "ratio": plain_s / fast_s,
            "runs": [p / f for f, p in zip(times[True], times[False])], "max_logp_diff": diff}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="output/bench_dpo_layouts")
    a = p.parse_args(argv)
    import torch

    from benchmarks.dpo_speed import make_data
    torch.manual_seed(0)
    work = Path(a.work)
    data, images = make_data(work, a.pairs)
    out = []
    print("| family | prompt / response tokens | shared prefix pairs/s | plain pairs/s | ratio (each run) "
          "| largest log-prob difference |\n|---|---|---|---|---|---|")
    for arch in a.archs:
        r = run_family(arch, work, data, images, a.batch, a.repeats)
        out.append(r)
        runs = ", ".join(f"{x:.2f}x" for x in r["runs"])
        print(f"| {arch} | {r['prompt_tokens']:.0f} / {r['response_tokens']:.0f} | {r['fast_pairs_s']:.2f} | "
              f"{r['plain_pairs_s']:.2f} | **{r['ratio']:.2f}x** ({runs}) | {r['max_logp_diff']:.2e} |", flush=True)
    return out


if __name__ == "__main__":
    main()
