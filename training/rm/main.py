"""Reward-model stage entry point (launched by run_rm_training.sh through `deepspeed --module`).

No arguments: the SFT actor in output/sft becomes a factual reward model trained on the embedded
world's preference pairs, evaluated on its held-out pairs -> output/rm, figure/rm_rewards.png.
"""
from __future__ import annotations

import json
from pathlib import Path

from training.config import (DataArgs, DeepSpeedArgs, LoraArgs, ModelArgs, OptimArgs, RMArgs, RunArgs, parse_config,
                             require_held_out)
from training.engine.loop import stopped_early
from training.engine.strategy import Strategy

CONCEPTS = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "optim": OptimArgs,
            "ds": DeepSpeedArgs, "run": RunArgs, "rm": RMArgs}
SFT_OUTPUT = "output/sft"
DEFAULTS = {"from_checkpoint": SFT_OUTPUT, "output_dir": "output/rm", "learning_rate": 5e-4,
            "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32,
            "num_warmup_steps": 20, "max_seq_len": 256, "eval_steps": None, "logging_steps": 10}
EVAL_STEPS = 250  # the default --eval_steps where there are held-out pairs
PANELS = [("loss", ["loss", "eval/loss"]), ("pairwise accuracy", ["accuracy", "eval/accuracy"]),
          ("rewards", ["reward_chosen", "reward_rejected", "eval/reward_chosen", "eval/reward_rejected"]),
          ("reward vs length (held out)", ["eval/length_corr"]), ("ODIN terms", ["odin_loss"])]


def require_checkpoint(model: ModelArgs) -> None:
    if model.from_checkpoint == SFT_OUTPUT and not (Path(SFT_OUTPUT) / "config.json").is_file() \
            and not (Path(SFT_OUTPUT) / "adapter").is_dir():
        raise SystemExit(f"{SFT_OUTPUT}: no SFT model to start the reward model from. Run `bash run_sft.sh` "
                         "first, or pass --from_checkpoint PATH.")


def resolve_eval_steps(data: DataArgs, run: RunArgs) -> None:
    """--eval_steps unset: every EVAL_STEPS steps with held-out pairs (the embedded world has them), else
    none; set: it needs held-out pairs."""
    if run.eval_steps is None:
        run.eval_steps = EVAL_STEPS if data.eval_data_path else 0
    require_held_out(data, run)


def main(argv=None) -> dict:
    cfg = parse_config(CONCEPTS, argv, DEFAULTS, description=__doc__)
    require_checkpoint(cfg["model"])
    from training.rm.mismatch import mismatched_pairs, require_fraction
    require_fraction(cfg["rm"].mismatched_pairs)
    strategy = Strategy(cfg["ds"], cfg["optim"], cfg["model"].precision)
    d, rmc, out = cfg["data"], cfg["rm"], Path(cfg["run"].output_dir)
    from training.defaults import resolve_defaults
    # held-out pairs: the embedded world's when training on it; user data needs --eval_data_path
    resolve_defaults(cfg["model"], d, strategy, "preference_train.json",
                     "preference_heldout.json" if not d.data_path else "")
    resolve_eval_steps(d, cfg["run"])
    if not d.eval_data_path and strategy.is_main:
        print("no held-out pairs (--eval_data_path): the reward model is trained without a held-out evaluation")

    import torch
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.data.span_weights import weights_note
    from training.model.builder import load_model_and_processor, set_chat_template
    from training.rm.data import RMDataset
    from training.rm.model import RewardModel, is_reward_model, load_reward_model
    from training.rm.trainer import RMTrainer
    from training.templates.chat import ChatEncoder

    torch.manual_seed(cfg["optim"].seed)
    start = cfg["model"].from_checkpoint
    if start and is_reward_model(start):  # more training of a reward model: its head too, not a new one
        model, processor, arch = load_reward_model(start, cfg["model"], cfg["lora"], for_training=True,
                                                   zero3=strategy.build_config(), length_head=rmc.length_head)
        model.factual = rmc.factual
    else:
        backbone, processor, arch = load_model_and_processor(cfg["model"], cfg["lora"], zero3=strategy.build_config())
        model = RewardModel(backbone, factual=rmc.factual, length_head=rmc.length_head)
    template = set_chat_template(processor, cfg["model"].template)  # saved with the model: generation renders alike
    encoder = ChatEncoder(processor, arch, d.max_seq_len, template)
    report = BadRowReport(skip=d.skip_bad_rows)
    captions = rmc.captions_file or None

    def dataset(path: str, train: bool) -> RMDataset:
        records = read_preferences(path, d.image_folder, report, captions)  # "a.json, b.json": spaces allowed
        if train and rmc.mismatched_pairs:
            records = with_mismatched_pairs(records)
        note = weights_note(records, "the reward model")
        if note and train and strategy.is_main:
            print(note)
        return RMDataset(records, encoder, d.image_folder, report, rmc.factual, shuffle_facts=train,
                         seed=cfg["optim"].seed)

    def with_mismatched_pairs(records: list) -> list:
        pairs, unmatched = mismatched_pairs(records, rmc.mismatched_pairs, cfg["optim"].seed)
        if strategy.is_main:
            none = (f"; {unmatched} chosen lists got none: no other list has the same prompt and another best "
                    "response" if unmatched else "")
            print(f"--mismatched_pairs {rmc.mismatched_pairs}: {len(pairs)} mismatched pairs added to "
                  f"{len(records)} training lists{none}")
        return records + pairs

    train_set = dataset(d.data_path, True)
    eval_set = dataset(d.eval_data_path, False) if d.eval_data_path else None
    if eval_set is not None and not len(eval_set):  # (its evaluation, after all the training, failed on no rows)
        raise SystemExit(f"--eval_data_path {d.eval_data_path}: every held-out row is a bad row (skipped by "
                         "--skip_bad_rows): nothing to evaluate; without --skip_bad_rows the first is named")
    trainer = RMTrainer(strategy, None, processor, train_set, eval_set, cfg, arch.name)
    trainer.report = report
    trainer.engine = strategy.prepare(model, trainer.plan.total_steps)
    history = trainer.train()
    if trainer.interrupted:
        return stopped_early(strategy, report, out, history, cfg["run"], trainer.logger)
    strategy.save_hf(trainer.engine, processor, out)
    result = {"history": history, "output_dir": str(out), "loss": trainer.loss_kind}
    if eval_set is not None:
        metrics, rewards = trainer.evaluate()
        trainer.logger.log(trainer.final_step, metrics)
        result["eval"] = metrics
        if strategy.is_main:
            write_eval(out, Path(cfg["run"].figure_dir), metrics, rewards, rmc.factual, eval_set.records)
    trainer.logger.close()
    strategy.write_report(report, out)
    if strategy.is_main:
        from training.engine.plots import plot_metrics
        plot_metrics(out / "metrics.jsonl", Path(cfg["run"].figure_dir) / f"{out.name}_metrics.png",
                     f"reward model: {out}", PANELS)
        if "eval" in result:
            print(f"held-out pairwise accuracy {result['eval']['eval/accuracy']:.4f}, reward-length correlation "
                  f"{result['eval']['eval/length_corr']:+.3f} ({result['eval']['eval/n']} lists, "
                  f"factual={rmc.factual}{', the quality head' if rmc.length_head else ''}) -> {out}")
    strategy.barrier()
    return result


def write_eval(out: Path, figure_dir: Path, metrics: dict, rewards, factual: bool, records) -> Path:
    """eval_metrics.json + eval_rewards.json in out (each held-out list's rewards, best first, with its file and
    row; null for a skipped row); the chosen-vs-rejected histogram in figure_dir."""
    from training.engine.plots import pyplot, save_figure
    plt = pyplot()

    (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=1))
    rows = [[None if v != v else v for v in r] for r in rewards.tolist()]  # NaN -> null
    where = [{"file": r.source.file, "row": r.source.row} if r.source else None for r in records]
    (out / "eval_rewards.json").write_text(json.dumps({"ranked_rewards": rows, "rows": where}))
    rewards = rewards[~rewards[:, 0].isnan()]
    chosen = rewards[:, 0]
    rejected = rewards[:, 1:].flatten()
    rejected = rejected[~rejected.isnan()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(chosen.numpy(), bins=40, alpha=0.6, label="chosen")
    ax.hist(rejected.numpy(), bins=40, alpha=0.6, label="rejected")
    ax.set_xlabel("reward")
    ax.set_ylabel("held-out responses")
    ax.set_title(f"{out.name}: pairwise accuracy {metrics['eval/accuracy']:.3f} "
                 f"({'factual' if factual else 'non-factual'})")
    ax.legend()
    return save_figure(fig, figure_dir / f"{out.name}_rewards.png")


if __name__ == "__main__":
    from training.engine.loop import run_stage
    run_stage(main)
