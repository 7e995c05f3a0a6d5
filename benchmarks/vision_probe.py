"""How fast can the tiny VLM's vision tower learn the embedded world on its own?

    python -m benchmarks.vision_probe [--lr 1e-3 --hidden 128 --layers 2 --patch 8 --steps 2000]

Trains the same CLIP-ViT configuration as the tiny VLM (from scratch) plus a linear head to say
which shape kinds are present (6 binary labels) on the world's SFT scenes, and prints the held-out
per-kind accuracy every 500 steps. Always answering "absent" scores 0.672 on the default held-out split.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="data/world")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from training.world.scenes import IMAGE_SIZE, KINDS

    scenes = json.loads(open(f"{a.world}/world.json").read())["scenes"]

    def load(split):
        x = [np.asarray(Image.open(f"{a.world}/images/{s['id']}.png"), dtype=np.float32) / 127.5 - 1 for s in scenes[split]]
        y = [[float(any(o["kind"] == k for o in s["objects"])) for k in KINDS] for s in scenes[split]]
        return torch.tensor(np.stack(x)).permute(0, 3, 1, 2), torch.tensor(y)

    xtr, ytr = load("sft")
    xte, yte = load("heldout")
    torch.manual_seed(0)
    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 2, num_attention_heads=4,
                                           num_hidden_layers=a.layers, image_size=IMAGE_SIZE, patch_size=a.patch))
    head = torch.nn.Linear(a.hidden, len(KINDS))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=a.lr)

    def logits(x):
        return head(vit(pixel_values=x).last_hidden_state[:, 1:].mean(1))

    t0, acc = time.time(), 0.0
    for step in range(a.steps + 1):
        if step % 500 == 0:
            with torch.no_grad():
                acc = float(((logits(xte) > 0).float() == yte).float().mean())
            print(f"step {step} ({time.time() - t0:.0f}s): held-out per-kind presence accuracy {acc:.3f}", flush=True)
        if step == a.steps:
            break
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 200)
        idx = torch.randint(0, len(xtr), (a.batch,))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return acc


if __name__ == "__main__":
    main()
