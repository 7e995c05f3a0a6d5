"""PPO numerics against hand-derived values (derivations inline)."""
import math

import pytest
import torch

from training.advantages import AdaptiveKLController, RunningMoments, gae, kl_estimate, token_rewards, whiten
from training.losses import ppo_policy_loss, ppo_value_loss

t = torch.tensor


def test_gae_gamma_lambda_one_returns_total_future_reward():
    # delta = [0+.6-.5, 0+.7-.6, 1+0-.7] = [.1, .1, .3];  A = suffix sums = [.5, .4, .3];  R = A + V = 1
    adv, ret = gae(t([[0., 0., 1.]]), t([[.5, .6, .7]]), t([[1., 1., 1.]]), 1.0, 1.0)
    torch.testing.assert_close(adv, t([[.5, .4, .3]]))
    torch.testing.assert_close(ret, t([[1., 1., 1.]]))


def test_gae_discounted_and_masked():
    # gamma .9, lam .5: delta = [.9*.6-.5, .9*.7-.6, 1-.7] = [.04, .03, .3]
    # A_2 = .3; A_1 = .03 + .45*.3 = .165; A_0 = .04 + .45*.165 = .11425; the padded 4th position is 0
    adv, ret = gae(t([[0., 0., 1., 5.]]), t([[.5, .6, .7, 9.]]), t([[1., 1., 1., 0.]]), 0.9, 0.5)
    torch.testing.assert_close(adv, t([[.11425, .165, .3, 0.]]))
    torch.testing.assert_close(ret, t([[.61425, .765, 1.0, 0.]]))


def test_kl_estimators():
    lp, ref = t([-1.0, -2.5]), t([-2.0, -2.0])  # d = log pi - log ref = [1, -.5]
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), t([1.0, -0.5]))
    # k3 = exp(-d) - 1 + d: [e^-1, e^.5 - 1.5]
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), t([math.exp(-1), math.exp(0.5) - 1.5]))
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k2")


def test_token_rewards_put_score_on_last_response_token():
    r = token_rewards(t([2.0]), t([[.1, .2, .3, .4]]), t([[1., 1., 1., 0.]]), kl_coef=0.5)
    torch.testing.assert_close(r, t([[-.05, -.1, -.15 + 2.0, 0.]]))


def test_policy_loss_clipping():
    old = torch.zeros(1, 3)
    logp = torch.log(t([[1.5, 0.5, 1.5]]))
    adv = t([[2.0, 2.0, -1.0]])
    # token 0: ratio 1.5, A 2: max(-3, -2*1.2) = -2.4 (clipped)
    # token 1: ratio .5, A 2: max(-1, -2*.8=-1.6) = -1 (unclipped, pessimistic)
    # token 2: ratio 1.5, A -1: max(1.5, 1.2) = 1.5 (unclipped)
    loss, clipfrac = ppo_policy_loss(logp, old, adv, torch.ones(1, 3), clip_eps=0.2)
    assert float(loss) == pytest.approx((-2.4 - 1 + 1.5) / 3)
    assert float(clipfrac) == pytest.approx(1 / 3)


def test_value_loss_clipping():
    # token 0: V 1, old .5, R .8 -> V_clip .7: max(.04, .01) = .04
    # token 1: V 0, old .1, R 1 -> V_clip 0: 1;  token 2 masked
    v = ppo_value_loss(t([[1.0, 0.0, 7.0]]), t([[.5, .1, 0.]]), t([[.8, 1.0, 0.]]), t([[1., 1., 0.]]), 0.2)
    assert float(v) == pytest.approx(0.5 * (0.04 + 1.0) / 2)


def test_whiten_and_running_moments():
    w = whiten(t([[1., 2., 3., 100.]]), t([[1., 1., 1., 0.]]))
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(w, t([[-1 / s, 0., 1 / s, 0.]]), atol=1e-5, rtol=1e-5)
    m = RunningMoments()
    m.update(t([1., 2., 3.]))
    m.update(t([4., 5.]))
    assert m.mean == pytest.approx(3.0) and m.var == pytest.approx(2.0)


def test_running_window_keeps_only_the_last_scores_and_resumes():
    m = RunningMoments(window=3)
    m.update(t([10., 20.]))
    m.update(t([1., 2., 3.]))  # 10 and 20 have left the window: mean 2, var 2/3
    assert m.mean == pytest.approx(2.0) and m.var == pytest.approx(2 / 3) and m.count == 5
    m.update(t([6.]))  # window 2, 3, 6
    assert m.mean == pytest.approx(11 / 3) and m.var == pytest.approx(((5 / 3) ** 2 + (2 / 3) ** 2 + (7 / 3) ** 2) / 3)
    resumed = RunningMoments(window=3)
    resumed.load_state_dict(m.state_dict())
    m.update(t([0.]))
    resumed.update(t([0.]))
    assert (resumed.mean, resumed.var) == (m.mean, m.var) == (pytest.approx(3.0), pytest.approx(6.0))
    with pytest.raises(ValueError, match="same --reward_norm_window"):
        RunningMoments().load_state_dict(m.state_dict())


def test_whiten_over_two_ranks_equals_one_rank_with_both_halves():
    """Advantages were whitened with each rank's own mean and std: two ranks then trained on other advantages
    than one rank with the whole batch. With `reduce` (a sum over ranks) they are the same."""
    import threading

    x = torch.tensor([[1., 5., 2., 9.], [0., -3., 4., 7.], [8., 1., 1., 2.], [3., 3., -6., 0.]])
    mask = torch.tensor([[1., 1., 1., 0.], [1., 0., 0., 0.], [1., 1., 1., 1.], [1., 1., 0., 0.]])
    whole = whiten(x, mask)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def reduce(v):  # all_reduce(sum) between the two threads
            slots[r] = v.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        out[r] = whiten(x[2 * r:2 * r + 2], mask[2 * r:2 * r + 2], reduce=reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    torch.testing.assert_close(torch.cat(out), whole, rtol=1e-6, atol=1e-6)
    assert float((whiten(x[:2], mask[:2]) - whole[:2]).abs().max()) > 0.1  # per rank differs
    assert torch.equal(whiten(x, torch.zeros_like(mask)), torch.zeros_like(x))  # no response token: zeros, no NaN


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, n_steps=100)  # error clipped to +.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    f = AdaptiveKLController(0.1)
    f.update(100.0, 100)
    assert f.value == 0.1


def test_option_bonus_follows_llava_rlhf():
    from training.ppo.shaping import option_bonus
    # a letter pays only at the start ("B.") or in "correct option is B." -- not anywhere in the text
    assert option_bonus("B. A red circle.", "B") == 1.0
    assert option_bonus("I think the correct option is B.", "b") == 1.0
    assert option_bonus("There is a blue star.", "A") == 0.0  # "a" inside words and as an article
    assert option_bonus("A. yes", "B") == 0.0
    assert option_bonus("C. Not B.", "B") == 0.0  # "B." later in the text is not an answer of B
    assert option_bonus("B. red", "B.") == 1.0 and option_bonus("No.", "No.") == 0.5  # a stated answer's "." drops
    # No-is-right yes/no questions: +0.5 for No, -0.5 for Yes; nothing when Yes is right
    assert (option_bonus("No, there is none.", "no"), option_bonus("Yes.", "No"), option_bonus("Maybe", "no")) == \
        (0.5, -0.5, 0.0)
    assert option_bonus("Yes.", "yes") == 0.0 and option_bonus("yesterday", "no") == 0.0
    assert option_bonus("Three circles.", "three") == 1.0 and option_bonus("It has three.", "three") == 0.0
    assert option_bonus("B.", None) == 0.0 and option_bonus("B.", "") == 0.0


def test_stop_token_penalty_sets_or_subtracts():
    from training.ppo.shaping import stop_token_penalty
    score, ended = t([1.5, -0.5, 2.0]), t([True, False, False])
    torch.testing.assert_close(stop_token_penalty(score, ended, 8.0, relative=False), t([1.5, -8.0, -8.0]))
    torch.testing.assert_close(stop_token_penalty(score, ended, 8.0, relative=True), t([1.5, -8.5, -6.0]))
    torch.testing.assert_close(stop_token_penalty(score, ended, 0.0, relative=False), score)
    from training.ppo.args import PPOArgs
    a = PPOArgs()  # on by default, as LLaVA-RLHF's _shape_reward: -8 for a response that never emitted EOS
    torch.testing.assert_close(stop_token_penalty(score, ended, a.missing_eos_penalty, a.relative_eos_penalty),
                               t([1.5, -8.0, -8.0]))
    # the scores on the accelerator, `ended` on the CPU (as rollouts keep it): torch.where mixed devices and
    # stopped a GPU run at its first step; the meta device stands in for a GPU here
    for relative in (False, True):
        assert stop_token_penalty(score.to("meta"), ended, 8.0, relative).device.type == "meta"


def test_disable_dropout_makes_train_mode_deterministic():
    from training.model.builder import disable_dropout
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    m.attention_dropout = 0.1  # what attention layers keep as a number
    x = torch.randn(4, 8)
    m.train()
    assert not torch.equal(m(x), m(x))
    disable_dropout(m)
    assert torch.equal(m(x), m(x)) and m.attention_dropout == 0.0 and m.training


def test_one_minibatch_of_all_rollouts_keeps_vision_inputs_of_any_layout():
    """Qwen2-VL's patches of all images are concatenated, not one row per prompt: a minibatch that reorders or
    splits the rollouts cannot carry them. With --per_device_train_batch_size = --rollout_batch_size (what the
    error says to set) it still raised, as each epoch's minibatch was a shuffled order of all the rollouts."""
    from types import SimpleNamespace

    import pytest

    from training.data.collate import SFTBatch
    from training.ppo.trainer import PPOTrainer, _select
    batch = SFTBatch(torch.arange(6).view(2, 3), torch.ones(2, 3), torch.zeros(2, 3),
                     {"pixel_values": torch.randn(7, 4), "image_grid_thw": torch.ones(2, 3)})
    trainer = SimpleNamespace(cfg={"optim": SimpleNamespace(per_device_train_batch_size=2, seed=0)}, _step=3)
    assert PPOTrainer._minibatches(trainer, 2, epoch=1) == [[0, 1]]
    assert _select(batch, [0, 1]) is batch
    with pytest.raises(NotImplementedError, match="cannot split vision input 'pixel_values'"):
        _select(batch, [1, 0])
    trainer.cfg["optim"].per_device_train_batch_size = 1
    assert sorted(sum(PPOTrainer._minibatches(trainer, 4, epoch=1), [])) == [0, 1, 2, 3]


def test_token_logprobs_and_entropy_by_hand_at_the_targets_only():
    """log softmax(logits / T) at each target's label, and the entropy there, in float32 from bf16 logits; prompt
    positions hold 0 and get no gradient (only the target rows are upcast: a VLM's image tokens never are)."""
    from training.logprobs import IGNORE, token_logprobs, token_logprobs_entropy
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7).to(torch.bfloat16).requires_grad_(True)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, IGNORE], [IGNORE, 4, 4, 0, 6]])
    T = 0.7
    lp, mask, ent = token_logprobs_entropy(logits, labels, temperature=T)
    logz = torch.log_softmax(logits.detach().float()[:, :-1] / T, -1)
    want_mask = labels[:, 1:] != IGNORE
    want_lp = logz.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * want_mask
    want_ent = -(logz.exp() * logz).sum(-1) * want_mask
    assert torch.equal(mask, want_mask) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent)
    torch.testing.assert_close(token_logprobs(logits, labels, T)[0], want_lp)
    lp.sum().backward()
    rows_with_grad = logits.grad.abs().sum(-1) != 0
    assert torch.equal(rows_with_grad[:, :-1], want_mask) and not rows_with_grad[:, -1].any()


def _over_two_ranks(fn, *halves_of):
    """fn(*args, reduce=...) run as two ranks (threads), rank r holding rows [2r, 2r+2) of each tensor, with
    `reduce` an all_reduce(sum) between them: -> the two ranks' results."""
    import threading

    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def reduce(v):
            slots[r] = v.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        out[r] = fn(*(x[2 * r:2 * r + 2] for x in halves_of), reduce=reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    return out


def test_explained_variance_by_hand_and_over_two_ranks():
    """1 - Var(ret - V) / Var(ret) over response tokens: by hand, and over two ranks as over one (it was each
    rank's own, and only rank 0's was logged)."""
    from training.advantages import explained_variance, masked_moments

    ret = torch.tensor([[1., 2., 3., 9.], [4., 6., 0., 0.], [2., 2., 2., 2.], [0., 1., 5., 5.]])
    val = torch.tensor([[1., 1., 2., -5.], [3., 6., 0., 7.], [2., 2., 2., 2.], [0., 1., 5., 5.]])
    mask = torch.tensor([[1., 1., 1., 0.], [1., 1., 0., 0.], [0., 0., 0., 0.], [0., 0., 0., 0.]])
    # ret over the mask: 1 2 3 4 6 (mean 3.2, var 2.96); ret - V: 0 1 1 1 0 (mean 0.6, var 0.24)
    mean, var = masked_moments(ret, mask)
    assert float(mean) == pytest.approx(3.2) and float(var) == pytest.approx(2.96)
    assert explained_variance(ret, val, mask) == pytest.approx(1 - 0.24 / 2.96)
    assert explained_variance(ret, ret.new_full(ret.shape, 3.2), mask) == pytest.approx(0.0, abs=1e-6)
    # rows 2-3 (rank 1) have no response token: rank 0 alone is the whole; now split rows 0 and 1 across ranks
    order = [0, 2, 1, 3]
    both = _over_two_ranks(explained_variance, ret[order], val[order], mask[order])
    assert both == [pytest.approx(1 - 0.24 / 2.96)] * 2
    assert explained_variance(ret[:1], val[:1], mask[:1]) != pytest.approx(1 - 0.24 / 2.96)  # one rank's own


def test_logged_update_statistics_are_token_weighted_means_over_ranks():
    """A micro-batch's token-mean loss weighs as many as its response tokens, as in the loss the update minimises
    (one mean over the step's tokens): a mean of micro-batch means logged another number."""
    from training.ppo.trainer import rank_means

    class TwoRanks:  # the other rank: policy_loss 3.0 over 4 tokens, entropy 1.0 over 4 tokens
        world_size = 2

        def all_reduce(self, t):
            return t.double() + torch.tensor([[12.0, 4.0], [4.0, 4.0]], dtype=torch.float64)

    got = rank_means(TwoRanks(), {"policy_loss": [(1.0, 3.0), (2.0, 1.0)], "value_loss": [],
                                  "entropy": [(0.5, 2.0), (0.5, 2.0)]})
    # policy loss: (1 x 3 + 2 x 1 + 3 x 4) / (3 + 1 + 4) = 17 / 8 (the mean of the three means: 2.0)
    assert got == {"policy_loss": pytest.approx(17 / 8), "entropy": pytest.approx((0.5 * 4 + 1.0 * 4) / 8)}


def test_the_stop_token_penalty_stays_out_of_the_reward_statistics():
    """The -8 of a response cut at --max_new_tokens went into the running mean / std, so the normalised scores
    of every other response shrank (and stayed shrunk with the whole-run window). The statistics are of the
    clipped reward-model scores; the penalised score is normalised with them."""
    from types import SimpleNamespace

    from training.advantages import RunningMoments
    from training.ppo.trainer import PPOTrainer

    p = SimpleNamespace(missing_eos_penalty=8.0, relative_eos_penalty=False, reward_clip=10.0, normalize_reward=True,
                        length_bonus=0.0, max_new_tokens=40, correct_bonus=0.0, reward_bias=0.0)
    fake = SimpleNamespace(p=p, moments=RunningMoments(), s=SimpleNamespace(gather=lambda t: t))
    score = torch.tensor([1.0, 2.0, 3.0, 14.0])
    rollout = SimpleNamespace(ended=torch.tensor([True, True, True, False]), lengths=torch.tensor([5, 6, 7, 40]))
    shaped = PPOTrainer._shape(fake, score, rollout, records=[None] * 4)
    clipped = torch.tensor([1.0, 2.0, 3.0, 10.0])  # the statistics: these, the 14 clipped, not the -8
    assert fake.moments.mean == pytest.approx(float(clipped.mean()))
    assert fake.moments.std == pytest.approx(float(clipped.std(unbiased=False)), rel=1e-5)
    expect = (torch.tensor([1.0, 2.0, 3.0, -8.0]) - clipped.mean()) / clipped.std(unbiased=False)
    torch.testing.assert_close(shaped, expect, rtol=1e-5, atol=1e-6)


def test_reward_clip_0_clips_nothing():
    """--reward_clip 0 clamped every score to 0: a run without any reward, silently."""
    from types import SimpleNamespace

    from training.advantages import RunningMoments
    from training.ppo.trainer import PPOTrainer

    p = SimpleNamespace(missing_eos_penalty=0.0, relative_eos_penalty=False, reward_clip=0.0, normalize_reward=False,
                        length_bonus=0.0, max_new_tokens=40, correct_bonus=0.0, reward_bias=0.0)
    fake = SimpleNamespace(p=p, moments=RunningMoments(), s=SimpleNamespace(gather=lambda t: t))
    score = torch.tensor([-30.0, 2.0, 14.0])
    rollout = SimpleNamespace(ended=torch.tensor([True] * 3), lengths=torch.tensor([5, 6, 7]))
    torch.testing.assert_close(PPOTrainer._shape(fake, score, rollout, records=[None] * 3), score)


def test_minibatches_split_the_images_of_each_prompt_several_or_none():
    """Prompts with two images, none (text-only, a valid row) and one: pixel_values has one row per image, not
    per prompt, so a minibatch raised at the first step that drew a text-only prompt (or, when the counts happened
    to match, took another prompt's image). Each minibatch now carries exactly its own prompts' vision rows."""
    from training.data.collate import collate_sft
    from training.ppo.rollout import vision_rows
    from training.ppo.trainer import _select
    from training.templates.chat import Encoded

    def row(n_img, tag):
        ids = torch.full((3 + tag,), tag)
        vis = {"pixel_values": torch.full((n_img, 2), float(tag))} if n_img else {}
        return Encoded(ids, ids.clone(), vis)

    rows = [row(2, 1), row(1, 2), row(0, 3), row(1, 4)]
    batch = collate_sft(rows, 0, "llava")
    assert batch.vision["pixel_values"].shape[0] == 4  # as many rows as prompts, but not one per prompt
    counts = vision_rows(rows, "llava")
    assert counts == {"pixel_values": [2, 1, 0, 1]}
    for idx in ([0, 2], [2, 1], [3, 0], [2]):
        want = collate_sft([rows[i] for i in idx], 0, "llava")
        got = _select(batch, idx, counts)
        assert got.vision.keys() == want.vision.keys()
        for k in want.vision:
            assert torch.equal(got.vision[k], want.vision[k]), (idx, k)
    assert vision_rows(rows, "idefics3") == {"pixel_values": [1, 1, 1, 1]}  # collated one row per sample there


def test_length_and_correct_option_shaping_by_hand():
    """LLaVA-RLHF's terms after clipping: + length_bonus * len / max_new_tokens + correct_bonus * option_bonus."""
    from types import SimpleNamespace

    from training.advantages import RunningMoments
    from training.ppo.trainer import PPOTrainer

    p = SimpleNamespace(missing_eos_penalty=0.0, relative_eos_penalty=False, reward_clip=10.0, normalize_reward=False,
                        length_bonus=-10.0, max_new_tokens=40, correct_bonus=2.0, reward_bias=0.5)
    fake = SimpleNamespace(p=p, moments=RunningMoments(), s=SimpleNamespace(gather=lambda t: t))
    rollout = SimpleNamespace(ended=torch.tensor([True] * 3), lengths=torch.tensor([10, 20, 30]),
                              responses=["B. A red circle.", "No, there is none.", "A. yes"])
    records = [SimpleNamespace(meta={"correct_option": "B"}), SimpleNamespace(meta={"gt_answer": "No"}),
               SimpleNamespace(meta={})]
    shaped = PPOTrainer._shape(fake, torch.tensor([1.0, 12.0, -3.0]), rollout, records)
    # 1 - 10 * 10/40 + 2 * 1 + .5 = 1;  10 (clipped) - 10 * 20/40 + 2 * .5 + .5 = 6.5;  -3 - 10 * 30/40 + 0 + .5 = -10
    torch.testing.assert_close(shaped, t([1.0, 6.5, -10.0]))


def test_policy_loss_is_a_mean_over_response_tokens_and_clips_nothing_at_ratio_one():
    """A padded position (huge advantage) stays out of the loss and its divisor: (-1 - 2) / 2 with ratio 1 (the
    first update of a step, logp = old_logp), where no token is clipped (clipfrac 0, not 1)."""
    logp = torch.zeros(1, 3)
    loss, clipfrac = ppo_policy_loss(logp, logp.clone(), t([[1.0, 2.0, 50.0]]), t([[1., 1., 0.]]), clip_eps=0.2)
    assert float(loss) == pytest.approx(-1.5) and float(clipfrac) == 0.0


def test_value_loss_takes_the_clipped_error_when_it_is_larger():
    """V 1, old V 0, R 1: unclipped error 0, V_clip = 0 + .2: (.2 - 1)^2 = .64 -> 0.5 * .64; a padded position
    (error 100) stays out of the mean."""
    v = ppo_value_loss(t([[1.0, 10.0]]), t([[0.0, 0.0]]), t([[1.0, 0.0]]), t([[1., 0.]]), clip_eps=0.2)
    assert float(v) == pytest.approx(0.5 * 0.64)


def test_masked_mean_by_hand():
    """The entropy bonus is a masked mean over response tokens: padding neither adds nor counts."""
    from training.logprobs import masked_mean
    x, mask = t([[1., 2., 9.], [3., 9., 9.]]), t([[1., 1., 0.], [1., 0., 0.]])
    assert float(masked_mean(x, mask)) == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), t([1.5, 3.0]))
