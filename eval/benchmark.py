"""Generate answers to a benchmark with a model, score them as the benchmark's paper does, and
write one results JSON per run.

    python -m eval.benchmark --benchmark pope --model_path output/dpo --data POPE/output/coco \\
        --image_folder coco/val2014
    bash run_predict.sh --benchmark mmhal --model_path output/dpo --data mmhal/response_template.json \\
        --image_folder mmhal/images --judge_url https://api.openai.com/v1 --judge_api_key_env OPENAI_API_KEY

Benchmarks (--data is what the user downloaded; nothing is downloaded here):
  objhal       Object HalBench question file (image base64, question, image_id) + COCO annotations
  pope         POPE folder with coco_pope_{random,popular,adversarial}.json
  amber        AMBER's data/ folder (annotations.json, relation.json, safe_words.txt, query/)
  mmhal        MMHal-Bench response_template.json (+ images in --image_folder)
  llava_bench  llava-bench-in-the-wild folder (questions.jsonl, answers_gpt4.jsonl, context.jsonl, images/)
  embedded     the embedded world's held-out benchmarks (default data/world)

Decoding defaults follow each paper (objhal: 3 beams, 1024 tokens; others greedy); every option
overrides. Answers go to <output_dir>/predictions/ and resume when interrupted; --answers scores
existing answer files instead. The results file <output_dir>/eval_<benchmark>[_<run_name>].json
records model, decoding, dataset files with their sha256 (and --dataset_version), the judge model,
URL and decoding, and the metrics; per-question records go to a .per_question.jsonl beside it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
from pathlib import Path

from eval.answers import (answers_model_ids, check_complete, check_same_questions, file_digest, generate,
                          predict_flags, read_answers, unique_questions)
from eval.judge import add_judge_args, judge_decoding, judge_from_args
from training.model.builder import add_inference_args

MODULES = {"objhal": "eval.chair", "pope": "eval.pope", "amber": "eval.amber", "mmhal": "eval.mmhal",
           "llava_bench": "eval.llava_bench", "embedded": "eval.embedded"}


def module(name: str):
    return importlib.import_module(MODULES[name])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--benchmark", required=True, choices=list(MODULES))
    p.add_argument("--model_path", default="", help="checkpoint to generate with (not needed with --answers)")
    p.add_argument("--model_name", default="", help="label in tables (default: the model folder's name)")
    p.add_argument("--data", default="", help="the benchmark's published file or folder")
    p.add_argument("--image_folder", default="", help="image root; image paths must resolve inside it "
                                                      "(default: <data>/images, else the data folder)")
    p.add_argument("--output_dir", default="", help="default: --model_path")
    p.add_argument("--run_name", default="", help="suffix for answer and results files (one per decoding setup)")
    p.add_argument("--answers", nargs="*", default=None, metavar="[SPLIT=]FILE",
                   help="score these answer files, no generation (predict JSONL, AMBER or MMHal JSON)")
    p.add_argument("--restart_answers", action="store_true",
                   help="regenerate answers made with another model / decoding instead of stopping")
    p.add_argument("--dataset_version", default="", help="label recorded with the data files' sha256")
    g = p.add_argument_group("generation (training.predict.main)")
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--num_processes", type=int, default=1,
                   help="processes answering the questions, one per GPU (training.predict.parallel; run_predict.sh "
                        "passes NUM_GPUS)")
    g.add_argument("--max_new_tokens", type=int, default=None, help="default: the benchmark's")
    g.add_argument("--num_beams", type=int, default=None, help="default: the benchmark's")
    g.add_argument("--do_sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model_architecture", default="auto")
    g.add_argument("--max_seq_len", type=int, default=2048)
    add_inference_args(g)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    for name in MODULES:
        module(name).add_args(p)
    add_judge_args(p)
    return p


def decoding_of(args, mod) -> dict:
    d = {"num_beams": args.num_beams if args.num_beams is not None else mod.DEFAULT_DECODING["num_beams"],
         "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None
         else mod.DEFAULT_DECODING["max_new_tokens"],
         "do_sample": args.do_sample, "seed": args.seed, "batch_size": args.batch_size}
    if args.do_sample:
        d.update(temperature=args.temperature, top_p=args.top_p)
    d["mode"] = "sampling" if args.do_sample else ("beam" if d["num_beams"] > 1 else "greedy")
    return d


def _answer_files(specs: list[str], splits: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        split, sep, path = spec.partition("=")
        if not sep:
            split, path = "", spec
        out[split] = path
    if set(out) == {""} and len(splits) == 1:
        out = {splits[0]: out[""]}
    missing = [s for s in splits if s not in out]
    if missing:
        raise ValueError(f"--answers needs one file per split, as SPLIT=FILE; missing {missing}")
    return out


def answers_decoding(files) -> dict:
    """The decoding that made answer files, from the `<answers>.settings.json` beside each (eval.answers writes
    them); unknown when a file has none or the files were made with different decodings."""
    found = []
    for f in files:
        sfile = Path(f).with_suffix(".settings.json")
        found.append(json.loads(sfile.read_text()).get("decoding") if sfile.is_file() else None)
    if found and found[0] is not None and all(d == found[0] for d in found):
        return {**found[0], "from": "the answers' settings files"}
    why = "no settings file beside an answer file" if None in found else "answer files of different decodings"
    return {"mode": f"unknown (scored from --answers; {why})"}


def run(args) -> dict:
    mod = module(args.benchmark)
    if not args.data:
        if not getattr(mod, "DEFAULT_DATA", ""):
            raise SystemExit(f"--data is required for --benchmark {args.benchmark}")
        args.data = mod.DEFAULT_DATA
    if not args.image_folder:
        d = Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent
        args.image_folder = str(d / "images") if (d / "images").is_dir() else str(d)
    out_dir = Path(args.output_dir or args.model_path or ".")
    suffix = f"_{args.run_name}" if args.run_name else ""
    args.answers_dir = str(out_dir / "predictions")
    Path(args.answers_dir).mkdir(parents=True, exist_ok=True)
    qs = mod.questions(args)
    unique_questions(qs, str(args.data))
    decoding = decoding_of(args, mod)
    answered_by = None
    if args.answers is not None:
        files = _answer_files(args.answers, list(qs))
        answers = {s: read_answers(f) for s, f in files.items()}
        for s in qs:
            check_complete(qs[s], answers[s], files[s])
            check_same_questions(qs[s], files[s])
        decoding = answers_decoding(files.values())
        answered_by = sorted({m for f in files.values() for m in answers_model_ids(f)})
        if len(answered_by) > 1:  # one result must belong to one model run
            raise ValueError(f"the answers ({', '.join(map(str, files.values()))}) come from several models "
                             f"({', '.join(answered_by)}): score each model's answers on its own")
    else:
        if not args.model_path:
            raise SystemExit("--model_path is required unless --answers is given")
        from training.model.builder import inference_device
        if args.num_processes < 1:
            raise SystemExit(f"--num_processes {args.num_processes}: need 1 or more")
        from training.predict.parallel import check_device
        check_device(args.device, args.num_processes)
        device, precision = inference_device(args.device, args.precision)
        # the numerics belong to the answers' settings: a rerun at another precision or on another kind of
        # device does not append to these answers
        decoding = {**decoding, "device": device.split(":")[0], "precision": precision}
        flags = predict_flags(decoding, {"model_architecture": args.model_architecture,
                                         "max_seq_len": args.max_seq_len, "model_id": args.model_name,
                                         "device": device, "precision": precision,
                                         "progress": args.progress})
        answers, files = generate(qs, out_dir / "predictions", args.benchmark + suffix, args.model_path,
                                  args.image_folder, decoding, flags, restart=args.restart_answers,
                                  num_processes=args.num_processes)
    judge, jdec = None, None
    if mod.needs_judge(args):
        judge = judge_from_args(args, mod.JUDGE_MODEL)
        jdec = judge_decoding(args, **mod.JUDGE_DECODING)
    metrics, details, per = mod.score(args, qs, answers, judge, jdec)
    model = args.model_path or ""
    record = {
        "benchmark": args.benchmark, "model": model,
        "model_name": args.model_name or Path(model.rstrip("/")).name or Path(next(iter(files.values()))).stem,
        "run_name": args.run_name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "decoding": decoding,
        "dataset": {"path": str(args.data), "version": args.dataset_version or None,
                    "files_sha256": file_digest(mod.data_files(args))},
        "judge": judge.record() if judge else None,
        "answers": files, "metrics": metrics, "details": details,
    }
    if answered_by:  # the model_id the answer rows name (--answers), whatever --model_path says
        record["answers_model_id"] = answered_by[0]
    path = out_dir / f"eval_{args.benchmark}{suffix}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    with open(path.with_suffix(".per_question.jsonl"), "w", encoding="utf-8") as f:
        for row in per:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    record["results_file"] = str(path)
    return record


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    record = run(args)
    print(json.dumps({"benchmark": record["benchmark"], "model": record["model_name"],
                      "metrics": record["metrics"], "results_file": record["results_file"]}, indent=1))
    return record


if __name__ == "__main__":
    main()
