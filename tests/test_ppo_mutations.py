"""PPO's update step (PPOTrainer.train_on) on small hand-made tensors, with stand-ins for the engines and the ranks:
what the actor's and the critic's backward receive, and what the step logs and hands the KL controller; its
minibatches, token shares and rollouts' EOS. Each test names the plausible bug (a mutation) that every other test
let through."""
import types
from types import SimpleNamespace

import pytest
import torch

from training.advantages import AdaptiveKLController, RunningMoments
from training.logprobs import masked_mean
from training.losses import ppo_policy_loss, ppo_value_loss
from training.ppo.trainer import PPOTrainer


class _Engine:
    """An engine stand-in: records the losses handed to backward (and backpropagates them)."""

    def __init__(self, out=None):
        self.out, self.losses = out, []

    def __call__(self, *a, **k):
        return self.out

    def train(self):
        pass

    def backward(self, loss):
        self.losses.append(loss.detach().clone())
        loss.backward()

    def step(self):
        pass


class _Ranks:
    """`world` ranks that all hold the same rollouts: a sum over ranks is world x this rank's, a max is its own."""

    def __init__(self, world):
        self.world_size, self.rank, self.device = world, 0, "cpu"

    def all_reduce(self, x, op="sum"):
        t = torch.as_tensor(x, dtype=torch.float64).detach().clone()
        return t if op == "max" else t * self.world_size

    def gather(self, x):
        return torch.cat([x.detach().float()] * self.world_size)

    def weights_finite(self, engine):
        return True


def _trainer(world=1, entropy_coef=0.5, vf_coef=0.25, kl_target=None):
    """A PPOTrainer's state for train_on: two rollouts of a 2-token prompt, responses of 3 and 1 tokens."""
    torch.manual_seed(0)
    B, T = 2, 6
    labels = torch.full((B, T), -100)
    labels[0, 2:5], labels[1, 2] = torch.tensor([5, 6, 7]), 8
    batch = SimpleNamespace(input_ids=torch.ones(B, T, dtype=torch.long), attention_mask=torch.ones(B, T),
                            labels=labels, vision={})
    mask = labels[:, 1:] != -100  # (B, T-1): positions 1-3 of row 0, position 1 of row 1
    lp = (torch.randn(B, T - 1) * 0.3 - 1).requires_grad_(True)  # the actor's token log-probs now
    ent = (torch.rand(B, T - 1) + 0.5).requires_grad_(True)  # and entropies
    v_now = torch.randn(B, T).requires_grad_(True)  # the critic's per-token values now
    rmask = torch.tensor([[True, True, True], [True, False, False]])
    exp = {"rollout": SimpleNamespace(batch=batch, responses=["a b c", "a"], lengths=torch.tensor([3, 1]),
                                      ended=torch.tensor([True, False]), gen_seconds=1.0, suppressed=[],
                                      vision_rows=None, with_vision=None),
           "critic_view": None, "mask": mask, "rmask": rmask, "R": 3,  # the critic reads the actor's rows
           "old_lp": torch.tensor([[-1.2, -0.8, -1.0], [-0.9, 0.0, 0.0]]),
           "adv": torch.tensor([[1.0, -0.5, 2.0], [-1.5, 0.0, 0.0]]),
           "values": torch.tensor([[0.2, 0.4, -0.3], [0.1, 0.0, 0.0]]),
           "ret": torch.tensor([[1.0, 0.5, 2.0], [-2.0, 0.0, 0.0]]),
           "raw": torch.tensor([1.5, -0.5]), "score": torch.tensor([1.0, -1.0]),
           "kl": torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.0, 0.0]])}
    p = SimpleNamespace(critic_warmup_steps=0, ppo_epochs=1, clip_eps=0.2, value_clip_eps=0.2, rollout_batch_size=B,
                        entropy_coef=entropy_coef, vf_coef=vf_coef, temperature=1.0)
    t = SimpleNamespace(p=p, s=_Ranks(world), actor=_Engine(), critic=_Engine(v_now), ptx=None, _step=0,
                        cfg={"optim": SimpleNamespace(gradient_accumulation_steps=1, per_device_train_batch_size=B,
                                                      seed=0)},
                        kl_ctl=AdaptiveKLController(0.1, kl_target, 10), moments=RunningMoments())
    for name in ("_minibatches", "_token_shares", "_mean", "_sum_ranks"):
        setattr(t, name, types.MethodType(getattr(PPOTrainer, name), t))
    t._logprobs = lambda model, b, suppressed, with_entropy=False: (lp, mask, ent)
    return t, exp, SimpleNamespace(lp=lp, ent=ent, v_now=v_now)


def _view(x, exp):
    """Rows' response positions of a shifted (B, T-1) tensor, laid out (B, R) as the rollout's."""
    from training.ppo.rollout import response_view
    return response_view(x, exp["mask"], exp["R"])[0]


def test_the_actor_minimises_the_policy_loss_minus_the_entropy_bonus():
    """One micro-batch of both rollouts on one rank (its share 1): the actor's loss is the clipped surrogate minus
    entropy_coef x the token-mean entropy. `pl + entropy_coef * ent` (an entropy penalty) passed every test: the one
    that looked only checked that entropy_coef changed the update."""
    t, exp, x = _trainer(entropy_coef=0.5)
    PPOTrainer.train_on(t, exp, step=1, ckpt=None)
    pl, _ = ppo_policy_loss(_view(x.lp, exp), exp["old_lp"], exp["adv"], exp["rmask"], 0.2)
    ent = masked_mean(_view(x.ent, exp), exp["rmask"]).detach()
    assert len(t.actor.losses) == 1
    torch.testing.assert_close(t.actor.losses[0], (pl - 0.5 * ent).detach())
    assert float(ent) > 0.5  # the two signs differ by far
    # the entropy's gradient pushes it up: d loss / d ent_t = -coef / (response tokens) on each response token
    want = torch.zeros_like(x.ent)
    want[exp["mask"]] = -0.5 / 4
    torch.testing.assert_close(x.ent.grad, want)


def test_the_critic_minimises_vf_coef_times_the_value_loss_at_the_rollouts_positions():
    """The critic's loss is vf_coef x the clipped value loss of its values now (read one position before each
    response token, as the old values were) against the returns. Ignoring --vf_coef passed every test."""
    t, exp, x = _trainer(vf_coef=0.25)
    PPOTrainer.train_on(t, exp, step=1, ckpt=None)
    v = _view(x.v_now.detach()[:, :-1], exp)
    vl = ppo_value_loss(v, exp["values"], exp["ret"], exp["rmask"], 0.2)
    assert len(t.critic.losses) == 1 and float(vl) > 0.1
    torch.testing.assert_close(t.critic.losses[0], 0.25 * vl)
    assert torch.equal(x.v_now.grad[:, -1], torch.zeros(2))  # the last position reads no response token


def test_the_kl_controller_counts_every_ranks_rollouts():
    """Two ranks of 2 rollouts: the adaptive coefficient moves by clip(KL / target - 1) x 4 / horizon, the step's
    rollouts on every rank (TRL's batch_size x processes). Counting one rank's passed every test (the two-rank test
    keeps the coefficient fixed)."""
    t, exp, _ = _trainer(world=2, kl_target=1.0)
    out = PPOTrainer.train_on(t, exp, step=1, ckpt=None)
    assert out["kl"] == pytest.approx((0.6 + 0.4) / 2)  # each rollout's summed KL, averaged
    assert t.kl_ctl.value == pytest.approx(0.1 * (1 - 0.2 * 4 / 10))  # KL / target - 1 = -.5, clipped to -.2


def test_the_steps_logged_figures_by_hand():
    """Two ranks holding the same two rollouts. explained_variance = 1 - Var(ret - V) / Var(ret) over the response
    tokens: ret 1, .5, 2, -2 (mean .375, var 2.171875), ret - V .8, .1, 2.3, -2.1 (mean .275, var 2.511875); with
    ret and V swapped (Var(V) .065) it was -37.6 and every test passed, as with the EOS rate of the responses that
    did not emit EOS. reward/std is the sample std of every rank's scores: 1.5, -.5, 1.5, -.5 -> sqrt(4 / 3)."""
    t, exp, _ = _trainer(world=2)
    exp["rollout"].ended = torch.tensor([True, True])
    out = PPOTrainer.train_on(t, exp, step=1, ckpt=None)
    assert out["explained_variance"] == pytest.approx(1 - 2.511875 / 2.171875, rel=1e-5)
    assert out["eos_rate"] == 1.0 and out["response_length"] == 2.0 and out["actor_trained"] == 1.0
    assert out["reward/mean"] == pytest.approx(0.5) and out["reward/shaped_mean"] == pytest.approx(0.0)
    assert out["reward/std"] == pytest.approx((4 / 3) ** 0.5)
    assert out["kl"] == pytest.approx(0.5) and out["kl_coef"] == 0.1


def test_each_ppo_epoch_and_step_draws_its_own_minibatches():
    """8 rollouts in minibatches of 2: each (step, epoch) splits them in its own order, each a partition of all 8.
    The same order in every epoch (or step) passed every test."""
    t = SimpleNamespace(cfg={"optim": SimpleNamespace(per_device_train_batch_size=2, seed=0)}, _step=0)
    orders = {}
    for step in (0, 1):
        for epoch in (0, 1):
            t._step = step
            mbs = PPOTrainer._minibatches(t, 8, epoch)
            assert [len(m) for m in mbs] == [2] * 4 and sorted(sum(mbs, [])) == list(range(8))
            orders[step, epoch] = mbs
    assert len({str(v) for v in orders.values()}) == 4
    t._step = 1
    assert PPOTrainer._minibatches(t, 8, 1) == orders[1, 1]  # fixed by (seed, step, epoch): a resumed run's own


def test_token_shares_divide_by_the_tokens_of_their_own_optimizer_step():
    """4 micro-batches of 1, 2, 3 and 4 response tokens, accumulation 2, two ranks holding the same: the steps hold
    2 x 3 and 2 x 7 tokens, so the shares are n x 2 x 2 / (2 x 3) for the first two and n x 2 x 2 / (2 x 7) for the
    last two. Dividing by another step's tokens (the accumulation only tested with one step per PPO step) passed."""
    t = SimpleNamespace(s=_Ranks(2), cfg={"optim": SimpleNamespace(gradient_accumulation_steps=2)})
    rmask = torch.arange(4)[None] < torch.tensor([1, 2, 3, 4])[:, None]
    shares = PPOTrainer._token_shares(t, [[0], [1], [2], [3]], rmask)
    assert shares == pytest.approx([1 * 2 / 3, 2 * 2 / 3, 3 * 2 / 7, 4 * 2 / 7])


def test_a_rollouts_response_ends_with_its_eos_token(world, tiny):
    """A response that emitted EOS holds it (labels, length) and nothing after it; one cut at --max_new_tokens holds
    every token and did not end. Cutting before the EOS (the actor then never trained on stopping) passed every
    test."""
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_prompts
    from training.data.images import load_image
    from training.model.builder import load_model_and_processor
    from training.ppo.rollout import generate_rollouts
    from training.predict.generate import DecodeArgs, stop_and_never
    from training.templates.chat import ChatEncoder

    model, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                      for_training=False)
    records = read_prompts([str(world / "ppo_prompts.json")], str(world / "images"), BadRowReport())[:2]
    images = [[load_image(src, str(world / "images")) for src in r.images] for r in records]
    encoder = ChatEncoder(processor, arch, 160)
    tok = processor.tokenizer
    eos_ids, never = stop_and_never(model, tok, encoder.end_of_turn_id)
    a, b, c = [i for i in range(len(tok)) if i not in eos_ids and i not in never][5:8]
    new = torch.tensor([[a, b, eos_ids[0], tok.pad_token_id, tok.pad_token_id], [a, b, c, a, b]])
    model.generate = lambda **kw: torch.cat([kw["input_ids"], new], 1)
    ro = generate_rollouts(model, processor, encoder, arch.name, [r.prompt for r in records], images,
                           DecodeArgs(max_new_tokens=5), "cpu")
    assert ro.lengths.tolist() == [3, 5] and ro.ended.tolist() == [True, False]
    labels = ro.batch.labels
    assert labels[0][labels[0] != -100].tolist() == [a, b, eos_ids[0]]
    assert labels[1][labels[1] != -100].tolist() == [a, b, c, a, b]
