"""PPO with a frozen (factual) reward model, a critic initialised from it, and a frozen reference.

One step: sample rollouts for a batch of prompts -> score them (RM with the factual block) ->
per-token KL penalty against the reference + shaped score at the last token -> GAE -> PPO epochs
over minibatches (clipped policy loss for the actor, clipped value loss for the critic).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from pathlib import Path

import torch

from training.advantages import (AdaptiveKLController, RunningMoments, explained_variance, gae, kl_estimate,
                                 token_rewards, whiten)
from training.data.collate import collate_sft
from training.data.images import load_image
from training.logprobs import masked_mean, nll_sum, token_logprobs, token_logprobs_entropy
from training.losses import ppo_policy_loss, ppo_value_loss
from training.data.row_parts import ANSWER_FIELDS
from training.ppo.args import refuse_unusable_step_shape
from training.ppo.rollout import generate_rollouts, relay, response_view
from training.ppo.shaping import option_bonus, stop_token_penalty
from training.predict.generate import DecodeArgs
from training.rm.data import encode_for_rm, readable_response
from training.rm.factual import factual_block
from training.engine.loop import StepPlan, open_run, planned_steps
from training.engine.strategy import NonFiniteError
from training.model.builder import eval_mode
from training.model.reference import lora_reference, snapshot
from training.templates.chat import IGNORE, PromptTooLong


def _check_finite(strategy, step: int, ckpt: Path, **tensors) -> None:
    """Every rank checks, and all stop together when any rank sees a non-finite value (a rank stopping
    alone would leave the others waiting in a collective)."""
    bad = [name for name, t in tensors.items() if not torch.isfinite(torch.as_tensor(t)).all()]
    if float(strategy.all_reduce(float(len(bad)))) > 0:
        what = ", ".join(bad) if bad else "values on another rank"
        raise NonFiniteError(f"non-finite {what} at PPO step {step}: stopping. The last good checkpoint "
                             f"is intact under {ckpt} (resume with --resume after fixing the cause)")


def rank_means(strategy, stats: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Each statistic's mean over every rank's updates, an update's value weighed by its weight (value, weight): the
    response tokens of its micro-batch for the token-mean losses, as the optimised loss is one mean over a step's
    tokens (a mean of micro-batch means logged a policy loss the update did not minimise). Every rank makes the same
    updates; statistics with no values are left out."""
    names = [k for k, v in stats.items() if v]
    sums = torch.tensor([[sum(v * w for v, w in stats[k]), sum(w for _, w in stats[k])] for k in names],
                        dtype=torch.float64)
    sums = strategy.all_reduce(sums)
    return {k: float(s / n) if n > 0 else 0.0 for k, (s, n) in zip(names, sums.tolist())}


def step_plan(n_prompts: int, p, o, world_size: int) -> StepPlan:
    """PPO's steps over n_prompts: one rollout batch per rank per step; refused when there is not one whole step."""
    try:
        return StepPlan.make(n_prompts, p.rollout_batch_size, 1, world_size, o.num_train_epochs, o.max_steps)
    except ValueError:
        raise ValueError(f"{n_prompts} prompts are fewer than one rollout batch (--rollout_batch_size "
                         f"{p.rollout_batch_size} x {world_size} ranks): give a smaller --rollout_batch_size, or "
                         "more prompts") from None


class PPOTrainer:
    report = None  # the run's BadRowReport (set by main): written with each resumable checkpoint

    def __init__(self, strategy, actor, critic, ref, rm, processor, rm_processor, encoder, rm_encoder,
                 arch_name: str, rm_arch_name: str, records, image_root: str, cfg, ptx=None, critic_encoder=None):
        self.s, self.actor, self.critic, self.ref, self.rm = strategy, actor, critic, ref, rm
        self.processor, self.rm_processor, self.encoder, self.rm_encoder = processor, rm_processor, encoder, rm_encoder
        self.arch_name, self.rm_arch_name = arch_name, rm_arch_name
        self.records, self.image_root, self.cfg = records, image_root, cfg
        self.ptx = ptx  # SFT rows of the PPO-ptx term (an SFTDataset), or None
        self.critic_encoder = critic_encoder  # --critic_facts: the critic's prompts, with facts (else the actor's)
        self.p, o = cfg["ppo"], cfg["optim"]
        if ptx is not None:  # the rows' order, fixed by the seed: a resumed run reads the same rows
            self.ptx_order = torch.randperm(len(ptx), generator=torch.Generator().manual_seed(o.seed)).tolist()
        # a PPO step is one rollout batch per rank: the shared plan's rule (its prompts past the last whole step are
        # left out each epoch and said); what else fixes its steps, checked on resume, goes into the shape
        self.plan = step_plan(len(records), self.p, o, strategy.world_size)
        self.plan.shape.update(rollout_batch_size=self.p.rollout_batch_size, ppo_epochs=self.p.ppo_epochs)
        self.steps_per_epoch, self.total_steps = self.plan.steps_per_epoch, self.plan.total_steps
        # optimizer updates per PPO step: the learning-rate schedule counts these, as does the ptx term
        self.micro_per_step = refuse_unusable_step_shape(self.p, o, strategy.world_size)
        self.updates_per_step = math.ceil(self.micro_per_step / o.gradient_accumulation_steps)
        self.kl_ctl = AdaptiveKLController(self.p.kl_coef, self.p.kl_target or None, self.p.kl_horizon)
        self.moments = RunningMoments(self.p.reward_norm_window)
        # ZeRO-3 generation with per-module gathers: a rank that finished keeps joining them (synced_gpus)
        self.synced = strategy.ds.zero_stage == 3 and strategy.world_size > 1 and not self.p.gather_for_generation

    # ---- forwards ------------------------------------------------------------------------------
    def _module(self, engine):
        return engine.module if hasattr(engine, "module") else engine

    def _ref_context(self):
        """LoRA actor with no separate reference: the reference is the actor with adapters disabled and its
        other trained weights (projector, vision tower) at their start (training.model.reference)."""
        if self.ref is None:
            return lora_reference(self.actor, self.ref_start)
        return contextlib.nullcontext()

    def _logprobs(self, model, batch, suppressed, with_entropy: bool = False):
        """Token log-probs (and entropies) of the distribution rollouts sample from: softmax(logits / temperature)
        without the tokens the sampler suppresses."""
        logits = model(**batch.model_inputs()).logits
        if with_entropy:  # with entropy_coef 0 only a metric
            return token_logprobs_entropy(logits, batch.labels, self.p.temperature, self.p.entropy_coef != 0,
                                          suppressed)
        return (*token_logprobs(logits, batch.labels, self.p.temperature, suppressed), None)

    def _scores(self, records, images, responses, step: int) -> torch.Tensor:
        """The reward model's scores of the rollouts, each read whole (image, prompt, response and the factual
        block, its facts shuffled per rollout as LLaVA-RLHF's PPO does, seeded by seed, step, rank and row): a
        rollout it cannot read whole stops the run on every rank, naming the prompt's row."""
        factual = self.p.factual and getattr(self._module(self.rm), "factual", False)
        enc, bad = [], ""
        for i, (r, im, resp) in enumerate(zip(records, images, responses)):
            seed = f"{self.cfg['optim'].seed}-{step}-{self.s.rank}-{i}"
            try:
                enc.append(encode_for_rm(self.rm_encoder, r.prompt, readable_response(resp, self.rm_encoder), im,
                                         r.facts, factual, shuffle_seed=seed, whole=True))
            except PromptTooLong as e:
                bad = bad or f"{r.source}: {e}"
        if float(self.s.all_reduce(float(bool(bad)))) > 0:  # every rank stops, none waits in a collective
            raise ValueError(f"{bad or 'a prompt on another rank'}: the reward model reads at most "
                             f"{self.rm_encoder.max_seq_len} tokens (--max_seq_len + --max_new_tokens + 64) and "
                             "cannot read this rollout whole; raise --max_seq_len or shorten the row's facts")
        batch = collate_sft(enc, self.rm_processor.tokenizer.pad_token_id, self.rm_arch_name).to(self.s.device)
        with torch.no_grad():
            return self.rm(batch.input_ids, batch.attention_mask, **batch.vision).float()

    def _shape(self, score: torch.Tensor, rollout, records) -> torch.Tensor:
        """The reward at each response's last token before the KL penalty: the reward model's score with the
        stop-token penalty (in the score's units, as LLaVA-RLHF has it), clipped, then normalised by running
        statistics of the clipped scores alone (the penalty kept out of them), then the length, correct-option
        and bias terms."""
        p = self.p
        s = stop_token_penalty(score, rollout.ended, p.missing_eos_penalty, p.relative_eos_penalty)
        clip = p.reward_clip or float("inf")  # (0: none; it clamped every score to 0, a run without reward)
        s = s.clamp(-clip, clip)
        if p.normalize_reward:
            self.moments.update(self.s.gather(score.clamp(-clip, clip)))
            s = (s - self.moments.mean) / self.moments.std
        s = s + p.length_bonus * rollout.lengths.to(s) / p.max_new_tokens
        if p.correct_bonus:
            answers = [next((r.meta[k] for k in ANSWER_FIELDS if r.meta.get(k) is not None), None) for r in records]
            bonus = [option_bonus(resp, a) for resp, a in zip(rollout.responses, answers)]
            s = s + p.correct_bonus * torch.tensor(bonus, dtype=s.dtype, device=s.device)
        return s + p.reward_bias

    def _ptx_loss(self, step: int, update: int) -> torch.Tensor:
        """Token-mean NLL of this rank's ptx batch for the `update`-th actor update of `step`: rows are
        read in a seeded order, so a resumed run sees the same rows as an uninterrupted one; rows whose
        encoding failed (counted in bad_rows.json) are passed over."""
        p, n, order = self.p, len(self.ptx), self.ptx_order
        start = (((step - 1) * self.micro_per_step + update) * self.s.world_size + self.s.rank) * p.ptx_batch_size
        items = []
        for j in range(n):
            if len(items) == p.ptx_batch_size:
                break
            item = self.ptx[order[(start + j) % n]]
            if item is not None:
                items.append(item)
        if not items:
            raise ValueError("no row of the ptx data fits --max_seq_len + --max_new_tokens (see bad_rows.json)")
        b = collate_sft(items, self.processor.tokenizer.pad_token_id, self.arch_name).to(self.s.device)
        nll, _ = nll_sum(self.actor(**b.model_inputs()).logits, b.labels)
        return nll / max(b.n_target_tokens, 1)

    # ---- one PPO step --------------------------------------------------------------------------
    def experience(self, records, step: int, ckpt: Path) -> dict:
        p = self.p
        images = [[load_image(src, self.image_root) for src in r.images] for r in records]
        decode = DecodeArgs(max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.temperature, top_p=p.top_p)
        actor = self._module(self.actor)
        eval_mode(actor)
        eval_mode(self._module(self.critic))  # the old values, as the old log-probs, without dropout
        # sampling depends only on (seed, step, rank): a resumed run draws the same rollouts
        torch.manual_seed(self.cfg["optim"].seed + 100003 * step + self.s.rank)
        with self.s.whole_for_generation(self.actor, p.gather_for_generation) as whole:
            ro = generate_rollouts(whole, self.processor, self.encoder, self.arch_name, [r.prompt for r in records],
                                   images, decode, self.s.device, synced_gpus=self.synced)
        R = int(ro.lengths.max())
        view = self._critic_view(records, images, ro) if self.critic_encoder is not None else None
        cb = view.batch if view is not None else ro.batch
        with torch.no_grad():
            lp, mask, _ = self._logprobs(actor, ro.batch, ro.suppressed)
            with self._ref_context():
                ref_lp, _, _ = self._logprobs(self._module(self.ref) if self.ref is not None else actor, ro.batch,
                                              ro.suppressed)
            values = self._module(self.critic)(cb.input_ids, cb.attention_mask, per_token=True, **cb.vision)
        old_lp, rmask = response_view(lp, mask, R)
        ref_lp, _ = response_view(ref_lp, mask, R)
        values, _ = response_view(values[:, :-1], cb.labels[:, 1:] != IGNORE, R)
        raw = self._scores(records, images, ro.responses, step)
        kl = kl_estimate(old_lp, ref_lp, p.kl_estimator) * rmask
        # the critic's values by name: a non-finite one was first seen as a "non-finite policy_loss" (value_loss in
        # the warm-up), pointing away from the critic
        _check_finite(self.s, step, ckpt, reward=raw, kl=kl, critic_values=values.masked_fill(~rmask.bool(), 0.0))
        score = self._shape(raw, ro, records)
        rewards = token_rewards(score, kl, rmask.float(), self.kl_ctl.value)
        adv, ret = gae(rewards, values, rmask.float(), p.gamma, p.lam)
        if p.whiten_advantages:
            adv = whiten(adv, rmask.float(), reduce=self._sum_ranks)
        return {"rollout": ro, "critic_view": view, "mask": mask, "rmask": rmask, "R": R, "old_lp": old_lp,
                "values": values, "adv": adv, "ret": ret, "raw": raw, "score": score, "kl": kl}

    def _critic_view(self, records, images, ro):
        """--critic_facts: the rollouts as the critic reads them, each prompt's last user turn followed by the factual
        block (facts in row order) and then the sampled response; a prompt it cannot read with the response stops the
        run on every rank, naming the row."""
        prompts, bad = [], ""
        for r in records:
            last = max(i for i, m in enumerate(r.prompt) if m.role == "user")
            turn = dataclasses.replace(r.prompt[last], content=r.prompt[last].content + "\n" + factual_block(r.facts))
            prompts.append([*r.prompt[:last], turn, *r.prompt[last + 1:]])
        try:
            view = relay(ro, self.critic_encoder, self.arch_name, prompts, images,
                         self.processor.tokenizer.pad_token_id, self.s.device, [str(r.source) for r in records])
        except PromptTooLong as e:
            view, bad = None, f"{e}"
        if float(self.s.all_reduce(float(bool(bad)))) > 0:
            raise ValueError(f"--critic_facts: {bad or 'a prompt on another rank'}: the critic reads at most "
                             f"{self.critic_encoder.max_seq_len} tokens of prompt, facts and response; raise "
                             "--max_seq_len or shorten the rows' facts")
        return view

    def _minibatches(self, n: int, epoch: int):
        """This PPO epoch's minibatches: a fresh order every epoch, fixed by (seed, step, epoch); one minibatch of
        every rollout, in rollout order, when it holds them all (its loss does not depend on the order)."""
        mb = self.cfg["optim"].per_device_train_batch_size
        if mb >= n:
            return [list(range(n))]
        g = torch.Generator().manual_seed(self.cfg["optim"].seed + self._step + 1_000_003 * epoch)
        perm = torch.randperm(n, generator=g).tolist()
        return [perm[i:i + mb] for i in range(0, n, mb)]

    def train_on(self, exp: dict, step: int, ckpt: Path) -> dict:
        p, ro = self.p, exp["rollout"]
        train_actor = step > p.critic_warmup_steps
        self.actor.train() if train_actor else None
        self.critic.train()
        stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "entropy", "ptx_loss")}
        t0, n_tok, update = time.time(), 0, 0
        micro = [idx for epoch in range(p.ppo_epochs) for idx in self._minibatches(len(ro.responses), epoch)]
        scale = self._token_shares(micro, exp["rmask"])
        for idx, share in zip(micro, scale):
            b = _select(ro.batch, idx, ro.vision_rows, ro.with_vision)
            rm_ = exp["rmask"][idx]
            n_own = float(rm_.sum())  # this micro-batch's response tokens: its weight in the logged means
            if train_actor:
                lp, mask, ent = self._logprobs(self.actor, b, ro.suppressed, with_entropy=True)
                lp, _ = response_view(lp, mask, exp["R"])
                ent, _ = response_view(ent, mask, exp["R"])
                pl, clipfrac = ppo_policy_loss(lp, exp["old_lp"][idx], exp["adv"][idx], rm_, p.clip_eps)
                ent_mean = masked_mean(ent, rm_)
                loss = (pl - p.entropy_coef * ent_mean) * share
                if self.ptx is not None:
                    ptx = self._ptx_loss(step, update)
                    loss = loss + p.ptx_coef * ptx
                    stats["ptx_loss"].append((float(ptx.detach()), 1.0))  # a token mean of its own batch
                update += 1
                _check_finite(self.s, step, ckpt, policy_loss=loss)
                self.actor.backward(loss)
                self.actor.step()
                for k, v in (("policy_loss", pl), ("clipfrac", clipfrac), ("entropy", ent_mean)):
                    stats[k].append((float(v.detach()), n_own))
            # through the engine (as the actor): its forward advances ZeRO-3's micro-step count, without which
            # each micro-batch's gradient replaced the one before under accumulation
            view = exp["critic_view"]
            bc = b if view is None else _select(view.batch, idx, view.vision_rows, view.with_vision)
            v = self.critic(bc.input_ids, bc.attention_mask, per_token=True, **bc.vision)
            v, _ = response_view(v[:, :-1], bc.labels[:, 1:] != IGNORE, exp["R"])
            vl = ppo_value_loss(v, exp["values"][idx], exp["ret"][idx], rm_, p.value_clip_eps)
            _check_finite(self.s, step, ckpt, value_loss=vl)
            self.critic.backward(p.vf_coef * vl * share)
            self.critic.step()
            stats["value_loss"].append((float(vl.detach()), n_own))  # unscaled, comparable across --vf_coef
            n_tok += int(n_own)
        for name, engine in (("actor", self.actor), ("critic", self.critic)):  # a finite loss can step to NaN
            if not self.s.weights_finite(engine):  # (the next rollout would fail inside sampling, unnamed)
                raise NonFiniteError(f"non-finite weights in the {name} after PPO step {step}: stopping. The last "
                                     f"good checkpoint is intact under {ckpt} (resume with --resume after fixing "
                                     "the cause, e.g. a lower learning rate)")
        rmask = exp["rmask"].float()
        seq_kl = exp["kl"].sum(-1)
        raw = self.s.gather(exp["raw"])  # every rank's scores; one score alone has no spread (std 0, not NaN)
        train_s = self.s.all_reduce(time.time() - t0, "max")
        out = {
            "reward/mean": self._mean(exp["raw"]), "reward/std": float(raw.std(correction=int(raw.numel() > 1))),
            "reward/shaped_mean": self._mean(exp["score"]), "kl": self._mean(seq_kl), "kl_coef": self.kl_ctl.value,
            "explained_variance": explained_variance(exp["ret"], exp["values"], rmask, self._sum_ranks),
            "response_length": self._mean(ro.lengths.float()), "eos_rate": self._mean(ro.ended.float()),
            # all ranks' tokens over the slowest rank's time
            "gen_tokens_per_s": float(self.s.all_reduce(float(ro.lengths.sum())) /
                                      self.s.all_reduce(ro.gen_seconds, "max").clamp(min=1e-9)),
            "train_tokens_per_s": float(self.s.all_reduce(float(n_tok)) / train_s.clamp(min=1e-9)),
            "actor_trained": float(train_actor),
        }
        out.update(rank_means(self.s, stats))
        self.kl_ctl.update(out["kl"], p.rollout_batch_size * self.s.world_size)
        return out

    def _token_shares(self, micro: list[list[int]], rmask: torch.Tensor) -> list[float]:
        """Per micro-batch, the factor that turns its token-mean losses into its share of one mean over the
        response tokens of its whole optimizer step (every micro-batch of every rank): its tokens over the step's,
        times accumulation x ranks, which DeepSpeed divides its gradient by. A mean of each micro-batch's own mean
        weighed a token of a short micro-batch more than one of a long micro-batch."""
        accum, world = self.cfg["optim"].gradient_accumulation_steps, self.s.world_size
        own = [float(rmask[idx].sum()) for idx in micro]
        steps = self.s.all_reduce(torch.tensor([sum(own[i:i + accum]) for i in range(0, len(own), accum)]))
        return [n * accum * world / max(float(steps[i // accum]), 1.0) for i, n in enumerate(own)]

    def _sum_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over ranks, in t's dtype and on its device (the `reduce` of whiten and explained_variance)."""
        return self.s.all_reduce(t).to(t)

    def _mean(self, x: torch.Tensor) -> float:
        return float(self.s.gather(x.float()).mean())

    # ---- loop ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run restores besides the two engines (saved with their checkpoints)."""
        return {"kl_coef": self.kl_ctl.value, "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.value = state["kl_coef"]
        self.moments.load_state_dict(state["moments"])

    def train(self) -> list[dict]:
        c, o = self.cfg["run"], self.cfg["optim"]
        ckpt = Path(c.output_dir) / "checkpoints"
        plan = self.plan
        if self.ref is None:  # the starting values, before a resumed run loads its own
            self.ref_start = snapshot(self.actor)
        step, log = open_run(self.s, {"actor": self.actor, "critic": self.critic}, self.cfg, plan, "ppo",
                             {"reward": ("reward/mean", "{:.2f}"), "kl": ("kl", "{:.2f}")}, state=self,
                             report=self.report)
        for step, _, idx in planned_steps(plan, step, len(self.records), self.p.rollout_batch_size, 1,
                                          self.s.world_size, self.s.rank, o.seed, c.stop_after_steps):
            self._step = step - 1
            exp = self.experience([self.records[i] for i in idx[0]], step, ckpt)
            log.after(step, self.train_on(exp, step, ckpt), {})  # its rates are per step (generation, training)
        log.close()
        self.interrupted = step < self.total_steps
        return log.history


def _select(batch, idx: list[int], rows: dict[str, list[int]] | None = None, with_vision: list[bool] | None = None):
    """The rollouts `idx` of a rollout batch. rows (Rollout.vision_rows): how many rows of each vision input each
    rollout holds, so that prompts with several images, none (text-only) or Qwen2-VL's patches split too; without
    it a vision input must hold one row per rollout. with_vision (Rollout.with_vision): whether each rollout's prompt
    has vision inputs; rollouts of text-only prompts alone get none, as collate_sft gives them (Idefics3 and mllama
    collate one row per sample, zeros for a text-only one: Idefics3 read such a row alone as no image and stopped,
    "cannot reshape tensor of 0 elements")."""
    from training.data.collate import SFTBatch
    if idx == list(range(batch.input_ids.shape[0])):  # the whole rollout: vision inputs of any layout as they are
        return batch
    if with_vision is not None and not any(with_vision[i] for i in idx):
        return SFTBatch(batch.input_ids[idx], batch.attention_mask[idx], batch.labels[idx], {})
    vision = {}
    for k, v in batch.vision.items():
        n = (rows or {}).get(k)
        if n is not None and sum(n) == v.shape[0]:
            start = [0, *itertools.accumulate(n)]
            picked = [j for i in idx for j in range(start[i], start[i] + n[i])]
            if picked:  # no row (text-only prompts alone): the input is left out, as collate_sft does
                vision[k] = v[picked]
        elif v.shape[0] == batch.input_ids.shape[0]:
            vision[k] = v[idx]
        else:
            raise NotImplementedError(f"PPO minibatching cannot split vision input {k!r}: its rows are not one per "
                                      "prompt (several images per prompt, or patches of all images concatenated as "
                                      "in Qwen2-VL); set --per_device_train_batch_size to --rollout_batch_size")
    return SFTBatch(batch.input_ids[idx], batch.attention_mask[idx], batch.labels[idx], vision)
