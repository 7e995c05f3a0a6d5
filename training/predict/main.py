"""Answer a question file with a model: JSONL of question_id, image, prompt, text, model_id.

    bash run_predict.sh --model_path output/sft --data_path data/world/bench_objhal.jsonl

Batched; an interrupted run resumes: question_ids already in --output_file are not generated again.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_path", required=True, help="question file (JSONL/JSON/parquet; LLaVA-style fields)")
    p.add_argument("--image_folder", default="", help="image root (default: images/ beside the data file)")
    p.add_argument("--output_file", default="", help="default: <model_path>/predictions/<data name>.jsonl")
    p.add_argument("--model_id", default="", help="recorded in every answer (default: the model path)")
    p.add_argument("--model_architecture", default="auto")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_seq_len", type=int, default=2048)
    p.add_argument("--skip_bad_rows", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def default_image_folder(data_path: str) -> str:
    cand = Path(data_path).parent / "images"
    return str(cand) if cand.is_dir() else str(Path(data_path).parent)


def predict(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_prompts
    from training.data.images import load_image
    from training.model.builder import load_model_and_processor
    from training.predict.generate import DecodeArgs, generate_batch
    from training.templates.chat import ChatEncoder

    torch.manual_seed(args.seed)
    image_root = args.image_folder or default_image_folder(args.data_path)
    out = Path(args.output_file or Path(args.model_path) / "predictions" / (Path(args.data_path).stem + ".jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["question_id"] for line in out.read_text().splitlines() if line.strip()}
    report = BadRowReport(skip=args.skip_bad_rows)
    records = [r for r in read_prompts([args.data_path], image_root, report) if _qid(r) not in done]
    model, processor, arch = load_model_and_processor(
        ModelArgs(from_checkpoint=args.model_path, model_architecture=args.model_architecture), LoraArgs(),
        for_training=False)
    model.eval()
    encoder = ChatEncoder(processor, arch, args.max_seq_len)
    decode = DecodeArgs(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams)
    model_id = args.model_id or args.model_path
    bar = tqdm(total=len(records) + len(done), initial=len(done), desc="predict", disable=not args.progress)
    with out.open("a") as f:
        for i in range(0, len(records), args.batch_size):
            chunk = records[i:i + args.batch_size]
            images = [[load_image(s, image_root) for s in r.images] for r in chunk]
            texts = generate_batch(model, processor, encoder, arch.name, [r.prompt for r in chunk], images, decode)
            for r, t in zip(chunk, texts):
                f.write(json.dumps({"question_id": _qid(r), "image": r.images[0] if r.images and isinstance(r.images[0], str) else None,
                                    "prompt": r.prompt[-1].content, "text": t[0], "model_id": model_id}) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    if report.skipped:
        report.write(out.parent, out.stem + ".bad_rows.json")
    return out


def _qid(r) -> str:
    return str(r.meta.get("question_id", r.id))


def main(argv=None) -> Path:
    return predict(parse(argv))


if __name__ == "__main__":
    print(main())
