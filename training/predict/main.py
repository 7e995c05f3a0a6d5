"""Answer a question file with a model: JSONL of question_id, image, prompt, text, model_id.

    bash run_predict.sh --model_path output/sft --data_path data/world/bench_objhal.jsonl
    bash run_predict.sh ... --best_of_n 8 --reward_model output/rm   # sample 8, keep the RM's best
    bash run_predict.sh ... --best_of_n 8 --reward_model R --captions_file image_to_caption.json  # LLaVA-RLHF's

Batched; an interrupted run resumes: question_ids already in --output_file are not generated again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from training.data.images import is_base64_text
from training.data.records import IMAGE_PLACEHOLDER
from training.files import check_settings, file_sha256, locked
from training.model.builder import add_inference_args


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
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
    p.add_argument("--best_of_n", type=int, default=1,
                   help="sample N answers per question (--temperature, --top_p) and keep the one --reward_model "
                        "scores highest; a factual reward model gets the questions' facts when they have them")
    p.add_argument("--reward_model", default="", help="reward model checkpoint (run_rm_training.sh); without "
                                                     "--best_of_n it only records each answer's reward")
    p.add_argument("--captions_file", default="",
                   help="LLaVA-RLHF image_to_caption.json (image -> captions) for a factual --reward_model trained "
                        "with it: each question's captions, and a multiple-choice question's correct answer, are its "
                        "facts, as PPO's --captions_file gives them (conversations rows; a question whose image has "
                        "none is a bad row)")
    p.add_argument("--rm_batch_size", type=int, default=32, help="sequences per reward-model forward pass")
    p.add_argument("--num_chunks", type=int, default=1,
                   help="answer every num_chunks-th question (from --chunk_idx) only: processes answering the "
                        "chunks of one file (NUM_GPUS=N bash run_predict.sh starts one per GPU) append to the same "
                        "--output_file, each batch under a file lock")
    p.add_argument("--chunk_idx", type=int, default=0, help="which chunk, 0 .. num_chunks-1")
    add_inference_args(p)
    args = p.parse_args(argv)
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        p.error(f"--chunk_idx {args.chunk_idx} of --num_chunks {args.num_chunks}: need 0 <= chunk_idx < num_chunks")
    if args.captions_file and not args.reward_model:
        p.error("--captions_file gives a reward model its factual block: it needs --reward_model PATH")
    if args.captions_file and not Path(args.captions_file).is_file():
        p.error(f"--captions_file {args.captions_file}: no such file")
    from training.rm.model import refuse_non_reward_model
    refuse_non_reward_model(args.reward_model, "reward_model")
    from training.config import seed_problem
    if seed_problem(args.seed):
        p.error(seed_problem(args.seed))
    for name in ("batch_size", "rm_batch_size", "max_new_tokens", "num_beams", "max_seq_len", "best_of_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: need 1 or more")
    if args.do_sample or args.best_of_n > 1:  # what sampling reads
        if not 0 < args.temperature < math.inf:  # inf: logits / inf made every answer one repeated word
            p.error(f"--temperature {args.temperature}: sampling needs a finite temperature above 0 (greedy: no "
                    "--do_sample)")
        if not 0 < args.top_p <= 1:
            p.error(f"--top_p {args.top_p}: need 0 < top_p <= 1")
    return args


def default_image_folder(data_path: str) -> str:
    cand = Path(data_path).parent / "images"
    return str(cand) if cand.is_dir() else str(Path(data_path).parent)


def drop_unfinished_line(out: Path) -> bytes:
    """The answers file's contents without a last line cut short (a process stopped while writing a batch), which
    is removed from the file: its question is answered again, and another chunk's process does not append after it.
    Call under `locked`."""
    data = out.read_bytes() if out.exists() else b""
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{out}: removing an unfinished last line ({len(data) - end} bytes) left by an interrupted run")
        with out.open("r+b") as f:
            f.truncate(end)
    return data[:end]


def ends_whole(out: Path) -> bool:
    """Whether the answers file is empty or ends with a whole line (reads its last byte only)."""
    with out.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def answered(out: Path) -> dict[str, dict]:
    """question_id -> answer row already in an answers file (`drop_unfinished_line` first); an unreadable line is
    an error."""
    if not out.exists():
        return {}
    done = {}
    for n, line in enumerate(drop_unfinished_line(out).decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                done[str(row["question_id"])] = row
            except (ValueError, KeyError, TypeError) as err:
                raise SystemExit(f"{out}, line {n}: not an answer row with a question_id ({err!r}); move the file "
                                 "away or fix the line to resume") from None
    return done


def run_settings(args, device: str, precision: str, image_root: str) -> dict:
    """What an answer depends on (not the batch size, the progress bar or the output file)."""
    from training.model.fingerprint import model_fingerprint
    return {"model_path": str(args.model_path), "model_fingerprint": model_fingerprint(args.model_path),
            "data_path": str(Path(args.data_path).resolve()), "image_folder": str(image_root),
            "decoding": {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                         "temperature": args.temperature, "top_p": args.top_p, "num_beams": args.num_beams,
                         "seed": args.seed},
            "best_of_n": args.best_of_n, "reward_model": str(args.reward_model),
            "captions_file": str(Path(args.captions_file).resolve()) if args.captions_file else None,
            "captions_fingerprint": file_sha256(args.captions_file)[:16] if args.captions_file else None,
            "reward_model_fingerprint": model_fingerprint(args.reward_model) if args.reward_model else None,
            "max_seq_len": args.max_seq_len, "model_architecture": args.model_architecture,
            "device": device.split(":")[0], "precision": precision, "model_id": args.model_id}


def answer_row(r, text: str, model_id: str) -> dict:
    """question_id, image_id (when the question has one), image (a path; not base64 pictures), prompt
    (the question text alone, without the image placeholders, as LLaVA's model_vqa writes it), text, model_id."""
    row = {"question_id": _qid(r)}
    if r.meta.get("image_id") is not None:
        row["image_id"] = r.meta["image_id"]
    src = r.images[0] if r.images else None
    row["image"] = src if isinstance(src, str) and not is_base64_text(src) else None
    prompt = r.prompt[-1].content.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
    return {**row, "prompt": prompt, "text": text, "model_id": model_id}


def changed_questions(records, done: dict[str, dict]) -> list[str]:
    """question_ids answered in the file for another prompt or image than the question file holds now (the
    settings record names the question file, not what it asks): resuming would keep those answers."""
    out = []
    for r in records:
        row = done.get(_qid(r))
        if row is not None:
            now = answer_row(r, "", "")
            if any(k in row and row[k] != now[k] for k in ("prompt", "image")):
                out.append(_qid(r))
    return out


def unique_ids(records) -> None:
    """Answers are keyed by question_id: two questions with one id would write rows that read_answers refuses,
    and a resumed run would skip the second as answered."""
    seen = {}
    for r in records:
        qid = _qid(r)
        if qid in seen:
            raise SystemExit(f"{seen[qid]} and {r.source}: both have question_id {qid!r}; give every question its "
                             "own question_id (a question file's rows without one are numbered by row: answer "
                             "such files one at a time)")
        seen[qid] = r.source


def fitting(chunk: list, images: list, encoder, report, prompt=lambda r: r.prompt,
            where=lambda r: (r.source, r.prompt_field)) -> tuple[list, list, list]:
    """(records, their images, their encoded prompts) of a batch, without the questions whose prompt does not
    fit max_seq_len: each is a bad row of `report` naming its file, row and text field (an error, or with
    --skip_bad_rows skipped and counted). prompt(r), where(r): a record's messages and its (source, field)."""
    from training.predict.generate import encode_prompts
    from training.templates.chat import RowNotEncodable

    kept = []
    for r, im in zip(chunk, images):
        try:
            kept.append((r, im, encode_prompts(encoder, [prompt(r)], [im])[0]))
        except RowNotEncodable as err:
            report.bad(*where(r), str(err))
    return tuple(map(list, zip(*kept))) if kept else ([], [], [])


def rewarded(chunk: list, rows: list[dict], rewards, n: int, report, scorer) -> tuple[list[dict], int]:
    """(the answer rows with reward, best_of_n and n_scored, the number of sampled answers not scored).
    rewards: (B, n), NaN where the reward model could not read an answer whole within its max_seq_len (see
    `RewardScorer.score`): the best is chosen among the others, and n_scored says how many there were. A
    question none of whose answers fits is a bad row of `report` naming its file, row and text field; but with one
    answer (n 1: the reward only recorded) the answer is kept, with reward null and n_scored 0."""
    out, unscored = [], 0
    for r, row, rs in zip(chunk, rows, rewards):
        m = int((~rs.isnan()).sum())
        unscored += n - m
        if m == 0 and n == 1:  # a greedy answer to record a reward of: the answer stands without it
            out.append({**row, "reward": None, "best_of_n": n, "n_scored": 0})
            continue
        if m == 0:
            what = "image, prompt, answer" + (" and factual block" if scorer.factual else "")
            report.bad(r.source, r.prompt_field, f"none of its {n} sampled answer(s) fits the reward model whole "
                                                 f"({what}) within max_seq_len={scorer.encoder.max_seq_len}: raise "
                                                 "--max_seq_len")
            continue
        out.append({**row, "reward": float(rs.nan_to_num(float("-inf")).max()), "best_of_n": n, "n_scored": m})
    return out, unscored


def predict(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_prompts
    from training.data.images import load_image
    from training.model.builder import inference_device, load_model_and_processor
    from training.predict.generate import DecodeArgs, best_of_n, generate_batch, sample_seed
    from training.templates.chat import ChatEncoder

    if args.best_of_n > 1 and not args.reward_model:
        raise SystemExit("--best_of_n needs --reward_model PATH (a checkpoint from run_rm_training.sh)")
    torch.manual_seed(args.seed)  # (what loading may draw; each batch's samples are seeded below)
    image_root = args.image_folder or default_image_folder(args.data_path)
    out = Path(args.output_file or Path(args.model_path) / "predictions" / (Path(args.data_path).stem + ".jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    device, precision = inference_device(args.device, args.precision)
    with locked(out):  # another chunk's process may be writing a batch: never read (or cut) half of it
        done = answered(out)
        check_settings(out, done, run_settings(args, device, precision, image_root))
    report = BadRowReport(skip=args.skip_bad_rows)
    records = read_prompts([args.data_path], image_root, report, args.captions_file or None)
    if args.captions_file:
        records = _with_captions(records, args.reward_model, report)
    if args.chunk_idx > 0:  # rows unreadable in the file are every chunk's finding: chunk 0 reports them
        report.skipped.clear()
    unique_ids(records)
    stale = changed_questions(records, done)
    if stale:
        raise SystemExit(f"{out} holds answers to {len(stale)} question(s) that {args.data_path} now asks otherwise "
                         f"(another prompt or image; first: {stale[0]!r}): pass another --output_file, or delete the "
                         "file to answer again")
    # chunks of the whole file, then what is answered: every process takes the same share whenever it starts
    mine = records[args.chunk_idx::args.num_chunks]
    place = {_qid(r): k for k, r in enumerate(records)}  # a question's place in the file: what its samples' seed names
    todo = [r for r in mine if _qid(r) not in done]
    if not todo:  # a rerun after every question was answered: no model to load (minutes for a 7B one)
        print(f"{out}: every question of this share of {args.data_path} is answered")
        if report.skipped:
            report.write(out.parent, f"{out.stem}.bad_rows{_chunk_tag(args)}.json")
        return out
    model, processor, arch = load_model_and_processor(
        ModelArgs(from_checkpoint=args.model_path, model_architecture=args.model_architecture, precision=precision),
        LoraArgs(), for_training=False)
    model.to(device).eval()
    encoder = ChatEncoder(processor, arch, args.max_seq_len)
    decode = DecodeArgs(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams)
    scorer = _scorer(args, records, device, precision) if args.reward_model else None  # the whole file's questions
    model_id = args.model_id or args.model_path
    what = f"predict {args.chunk_idx + 1}/{args.num_chunks}" if args.num_chunks > 1 else "predict"
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=what, disable=not args.progress)
    unscored = 0
    with out.open("a") as f:
        for i in range(0, len(mine), args.batch_size):  # the batches of an uninterrupted run, less what is answered
            chunk = [r for r in mine[i:i + args.batch_size] if _qid(r) not in done]
            if not chunk:
                continue
            # each question's samples are drawn from a generator of its own, seeded by --seed and its place in the
            # file (generate_batch's seeds): whatever the batch size, chunks or resumption, the same samples. Beam
            # search with sampling draws from torch's generator, seeded by where the batch's first question stands
            torch.manual_seed(args.seed * 1_000_003 + args.chunk_idx + i * args.num_chunks)
            images = [[load_image(s, image_root) for s in r.images] for r in chunk]
            n = len(chunk)
            chunk, images, encoded = fitting(chunk, images, encoder, report)
            bar.update(n - len(chunk))  # questions skipped as bad rows
            if not chunk:
                continue
            prompts = [r.prompt for r in chunk]
            seeds = [sample_seed(args.seed, place[_qid(r)]) for r in chunk]
            facts = [r.facts for r in chunk] if scorer is not None and scorer.factual else None
            rewards = None
            if args.best_of_n > 1:
                texts, _, rewards = best_of_n(model, processor, encoder, arch.name, prompts, images, decode,
                                              args.best_of_n, scorer, facts, device, encoded, seeds)
            else:
                texts = [t[0] for t in generate_batch(model, processor, encoder, arch.name, prompts, images, decode,
                                                      device, encoded, seeds)]
                if scorer is not None:
                    rewards = scorer.score(prompts, images, texts, facts)[:, None]
            rows = [answer_row(r, t, model_id) for r, t in zip(chunk, texts)]
            if rewards is not None:
                rows, k = rewarded(chunk, rows, rewards, args.best_of_n, report, scorer)
                unscored += k
            with locked(out):
                if not ends_whole(out):  # another chunk's process died mid-batch: append after whole lines only
                    drop_unfinished_line(out)
                f.write("".join(json.dumps(row) + "\n" for row in rows))  # a batch at once; a cut one is redone
                f.flush()
            bar.update(len(chunk))
    bar.close()
    if unscored:
        print(f"{unscored} answers did not fit the reward model's max_seq_len={args.max_seq_len} whole and were not "
              "scored; " + ("each kept with reward null" if args.best_of_n == 1 else
                            "each question's answer was chosen among the rest") + f" ('n_scored' in {out})")
    if report.skipped:
        report.write(out.parent, f"{out.stem}.bad_rows{_chunk_tag(args)}.json")
    return out


def _chunk_tag(args) -> str:
    return f".chunk{args.chunk_idx}of{args.num_chunks}" if args.num_chunks > 1 else ""


def _with_captions(records, reward_model: str, report) -> list:
    """Questions read with a captions file: for a factual reward model, each one without facts (no image, so no
    caption, and no correct answer) is a bad row of `report`, as in PPO, rather than every question being scored
    without the factual block; a reward model that is not factual reads no facts, and a note says so."""
    from training.rm.factual import with_facts
    from training.rm.model import reward_model_info

    if reward_model_info(reward_model).get("factual", False):
        return with_facts(records, report)
    print(f"note: {reward_model} is not a factual reward model: it reads no captions (--captions_file unused)")
    return records


def _scorer(args, records, device: str, precision: str):
    """The reward model as a scorer; factual models get facts only when every question of the file has them (not
    only those left to answer: a resumed run, or each chunk's process, scores as one uninterrupted run)."""
    from training.config import ModelArgs
    from training.rm.data import RewardScorer, missing_facts_note
    from training.rm.model import load_reward_model

    rm, rm_processor, rm_arch = load_reward_model(args.reward_model, ModelArgs(precision=precision))
    rm.to(device)
    note = missing_facts_note(records, rm.factual)
    if note:
        print(note)
    return RewardScorer(rm, rm_processor, rm_arch, args.max_seq_len, args.rm_batch_size, device=device,
                        factual=rm.factual and not note, skip_unfit=True)


def _qid(r) -> str:
    """The question's question_id, else its record id (a question file's id or row index: an empty question_id
    counts as none, as `training.data.prompt_formats.question_id` and the benchmarks' scoring read it)."""
    qid = r.meta.get("question_id")
    return str(qid if qid is not None else r.id)


def main(argv=None) -> Path:
    return predict(parse(argv))


if __name__ == "__main__":
    print(main())
