"""Reward-model training loop and held-out evaluation under DeepSpeed.

An optimizer step's ranking loss is the mean over ALL its units (pairs for Bradley-Terry, lists for
Plackett-Luce) on every micro-batch of every rank, so batch 4 x accumulation 1, 1 x 4 and 2 ranks
x 2 give the same update. The centering term is per micro-batch (as in LLaVA-RLHF) and averaged
over the step's micro-batches, so with centering on that invariance holds only up to that term. So are ODIN's
terms (--length_head): correlations over each micro-batch's responses, averaged over the step's micro-batches.
"""
from __future__ import annotations

import torch

from training.losses import bradley_terry_loss, odin_loss, pearson, plackett_luce_loss, ranked_pairs, reward_centering
from training.rm.data import RankedBatch, RMDataset, collate_ranked
from training.engine.loop import batch_plan, idle_micro_step, open_run, planned_steps, rank_batches, stand_in_batch
from training.model.builder import eval_mode


def matrix_pairs(R: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) ranked rewards -> (P,) better and (P,) worse rewards of every valid pair i < j."""
    i, j = ranked_pairs(R.shape[1])
    ok = mask[:, i] & mask[:, j]
    return R[:, i][ok], R[:, j][ok]


def resolve_rank_loss(kind: str, sizes: list[int]) -> str:
    if kind != "auto":
        return kind
    return "bradley_terry" if all(n == 2 for n in sizes) else "plackett_luce"


def list_margins(margins: list[float | None] | None, n_lists: int, default: float) -> list[float]:
    """Each list's Bradley-Terry margin: its row's margin column where it has one, else --margin."""
    return [default if m is None else m for m in (margins or [None] * n_lists)]


def rank_loss(R, mask, kind: str, margin: float | list[float], center_coef: float):
    """-> (loss summed over units, number of units, centering term) of one micro-batch. margin: one for all
    pairs, or one per list (row) applied to each of its pairs."""
    better, worse = matrix_pairs(R, mask)
    center = reward_centering(better, worse, center_coef) if center_coef else R.new_zeros(())
    if kind == "plackett_luce":
        return plackett_luce_loss(R, mask, reduction="sum"), R.shape[0], center
    if not isinstance(margin, (int, float)):
        per_list = torch.tensor(margin, dtype=torch.float32, device=R.device)
        margin = matrix_pairs(per_list[:, None].expand(R.shape), mask)[0]  # each pair gets its list's margin
    return bradley_terry_loss(better, worse, margin, reduction="sum"), better.numel(), center


def pair_stats(R, mask) -> torch.Tensor:
    """[correct pairs, pairs, sum best reward, lists, sum other rewards, others] as float64."""
    R, mask = R.detach().cpu(), mask.cpu()  # counts and sums on one device (the rewards may be on a GPU)
    better, worse = matrix_pairs(R, mask)
    others = mask.clone()
    others[:, 0] = False
    return torch.stack([(better > worse).sum(), torch.tensor(better.numel()), R[:, 0].sum(), torch.tensor(R.shape[0]),
                        R[others].sum(), others.sum()]).double().cpu()


def summarize(stats: torch.Tensor, prefix: str = "") -> dict:
    correct, pairs, best, lists, other, n_other = stats.tolist()
    chosen, rejected = best / max(lists, 1), other / max(n_other, 1)
    return {f"{prefix}accuracy": correct / max(pairs, 1), f"{prefix}reward_chosen": chosen,
            f"{prefix}reward_rejected": rejected, f"{prefix}reward_margin": chosen - rejected}


def response_tokens(tokenizer, responses: list[str]) -> list[int]:
    """Each response's length in tokens (its text alone, as the tokenizer splits it): ODIN's length."""
    return [len(ids) for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]


def length_corr(tokenizer, records, kept: torch.Tensor, R: torch.Tensor) -> float:
    """Pearson correlation of the held-out rewards (kept rows' (n, N), NaN: padding) with their responses' lengths in
    tokens: how much of the reward is length (ODIN's measure of it)."""
    lengths = [n for i in kept.nonzero().flatten().tolist() for n in response_tokens(tokenizer, records[i].responses)]
    rewards = R[~torch.isnan(R)]
    return float(pearson(rewards, torch.tensor(lengths, dtype=torch.float64))) if len(lengths) > 1 else float("nan")


class RMTrainer:
    report = None  # the run's BadRowReport (set by main): written with each resumable checkpoint
    odin = False  # --length_head (set from the config)

    def __init__(self, strategy, engine, processor, train_set: RMDataset, eval_set: RMDataset | None, cfg,
                 arch_name: str):
        self.s, self.engine, self.processor, self.cfg = strategy, engine, processor, cfg
        self.train_set, self.eval_set, self.arch_name = train_set, eval_set, arch_name
        self.pad_id, self.tokenizer = processor.tokenizer.pad_token_id, processor.tokenizer
        o, rm = cfg["optim"], cfg["rm"]
        self.plan = batch_plan(len(train_set), o, strategy.world_size)
        self.loss_kind = resolve_rank_loss(rm.rank_loss, [len(r.responses) for r in train_set.records])
        if rm.margin and self.loss_kind == "plackett_luce":  # it has no margin term: the flag did nothing
            raise SystemExit(f"--margin {rm.margin} is a Bradley-Terry margin; the Plackett-Luce loss (ranked lists "
                             "longer than two, or --rank_loss plackett_luce) has none: drop --margin or use "
                             "--rank_loss bradley_terry")
        with_margin = next((r for ds in (train_set, eval_set) if ds is not None for r in ds.records
                            if r.margin is not None), None)  # the held-out file's too: its loss would drop it
        if with_margin is not None and self.loss_kind == "plackett_luce":
            raise SystemExit(f"{with_margin.source}: a margin column is a Bradley-Terry margin; the Plackett-Luce "
                             "loss (ranked lists longer than two, or --rank_loss plackett_luce) has none: drop the "
                             "column or use --rank_loss bradley_terry")
        self.odin = rm.length_head
        self.interrupted = False

    def _batch(self, dataset: RMDataset, idx: list[int]) -> RankedBatch | None:
        got = [(i, x) for i in idx if (x := dataset[i]) is not None]
        margins = [dataset.records[i].margin for i, _ in got]
        lengths = [response_tokens(self.tokenizer, dataset.records[i].responses) for i, _ in got] if self.odin else None
        return (collate_ranked([x for _, x in got], self.pad_id, self.arch_name, margins, lengths,
                               self.cfg["rm"].fast_path).to(self.s.device) if got else None)

    def _rewards(self, b: RankedBatch):
        """(B, N) rewards and mask: the reward model's reward (an ODIN model's quality head)."""
        return b.as_matrix(self.engine(**b.model_inputs()))

    def _train_rewards(self, b: RankedBatch):
        """(B, N) rewards the ranking loss sees, their mask, and the ODIN term (0 without --length_head): with it
        the rewards are the sum of the quality and length heads'."""
        if not self.odin:
            return *self._rewards(b), 0.0
        (heads, dot), rm = self.engine(**b.model_inputs(), with_length=True), self.cfg["rm"]
        R, mask = b.as_matrix(heads.sum(-1))
        return R, mask, odin_loss(heads[:, 0], heads[:, 1], b.lengths, dot, rm.length_coef, rm.orthogonal_coef)

    def _units(self, b: RankedBatch) -> int:
        return len(b.sizes) if self.loss_kind == "plackett_luce" else sum(n * (n - 1) // 2 for n in b.sizes)

    def _step(self, micro_batches: list) -> dict:
        o, rm = self.cfg["optim"], self.cfg["rm"]
        accum, world = o.gradient_accumulation_steps, self.s.world_size
        batches = [b for b in micro_batches if b is not None]
        lr = self.engine.get_lr()[0]  # this step's rate (the scheduler moves on at its last micro-step)
        n_units = float(self.s.all_reduce(sum(self._units(b) for b in batches)))
        # summed where computed, copied to the host once per step (a float() per micro-batch waited for the GPU)
        sums, rewards = torch.zeros(3, dtype=torch.float64, device=self.s.device), []
        tokens = sum(b.n_tokens for b in batches)  # counted before the first forward
        lists = sum(len(b.sizes) for b in batches)  # those trained: a skipped bad row's list is not
        for b in batches:
            R, mask, odin = self._train_rewards(b)
            margins = list_margins(b.margins, len(b.sizes), rm.margin)
            loss_sum, _, center = rank_loss(R, mask, self.loss_kind, margins, rm.center_coef)
            # DeepSpeed divides by `accum` and averages ranks: the ranking term becomes a mean over
            # the step's units, the centering and ODIN terms means over its micro-batches
            self.engine.backward(loss_sum * accum * world / max(n_units, 1.0) + center + odin)
            self.engine.step()
            sums += torch.stack([torch.as_tensor(x, device=sums.device).detach().double()
                                 for x in (loss_sum, center, odin)])
            rewards.append((R.detach(), mask))
        for _ in range(accum - len(batches)):  # all rows of a micro-batch skipped: keep the count in sync
            stand = stand_in_batch(lambda i: self._batch(self.train_set, i), len(self.train_set))
            idle_micro_step(self.engine, lambda: self._train_rewards(stand)[0].sum())
        stats = sum((pair_stats(R, mask) for R, mask in rewards), torch.zeros(6, dtype=torch.float64))
        red = self.s.all_reduce(torch.cat([sums.cpu(), torch.tensor([tokens, lists], dtype=torch.float64), stats]))
        loss = float(red[0]) / max(n_units, 1.0) + float(red[1] + red[2]) / (accum * world)
        odin = {"odin_loss": float(red[2]) / (accum * world)} if self.odin else {}
        return {"loss": loss, "tokens": float(red[3]), "lists": float(red[4]), "lr": lr, **odin, **summarize(red[5:])}

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[dict, torch.Tensor]:
        """Held-out metrics and the (n_lists, N) reward matrix, row i for eval_set.records[i] (NaN: padding, or
        every entry of a skipped row). Ranks split the lists (training.engine.loop.rank_batches)."""
        ds, bs = self.eval_set, self.cfg["optim"].per_device_eval_batch_size
        n = len(ds)
        N = max(len(r.responses) for r in ds.records)
        out = torch.zeros((n, N), dtype=torch.float64)
        nonfinite = 0.0  # rewards of real responses that are NaN or inf (a NaN here marks skipped rows and padding)
        was_training = self.engine.training
        eval_mode(self.engine)
        for idx in rank_batches(n, self.s.world_size, self.s.rank, bs):
            got = [(i, x) for i in idx if (x := ds[i]) is not None]
            for i in set(idx) - {i for i, _ in got}:
                out[i] = float("nan")  # a skipped bad row
            if not got:  # a forward all the same (rank_batches), discarded
                self._rewards(stand_in_batch(lambda i: self._batch(ds, i), n,
                                             fallback=(lambda i: self._batch(self.train_set, i), len(self.train_set))))
                continue
            R, mask = self._rewards(collate_ranked([x for _, x in got], self.pad_id, self.arch_name,
                                                   fast=self.cfg["rm"].fast_path).to(self.s.device))
            R, mask = R.double().cpu(), mask.cpu()
            nonfinite += float((~torch.isfinite(R) & mask).sum())
            R = R.masked_fill(~mask, float("nan"))
            for (i, _), row in zip(got, R):
                out[i, :row.shape[0]] = row
                out[i, row.shape[0]:] = float("nan")
        if was_training:
            self.engine.train()
        if float(self.s.all_reduce(torch.tensor(nonfinite, dtype=torch.float64))) > 0:  # every rank stops together
            from training.engine.strategy import NonFiniteError
            raise NonFiniteError("held-out evaluation: the reward model gave non-finite rewards (they were taken for "
                                 "skipped bad rows and left out of the metrics); its numerics overflowed (fp16?) or "
                                 "its weights are broken")
        every = self.s.all_reduce(out)
        kept = ~torch.isnan(every[:, 0])
        R, mask = every[kept], ~torch.isnan(every[kept])
        Rf = torch.nan_to_num(R).float()
        margins = list_margins([r.margin for r, k in zip(ds.records, kept.tolist()) if k], len(R),
                               self.cfg["rm"].margin)
        loss, units, center = rank_loss(Rf, mask, self.loss_kind, margins, self.cfg["rm"].center_coef)
        metrics = {"eval/loss": float(loss) / max(units, 1) + float(center), "eval/n": int(kept.sum()),
                   **summarize(pair_stats(Rf, mask), "eval/"),
                   "eval/length_corr": length_corr(self.tokenizer, ds.records, kept, R)}
        if not kept.any():  # every held-out row a bad row (skipped): no figures, rather than an accuracy of 0
            metrics = {k: v if k == "eval/n" else float("nan") for k, v in metrics.items()}
            if self.s.is_main:
                print("held-out evaluation: every row was a bad row (skipped; see bad_rows.json): no metrics")
        return metrics, every

    # ---- loop --------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        c, o = self.cfg["run"], self.cfg["optim"]
        step, log = open_run(self.s, self.engine, self.cfg, self.plan, "rm",
                             {"loss": ("loss", "{:.3f}"), "acc": ("accuracy", "{:.2f}")},
                             report=self.report)
        self.logger = log.logger
        self.engine.train()
        for step, epoch, idx in planned_steps(self.plan, step, len(self.train_set), o.per_device_train_batch_size,
                                              o.gradient_accumulation_steps, self.s.world_size, self.s.rank, o.seed,
                                              c.stop_after_steps):
            self.train_set.epoch = epoch
            m = self._step([self._batch(self.train_set, i) for i in idx])
            log.after(step, m, {"tokens_per_s": m.pop("tokens"), "lists_per_s": m.pop("lists")},
                      evaluate=(lambda: self.evaluate()[0]) if self.eval_set is not None else None)
        log.close(keep_logger=True)  # main logs the final evaluation after saving
        self.interrupted = step < self.plan.total_steps
        self.final_step = step
        return log.history
