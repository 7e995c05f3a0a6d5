"""OPA-DPO end to end (Yang et al., CVPR 2025), each step a resumable command (run_opa_dpo.sh):

    rollout  the ORIGINAL policy answers each prompt (sampling, temperature 1)    -> work/rollouts.jsonl
    correct  the expert reviews every sentence; revised answer, token weights    -> work/reports.jsonl,
             (ground truth where the data has it, or an OpenAI-compatible endpoint)  work/opa_pairs.json (the
             rollouts that make no pairs: work/bad_rollouts.json)
    sft      OPA step: LoRA-SFT of the policy on ground-truth AND revised answers -> work/opa_sft
    dpo      OPA-DPO from that policy: four pairs + anchor (--loss_type opa)       -> output_dir

    bash run_opa_dpo.sh                          # every step, from output/sft on 600 embedded prompts
    bash run_opa_dpo.sh --step correct --expert chat --expert_url http://host:8000/v1 --expert_model gpt-4o
    bash run_opa_dpo.sh --step dpo --dpo_args "--beta 0.2"

A step whose output exists is skipped (rollouts and reports are appended per prompt, so an
interrupted step continues where it stopped; the SFT and DPO stages continue from their last checkpoint, and are
made again from the start when their data or options changed: opa_sft.inputs / opa_dpo.inputs in work/);
--force redoes the named step, with --step all every step. Work files key each prompt by its data id and
row (`key`: ids need not be unique, LLaVA's name the image); a report records a hash of what the expert
reviewed and of the expert (--expert, its endpoint and model), so a rollout made anew, or a rollout under
another expert, is reviewed anew.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shlex
import subprocess
from pathlib import Path

from training.config import DataArgs
from training.dpo.opa.expert import REVISIONS
from training.files import file_sha256, write_text_atomic
from training.model.builder import add_inference_args

ROOT = Path(__file__).resolve().parents[3]
STEPS = ("rollout", "correct", "sft", "dpo")
# The OPA-DPO step's epochs and added SFT term (the DPO stage's --sft_weight; the paper has none), chosen on a
# validation world (`python -m training.world.generate --seed 1`: scenes neither trained on nor in the held-out
# benchmark; SFT 0.109 / recall 0.948, DPO 0.038 / 0.942 there), CHAIR_i / recall: without the SFT term 2 epochs
# 0.054 / 0.908, 4 0.031 / 0.911, 6 0.029 / 0.914; 4 epochs with weight 0.5 0.037 / 0.924, with 1 0.035 / 0.926.
# Chosen: the fewest epochs that reach DPO's CHAIR_i, then the weight that keeps recall within 0.03 of SFT's with the
# lowest CHAIR_i.
DPO_EPOCHS, SFT_WEIGHT = 4, 1.0


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--step", default="all", choices=("all",) + STEPS)
    p.add_argument("--force", action="store_true", help="redo the named step (all: every step) even if its output "
                                                         "exists")
    p.add_argument("--from_checkpoint", default="output/sft", help="the original policy")
    p.add_argument("--data_path", default="", help="preference or prompt file with reference answers "
                                                   "(default: the embedded world's preference_train.json, in "
                                                   "--world_dir)")
    p.add_argument("--image_folder", default="", help="image root (default: the data file's folder); the work "
                                                       "files name images relative to it")
    for f in dataclasses.fields(DataArgs):  # the other stages' options of the embedded world, and their defaults
        if f.name in ("world_dir", "world_seed"):
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    p.add_argument("--skip_bad_rows", action="store_true",
                   help="skip and count bad prompt rows (e.g. without an image) in work/bad_rows.json, and rollouts "
                        "the expert answers unusably or not at all after its retries (asked again on the next run; "
                        "in work/bad_rollouts.json, with those that make no pairs), instead of stopping")
    p.add_argument("--n_prompts", type=int, default=600, help="prompts used (the first N of the data file)")
    p.add_argument("--output_dir", default="output/opa_dpo")
    p.add_argument("--figure_dir", default="figure", help="the SFT and DPO steps' plots (named after their folders)")
    p.add_argument("--only_corrected", action="store_true",
                   help="build pairs only from rollouts the expert corrected (a rollout it leaves as it is gives "
                        "pairs 1 and 2 no contrast: chosen and rejected say the same)")
    p.add_argument("--max_pairs", type=int, default=0, help="keep at most this many prompts' pairs (0: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--max_seq_len", type=int, default=4096, help="longest prompt (image tokens included) a rollout "
                   "is sampled after; a longer one is a bad row (the DPO step's own limit is its --max_seq_len)")
    p.add_argument("--rollout_batch_size", type=int, default=64)
    add_inference_args(p, "of the rollouts: ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert", default="ground_truth", choices=["ground_truth", "chat"])
    p.add_argument("--revision", default="reference", choices=REVISIONS,
                   help="how the ground-truth expert rewrites a bad sentence: reference (as the reference answer) or "
                        "minimal (its errors corrected in place, wrong colours too, the rest kept word for word, as "
                        "the paper's expert keeps what is right; a response that does not read as lists of objects "
                        "gets the reference). minimal gave the higher CHAIR_i on a validation world")
    p.add_argument("--expert_url", default="", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    p.add_argument("--expert_model", default="gpt-4o")
    p.add_argument("--expert_api_key_env", default="OPENAI_API_KEY", help="NAME of the env variable with the key")
    p.add_argument("--expert_cache", default="", help="on-disk cache of expert answers (default: work/expert_cache)")
    p.add_argument("--sft_args", default="--lora_r 16 --lora_alpha 32 --lora_dropout 0 --learning_rate 1e-3 "
                                         "--num_train_epochs 2 --num_warmup_steps 0 --per_device_train_batch_size 16",
                   help="extra arguments of the OPA LoRA-SFT step (run_sft.sh)")
    p.add_argument("--dpo_args", default="",
                   help="extra arguments of the OPA-DPO step (run_dpo_training.sh). It runs the paper's loss plus the "
                        f"DPO stage's added SFT term with weight {SFT_WEIGHT} (it kept recall on a validation world), "
                        f"for {DPO_EPOCHS} epochs; --dpo_args '--sft_weight 0' runs the paper's loss alone, "
                        "'--num_train_epochs N' other epochs")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars of the rollout and correction steps")
    p.add_argument("--in_process", action="store_true", help="run the SFT and DPO stages in this process "
                                                             "(one rank) instead of through their run_*.sh")
    a = p.parse_args(argv)
    refuse_unusable_settings(a)
    return a


def refuse_unusable_settings(a: argparse.Namespace) -> None:
    """Counts, a temperature and a seed the steps cannot work with, refused before any model loads: a negative
    --n_prompts used every prompt of the file and a negative --max_pairs kept no pairs, without a word;
    --rollout_batch_size 0, a temperature of 0 and a seed past 2**32 stopped the rollout step once the model had
    loaded."""
    bad = [f"--{k} {getattr(a, k)}: give N >= 1" for k in ("n_prompts", "rollout_batch_size", "max_new_tokens",
                                                           "max_seq_len") if getattr(a, k) < 1]
    if a.max_pairs < 0:
        bad.append(f"--max_pairs {a.max_pairs}: give N >= 0 (0: all)")
    if not 0 < a.temperature < math.inf:
        bad.append(f"--temperature {a.temperature}: rollouts sample; give a finite temperature above 0")
    from training.config import seed_problem
    bad += [seed_problem(a.seed)] if seed_problem(a.seed) else []  # rollout batches are seeded seed + position
    if bad:
        raise SystemExit("; ".join(bad))


def _read_jsonl(path: Path) -> dict[str, dict]:
    """{key: row} of a work file, a later row replacing an earlier one of its key. A last line cut short (the
    step killed while appending) is dropped from the file with a warning, and its row is made again; any
    other bad line is an error naming the file and line; a whole last row without its newline gets it."""
    if not path.exists():
        return {}
    text = path.read_text()
    lines = text.splitlines()
    last = max((n for n, x in enumerate(lines, 1) if x.strip()), default=0)
    rows = {}
    for n, line in enumerate(lines[:last], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if n < last:
                raise SystemExit(f"{path}: line {n}: invalid JSON ({err.msg}); delete the line or redo the step "
                                 "with --force") from None
            print(f"warning: {path}: line {n} is cut short (a step killed while writing it): dropped, made again")
            _write_lines(path, lines[:n - 1])
            break
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise SystemExit(f"{path}: line {n}: not a work-file row with a 'key' (an older version's file? redo "
                             "the step with --force)")
        rows[row["key"]] = row
    else:
        if text.strip() and not text.endswith("\n"):  # killed just before a row's newline: the next append would
            _write_lines(path, lines[:last])           # join its row to that line
    return rows


def _write_lines(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "".join(x + "\n" for x in lines))


def expert_identity(a) -> list:
    """Which expert reviews: --expert, and for an endpoint its URL (less credentials; only ever hashed) and model."""
    if a.expert != "chat":
        return [a.expert] if a.revision == "reference" else [a.expert, a.revision]
    from training.chat_api import chat_completions_url, endpoint_key
    return [a.expert, endpoint_key(chat_completions_url(a.expert_url)), a.expert_model]


def _input_sha(r: dict, expert: list) -> str:
    """A hash of what the expert reviews of a rollout row, and of the expert (expert_identity): a report whose hash
    differs is of another rollout, or another expert's."""
    seen = [r["rollout"], r["question"], r["gt"], r.get("facts"), r["image"], expert]
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]


def resolve_paths(a) -> None:
    """The data file (default: the embedded world's) and the image root every step uses: --image_folder, else
    the data file's folder, the root the readers confine its image paths to."""
    if not a.data_path:
        from training.world.generate import ensure_world
        world = ensure_world(a.world_dir, a.world_seed)
        a.data_path, a.image_folder = str(world / "preference_train.json"), a.image_folder or str(world / "images")
    a.image_folder = a.image_folder or os.path.dirname(os.path.abspath(a.data_path))


def _is_preference_data(path: str) -> bool:
    """Whether the data's first row ranks responses (a preference file) rather than holding a prompt with an
    optional reference answer. The ranked-list format claims every `conversations` row, so a LLaVA prompt
    file is told apart by its last turn: one answer, not a list."""
    from training.data.formats import KINDS
    from training.data.row_parts import _is_ranked
    from training.data.readers import expand_paths, read_table

    rows = read_table(expand_paths([path])[0])
    row = next((r for _, r in rows), None)
    rows.close()
    if not isinstance(row, dict):
        return True  # the preference reader reports it
    fmt = next((f for f in KINDS["preference"] if f.detect(row)), None)
    return fmt is not None and (fmt.name != "ranked_list" or _is_ranked(row))


def load_prompts(a, report=None):
    """(id, prompt, image, reference, facts, key, (source, field)) of the first --n_prompts rows of a preference
    file (the chosen response is the reference) or a prompt file with reference answers; image is JSON-safe
    (image_field); key "<id>#<k>", k the row's position among the rows read, is unique where ids are not;
    source and field: where the prompt was read (a bad row names them).
    OPA-DPO needs one image per prompt: a row with none or several is a bad row of `report`."""
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences, read_prompts
    from training.dpo.opa.data import image_field

    resolve_paths(a)
    report = report if report is not None else BadRowReport()
    if _is_preference_data(a.data_path):
        rows = [(r, r.responses[0]) for r in read_preferences([a.data_path], a.image_folder, report)]
    else:
        rows = [(r, r.reference or "") for r in read_prompts([a.data_path], a.image_folder, report)]
    out = []
    for k, (r, ref) in enumerate(rows):
        if len(out) == a.n_prompts:
            break
        if len(r.images) != 1:
            report.bad(r.source, "image", f"OPA-DPO needs exactly one image per prompt; the row has {len(r.images)}")
            continue
        out.append((r.id, r.prompt, image_field(r.images[0], a.image_folder), ref, r.facts, f"{r.id}#{k}",
                    (r.source, getattr(r, "prompt_field", getattr(r, "text_field", "prompt")))))
    return out


PROMPT_KEYS = "prompt_keys.json"  # in work/: the keys of the prompts the last rollout step was asked for


def rollout_settings(a) -> dict:
    """What draws the rollouts: the prompts (the data file and the image root its rows' images are read from), the
    policy (and its files), the sampling and its seeds. An interrupted rollout step rerun with others appended
    another policy's or temperature's rollouts to the first ones; rerun on another data file, both files' rollouts
    went into the pairs. The data file's SHA-256 too: a world made again in the same folder with another
    --world_seed (or a data file edited in place) has rows of the same keys over other images, and the first
    world's rollouts were reused against them."""
    from training.model.fingerprint import model_fingerprint
    resolve_paths(a)
    return {"data_path": os.path.abspath(a.data_path), "image_folder": os.path.abspath(a.image_folder),
            "data_sha256": file_sha256(a.data_path),
            "from_checkpoint": a.from_checkpoint, "model": model_fingerprint(a.from_checkpoint),
            "temperature": a.temperature, "max_new_tokens": a.max_new_tokens, "seed": a.seed,
            "rollout_batch_size": a.rollout_batch_size}


def step_rollout(a, work: Path) -> None:
    import torch

    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.images import load_image
    from training.model.builder import inference_device, load_model_and_processor
    from training.predict.generate import DecodeArgs, generate_batch
    from training.predict.main import fitting
    from training.files import check_settings
    from training.templates.chat import ChatEncoder

    out = work / "rollouts.jsonl"
    done = _read_jsonl(out)
    check_settings(out, done, rollout_settings(a), ".settings.json",
                   "give the first settings, or redo every step with --step all --force")
    report = BadRowReport(skip=a.skip_bad_rows)
    prompts = load_prompts(a, report)
    write_text_atomic(work / PROMPT_KEYS, json.dumps([r[5] for r in prompts]))  # this run's prompts: the correct step
    todo = [r for r in prompts if r[5] not in done]                             # pairs these rollouts alone
    report.write(work)
    if not todo:
        return
    device, precision = inference_device(a.device, a.precision)
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=a.from_checkpoint, precision=precision),
                                                 LoraArgs(), for_training=False)
    model.to(device)
    enc = ChatEncoder(proc, arch, a.max_seq_len)
    decode = DecodeArgs(max_new_tokens=a.max_new_tokens, do_sample=True, temperature=a.temperature)
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="rollouts", unit="prompt", disable=not a.progress, dynamic_ncols=True)
    written = 0
    with out.open("a") as f:
        # batches of the prompts, each seeded by its place among them: a resumed run samples each prompt in the same
        # batch under the same seed as an uninterrupted run (a batch partly written is sampled whole again)
        for i in range(0, len(prompts), a.rollout_batch_size):
            chunk = prompts[i:i + a.rollout_batch_size]
            asked = sum(r[5] not in done for r in chunk)
            if not asked:
                continue
            torch.manual_seed(a.seed + i)
            images = [[load_image(r[2], a.image_folder)] for r in chunk]
            chunk, images, encoded = fitting(chunk, images, enc, report, prompt=lambda r: r[1], where=lambda r: r[6])
            report.write(work)
            texts = generate_batch(model, proc, enc, arch.name, [r[1] for r in chunk], images, decode, device,
                                   encoded) if any(r[5] not in done for r in chunk) else []
            new = [(r, t) for r, t in zip(chunk, texts) if r[5] not in done]
            for (rid, prompt, image, ref, facts, key, _), t in new:
                question = prompt[-1].content.replace("<image>", "").strip()  # what the expert reads
                messages = [{"role": m.role, "content": m.content} for m in prompt]  # what the policy answered
                f.write(json.dumps({"key": key, "id": rid, "image": image, "question": question, "prompt": messages,
                                    "gt": ref, "facts": facts, "rollout": t[0]}) + "\n")
            f.flush()
            bar.update(asked)
            written += len(new)
    bar.close()
    print(f"rollouts: {written} new -> {out}" + (f" ({len(todo) - written} prompts bad rows)" if written < len(todo)
                                                  else ""))
    del model
    if device.startswith("cuda"):  # the SFT and DPO steps train in processes of their own on this GPU
        import gc
        gc.collect()
        torch.cuda.empty_cache()


def make_expert(a, work: Path):
    from training.dpo.opa.expert import ChatExpert, GroundTruthReviser
    if a.expert == "ground_truth":
        return GroundTruthReviser(a.revision)
    if not a.expert_url:
        raise SystemExit("--expert chat needs --expert_url (an OpenAI-compatible endpoint)")
    return ChatExpert(a.expert_url, a.expert_model, a.expert_api_key_env, a.expert_cache or work / "expert_cache")


BAD_ROLLOUTS = "bad_rollouts.json"  # in work/: the correct step's rollouts without pairs (BadRowReport's layout)


def step_correct(a, work: Path) -> None:
    from training.chat_api import ChatAPIError
    from training.data.bad_rows import BadRowReport
    from training.data.records import RowRef
    from training.data.images import load_image
    from training.data.span_weights import missing_span
    from training.dpo.opa.data import corrected, opa_prompt, revised_with_weights, rollout_weights
    from training.dpo.opa.expert import NO_SENTENCE

    rollouts = _read_jsonl(work / "rollouts.jsonl")
    if (work / PROMPT_KEYS).exists():  # a rollout step rerun with a smaller --n_prompts keeps the others' rollouts
        asked = set(json.loads((work / PROMPT_KEYS).read_text()))
        rollouts = {k: r for k, r in rollouts.items() if k in asked}
    if not rollouts:
        raise SystemExit(f"no rollouts in {work}: run the rollout step first")
    out = work / "reports.jsonl"
    done = _read_jsonl(out)
    expert = make_expert(a, work)
    from tqdm import tqdm
    who = expert_identity(a)
    todo = [key for key, r in rollouts.items() if done.get(key, {}).get("input_sha") != _input_sha(r, who)]
    bad = []
    skipped = BadRowReport(skip=True)  # the rollouts this run made no pairs of, by key: work/BAD_ROLLOUTS
    with out.open("a") as f, tqdm(todo, desc="expert review", unit="answer", disable=not a.progress,
                                   dynamic_ncols=True) as bar:
        for key in bar:
            r = rollouts[key]
            try:  # an image changed on disk since the rollout step read it is this rollout's bad row too
                image = load_image(r["image"], a.image_folder) if a.expert == "chat" else None
                report = expert.review(r["rollout"], reference=r["gt"], facts=r.get("facts"), question=r["question"],
                                       image=image)
                if not report and r["rollout"].strip():  # stored, it made no pairs and was never asked again
                    raise ValueError(NO_SENTENCE)
                j = missing_span(r["rollout"], rollout_weights(report))
                if j is not None:  # its weight has no tokens to go to: the DPO step refused the pair, after the SFT
                    raise ValueError(f"expert answer: copied_content {rollout_weights(report)[j][0]!r:.60} is not in "
                                     "the rollout (verbatim, after the sentences before it)")
            except (ValueError, ChatAPIError) as err:  # an answer that is no usable report (or an ImageError), or
                if not getattr(err, "row", True):     # none after the retries; an error of the endpoint itself stops
                    raise
                bad.append(f"{work / 'rollouts.jsonl'}: rollout {key}: {err}")
                if not a.skip_bad_rows:
                    raise ValueError(f"{bad[-1]} (pass --skip_bad_rows to skip and count such rollouts)") from err
                skipped.bad(RowRef(str(work / "rollouts.jsonl"), key), "rollout", f"expert: {err}")
                continue
            done[key] = {"key": key, "id": r["id"], "input_sha": _input_sha(r, who), "report": report}
            f.write(json.dumps(done[key]) + "\n")
            f.flush()
    reports = {k: done[k]["report"] for k, r in rollouts.items()
               if done.get(k, {}).get("input_sha") == _input_sha(r, who)}
    pairs, sft, empty = [], [], []
    for key, report in reports.items():
        r = rollouts[key]
        revised, score_w, type_w = revised_with_weights(report)
        if not revised.strip() or not r["gt"].strip():  # no ground-truth answer (a prompt file without
            empty.append(key)                            # references) or an empty revision: no pairs
            skipped.bad(RowRef(str(work / "rollouts.jsonl"), key), "gt" if not r["gt"].strip() else "revised",
                        "empty: OPA-DPO's pairs need a ground-truth answer and a revised one")
            continue
        if a.only_corrected and not corrected(report) or a.max_pairs and len(pairs) >= a.max_pairs:
            continue
        rid = r["id"]
        pair = {"id": rid, "key": key, "image": r["image"], "question": r["question"], "gt": r["gt"],
                "rollout": r["rollout"], "revised": revised, "rollout_weights": rollout_weights(report),
                "revised_score_weights": score_w, "revised_type_weights": type_w, "report": report}
        if r.get("prompt"):  # rollouts written before the prompt was kept: the question, the image first
            pair["prompt"] = r["prompt"]
        pairs.append(pair)
        prompt = [{"role": m.role, "content": m.content} for m in opa_prompt(pair)]
        for answer in dict.fromkeys([r["gt"], revised]):  # both become on-policy (once if equal); TRL's
            sft.append({"id": f"{rid}-{len(sft)}", "images": [r["image"]], "prompt": prompt,  # prompt-completion
                        "completion": [{"role": "assistant", "content": answer}]})  # rows: the answer alone trains
    skipped.write(work, BAD_ROLLOUTS)  # (its rows' "row" is the rollout's key)
    # whole or not at all: a write cut short left half a file that a later --step sft or dpo alone read
    write_text_atomic(work / "opa_pairs.json", json.dumps(pairs, indent=0))
    write_text_atomic(work / "opa_sft.json", json.dumps(sft, indent=0))
    n_bad = sum(corrected(report) for report in reports.values())
    print(f"expert: {n_bad} of {len(rollouts)} rollouts corrected; {len(pairs)} prompts' pairs -> "
          f"{work / 'opa_pairs.json'}")
    if bad:
        print(f"expert: skipped {len(bad)} rollouts whose expert answer was unusable, asked again on the next run "
              f"(first: {bad[0]})")
    if empty:
        print(f"expert: {len(empty)} rollouts made no pairs, their ground-truth answer or revision being empty "
              f"(first: {empty[0]}); OPA-DPO needs a reference answer per prompt")


def _stage(script: str, args: list[str], in_process: bool = False) -> None:
    """Run one step's stage; a step that did not finish (a failure, or --stop_after_steps: exit status 75) stops
    OPA-DPO with its exit status, before the next step starts from it."""
    if in_process:
        import importlib

        from training.engine.loop import exit_status
        module = {"run_sft.sh": "training.sft.main", "run_dpo_training.sh": "training.dpo.main"}[script]
        status = exit_status(importlib.import_module(module).main(args))
    else:
        cmd = ["bash", str(ROOT / script), *args]
        print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
        status = subprocess.run(cmd, cwd=ROOT).returncode
    if status:
        raise SystemExit(status)


def _stage_path(path, in_process: bool) -> str:
    """A path of this command (relative ones to its working folder) as a stage reads it: its run_*.sh runs in the
    repository's folder, so relative to that (as run_opa_dpo.sh, run there, gives it), or absolute outside it (the
    stage read and wrote the repository's out/ for `python -m training.dpo.opa.main --output_dir out` started
    elsewhere); in process, as it is."""
    if in_process:
        return str(path)
    p = Path(os.path.abspath(path))
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _stage_resume(out_dir: Path, record: Path, inputs: list, force: bool) -> list[str] | None:
    """How a stage runs: None (skipped: its model is there, made from these inputs), [] (from the start: --force, or
    its inputs changed since it started) or ["--resume"] (from its last checkpoint, if any). inputs: the files (Path)
    and options it is made from, hashed into `record` (a model without a record, an older version's, is kept)."""
    from training.model.builder import saved_model_files  # a finished step's model: weights or adapters
    h = hashlib.sha256()
    for x in inputs:
        h.update(x.read_bytes() if isinstance(x, Path) and x.exists() else str(x).encode())
        h.update(b"\0")
    sha, old = h.hexdigest()[:16], record.read_text().strip() if record.exists() else None
    changed = old is not None and old != sha
    if saved_model_files(out_dir) and not (force or changed):
        return None
    write_text_atomic(record, sha)
    return [] if force or changed else ["--resume"]


def main(argv=None) -> None:
    a = parse(argv)
    if not Path(a.from_checkpoint).exists() and a.from_checkpoint == "output/sft":
        raise SystemExit("output/sft holds no SFT model: run `bash run_sft.sh` first (or pass --from_checkpoint)")
    work = Path(a.output_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    resolve_paths(a)
    steps = STEPS if a.step == "all" else (a.step,)  # --force redoes each of them
    if "rollout" in steps:
        if a.force:
            (work / "rollouts.jsonl").unlink(missing_ok=True)
        step_rollout(a, work)
    if "correct" in steps:
        if a.force:
            (work / "reports.jsonl").unlink(missing_ok=True)
        step_correct(a, work)
    sft_dir = work / "opa_sft"
    # a stage continues from its last checkpoint (none: from the start); one whose data or options changed since
    # (the correct step made other pairs, another --sft_args) is made again, and so is the DPO step after it
    sft_record, dpo_record = work / "opa_sft.inputs", work / "opa_dpo.inputs"
    here = functools.partial(_stage_path, in_process=a.in_process)
    start = here(a.from_checkpoint) if Path(a.from_checkpoint).exists() else a.from_checkpoint  # a Hub id as it is
    if "sft" in steps:
        resume = _stage_resume(sft_dir, sft_record, [work / "opa_sft.json", a.from_checkpoint, a.image_folder, a.seed,
                                                     a.sft_args], a.force)
        if resume is not None:
            _stage("run_sft.sh", ["--from_checkpoint", start, "--data_path",
                                  here(work / "opa_sft.json"), "--image_folder", here(a.image_folder), "--output_dir",
                                  here(sft_dir), "--seed", str(a.seed), "--figure_dir", here(a.figure_dir), *resume,
                                  *shlex.split(a.sft_args)], a.in_process)
    if "dpo" in steps:
        settings = ["--sft_weight", str(SFT_WEIGHT), "--num_train_epochs", str(DPO_EPOCHS), *shlex.split(a.dpo_args)]
        resume = _stage_resume(Path(a.output_dir), dpo_record, [work / "opa_pairs.json", sft_record, a.image_folder,
                                                                 settings], a.force)
        if resume is not None:
            _stage("run_dpo_training.sh", ["--loss_type", "opa", "--from_checkpoint", here(sft_dir), "--data_path",
                                           here(work / "opa_pairs.json"), "--image_folder", here(a.image_folder),
                                           "--output_dir", here(a.output_dir), "--figure_dir", here(a.figure_dir),
                                           *resume, *settings], a.in_process)


if __name__ == "__main__":
    main()
