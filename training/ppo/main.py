"""PPO stage entry point (run_ppo_training.sh -> `deepspeed --module training.ppo.main`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from training.config import (DataArgs, DeepSpeedArgs, LoraArgs, ModelArgs, OptimArgs, RunArgs, parse_config,
                             refuse_held_out)
from training.engine.loop import stopped_early
from training.engine.strategy import Strategy
from training.ppo.args import PPOArgs, refuse_unusable_counts, refuse_unusable_step_shape

CONCEPTS = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "optim": OptimArgs,
            "ds": DeepSpeedArgs, "run": RunArgs, "ppo": PPOArgs}
# The embedded world's defaults (kl_coef, length_bonus, lam, temperature, learning_rate, num_train_epochs) were chosen
# on a validation world (three training seeds): the highest mean recall among the settings whose mean CHAIR_i is at
# most half SFT's. Every sweep behind them, seven so far: benchmarks/results_history.md, "PPO sweeps".
DEFAULTS = {"output_dir": "output/ppo", "from_checkpoint": "output/sft", "learning_rate": 5e-5,
            "kl_coef": 0.4, "length_bonus": 6.0, "lam": 1.0, "temperature": 0.7,
            "per_device_train_batch_size": 16, "num_train_epochs": 6.0, "max_seq_len": 160,
            "lr_scheduler_type": "constant", "logging_steps": 1}
PANELS = [("reward", ["reward/mean", "reward/std", "reward/shaped_mean"]), ("KL", ["kl"]), ("entropy", ["entropy"]),
          ("clip fraction", ["clipfrac"]), ("losses", ["policy_loss", "value_loss", "ptx_loss"]),
          ("response length", ["response_length"]), ("critic", ["explained_variance"]),
          ("tokens / s", ["gen_tokens_per_s", "train_tokens_per_s"])]


def _need(path: str, what: str, how: str) -> None:
    if not Path(path).exists():
        raise SystemExit(f"{what} not found at {path}: {how}")


def refuse_model_roles(actor: str, p: PPOArgs) -> None:
    """Each model where PPO reads it, before any loads: --reward_model (and --critic_init) a reward model folder (an
    actor there stopped on a traceback once the actor and reference had loaded), the actor and reference none (a
    reward model there trained its backbone as the policy, silently)."""
    from training.rm.model import refuse_non_reward_model, refuse_reward_model_as_policy
    refuse_reward_model_as_policy(actor, "from_checkpoint")
    refuse_reward_model_as_policy(p.reference_model, "reference_model")
    refuse_non_reward_model(p.reward_model, "reward_model")
    refuse_non_reward_model(p.critic_init, "critic_init")


def ptx_data(p: PPOArgs, d, processor, arch, report, template: str | None):
    """The SFT rows of the ptx term, or None when it is off."""
    if p.ptx_coef <= 0:
        return None
    from training.data.formats import read_sft
    from training.sft.trainer import SFTDataset
    from training.templates.chat import ChatEncoder
    world = Path(d.world_dir)  # the default rows are the world's, and so are their images
    path = p.ptx_data_path or str(world / "sft_train.json")
    root = p.ptx_image_folder or (d.image_folder if p.ptx_data_path else str(world / "images"))
    encoder = ChatEncoder(processor, arch, d.max_seq_len + p.max_new_tokens, template)
    return SFTDataset(read_sft(path, root, report), encoder, root, report)


def ensure_ptx_world(p: PPOArgs, d, strategy) -> None:
    """--ptx_coef without --ptx_data_path reads the embedded world's SFT rows: rank 0 makes the world for them as the
    defaults make it, also beside the user's own prompts (which do not make it; the run stopped on
    data/world/sft_train.json not found, not saying it was the ptx term's default)."""
    if p.ptx_coef > 0 and not p.ptx_data_path:
        if strategy.is_main:
            from training.world.generate import ensure_world
            ensure_world(d.world_dir, d.world_seed)
        strategy.barrier()


def usable_prompts(records, encoder, image_root: str, report, factual: bool, progress: bool, rm_encoder=None,
                   room: int = 0) -> list:
    """The prompts a rollout can use, checked before training (a bad one found mid-run would stop every resume
    at the same step, and on several ranks leave the others waiting): each must fit --max_seq_len with its
    image, carry facts when the reward model is factual, and leave the reward model `room` tokens for the
    response beside its image, prompt and factual block (rm_encoder: the reward model's). The others are bad
    rows of `report` naming file, row and field (an error, or with --skip_bad_rows skipped and counted in
    bad_rows.json)."""
    from tqdm import tqdm

    from training.data.images import load_image
    from training.rm.data import encode_for_rm
    from training.rm.factual import with_facts
    from training.templates.chat import RowNotEncodable

    kept = []
    for r in tqdm(records, desc="checking prompts", disable=not progress, dynamic_ncols=True):
        if factual and not with_facts([r], report):  # in row order: the first bad row is the one named
            continue
        images = [load_image(s, image_root) for s in r.images]
        try:
            encoder.encode(r.prompt, images, add_generation_prompt=True)
        except RowNotEncodable as e:
            report.bad(r.source, r.prompt_field, str(e))
            continue
        if rm_encoder is not None:
            try:
                n = len(encode_for_rm(rm_encoder, r.prompt, "", images, r.facts, factual, whole=True).input_ids)
            except RowNotEncodable as e:
                n, why = None, str(e)
            if n is None or n + room > rm_encoder.max_seq_len:
                report.bad(r.source, "facts" if factual else r.prompt_field,
                           why if n is None else f"the reward model reads {n} tokens of image, prompt"
                           f"{' and facts' if factual else ''} before the response, which with --max_new_tokens "
                           f"{room} exceeds the {rm_encoder.max_seq_len} it reads (--max_seq_len + "
                           "--max_new_tokens + 64)")
                continue
        kept.append(r)
    return kept


def main(argv=None) -> dict:
    cfg = parse_config(CONCEPTS, argv, DEFAULTS, description=__doc__)
    m, d, p, run = cfg["model"], cfg["data"], cfg["ppo"], cfg["run"]
    refuse_held_out(d, run, "PPO")
    if p.top_p != 1:
        raise SystemExit(f"--top_p {p.top_p}: PPO's ratios, KL and entropy are those of softmax(logits / temperature), "
                         "so rollouts sample from all of it (top_p 1); lower --temperature to sample more narrowly")
    if p.temperature <= 0:
        raise SystemExit(f"--temperature {p.temperature}: rollouts sample; give a temperature above 0")
    if p.reward_clip < 0:
        raise SystemExit(f"--reward_clip {p.reward_clip}: scores are clipped to +-it; give a bound above 0, or 0 "
                         "for none")
    refuse_unusable_counts(p)
    strategy = Strategy(cfg["ds"], cfg["optim"], m.precision)
    refuse_unusable_step_shape(p, cfg["optim"], strategy.world_size)
    from training.defaults import resolve_defaults
    if m.from_checkpoint == DEFAULTS["from_checkpoint"]:
        _need(m.from_checkpoint, "the SFT actor", "run `bash run_sft.sh` first")
    _need(p.reward_model, "the reward model", "run `bash run_rm_training.sh` first")
    refuse_model_roles(m.from_checkpoint, p)
    resolve_defaults(m, d, strategy, "ppo_prompts.json")
    ensure_ptx_world(p, d, strategy)

    import torch
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_prompts
    from training.engine.plots import plot_metrics
    from training.model.builder import disable_dropout, load_model_and_processor, set_chat_template
    from training.ppo.trainer import PPOTrainer, step_plan
    from training.rm.model import load_reward_model
    from training.templates.chat import ChatEncoder

    torch.manual_seed(cfg["optim"].seed)
    out = Path(run.output_dir)
    # the prompts are read before any model loads: too few for one rollout batch is refused at once (checked again
    # below on the prompts the models can use)
    report = BadRowReport(skip=d.skip_bad_rows)
    records = read_prompts(d.data_path, d.image_folder, report, p.captions_file or None)
    step_plan(len(records), p, cfg["optim"], strategy.world_size)
    if p.critic_facts:
        from training.rm.factual import has_facts
        lacking = next((r for r in records if not has_facts(r.facts)), None)
        if lacking is not None:
            raise SystemExit(f"--critic_facts: the critic reads each prompt's facts, and {lacking.source} has none "
                             "(--captions_file gives LLaVA-RLHF prompts theirs)")
    actor, processor, arch = load_model_and_processor(m, cfg["lora"], zero3=strategy.build_config())
    template = set_chat_template(processor, m.template)  # rollout prompts; saved with the actor
    ref = None
    # with --qlora the frozen models load in 4-bit too (a 7B reward model in fp16 alone fills a 16 GB T4)
    frozen = dataclasses.replace(cfg["lora"], lora_r=0) if cfg["lora"].qlora else LoraArgs()
    if cfg["lora"].lora_r == 0 or p.reference_model:
        ref_args = dataclasses.replace(m, from_checkpoint=p.reference_model or m.from_checkpoint)
        ref, _, _ = load_model_and_processor(ref_args, frozen, for_training=False,
                                            zero3=strategy.build_config(frozen=True))
        ref = strategy.prepare_frozen(ref)
    rm, rm_processor, rm_arch = load_reward_model(p.reward_model, dataclasses.replace(m, gradient_checkpointing=False),
                                                  frozen, zero3=strategy.build_config(frozen=True))
    rm = strategy.prepare_frozen(rm)
    critic, critic_proc, critic_arch = load_reward_model(p.critic_init or p.reward_model, m, cfg["lora"],
                                                         for_training=True, zero3=strategy.build_config())
    same_tokens = critic_proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    if not same_tokens or critic_arch.name != arch.name:  # the critic reads the actor's token ids and images
        raise SystemExit(f"the critic ({p.critic_init or p.reward_model}: {critic_arch.name}) must share the actor's "
                         f"tokenizer and architecture ({m.from_checkpoint}: {arch.name}); initialise it from a reward "
                         "model trained from the same SFT model (--critic_init)")
    if p.disable_dropout:
        disable_dropout(actor)
        disable_dropout(critic)
    encoder = ChatEncoder(processor, arch, d.max_seq_len, template)
    rm_encoder = ChatEncoder(rm_processor, rm_arch, d.max_seq_len + p.max_new_tokens + 64)
    records = usable_prompts(records, encoder, d.image_folder, report,
                             p.factual and getattr(getattr(rm, "module", rm), "factual", False),
                             strategy.is_main and run.progress, rm_encoder, p.max_new_tokens)
    critic_encoder = None
    if p.critic_facts:  # the critic reads prompt, facts and response: as long as the reward model's reading
        critic_encoder = ChatEncoder(processor, arch, rm_encoder.max_seq_len, template)
    trainer = PPOTrainer(strategy, None, None, ref, rm, processor, rm_processor, encoder, rm_encoder, arch.name,
                         rm_arch.name, records, d.image_folder, cfg, ptx_data(p, d, processor, arch, report, template),
                         critic_encoder)
    trainer.report = report
    # schedules count optimizer updates: updates_per_step of them per PPO step, the actor's after the warm-up
    actor_steps = trainer.total_steps - min(p.critic_warmup_steps, trainer.total_steps)
    actor_updates = max(1, actor_steps * trainer.updates_per_step)
    trainer.actor = strategy.prepare(actor, actor_updates)
    trainer.critic = strategy.prepare(critic, trainer.total_steps * trainer.updates_per_step,
                                      learning_rate=p.critic_learning_rate)
    history = trainer.train()
    if trainer.interrupted:
        return stopped_early(strategy, report, out, history, run)
    strategy.save_hf(trainer.actor, processor, out)
    strategy.write_report(report, out)
    if strategy.is_main:
        plot_metrics(out / "metrics.jsonl", Path(run.figure_dir) / f"ppo_{out.name}.png", "PPO", PANELS)
    return {"history": history, "output_dir": str(out)}


if __name__ == "__main__":
    from training.engine.loop import run_stage
    run_stage(main)
