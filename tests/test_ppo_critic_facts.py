"""--critic_facts (asymmetric critic): the critic reads each prompt with its facts before the very response tokens
the actor sampled, in the experience pass and in every update; the actor never sees the facts."""
import json

import pytest
import torch
from sft_helpers import make_reward_model, ppo_args, ppo_args_with_prompts

from training.ppo.main import main
from training.rm.factual import FACTUAL_PREFIX
from training.templates.chat import IGNORE


def plain(text: str) -> str:
    """The tiny tokenizer lower-cases and splits punctuation off: compare without case and spaces."""
    return "".join(text.lower().split())


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm"))


def test_the_critic_reads_facts_then_the_sampled_response(world, tiny, rm, tmp_path, monkeypatch):
    import training.ppo.trainer as trainer_mod
    from training.model.tiny import build_processor
    from training.rm.model import RewardModel

    views, actor_batches, critic_widths = [], [], []
    real_relay, real_forward = trainer_mod.relay, RewardModel.forward

    def spy_relay(ro, *a, **k):
        view = real_relay(ro, *a, **k)
        views.append(view)
        actor_batches.append(ro.batch)
        return view

    def spy_forward(self, input_ids, attention_mask, per_token=False, **vision):
        if per_token:  # the critic (the reward model scores with per_token False)
            critic_widths.append(input_ids.shape[1])
        return real_forward(self, input_ids, attention_mask, per_token=per_token, **vision)

    monkeypatch.setattr(trainer_mod, "relay", spy_relay)
    monkeypatch.setattr(RewardModel, "forward", spy_forward)
    out = tmp_path / "ppo"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--ppo_epochs", "2", "--critic_facts"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["value_loss"] == r["value_loss"] for r in rows)

    tok = build_processor().tokenizer
    prompts = {json.dumps(p["facts"]): p for p in json.loads((world / "ppo_prompts.json").read_text())}
    assert len(views) == 2
    for view, actor in zip(views, actor_batches):
        for i in range(actor.input_ids.shape[0]):
            sampled = actor.labels[i][actor.labels[i] != IGNORE]
            read = view.batch.labels[i][view.batch.labels[i] != IGNORE]
            assert torch.equal(sampled, read)  # the same response ids, EOS included
            n = int(view.batch.attention_mask[i].sum())
            assert torch.equal(view.batch.input_ids[i, n - len(read):n], read)  # ... at the end of the row
            text, seen = plain(tok.decode(view.batch.input_ids[i, :n - len(read)])), plain(tok.decode(actor.input_ids[i]))
            assert plain(FACTUAL_PREFIX) in text and plain(FACTUAL_PREFIX) not in seen
            assert any(all(plain(f) in text for f in json.loads(k)) for k in prompts)  # one prompt's facts, all
    # every critic forward (the old values, then 2 epochs x 2 minibatches per step) read the relaid rows
    assert critic_widths == [views[0].batch.input_ids.shape[1]] * 5 + [views[1].batch.input_ids.shape[1]] * 5
    assert all(v.batch.input_ids.shape[1] > a.input_ids.shape[1] for v, a in zip(views, actor_batches))


def test_prompts_without_facts_are_refused_before_models_load(world, tiny, rm, tmp_path, monkeypatch):
    import training.model.builder as builder

    def no_load(*a, **k):
        raise AssertionError("a model loaded before the prompts were checked")

    monkeypatch.setattr(builder, "load_model_and_processor", no_load)
    rows = json.loads((world / "ppo_prompts.json").read_text())
    rows[1].pop("facts")
    args = ppo_args_with_prompts(rows, tmp_path / "prompts.json", world, tiny, rm, tmp_path / "out", "--critic_facts",
                                 "--no-factual")
    with pytest.raises(SystemExit, match=r"--critic_facts: .*prompts\.json.* has none"):
        main(args)


def test_a_prompt_the_critic_cannot_read_is_named():
    """relay names the row whose prompt (with facts) leaves the critic's encoder no room."""
    from types import SimpleNamespace

    from PIL import Image

    from training.data.records import Message
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny import build_processor
    from training.ppo.rollout import relay
    from training.templates.chat import ChatEncoder, PromptTooLong

    labels = torch.tensor([[IGNORE, IGNORE, 5, 6]])
    ro = SimpleNamespace(batch=SimpleNamespace(labels=labels))
    enc = ChatEncoder(build_processor(), ARCHITECTURES["llava"], 24)  # fewer than the image's tokens
    prompt = [Message("user", "<image>\ndescribe the image. " + "the image contains one red star. " * 4)]
    with pytest.raises(PromptTooLong, match=r"^ppo_prompts.json row 7: "):
        relay(ro, enc, "llava", [prompt], [[Image.new("RGB", (32, 32))]], 0, "cpu", ["ppo_prompts.json row 7"])
