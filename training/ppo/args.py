"""PPO's own concept: rollout, reward shaping, KL control and PPO optimisation settings."""
from __future__ import annotations

import math
from dataclasses import dataclass

from training.config import OptimArgs, _f


@dataclass
class PPOArgs:
    reward_model: str = _f("output/rm", "Reward model checkpoint (run_rm_training.sh writes one).")
    critic_init: str = _f("", "Critic initialisation: a reward model checkpoint (default: --reward_model).")
    reference_model: str = _f("", "Frozen reference (default: --from_checkpoint; with LoRA: the actor with adapters "
                                  "disabled and its other trained weights at their start, no second model).")
    rollout_batch_size: int = _f(32, "Prompts per rank per PPO step (generated together, KV-cached).")
    max_new_tokens: int = _f(40, "Longest response.")
    temperature: float = _f(1.0, "Sampling temperature of rollouts.")
    top_p: float = _f(1.0, "Nucleus sampling of rollouts: 1 only (the trainer's log-probs are of the whole softmax; "
                           "lower --temperature instead).")
    gather_for_generation: bool = _f(True, "At ZeRO-3, gather the actor's whole weights on each rank while it "
                                           "generates rollouts (one all-gather per PPO step, not one per layer "
                                           "per token); turn off when the whole actor does not fit in one "
                                           "device's memory beside the run.")
    ppo_epochs: int = _f(1, "Passes over each rollout batch.")
    clip_eps: float = _f(0.2, "Policy ratio clip.")
    value_clip_eps: float = _f(0.2, "Value clip.")
    vf_coef: float = _f(1.0, "Scale of the critic loss (the critic has its own AdamW, so it acts through gradient "
                             "clipping alone; metrics log the loss unscaled).")
    critic_learning_rate: float = _f(1e-4, "Critic learning rate.")
    gamma: float = _f(1.0, "Discount.")
    lam: float = _f(0.95, "GAE lambda.")
    kl_coef: float = _f(0.05, "Initial per-token KL penalty coefficient.")
    kl_estimator: str = _f("k1", "k1 | k3", choices=["k1", "k3"])
    kl_target: float = _f(0.0, "Adaptive KL controller target (0: fixed coefficient).")
    kl_horizon: int = _f(10000, "Adaptive KL controller horizon (samples).")
    reward_clip: float = _f(10.0, "Clip reward-model scores to +-this (0: no clipping).")
    normalize_reward: bool = _f(True, "Normalise scores with running mean/std.")
    reward_norm_window: int = _f(0, "Normalise with the mean/std of the last this many scores (all ranks'), a "
                                    "running window; 0: of every score so far.")
    whiten_advantages: bool = _f(True, "Whiten advantages per rollout batch (over all ranks' response tokens).")
    length_bonus: float = _f(0.0, "LLaVA-RLHF length shaping: + length_bonus * len / max_new_tokens.")
    correct_bonus: float = _f(0.0, "LLaVA-RLHF's symbolic reward, + bonus * training.ppo.shaping.option_bonus: 1 when "
                                   "a multiple-choice answer starts with the correct option's letter (\"B.\") or says "
                                   "\"correct option is B.\"; 0.5 / -0.5 for No / Yes where No is right.")
    reward_bias: float = _f(0.0, "LLaVA-RLHF's reward_bias, added to every shaped score (after normalisation, with "
                                 "the length and correct-option terms).")
    missing_eos_penalty: float = _f(8.0, "LLaVA-RLHF's stop-token penalty (its -8): a response that never emitted "
                                         "EOS within --max_new_tokens gets the reward-model score "
                                         "-missing_eos_penalty, before clipping and normalisation (0: off).")
    relative_eos_penalty: bool = _f(False, "Subtract --missing_eos_penalty from such a response's score instead "
                                          "(LLaVA-RLHF's relative_stop_token_penalty).")
    disable_dropout: bool = _f(True, "Turn dropout off in the actor and critic (LoRA's too): old and new log-probs "
                                     "and values then come from the same function.")
    entropy_coef: float = _f(0.0, "Entropy bonus.")
    critic_warmup_steps: int = _f(0, "Steps that train only the critic before the actor moves.")
    critic_facts: bool = _f(False, "Asymmetric critic: the critic reads each prompt with its facts (the reward model's "
                                   "factual block) before the response, so its per-token values can tell a mentioned "
                                   "object that the facts hold from one they do not; the actor never sees them.")
    ptx_coef: float = _f(0.0, "PPO-ptx (InstructGPT): + ptx_coef * the token-mean NLL of a batch of SFT data in "
                            "every actor update, against the alignment tax (0: off).")
    ptx_data_path: str = _f("", "SFT data of the ptx term (default: the embedded world's sft_train.json).")
    ptx_image_folder: str = _f("", "Image root of --ptx_data_path (default: --image_folder; with no --ptx_data_path, "
                                   "the embedded world's images).")
    ptx_batch_size: int = _f(8, "SFT rows per actor update in the ptx term.")
    factual: bool = _f(True, "Give the reward model the factual block (when it was trained factual).")
    captions_file: str = _f("", "LLaVA-RLHF image_to_caption.json (image -> captions): each prompt's captions, and a "
                                "multiple-choice prompt's correct answer, join its facts, as the reward model's "
                                "training (its --captions_file) gave them.")


def refuse_unusable_counts(p: PPOArgs) -> None:
    """Counts a PPO run cannot work with, refused before any model loads: --ppo_epochs 0 trained nothing and saved
    the starting actor as the result; --rollout_batch_size 0, and --kl_horizon 0 with a KL target, stopped on a
    division by zero (the latter after the first step); --ptx_batch_size 0 was said to be data that did not fit;
    a negative --reward_norm_window normalised with every score so far."""
    bad = [f"--{k} {getattr(p, k)}: give N >= 1" for k in ("rollout_batch_size", "max_new_tokens", "ppo_epochs")
           if getattr(p, k) < 1]
    if p.kl_target and p.kl_horizon < 1:
        bad.append(f"--kl_horizon {p.kl_horizon}: the adaptive KL controller (--kl_target {p.kl_target}) needs N >= 1")
    if p.ptx_coef > 0 and p.ptx_batch_size < 1:
        bad.append(f"--ptx_batch_size {p.ptx_batch_size}: the ptx term (--ptx_coef {p.ptx_coef}) needs N >= 1")
    if p.reward_norm_window < 0:
        bad.append(f"--reward_norm_window {p.reward_norm_window}: give 0 (every score so far) or N >= 1")
    # a negative clip made clamp's lower bound its upper one (every ratio or value clipped to one number, silently);
    # a negative KL coefficient or target paid the policy for leaving the reference
    # a negative critic scale trained the critic away from the returns, a negative stop-token penalty paid a response
    # for never ending, a negative ptx coefficient or critic warm-up was none (torch refused a negative critic
    # learning rate, after the models had loaded)
    bad += [f"--{k} {getattr(p, k)}: give a value >= 0" for k in ("clip_eps", "value_clip_eps", "kl_coef", "kl_target",
                                                                  "vf_coef", "critic_learning_rate", "ptx_coef",
                                                                  "missing_eos_penalty", "critic_warmup_steps")
            if getattr(p, k) < 0]
    bad += [f"--{k} {getattr(p, k)}: give a value in [0, 1]" for k in ("gamma", "lam") if not 0 <= getattr(p, k) <= 1]
    if bad:
        raise SystemExit("; ".join(bad))


def refuse_unusable_step_shape(p: PPOArgs, o: OptimArgs, world_size: int) -> int:
    """A PPO step's micro-batches (--ppo_epochs x its rollout batch's), checked before any model loads (the trainer
    found these only after every model had loaded and every prompt had been checked): --gradient_accumulation_steps
    must divide them (else a step's gradients spilled into the next), and a --reward_norm_window must hold at least
    one step's scores (all ranks')."""
    micro = p.ppo_epochs * math.ceil(p.rollout_batch_size / o.per_device_train_batch_size)
    if micro % o.gradient_accumulation_steps:
        raise ValueError(f"--gradient_accumulation_steps {o.gradient_accumulation_steps} must divide the micro-"
                         f"batches of a PPO step: --ppo_epochs {p.ppo_epochs} x ceil(--rollout_batch_size "
                         f"{p.rollout_batch_size} / --per_device_train_batch_size "
                         f"{o.per_device_train_batch_size}) = {micro}")
    if 0 < p.reward_norm_window < p.rollout_batch_size * world_size:  # a part of one step's scores
        raise ValueError(f"--reward_norm_window {p.reward_norm_window} is smaller than one PPO step's "
                         f"scores (--rollout_batch_size {p.rollout_batch_size} x {world_size} "
                         "ranks): give 0 or at least that many")
    return micro
