"""DPO / cDPO / IPO / ORPO / listwise training loop under DeepSpeed.

The loss of an optimizer step is the mean over ALL items (pairs or ranked lists) of that step, every
micro-batch of every rank (plus, for ORPO, the chosen-token mean NLL over the same step), so batch
4 x accumulation 1, batch 1 x accumulation 4 and 2 ranks x batch 2 give the same update.
Reference log-probs come from the cache (default), or are computed live: the policy with its
adapters off (LoRA) or a frozen reference model. Held-out pairs (eval_set) are scored with the same
objective, without updates, every --eval_steps and after training.
"""
from __future__ import annotations

import torch

from training.dpo.data import collate_groups
from training.dpo.forward import response_logps
from training.dpo.objective import REFERENCE_FREE, metric_keys, objective
from training.engine.loop import (batch_plan, idle_micro_step, open_run, planned_steps, rank_batches,
                                  stand_in_batch)
from training.model.builder import eval_mode
from training.model.reference import lora_reference


class DPOTrainer:
    report = None  # the run's BadRowReport (set by main): written with each resumable checkpoint

    def __init__(self, strategy, processor, dataset, cfg, arch_name: str, eval_set=None):
        self.s, self.processor, self.dataset, self.cfg = strategy, processor, dataset, cfg
        self.arch_name, self.a = arch_name, cfg["dpo"]
        self.pad_id = processor.tokenizer.pad_token_id
        self.engine = None
        self.ref_cache = None  # RefCache
        self.eval_set, self.eval_ref_cache = eval_set, None
        self.ref_model = None  # live reference without LoRA
        self.ref_start = {}  # live reference with LoRA: the other trained weights' start (setup_reference)
        self.metric_keys = metric_keys(self.a)  # every rank reduces these, batch or none
        o = cfg["optim"]
        self.plan = batch_plan(len(dataset), o, strategy.world_size)

    @property
    def needs_reference(self) -> bool:
        return self.a.loss_type not in REFERENCE_FREE

    def make_batch(self, idx: list[int], dataset=None):
        dataset = self.dataset if dataset is None else dataset
        items = [x for x in (dataset[i] for i in idx) if x is not None]
        items = [g for x in items for g in (x if isinstance(x, list) else [x])]  # OPA: two rows per item
        if not items:
            return None
        return collate_groups(items, self.pad_id, self.arch_name, self.a.fast_path).to(self.s.device)

    def _reference(self, batch, cache=None):
        cache = self.ref_cache if cache is None else cache
        if cache is not None:
            return cache.lookup(batch.indices, self.s.device, batch.n_responses)
        with torch.no_grad():
            if self.ref_model is not None:
                r = response_logps(self.ref_model, batch)
            else:  # LoRA: the policy with adapters off (other trained weights at their start), deterministic
                was_training = self.engine.training
                if not self.a.disable_dropout:
                    eval_mode(self.engine)
                with lora_reference(self.engine, self.ref_start):
                    r = response_logps(self.engine, batch)
                self.engine.train(was_training)
        if self.a.loss_type == "opa" and self.a.opa_token_level:
            return r.sum.float(), r.count.float(), r.wsum.float(), r.token_lp.float()
        return r.sum.float(), r.count.float(), r.wsum.float()

    def _step(self, micro_batches: list) -> dict:
        o = self.cfg["optim"]
        accum, world = o.gradient_accumulation_steps, self.s.world_size
        batches = [b for b in micro_batches if b is not None]
        lr = self.engine.get_lr()[0]  # this step's rate (the scheduler moves on at its last micro-step)
        rows = getattr(self.dataset, "rows_per_item", 1)
        tok = 0.0
        if self.a.loss_type == "orpo":  # chosen target tokens of the whole step, for the NLL token mean
            tok = sum(float((b.labels.view(b.n_items, b.n_responses, -1)[:, 0, 1:] != -100).sum()) for b in batches)
        n_items, n_tok = self.s.all_reduce(torch.tensor([sum(b.n_items // rows for b in batches), tok],
                                                        dtype=torch.float64)).tolist()
        # each micro-batch's numbers are summed where computed and read to the host once, after the step's last
        # micro-batch (a read per micro-batch made the CPU wait for the GPU between them)
        acc, counts = None, []
        for b in batches:
            ref = self._reference(b) if self.needs_reference else None
            pol = response_logps(self.engine, b)
            counts.append((b.indices, pol.count.detach()))
            obj = objective(pol, ref, self.a)
            loss = obj["pair_loss_sum"] / max(n_items, 1.0)
            if n_tok:
                loss = loss + obj["nll_sum"] / n_tok
            # DeepSpeed divides by `accum` and averages ranks: undo both so the step is a global mean
            self.engine.backward(loss * accum * world)
            self.engine.step()
            vals = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=loss.device).detach() for x in (
                loss, obj["nll_sum"] / max(n_tok, 1), *(obj["metrics"][k] for k in self.metric_keys))])
            acc = vals if acc is None else acc + vals
        for _ in range(accum - len(batches)):  # every row of a micro-batch skipped: keep the count in sync
            stand = stand_in_batch(self.make_batch, len(self.dataset))
            if self.needs_reference and self.ref_cache is None:
                self._reference(stand)  # a live reference's forward gathers under ZeRO-3 too: discarded
            idle_micro_step(self.engine, lambda: response_logps(self.engine, stand).sum.sum())
        if self.ref_cache is not None:
            for indices, count in counts:
                self.ref_cache.check(indices, count)
        if acc is None:  # a rank whose rows were all skipped adds nothing
            acc = torch.zeros(2 + len(self.metric_keys), dtype=torch.float64)
        # one collective of values every rank has, in one order, even a rank whose rows were all skipped
        t = self.s.all_reduce(acc.cpu()).tolist()
        m = {"loss": t[0], **({"nll_loss": t[1]} if self.a.loss_type == "orpo" else {})}
        m.update({k: v / max(n_items, 1.0) for k, v in zip(self.metric_keys, t[2:])})
        m.update(pairs=n_items, lr=lr)
        return m

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The training metrics over the held-out pairs, prefixed eval/: loss (pair-loss mean, plus for ORPO
        the chosen-token mean NLL), rewards/*, logps/* (means over items), eval/n. Ranks split the items
        (training.engine.loop.rank_batches)."""
        ds, bs = self.eval_set, self.cfg["optim"].per_device_eval_batch_size
        rows = getattr(ds, "rows_per_item", 1)
        was_training = self.engine.training
        eval_mode(self.engine)
        sums = {"items": 0.0, "pair_loss": 0.0, "nll": 0.0, "nll_tokens": 0.0, **dict.fromkeys(self.metric_keys, 0.0)}
        for idx in rank_batches(len(ds), self.s.world_size, self.s.rank, bs):
            batch = self.make_batch(idx, ds) if idx else None
            fill = batch is None
            batch = stand_in_batch(lambda i: self.make_batch(i, ds), len(ds)) if fill else batch
            ref = self._reference(batch, self.eval_ref_cache) if self.needs_reference else None
            pol = response_logps(self.engine, batch)
            if self.eval_ref_cache is not None and not fill:
                self.eval_ref_cache.check(batch.indices, pol.count)
            obj = objective(pol, ref, self.a)
            for k, v in (("items", batch.n_items // rows), ("pair_loss", obj["pair_loss_sum"]),
                         ("nll", obj["nll_sum"]), ("nll_tokens", obj["nll_tokens"]), *obj["metrics"].items()):
                sums[k] += 0.0 if fill else float(v)  # a stand-in's forward is discarded
        self.engine.train(was_training)
        t = dict(zip(sums, self.s.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
        items = t.pop("items")
        n = max(items, 1.0)
        loss, nll, tokens = t.pop("pair_loss") / n, t.pop("nll"), t.pop("nll_tokens")
        m = {"eval/loss": loss + (nll / tokens if tokens else 0.0), "eval/n": int(items)}
        if tokens:
            m["eval/nll_loss"] = nll / tokens
        return {**m, **{f"eval/{k}": v / n for k, v in t.items()}}

    def train(self) -> list[dict]:
        c, o = self.cfg["run"], self.cfg["optim"]
        step, log = open_run(self.s, self.engine, self.cfg, self.plan, self.a.loss_type,
                             {"loss": ("loss", "{:.3f}"), "acc": ("rewards/accuracies", "{:.2f}")},
                             report=self.report)
        self.engine.train()
        for step, _, idx in planned_steps(self.plan, step, len(self.dataset), o.per_device_train_batch_size,
                                          o.gradient_accumulation_steps, self.s.world_size, self.s.rank, o.seed,
                                          c.stop_after_steps):
            m = self._step([self.make_batch(i) for i in idx])
            log.after(step, m, {"pairs_per_s": m["pairs"]}, evaluate=self.evaluate if self.eval_set is not None else None)
        log.close(keep_logger=True)  # main logs the final evaluation after saving
        self.logger, self.final_step = log.logger, step
        self.interrupted = step < self.plan.total_steps
        return log.history
