"""DPO speed: our DPO stage vs TRL's DPOTrainer on the same tiny LLaVA-shaped VLM, data and machine.

    python -m benchmarks.dpo_speed                       # 64 pairs, batch 8, 256 image tokens per prompt
    python -m benchmarks.dpo_speed --image_size 192      # 576 image tokens (LLaVA-1.5's count)

The VLM is the embedded tiny LLaVA with its plain CLIP-ViT tower (tower "vit"; + projector + Llama) at a
larger image size, so each prompt holds (image_size/8)^2 image tokens and each response tens of
tokens, as with LLaVA. Data: the embedded world's preference pairs. Each side runs in its own
process over --epochs epochs (sigmoid DPO, beta 0.1, AdamW, no gradient checkpointing, same precision,
whole batches: pairs past an epoch's last whole batch are left out on both sides):

  ours  training.dpo.main: reference log-probs precomputed once (counted in its time), image and
        prompt computed once per pair (shared-prefix layout), the last layer run whole only where
        logits are taken (training.dpo.last_layer), no reference model in memory, each
        sample tokenised and its image processed once (kept in memory for the epochs after the
        reference pass: --encoded_cache_mb; that memory is in its peak).
        On the CPU our stages keep freed tensor memory for reuse (training.engine.cpu_memory: glibc's
        mmap threshold at its maximum, no trimming), so batches do not fault their activations in
        anew; --trl_keep_freed_memory gives TRL the same setting.
  TRL   trl.DPOTrainer at its best available settings for a VLM: precompute_ref_log_probs raises
        for vision datasets and padding_free is disabled, so it runs a reference copy each step;
        gradient checkpointing off (its default is on: slower).

Printed for both: pairs/s over the run (ours including its reference pass), the part of that time spent encoding
the pairs (tokenising, image processing: ours once per pair, within its reference pass; TRL's collator, every batch), peak memory (CUDA:
max allocated; CPU: the process's peak RSS above its RSS before training), and the chosen/rejected
log-probs of the first batch (the first `batch` pairs of the file, at initialisation); then ratios.
Each side runs --repeats times (default 3), alternating ours / TRL, and the run with the median pairs/s
is the one reported (on a shared 2-core machine one run of either side varies by 10-20%); the ratio
of every pair of runs is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Memory:
    """Peak memory of the training phase: CUDA max allocated, else peak RSS above the RSS at start."""

    def __init__(self):
        import torch
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.base = _rss_mb()

    def peak_mb(self) -> float:
        import torch
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return _peak_rss_mb() - self.base


def build_bench_vlm(out: Path, image_size: int, hidden: int, layers: int) -> Path:
    """The tiny LLaVA at another image size: (image_size / 8)^2 image tokens per image."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    from training.model import tiny

    if (out / "config.json").exists():
        return out
    proc = tiny.build_processor()
    proc.image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    cfg = tiny.tiny_config(proc.tokenizer, hidden, layers, tower="vit", image_size=image_size)  # CLIP-shaped, as LLaVA
    cfg.text_config.max_position_embeddings = 4096
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    return out


def make_data(work: Path, n_pairs: int) -> tuple[Path, Path]:
    """The first n_pairs of the embedded world's preference pairs: data/world, made (or made again, as every stage
    makes it) when missing. A small world made here when data/world was missing held other scenes and shorter
    answers than the default's (20 response tokens against 28 and 32 for the first pair), so the figures depended on
    whether the main job had run in this checkout."""
    from training.world.generate import ensure_world

    world = ensure_world(ROOT / "data" / "world")
    rows = json.loads((world / "preference_train.json").read_text())[:n_pairs]
    if len(rows) < n_pairs:
        raise SystemExit(f"{world} holds {len(rows)} preference pairs, fewer than --pairs {n_pairs}")
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pairs.json"
    path.write_text(json.dumps(rows))
    return path, world / "images"


# ---- workers (each in its own process) ---------------------------------------------------------

def first_batch_ours(model_dir: Path, data: Path, images: Path, batch: int, precision: str) -> dict:
    import torch

    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset, collate_prefix
    from training.dpo.forward import response_logps
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(model_dir), precision=precision),
                                                 LoraArgs(), for_training=False)
    model.to(dev)
    ds = PreferenceDataset(read_preferences([str(data)], str(images)), ChatEncoder(proc, arch, 4096), str(images),
                           BadRowReport())
    with torch.no_grad():
        r = response_logps(model, collate_prefix([ds[i] for i in range(batch)], proc.tokenizer.pad_token_id,
                                                 arch.name).to(dev))
    return {"chosen": r.sum[:, 0].tolist(), "rejected": r.sum[:, 1].tolist(),
            "prompt_tokens": len(ds[0].prompt_ids), "response_tokens": [len(x) for x in ds[0].responses]}


def worker_ours(a) -> dict:
    from training.dpo.main import main

    fb = first_batch_ours(Path(a.model), Path(a.data), Path(a.images), a.batch, a.precision)
    out = Path(a.work) / "ours"
    ref_dir = out / f"ref_cache_{time.time_ns()}"  # fresh, so the reference pass is computed (and timed)
    mem = Memory()
    t0 = time.time()
    r = main(["--from_checkpoint", a.model, "--data_path", a.data, "--image_folder", a.images, "--output_dir",
              str(out), "--ref_cache_dir", str(ref_dir), "--max_seq_len", "4096",
              "--per_device_train_batch_size", str(a.batch),
              "--per_device_eval_batch_size", str(a.ref_batch or a.batch),
              "--num_train_epochs", str(a.epochs), "--learning_rate", "1e-5", "--lr_scheduler_type", "constant",
              "--num_warmup_steps", "0", "--logging_steps", "1", "--no-progress", "--precision", a.precision,
              "--figure_dir", str(out / "figure"), "--max_grad_norm", "1.0", "--sft_weight", "0"])  # plain sigmoid DPO, as TRL
    total = time.time() - t0
    shutil.rmtree(ref_dir, ignore_errors=True)
    t = r["timings"]
    n = sum(h["pairs"] for h in r["history"])
    return {"pairs": n, "seconds": t["reference_s"] + t["train_s"], "reference_s": t["reference_s"],
            "train_s": t["train_s"], "encode_s": t["encode_s"], "wall_incl_save_s": total, "peak_mb": mem.peak_mb(),
            "first_batch": fb}


def trl_config(a, cuda: bool):
    """TRL's settings, ours where both have them. Whole batches only (dataloader_drop_last), as our stages train
    (training.engine.loop.StepPlan): both sides take the same optimizer steps over the same pairs, and TRL's
    pairs are its steps x batch."""
    from trl import DPOConfig

    return DPOConfig(output_dir=str(Path(a.work) / "trl"), per_device_train_batch_size=a.batch,
                     num_train_epochs=a.epochs, learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1,
                     loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to=[], max_length=None,
                     gradient_checkpointing=False, bf16=a.precision == "bf16", use_cpu=not cuda,
                     dataloader_num_workers=0, dataloader_drop_last=True, seed=1234, disable_tqdm=True,
                     max_grad_norm=1.0)


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOTrainer

    from training.data.images import load_image

    rows = json.loads(Path(a.data).read_text())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.precision]
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=dtype, use_safetensors=True)
    proc = AutoProcessor.from_pretrained(a.model)

    def example(r):
        q = r["conversations"][0]["value"].replace("<image>\n", "")
        chosen, rejected = r["conversations"][1]["value"][:2]
        return {"images": [load_image(r["image"], a.images)],  # inside the image root, as our stages read it
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    ds = Dataset.from_list([example(r) for r in rows])
    trainer = DPOTrainer(model=model, args=trl_config(a, torch.cuda.is_available()), train_dataset=ds,
                         processing_class=proc)

    # first batch: TRL's own collator and loss code on the first `batch` pairs of the file, at initialisation
    gathered = []
    gather = trainer.accelerator.gather
    trainer.accelerator.gather = lambda x: (gathered.append(x.detach().float().cpu()), gather(x))[1]
    inputs = trainer.data_collator([ds[i] for i in range(a.batch)])
    inputs = trainer._prepare_inputs(inputs)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    trainer.accelerator.gather = gather
    chosen, rejected = gathered[-2], gathered[-1]  # logps/chosen, logps/rejected are gathered last
    cm = inputs["completion_mask"]
    fb = {"chosen": chosen.tolist(), "rejected": rejected.tolist(),
          "prompt_tokens": int((inputs["attention_mask"][0] - cm[0]).sum()),
          "response_tokens": [int(cm[0].sum()), int(cm[a.batch].sum())]}
    for m in trainer._metrics.values():
        m.clear()

    collate, encode = trainer.data_collator, [0.0]  # its tokenising and image processing, timed (in-process)

    def timed_collate(examples):
        t = time.perf_counter()
        try:
            return collate(examples)
        finally:
            encode[0] += time.perf_counter() - t
    trainer.data_collator = timed_collate  # the train dataloader reads it when train() builds it
    mem = Memory()
    t0 = time.time()
    out = trainer.train()
    seconds = time.time() - t0
    return {"pairs": out.global_step * a.batch, "seconds": seconds, "encode_s": encode[0], "peak_mb": mem.peak_mb(),
            "first_batch": fb}


# ---- driver ------------------------------------------------------------------------------------

def run_worker(kind: str, a, model: Path, data: Path, images: Path, work: Path) -> dict:
    out = work / f"{kind}.json"
    cmd = [sys.executable, "-m", "benchmarks.dpo_speed", "--worker", kind, "--model", str(model), "--data",
           str(data), "--images", str(images), "--work", str(work), "--batch", str(a.batch), "--epochs", str(a.epochs),
           "--ref_batch", str(a.ref_batch),
           "--precision",
           a.precision, "--result", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kind == "trl" and a.trl_keep_freed_memory:  # glibc's environment form of training.engine.cpu_memory's mallopt
        from training.engine.cpu_memory import MMAP_THRESHOLD_MAX, TRIM_OFF
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_MAX), MALLOC_TRIM_THRESHOLD_=str(TRIM_OFF))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def median_run(runs: list[dict]) -> dict:
    """The run with the median pairs/s (its own seconds, memory and first batch)."""
    return sorted(runs, key=lambda r: r["pairs"] / r["seconds"])[len(runs) // 2]


def madd_bound(model_dir: Path, prompt: int, responses: list[int]) -> tuple[float, float, float]:
    """The one-epoch ratio of multiply-adds per pair, TRL / ours, from parameter counts (attention's
    quadratic part aside) -> (whole model, whole model from sharing the prompt alone, language model from sharing
    alone). Both sides run the policy forward and backward and one reference forward per pair. TRL: the image
    through the vision tower and projector twice, 2(P+R) tokens through the language model and its head. Ours: the
    image once, P+2R tokens through the language model, the head on the 2R response tokens only, and the last layer
    (training.dpo.last_layer) whole on the 2R+1 live tokens alone, its key and value projections on all P+2R."""
    import math
    import re

    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())["vision_config"]
    n_patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    size = {"vision": 0, "projector": 0, "lm": 0, "head": 0, None: 0}
    layers: dict[int, dict[str, int]] = {}  # the language model's layers: key/value projections, the rest
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            part = ("vision" if "vision_tower" in k else "projector" if "multi_modal_projector" in k
                    else "head" if "lm_head" in k else None if "embed_tokens" in k else "lm")  # embeddings: lookups
            n = math.prod(f.get_slice(k).get_shape())
            size[part] += n
            layer = re.search(r"language_model\.(?:model\.)?layers\.(\d+)\.", k)
            if part == "lm" and layer:
                kv = "kv" if re.search(r"self_attn\.[kv]_proj\.", k) else "rest"
                layers.setdefault(int(layer[1]), {"kv": 0, "rest": 0})[kv] += n
    p, r = prompt, sum(responses)
    image = size["vision"] * (n_patches + 1) + size["projector"] * n_patches  # +1: the class token
    trl = 2 * image + (size["lm"] + size["head"]) * (2 * p + r)
    shared = image + size["lm"] * (p + r) + size["head"] * r
    last = layers[max(layers)]["rest"] if layers else 0
    ours = shared - last * (p - 1)  # the last layer's rest on the live tokens alone: p + r - (r + 1)
    return trl / ours, trl / shared, (2 * p + r) / (p + r)


def report(ours: dict, trl: dict, model: Path) -> str:
    import statistics as st

    lines = []
    fb_o, fb_t = ours["first_batch"], trl["first_batch"]
    for name, r in (("ours", ours), ("TRL", trl)):
        fb = r["first_batch"]
        lines.append(f"{name:5s} pairs/s {r['pairs'] / r['seconds']:8.2f}  ({r['pairs']} pairs in {r['seconds']:.1f} s"
                     + (f"; reference pass {r['reference_s']:.1f} s" if "reference_s" in r else "")
                     + (f"; encoding {r['encode_s']:.2f} s" if r.get("encode_s") is not None else "")
                     + f")  peak memory {r['peak_mb']:8.1f} MiB  first batch logps chosen "
                     f"{st.mean(fb['chosen']):.4f} rejected {st.mean(fb['rejected']):.4f}")
    dc = max(abs(x - y) for x, y in zip(fb_o["chosen"], fb_t["chosen"]))
    dr = max(abs(x - y) for x, y in zip(fb_o["rejected"], fb_t["rejected"]))
    speed = (ours["pairs"] / ours["seconds"]) / (trl["pairs"] / trl["seconds"])
    lines.append(f"ratios: pairs/s ours/TRL {speed:.2f}x   peak memory ours/TRL {ours['peak_mb'] / trl['peak_mb']:.2f}"
                 f"   first-batch per-pair |logp diff| max chosen {dc:.2e} rejected {dr:.2e}")
    lines.append(f"tokens per pair: prompt {fb_o['prompt_tokens']} (ours) / {fb_t['prompt_tokens']} (TRL), "
                 f"responses {fb_o['response_tokens']} / {fb_t['response_tokens']}")
    whole, shared, lm = madd_bound(model, fb_o["prompt_tokens"], fb_o["response_tokens"])
    lines.append(f"one-epoch bound (multiply-adds per pair, TRL / ours, first pair's tokens, attention's quadratic "
                 f"part aside): {whole:.2f}x; from sharing the prompt alone {shared:.2f}x ({lm:.2f}x in the language "
                 f"model), the rest from the last layer on the live tokens alone")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ref_batch", type=int, default=0, help="pairs per batch of our reference pass "
                   "(--per_device_eval_batch_size; TRL, which runs its reference every step, has none; 0: --batch)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the pairs (ours computes the reference "
                                                          "log-probs once, before the first)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the median run is reported")
    p.add_argument("--image_size", type=int, default=128, help="(image_size/8)^2 image tokens per prompt")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--precision", default="", help="fp32 | bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--work", default="output/bench_dpo")
    p.add_argument("--trl_keep_freed_memory", action="store_true",
                   help="run TRL with the malloc settings our stages apply on the CPU (training.engine.cpu_memory), "
                        "through glibc's environment variables: what the setting alone is worth to TRL")
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.precision = a.precision or ("bf16" if _cuda() else "fp32")
    if a.worker:
        res = (worker_ours if a.worker == "ours" else worker_trl)(a)
        Path(a.result).write_text(json.dumps(res))
        return res
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_bench_vlm(work / f"vlm_{a.image_size}_{a.hidden}_{a.layers}", a.image_size, a.hidden, a.layers)
    data, images = make_data(work, a.pairs)
    runs = {"ours": [], "trl": []}
    for r in range(a.repeats):  # alternating, so a slow spell of the machine hits both sides
        for kind in ("ours", "trl"):
            if a.only in (None, kind):
                runs[kind].append(run_worker(kind, a, model, data, images, work))
                print(kind, r + 1, json.dumps({k: v for k, v in runs[kind][-1].items() if k != "first_batch"}),
                      flush=True)
    res = {k: median_run(v) for k, v in runs.items() if v}
    if len(res) == 2:
        text = report(res["ours"], res["trl"], model)
        if a.repeats > 1:
            each = [(o["pairs"] / o["seconds"]) / (t["pairs"] / t["seconds"]) for o, t in zip(runs["ours"], runs["trl"])]
            text += ("\nmedian of " + str(a.repeats) + " alternating runs per side; ratio of each pair of runs: "
                     + ", ".join(f"{x:.2f}x" for x in each))
        print(f"\nDPO speed, {a.pairs} pairs x {a.epochs} epoch(s), batch {a.batch}, {(a.image_size // 8) ** 2} image "
              f"tokens per prompt, "
              f"hidden {a.hidden}, {a.layers} layers, {a.precision}, {'CUDA' if _cuda() else 'CPU'}:\n{text}")
        (work / "result.txt").write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
