"""DPO-family / ORPO stage entry point (launched by run_dpo_training.sh through `deepspeed --module`).

No arguments: DPO (sigmoid) from the SFT actor (output/sft) on the embedded world's pairs -> output/dpo.
--loss_type cdpo | ipo | orpo | listwise selects the others (listwise defaults to the ranked lists).
"""
from __future__ import annotations

from pathlib import Path

from training.config import (DataArgs, DeepSpeedArgs, DPOArgs, LoraArgs, ModelArgs, OptimArgs, RunArgs, parse_config,
                             refuse_held_out, require_held_out)
from training.data.readers import split_paths
from training.engine.loop import stopped_early
from training.engine.strategy import Strategy

CONCEPTS = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "optim": OptimArgs,
            "ds": DeepSpeedArgs, "run": RunArgs, "dpo": DPOArgs}
SFT_OUTPUT = "output/sft"
# The embedded world's defaults (chosen with benchmarks/quality.py). sft_weight 1 (RLAIF-V / RPO's
# added NLL on the chosen answer; only the DPO family reads it, ORPO has its own): without it, chosen
# and rejected log-probs both fall (likelihood displacement: pairs differ in a few tokens) and the
# model degenerates - measured object recall 0.981 -> 0.305 at lr 2e-4, 0.384 at 5e-5; with it 0.980.
DEFAULTS = {"output_dir": "output/dpo", "from_checkpoint": SFT_OUTPUT, "learning_rate": 2e-4, "sft_weight": 1.0,
            "num_train_epochs": 2.0, "per_device_train_batch_size": 16, "num_warmup_steps": 10,
            "max_seq_len": 160, "lr_scheduler_type": "cosine", "logging_steps": 10}


def main(argv=None) -> dict:
    cfg = parse_config(CONCEPTS, argv, DEFAULTS, description=__doc__)
    m, d, a, run = cfg["model"], cfg["data"], cfg["dpo"], cfg["run"]
    if a.loss_type == "opa":
        refuse_held_out(d, run, "OPA-DPO")
    if m.from_checkpoint == SFT_OUTPUT and not (Path(SFT_OUTPUT) / "config.json").exists() \
            and not (Path(SFT_OUTPUT) / "adapter").exists():
        raise SystemExit(f"{SFT_OUTPUT} holds no SFT model: run `bash run_sft.sh` first "
                         "(or pass --from_checkpoint)")
    from training.rm.model import refuse_reward_model_as_policy
    refuse_reward_model_as_policy(m.from_checkpoint, "from_checkpoint")
    if a.loss_type == "opa" and a.opa_token_level and a.precompute_ref:
        raise SystemExit("--opa_token_level needs per-token reference log-probs: add --no-precompute_ref")
    strategy = Strategy(cfg["ds"], cfg["optim"], m.precision)
    from training.defaults import resolve_defaults
    # held-out pairs: the embedded world's when training on its pairs; user data needs --eval_data_path
    resolve_defaults(m, d, strategy, "ranked_train.json" if a.loss_type == "listwise" else "preference_train.json",
                     "preference_heldout.json" if not d.data_path and a.loss_type not in ("listwise", "opa") else "")
    require_held_out(d, run)

    import torch
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.data.span_weights import weights_note
    from training.dpo.data import PreferenceDataset
    from training.dpo.trainer import DPOTrainer
    from training.model.builder import disable_dropout, load_model_and_processor, set_chat_template
    from training.templates.chat import ChatEncoder

    torch.manual_seed(cfg["optim"].seed)
    out = Path(run.output_dir)
    model, processor, arch = load_model_and_processor(m, cfg["lora"], zero3=strategy.build_config())
    if a.disable_dropout:
        disable_dropout(model)
    report = BadRowReport(skip=d.skip_bad_rows)
    paths = split_paths(d.data_path)
    template = set_chat_template(processor, m.template)  # saved with the model: generation renders alike
    encoder = ChatEncoder(processor, arch, d.max_seq_len, template)
    if a.loss_type == "opa":
        from training.dpo.opa.data import OPADataset, read_opa
        records = [r for p in paths for r in read_opa(p, report)]
        dataset = OPADataset(records, encoder, d.image_folder, report, a.opa_mask_ratio, cfg["optim"].seed, paths[0])
        n_resp = 4
    else:
        records = read_preferences(paths, d.image_folder, report)
        note = weights_note(records, "ORPO") if a.loss_type == "orpo" else None
        if note and strategy.is_main:
            print(note)
        n_resp = 0 if a.loss_type == "listwise" else 2
        dataset = PreferenceDataset(records, encoder, d.image_folder, report, n_responses=n_resp)
    eval_set = None
    if d.eval_data_path:
        eval_records = read_preferences(d.eval_data_path, d.image_folder, report)
        eval_set = PreferenceDataset(eval_records, encoder, d.image_folder, report, n_responses=n_resp)
    if d.encoded_cache_mb > 0:
        from training.data.encoded_cache import EncodedCache
        dataset = EncodedCache(dataset, d.encoded_cache_mb)
    trainer = DPOTrainer(strategy, processor, dataset, cfg, arch.name, eval_set)
    trainer.report = report
    trainer.engine = strategy.prepare(model, trainer.plan.total_steps)
    import time
    t0 = time.time()
    if trainer.needs_reference:
        setup_reference(trainer, cfg, records, paths, arch.name, template, n_resp)
    t1 = time.time()
    history = trainer.train()
    timings = {"reference_s": t1 - t0, "train_s": time.time() - t1,
               "encode_s": getattr(dataset, "encode_seconds", None)}  # within the two (with --encoded_cache_mb)
    if trainer.interrupted:
        return stopped_early(strategy, report, out, history, run, trainer.logger)
    strategy.save_hf(trainer.engine, processor, out)
    result = {"history": history, "output_dir": str(out), "timings": timings}
    if eval_set is not None:
        result["eval"] = trainer.evaluate()
        trainer.logger.log(trainer.final_step, result["eval"])
        if strategy.is_main:
            print(f"held-out pairs: accuracy {result['eval']['eval/rewards/accuracies']:.4f}, margin "
                  f"{result['eval']['eval/rewards/margins']:.4f} ({result['eval']['eval/n']} items) -> {out}")
    trainer.logger.close()
    strategy.write_report(report, out)
    if strategy.is_main:
        from training.dpo.plots import plot_metrics
        png = plot_metrics(out / "metrics.jsonl", Path(cfg["run"].figure_dir) / f"{out.name}_metrics.png",
                           f"{a.loss_type}: {out}")
        if png:
            print(f"metrics plotted to {png}")
    return result


# Bumped when the reference log-probs of the same model and data change with the code (2: the packed layout
# follows sliding windows and soft-capping; 3: a SentencePiece tokenizer's segments are tokenised as in the whole
# conversation; 4: OPA's per-token weights, in the cached weighted sums, are those of each answer's tokens as its
# conversation holds them; 5: a preference row's chosen_weights / rejected_weights weigh the cached weighted sums,
# which held the plain sums before, and a text config's final_logit_softcapping caps a LLaVA's logits; 6: a span is
# found in the answer, not in the template's text before it in the answer's segment; 7: an answer a template trims
# keeps its weights; 8: a span inside one token weighs that token; 9: an answer whose last token merges with the
# template's text after it keeps its weights), so a cache computed before is computed anew.
REF_NUMERICS = 9


def reference_settings(cfg, template: str | None, K: int, arch_name: str, rows: int) -> dict:
    """What the cached reference log-probs depend on besides the checkpoint's files and the data (its key)."""
    from training.model.fingerprint import model_fingerprint
    m, d, a, lora = cfg["model"], cfg["data"], cfg["dpo"], cfg["lora"]
    return {"numerics": REF_NUMERICS, "max_seq_len": d.max_seq_len, "template": template, "K": K, "arch": arch_name,
            "precision": m.precision,
            "rows": rows, "skip_bad_rows": d.skip_bad_rows, "qlora": lora.qlora,
            # a model built from parts ignores from_checkpoint: each part's files (a folder's), else its name
            "parts": [(x, model_fingerprint(x)) if x and Path(x).is_dir() else x for x in (m.vision_tower,
                                                                                           m.language_model)],
            "bnb": (lora.bnb_compute_dtype, lora.bnb_double_quant),  # the 4-bit base a QLoRA reference runs on
            "opa_mask": (a.opa_mask_ratio, cfg["optim"].seed, "model input")}  # how the mask is made


def setup_reference(trainer, cfg, records, paths, arch_name, template, n_resp) -> None:
    """Cached reference log-probs (default), the LoRA policy with adapters off, or a frozen model."""
    m, d, a, lora = cfg["model"], cfg["data"], cfg["dpo"], cfg["lora"]
    if a.precompute_ref:
        from training.dpo.refcache import RefCache, cache_key, default_cache_dir

        def build(dataset, records, paths):
            K = n_resp or max(len(r.responses) for r in records)
            rows = getattr(dataset, "rows_per_item", 1)
            key = cache_key(m.from_checkpoint, paths, reference_settings(cfg, template, K, arch_name, rows),
                            records, d.image_folder)
            root = Path(a.ref_cache_dir) if a.ref_cache_dir else default_cache_dir(paths, cfg["run"].output_dir)
            return RefCache.load_or_build(
                root / f"{key}.safetensors", trainer.s, trainer.engine, lambda idx: trainer.make_batch(idx, dataset),
                len(dataset) * rows, K, cfg["optim"].per_device_eval_batch_size, rows,
                progress=cfg["run"].progress and trainer.s.is_main)

        trainer.ref_cache = build(trainer.dataset, records, paths)
        if trainer.eval_set is not None:
            trainer.eval_ref_cache = build(trainer.eval_set, trainer.eval_set.records, split_paths(d.eval_data_path))
    elif lora.lora_r > 0:  # the policy with adapters off and its other trained weights at their start
        from training.model.reference import snapshot
        trainer.ref_start = snapshot(trainer.engine)
    else:
        from training.model.builder import load_model_and_processor
        ref, _, _ = load_model_and_processor(m, lora, for_training=False, zero3=trainer.s.build_config(frozen=True))
        trainer.ref_model = trainer.s.prepare_frozen(ref)


if __name__ == "__main__":
    from training.engine.loop import run_stage
    run_stage(main)
