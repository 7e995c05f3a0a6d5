"""PPO rollout throughput: one batched, KV-cached generate call vs one prompt at a time.

    python -m benchmarks.rollout_speed [--model output/sft] [--n 32] [--max_new_tokens 40]
"""
from __future__ import annotations

import argparse
import time

from training.model.builder import add_inference_args


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default="output/sft")
    p.add_argument("--data", default="data/world/ppo_prompts.json")
    p.add_argument("--image_folder", default="data/world/images")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=40)
    add_inference_args(p)
    a = p.parse_args(argv)
    import torch

    from training.config import LoraArgs, ModelArgs
    from training.data.formats import read_prompts
    from training.data.images import load_image
    from training.model.builder import inference_device, load_model_and_processor
    from training.ppo.rollout import generate_rollouts
    from training.predict.generate import DecodeArgs
    from training.templates.chat import ChatEncoder

    device, precision = inference_device(a.device, a.precision)
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=a.model, precision=precision), LoraArgs(),
                                                 for_training=False)
    model.to(device)
    recs = read_prompts([a.data], a.image_folder)[:a.n]
    n = len(recs)  # a file of fewer prompts than --n: all of them
    imgs = [[load_image(s, a.image_folder) for s in r.images] for r in recs]
    enc = ChatEncoder(proc, arch, 512)
    dec = DecodeArgs(max_new_tokens=a.max_new_tokens, do_sample=True)
    out = {}
    for name, chunk in (("batched", n), ("one_at_a_time", 1)):
        torch.manual_seed(0)
        t0, tokens = time.time(), 0
        for i in range(0, n, chunk):
            ro = generate_rollouts(model, proc, enc, arch.name, [r.prompt for r in recs[i:i + chunk]],
                                   imgs[i:i + chunk], dec, torch.device(device))
            tokens += int(ro.lengths.sum())
        out[name] = tokens / (time.time() - t0)
        print(f"{name}: {n} prompts, {tokens} tokens, {out[name]:.0f} tokens/s", flush=True)
    print(f"batched / one-at-a-time: {out['batched'] / out['one_at_a_time']:.1f}x")
    return out


if __name__ == "__main__":
    main()
