"""SFT stage entry point (launched by run_sft.sh through `deepspeed --module training.sft.main`)."""
from __future__ import annotations

from pathlib import Path

from training.config import (DataArgs, DeepSpeedArgs, LoraArgs, ModelArgs, OptimArgs, RunArgs, parse_config,
                             require_held_out)
from training.engine.loop import stopped_early
from training.engine.strategy import Strategy

CONCEPTS = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "optim": OptimArgs,
            "ds": DeepSpeedArgs, "run": RunArgs}
# The embedded world's defaults for the tiny VLM, in LLaVA-1.5's recipe: the vision tower (pre-trained,
# see training.model.tiny_vision) stays frozen; projector and language model train in full.
# A from-scratch tower trained through the LM's loss learns colours but not shapes in this budget.
DEFAULTS = {"output_dir": "output/sft", "learning_rate": 5e-4, "num_train_epochs": 6.0, "freeze_vision_tower": True,
            "per_device_train_batch_size": 16, "num_warmup_steps": 50, "max_seq_len": 160}
PANELS = [("loss", ["loss", "eval/loss"]), ("learning rate", ["lr"]), ("target tokens / s", ["target_tokens_per_s"])]


def main(argv=None) -> dict:
    cfg = parse_config(CONCEPTS, argv, DEFAULTS, description=__doc__)
    require_held_out(cfg["data"], cfg["run"])  # before anything starts; again once the defaults are filled in:
    strategy = Strategy(cfg["ds"], cfg["optim"], cfg["model"].precision)
    from training.defaults import resolve_defaults
    resolve_defaults(cfg["model"], cfg["data"], strategy, "sft_train.json")
    require_held_out(cfg["data"], cfg["run"])  # the embedded world's training file is training data too

    import torch
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_sft
    from training.model.builder import load_model_and_processor, set_chat_template
    from training.sft.trainer import SFTDataset, SFTTrainer
    from training.templates.chat import ChatEncoder

    torch.manual_seed(cfg["optim"].seed)
    d, out = cfg["data"], Path(cfg["run"].output_dir)
    model, processor, arch = load_model_and_processor(cfg["model"], cfg["lora"], zero3=strategy.build_config())
    report = BadRowReport(skip=d.skip_bad_rows)
    template = set_chat_template(processor, cfg["model"].template)  # saved with the model: generation renders alike
    encoder = ChatEncoder(processor, arch, d.max_seq_len, template)

    def dataset(paths: str) -> SFTDataset:
        return SFTDataset(read_sft(paths, d.image_folder, report), encoder, d.image_folder, report)

    eval_set = dataset(d.eval_data_path) if d.eval_data_path else None
    trainer = SFTTrainer(strategy, None, processor, dataset(d.data_path), cfg, arch.name, eval_set)
    trainer.report = report
    trainer.engine = strategy.prepare(model, trainer.plan.total_steps)
    history = trainer.train()
    if trainer.interrupted:
        return stopped_early(strategy, report, out, history, cfg["run"], trainer.logger)
    strategy.save_hf(trainer.engine, processor, out)
    result = {"history": history, "output_dir": str(out)}
    if eval_set is not None:
        result["eval"] = trainer.evaluate()
        trainer.logger.log(trainer.final_step, result["eval"])
        if strategy.is_main:
            print(f"held-out loss {result['eval']['eval/loss']:.4f} ({result['eval']['eval/n']} rows) -> {out}")
    trainer.logger.close()
    strategy.write_report(report, out)
    if strategy.is_main:
        from training.engine.plots import plot_metrics
        plot_metrics(out / "metrics.jsonl", Path(cfg["run"].figure_dir) / f"{out.name}_metrics.png", f"SFT: {out}",
                     PANELS)
    return result


if __name__ == "__main__":
    from training.engine.loop import run_stage
    run_stage(main)
