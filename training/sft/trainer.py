"""Supervised fine-tuning loop: assistant-token cross-entropy under DeepSpeed.

The loss of an optimizer step is the mean over ALL target tokens of that step (every micro-batch
of every rank), so batch 4 x accumulation 1, batch 1 x accumulation 4 and 2 ranks x batch 2 give
the same update.
"""
from __future__ import annotations

import torch

from training.data.collate import collate_sft
from training.data.images import load_image
from training.engine.loop import batch_plan, idle_micro_step, open_run, planned_steps, rank_batches, stand_in_batch
from training.logprobs import nll_sum
from training.model.builder import eval_mode
from training.templates.chat import ChatEncoder, RowNotEncodable


class SFTDataset(torch.utils.data.Dataset):
    """Records -> Encoded samples, lazily (images decoded when a batch is built)."""

    def __init__(self, records, encoder: ChatEncoder, image_root: str, report):
        self.records, self.encoder, self.image_root, self.report = records, encoder, image_root, report

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        images = [load_image(src, self.image_root) for src in r.images]
        try:
            enc = self.encoder.encode(r.messages, images, last_answer_only=r.last_answer_only)
        except RowNotEncodable as e:
            self.report.bad(r.source, r.text_field, str(e), item=(self, i))
            return None
        if enc.truncated:  # kept (its loss covers the kept tokens), counted in bad_rows.json
            self.report.truncated(r.source, (self, i))
        return enc


class SFTTrainer:
    report = None  # the run's BadRowReport (set by main): written with each resumable checkpoint

    def __init__(self, strategy, engine, processor, dataset: SFTDataset, cfg, arch_name: str,
                 eval_set: SFTDataset | None = None):
        self.s, self.engine, self.processor, self.dataset, self.cfg = strategy, engine, processor, dataset, cfg
        self.eval_set = eval_set
        self.arch_name = arch_name
        self.pad_id = processor.tokenizer.pad_token_id
        o = cfg["optim"]
        self.plan = batch_plan(len(dataset), o, strategy.world_size)

    def _batch(self, idx: list[int], dataset=None):
        ds = self.dataset if dataset is None else dataset
        items = [x for x in (ds[i] for i in idx) if x is not None]
        return collate_sft(items, self.pad_id, self.arch_name).to(self.s.device) if items else None

    def _step(self, micro_batches: list) -> dict:
        o = self.cfg["optim"]
        accum, world = o.gradient_accumulation_steps, self.s.world_size
        batches = [b for b in micro_batches if b is not None]
        lr = self.engine.get_lr()[0]  # this step's rate (the scheduler moves on at its last micro-step)
        n_tok = float(self.s.all_reduce(sum(b.n_target_tokens for b in batches)))
        total_nll = torch.zeros((), dtype=torch.float64, device=self.s.device)  # summed where computed: no GPU sync
        for b in batches:
            logits = self.engine(**b.model_inputs()).logits
            nll, _ = nll_sum(logits, b.labels)
            # DeepSpeed divides by `accum` and averages ranks: undo both so the step is a token mean
            self.engine.backward(nll * accum * world / max(n_tok, 1.0))
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total_nll += nll.detach().double()
        for _ in range(accum - len(batches)):  # all rows of a micro-batch skipped: keep the count in sync
            stand = stand_in_batch(self._batch, len(self.dataset))
            idle_micro_step(self.engine, lambda: nll_sum(self.engine(**stand.model_inputs()).logits, stand.labels)[0])
        loss = float(self.s.all_reduce(total_nll.cpu())) / max(n_tok, 1.0)  # one device-to-host copy per step
        return {"loss": loss, "target_tokens": n_tok, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss: the NLL of every target token of eval_set over their number (eval/loss), as the
        training loss is taken. Ranks split the rows (training.engine.loop.rank_batches)."""
        ds, bs = self.eval_set, self.cfg["optim"].per_device_eval_batch_size
        was_training = self.engine.training
        eval_mode(self.engine)
        nll, tokens, rows = 0.0, 0, 0
        for idx in rank_batches(len(ds), self.s.world_size, self.s.rank, bs):
            b = self._batch(idx, ds) if idx else None
            fill = b is None
            if fill:  # no rows (or only bad ones) in this rank's batch: a forward all the same, discarded (of a
                # training row when every held-out row is a bad row)
                b = stand_in_batch(lambda i: self._batch(i, ds), len(ds), fallback=(self._batch, len(self.dataset)))
            s, t = nll_sum(self.engine(**b.model_inputs()).logits, b.labels)
            if not fill:
                nll, tokens, rows = nll + float(s), tokens + int(t), rows + b.input_ids.shape[0]
        if was_training:
            self.engine.train()
        nll, tokens, rows = self.s.all_reduce(torch.tensor([nll, tokens, rows], dtype=torch.float64)).tolist()
        if not rows and self.s.is_main:
            print("held-out evaluation: every row was a bad row (skipped; see bad_rows.json): no loss")
        loss = nll / tokens if tokens else float("nan")
        return {"eval/loss": loss, "eval/target_tokens": tokens, "eval/n": int(rows)}

    def train(self) -> list[dict]:
        c, o = self.cfg["run"], self.cfg["optim"]
        step, log = open_run(self.s, self.engine, self.cfg, self.plan, "sft",
                             {"loss": ("loss", "{:.3f}"), "tok_s": ("target_tokens_per_s", "{:.0f}")},
                             report=self.report)
        self.engine.train()
        for step, _, idx in planned_steps(self.plan, step, len(self.dataset), o.per_device_train_batch_size,
                                          o.gradient_accumulation_steps, self.s.world_size, self.s.rank, o.seed,
                                          c.stop_after_steps):
            m = self._step([self._batch(i) for i in idx])
            log.after(step, m, {"target_tokens_per_s": m["target_tokens"]},
                      evaluate=self.evaluate if self.eval_set is not None else None)
        log.close(keep_logger=True)  # main logs the final evaluation after saving
        self.logger, self.final_step = log.logger, step
        self.interrupted = step < self.plan.total_steps
        return log.history
