"""PPO stage end to end on the tiny VLM: metrics, saving, resume, and the non-finite guard."""
import json

import pytest
import torch
from PIL import Image
from sft_helpers import SMALL_WORLD, make_reward_model, ppo_args, ppo_args_with_prompts, split_rows, weights

from training.data.records import Message
from training.ppo.main import main
from training.ppo.trainer import NonFiniteError, PPOTrainer


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm"))


def test_ppo_end_to_end(world, tiny, rm, tmp_path):
    out = tmp_path / "ppo"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--ppo_epochs", "2", "--kl_estimator", "k3"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/std", "kl", "entropy", "clipfrac", "value_loss", "policy_loss",
                "explained_variance", "response_length", "gen_tokens_per_s", "train_tokens_per_s"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert all(0 < r["response_length"] <= 8 for r in rows)
    assert (out / "figure" / "ppo_ppo.png").stat().st_size > 1000
    w, init = weights(out), weights(tiny)
    assert sum(float((w[k] - init[k]).abs().max()) for k in w) > 0  # the actor moved


def test_ppo_lora_actor_uses_disabled_adapters_as_reference(world, tiny, rm, tmp_path):
    """Before the first update the actor is the reference (KL 0); after it, the adapters-off reference gives the
    run a separate frozen SFT model gives (KL 0 at step 1 alone held whatever the reference was: LoRA's B starts
    at zero)."""
    lora = ["--max_steps", "2", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj", "--lora_dropout", "0",
            "--learning_rate", "1e-2"]
    main(ppo_args(world, tiny, rm, tmp_path / "off", *lora))
    main(ppo_args(world, tiny, rm, tmp_path / "frozen", *lora, "--reference_model", str(tiny)))
    off, frozen = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                   for r in ("off", "frozen"))
    assert off[0]["kl"] == pytest.approx(0.0, abs=1e-6) and abs(off[1]["kl"]) > 1e-4
    assert [r["kl"] for r in off] == pytest.approx([r["kl"] for r in frozen], rel=1e-4, abs=1e-7)
    assert (tmp_path / "off" / "adapter").exists()


def test_ppo_lora_reference_stays_the_sft_model_while_the_projector_trains(world, tiny, rm, tmp_path, monkeypatch):
    """With LoRA the projector and vision tower still train (no freeze flags): the reference (adapters off) must
    put them back at their start, or it moves with every update (measured 0.11 in log-prob by step 2)."""
    from sft_helpers import on_reference_logprobs
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor

    frozen, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    real_lp, diffs = PPOTrainer._logprobs, []

    def compare(trainer, out, batch, suppressed):  # the reference's log-probs vs the frozen SFT model's, same rollouts
        diffs.append(float((out[0] - real_lp(trainer, frozen, batch, suppressed)[0]).abs().max()))
        return out
    on_reference_logprobs(monkeypatch, compare)
    main(ppo_args(world, tiny, rm, tmp_path / "out", "--max_steps", "3", "--lora_r", "4", "--lora_target_modules",
                  "q_proj,v_proj", "--learning_rate", "1e-3"))
    assert len(diffs) == 3 and max(diffs) < 1e-5, diffs


def test_entropy_bonus_reaches_the_actor_update(world, tiny, rm, tmp_path):
    """With entropy_coef 0 the entropy is only a metric (no graph kept); with it on, it changes the update."""
    main(ppo_args(world, tiny, rm, tmp_path / "off", "--max_steps", "1"))
    main(ppo_args(world, tiny, rm, tmp_path / "on", "--max_steps", "1", "--entropy_coef", "0.5"))
    a, b = weights(tmp_path / "off"), weights(tmp_path / "on")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6
    rows = [json.loads((tmp_path / x / "metrics.jsonl").read_text().splitlines()[0]) for x in ("off", "on")]
    assert rows[0]["entropy"] == pytest.approx(rows[1]["entropy"], rel=1e-5)  # the same rollouts, first update


def test_ppo_resume_equals_uninterrupted(world, tiny, rm, tmp_path):
    common = ["--max_steps", "2", "--kl_target", "1", "--kl_horizon", "10"]  # the adaptive coefficient resumes too
    main(ppo_args(world, tiny, rm, tmp_path / "full", *common))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "1"))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_with_other_ppo_epochs_or_rollout_batch_is_refused(world, tiny, rm, tmp_path):
    """--ppo_epochs and --rollout_batch_size fix a PPO step's updates and prompts: a resume with either changed
    continued silently with another schedule when steps_per_epoch happened to stay the same."""
    out = tmp_path / "cut"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--save_steps", "1", "--stop_after_steps", "1"))
    with pytest.raises(SystemExit, match="ppo_epochs 1 in the checkpoint, 2 now"):
        main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--ppo_epochs", "2", "--resume"))


def test_reward_window_smaller_than_a_step_is_refused(world, tiny, rm, tmp_path):
    with pytest.raises(ValueError, match="--reward_norm_window 3 is smaller than one PPO step's scores"):
        main(ppo_args(world, tiny, rm, tmp_path / "w", "--max_steps", "1", "--reward_norm_window", "3"))


def test_reward_bias_is_added_to_every_shaped_score(world, tiny, rm, tmp_path):
    rows = []
    for name, bias in (("base", "0"), ("bias", "3")):
        main(ppo_args(world, tiny, rm, tmp_path / name, "--max_steps", "1", "--reward_bias", bias))
        rows.append(json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]))
    assert rows[0]["reward/mean"] == pytest.approx(rows[1]["reward/mean"], abs=1e-6)  # the same rollouts
    assert rows[1]["reward/shaped_mean"] == pytest.approx(rows[0]["reward/shaped_mean"] + 3, abs=1e-5)


def test_non_finite_reward_stops_and_keeps_last_checkpoint(world, tiny, rm, tmp_path, monkeypatch):
    real = PPOTrainer._scores

    def poisoned(self, records, images, responses, step):
        s = real(self, records, images, responses, step)
        return s * float("nan") if self._step >= 1 else s

    monkeypatch.setattr(PPOTrainer, "_scores", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match="non-finite reward at PPO step 2"):
        main(ppo_args(world, tiny, rm, out, "--max_steps", "3", "--save_steps", "1"))
    ckpt = out / "checkpoints" / "actor"
    assert (ckpt / "latest").read_text().strip() == "step1" and (ckpt / "step1").is_dir()


def test_a_prompt_whose_facts_leave_the_reward_model_no_room_is_a_bad_row_before_training(world, tiny, rm, tmp_path):
    """A factual block too long for the reward model's room was cut silently and the cut input scored; then it
    stopped the run at the step that drew it (every resume again). Now a bad row before training."""
    from training.data.bad_rows import BadRowError

    rows = json.loads((world / "ppo_prompts.json").read_text())[:9]
    rows[3]["facts"] = rows[3]["facts"] * 40
    args = ppo_args_with_prompts(rows, tmp_path / "prompts.json", world, tiny, rm, tmp_path / "out", "--max_steps", "1")
    with pytest.raises(BadRowError, match=r"prompts.json: row 3: field .facts.: .*factual block exceed"):
        main(args)
    main(args + ["--skip_bad_rows"])
    bad = json.loads((tmp_path / "out" / "bad_rows.json").read_text())
    assert [(r["row"], r["field"]) for r in bad["rows"]] == [(3, "facts")]


def test_a_response_spelling_the_image_placeholder_is_scored(world, tiny, rm, tmp_path, monkeypatch):
    """The policy can spell "<image>" from ordinary tokens (the placeholder's id is never sampled); the reward
    model's encoder took it for a second image and the run stopped (at the same step on every resume)."""
    import training.ppo.trainer as trainer_mod
    from training.rm.data import readable_response

    real = trainer_mod.generate_rollouts

    def spelled(*a, **k):
        ro = real(*a, **k)
        ro.responses[0] = ro.responses[0] + " <image>"
        return ro

    monkeypatch.setattr(trainer_mod, "generate_rollouts", spelled)
    out = tmp_path / "spelled"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "1"))
    import math
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["reward/mean"])
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny import build_processor
    from training.templates.chat import ChatEncoder
    enc = ChatEncoder(build_processor(), ARCHITECTURES["llava"], 512)
    assert readable_response("a <image> b <image>", enc) == "a  b "
    assert readable_response("a <ima<image>ge> b", enc) == "a  b"  # one pass would join another


def test_a_response_spelling_an_end_token_is_scored_without_it():
    """A policy can spell "</s>" from ordinary tokens; decoded and encoded again for the reward model, it became a
    real EOS inside the answer (two in the reward model's input, a cut the policy could be paid for)."""
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny import build_processor
    from training.rm.data import encode_for_rm, readable_response
    from training.templates.chat import ChatEncoder

    proc = build_processor()
    enc, eos = ChatEncoder(proc, ARCHITECTURES["llava"], 512), proc.tokenizer.eos_token_id
    prompt = [Message("user", "<image>\nDescribe the image in detail.")]
    response = readable_response("A red circle.</s> A blue star.", enc)
    assert response == "A red circle. A blue star."
    ids = encode_for_rm(enc, prompt, response, [Image.new("RGB", (32, 32))]).input_ids.tolist()
    assert ids.count(eos) == 1 and ids[-1] == eos


def test_weights_made_non_finite_between_checkpoints_stop_the_step_by_name(world, tiny, rm, tmp_path, monkeypatch):
    """An update that steps the weights to inf from a finite loss, with no checkpoint due: the next rollout
    failed inside sampling ("probability tensor contains inf"; on a GPU a device-side assert)."""
    import training.ppo.trainer as trainer_mod

    real_value_loss, real_train_on, seen = trainer_mod.ppo_value_loss, PPOTrainer.train_on, {}

    def train_on(self, exp, step, ckpt):
        seen.update(trainer=self, step=step)
        return real_train_on(self, exp, step, ckpt)

    def value_loss(*a, **k):  # after the actor's update of step 1's one minibatch: poison what it stepped to
        if seen["step"] == 1:
            with torch.no_grad():
                next(seen["trainer"]._module(seen["trainer"].actor).parameters()).fill_(float("inf"))
        return real_value_loss(*a, **k)

    monkeypatch.setattr(PPOTrainer, "train_on", train_on)
    monkeypatch.setattr(trainer_mod, "ppo_value_loss", value_loss)
    with pytest.raises(NonFiniteError, match="non-finite weights in the actor after PPO step 1"):
        main(ppo_args(world, tiny, rm, tmp_path / "inf", "--max_steps", "3", "--per_device_train_batch_size", "4"))


def test_bad_prompts_are_bad_rows_before_training(world, tiny, rm, tmp_path):
    """A prompt too long for --max_seq_len, or without facts for the factual reward model, stopped the run at the
    step that drew it (every resume again; on several ranks the others waited): now a bad row before training,
    naming file, row and field; --skip_bad_rows skips and counts it."""
    from training.data.bad_rows import BadRowError

    rows = json.loads((world / "ppo_prompts.json").read_text())[:9]
    rows[2]["conversations"][0]["value"] += " Describe it." * 60
    del rows[5]["facts"]
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps(rows))

    def args(out, *extra):
        a = ppo_args(world, tiny, rm, tmp_path / out, "--max_steps", "1", *extra)
        a[a.index("--data_path") + 1] = str(data)
        return a

    with pytest.raises(BadRowError, match=r"prompts.json: row 2: field .conversations.: prompt of .* exceeds "
                                          r"max_seq_len"):
        main(args("a"))
    main(args("b", "--skip_bad_rows"))
    bad = json.loads((tmp_path / "b" / "bad_rows.json").read_text())
    assert sorted((r["row"], r["field"]) for r in bad["rows"]) == [(2, "conversations"), (5, "facts")]


def test_accumulation_must_divide_a_ppo_steps_micro_batches(world, tiny, rm, tmp_path):
    """Accumulating over 4 micro-batches when a PPO step has 2 left the step's gradients to the next step (the
    actor did not move in step 1 though the metrics said it trained)."""
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 4 must divide"):
        main(ppo_args(world, tiny, rm, tmp_path / "out", "--max_steps", "1", "--gradient_accumulation_steps", "4"))


def test_the_critic_accumulates_gradients_at_zero3_as_at_zero0(world, tiny, rm, tmp_path):
    """Called past its DeepSpeed engine (engine.module), the critic never advanced ZeRO-3's micro-step count, so
    each micro-batch's gradient replaced the one before instead of adding to it: with accumulation 2 the critic
    learnt from every second micro-batch only. Its values steer the actor from step 2 on."""
    rows = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--gradient_accumulation_steps", "2",
                      "--per_device_train_batch_size", "1", "--zero_stage", str(stage), "--optimizer", "sgd"))
        rows[stage] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows[0], rows[3]):
        for k in ("value_loss", "explained_variance", "policy_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    w0, w3 = weights(tmp_path / "zero0"), weights(tmp_path / "zero3")
    for k in w0:
        torch.testing.assert_close(w3[k], w0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_ptx_term_is_the_sft_nll_of_its_seeded_rows_and_resumes_exactly(world, tiny, rm, tmp_path):
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.collate import collate_sft
    from training.data.formats import read_sft
    from training.logprobs import nll_sum
    from training.model.builder import load_model_and_processor
    from training.sft.trainer import SFTDataset
    from training.templates.chat import ChatEncoder

    ptx = ["--ptx_coef", "0.5", "--ptx_data_path", str(world / "sft_train.json"), "--ptx_batch_size", "3",
           "--per_device_train_batch_size", "4", "--max_steps", "2"]  # one actor update per step
    main(ppo_args(world, tiny, rm, tmp_path / "full", *ptx))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    # step 1's only update sees the initial actor: its ptx loss is the SFT model's token-mean NLL of
    # the first 3 rows of the seeded order
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    ds = SFTDataset(read_sft([str(world / "sft_train.json")], str(world / "images"), BadRowReport()),
                    ChatEncoder(proc, arch, 160 + 8), str(world / "images"), BadRowReport())
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234)).tolist()  # OptimArgs.seed
    b = collate_sft([ds[i] for i in order[:3]], proc.tokenizer.pad_token_id, arch.name)
    with torch.no_grad():
        nll, _ = nll_sum(model(**b.model_inputs()).logits, b.labels)
    assert rows[0]["ptx_loss"] == pytest.approx(float(nll) / b.n_target_tokens, rel=1e-4)
    assert rows[1]["ptx_loss"] != rows[0]["ptx_loss"]  # the next rows, the moved actor
    # an interrupted run reads the same ptx rows as the uninterrupted one
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *ptx, "--save_steps", "1", "--stop_after_steps", "1"))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *ptx, "--resume"))
    a, c = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-6, msg=k)
    # and the term is in the actor's loss: the same run without it (same rollouts) ends elsewhere
    off = [x if x != "0.5" else "0" for x in ptx]
    main(ppo_args(world, tiny, rm, tmp_path / "off", *off))
    d = weights(tmp_path / "off")
    assert max(float((a[k] - d[k]).abs().max()) for k in a) > 1e-5


def test_ppo_qlora_actor_and_critic(world, tiny, rm, tmp_path, monkeypatch):
    """QLoRA (NF4 base + LoRA) for the actor, the critic and the frozen reward model (it loaded in full precision:
    a 7B's 14 GB on a 16 GB T4); the reference is the actor with its adapters off."""
    import bitsandbytes as bnb

    import training.rm.model as rm_model
    real, frozen = rm_model.load_reward_model, []

    def recording(*a, for_training=False, **k):
        out = real(*a, for_training=for_training, **k)
        if not for_training:
            frozen.append(out[0])
        return out

    monkeypatch.setattr(rm_model, "load_reward_model", recording)
    out = tmp_path / "ppo_qlora"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--qlora", "--lora_r", "4", "--lora_dropout", "0",
                  "--freeze_vision_tower"))
    assert len(frozen) == 1 and any(isinstance(x, bnb.nn.Linear4bit) for x in frozen[0].modules())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollouts: actor = reference
    assert all(r["value_loss"] == r["value_loss"] and r["policy_loss"] == r["policy_loss"] for r in rows)
    from safetensors.torch import load_file
    adapters = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in adapters.items())  # lora_B starts at 0


def test_schedule_counts_optimizer_updates_and_dropout_is_off(world, tiny, rm, tmp_path, monkeypatch):
    """Rollout 4, minibatch 2, 2 PPO epochs: 4 optimizer updates per PPO step, so a linear schedule over
    2 PPO steps decays over 8 updates (the actor's over 4 after 1 critic warm-up step); before, it
    counted PPO steps and reached 0 after the first step's second update. Dropout is off in actor and critic."""
    from training.engine.strategy import Strategy
    seen = {}
    real = Strategy.prepare

    def prepare(self, model, total_steps, learning_rate=None):
        seen.setdefault("totals", []).append(total_steps)
        seen.setdefault("dropout", []).append([m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)])
        return real(self, model, total_steps, learning_rate)

    monkeypatch.setattr(Strategy, "prepare", prepare)
    main(ppo_args(world, tiny, rm, tmp_path / "ppo", "--max_steps", "2", "--ppo_epochs", "2",
                  "--lr_scheduler_type", "linear", "--critic_warmup_steps", "1", "--lora_r", "4",
                  "--lora_dropout", "0.1"))
    assert seen["totals"] == [4, 8]  # actor, critic
    assert seen["dropout"][0] and all(p == 0.0 for ps in seen["dropout"] for p in ps)


def test_temperature_scales_the_log_probs(world, tiny, rm, tmp_path, monkeypatch):
    """Rollouts sample from softmax(logits / T): old, reference and new log-probs use the same
    distribution, so before the first update the ratio is 1 and the KL 0 at any temperature."""
    out = tmp_path / "t"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "1", "--temperature", "0.7", "--lora_r", "4",
                  "--per_device_train_batch_size", "4",
                  "--lora_target_modules", "q_proj,v_proj"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["clipfrac"] == 0.0
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    labels = torch.tensor([[-100, 0]])
    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.p = type("P", (), {"temperature": 0.5})()
    model = lambda **kw: type("O", (), {"logits": logits})()  # noqa: E731
    batch = type("B", (), {"model_inputs": lambda self: {}, "labels": labels})()
    lp, _, _ = trainer._logprobs(model, batch, [])
    assert float(lp[0, 0]) == pytest.approx(float(torch.log_softmax(logits[0, 0] / 0.5, -1)[0]))
    # a token the sampler suppresses (padding, <image>) is out of the softmax, as it is out of the sampler's
    lp, _, _ = trainer._logprobs(model, batch, [2])
    assert float(lp[0, 0]) == pytest.approx(float(torch.log_softmax(logits[0, 0, :2] / 0.5, -1)[0]))


def test_top_p_below_one_and_no_temperature_are_refused(world, tiny, rm, tmp_path):
    with pytest.raises(SystemExit, match="--top_p 0.9: PPO's ratios, KL and entropy"):
        main(ppo_args(world, tiny, rm, tmp_path / "p", "--top_p", "0.9"))
    with pytest.raises(SystemExit, match="--temperature 0.0: rollouts sample"):
        main(ppo_args(world, tiny, rm, tmp_path / "t", "--temperature", "0"))


def test_the_factual_block_is_shuffled_per_rollout(world, tiny, tmp_path, monkeypatch):
    """LLaVA-RLHF's PPO shuffles the captions for every rollout (the reward model trains on shuffled ones too);
    every rollout of a prompt read them in the row's order."""
    from sft_helpers import make_reward_model

    import training.ppo.trainer as trainer_module
    calls, real = [], trainer_module.encode_for_rm
    monkeypatch.setattr(trainer_module, "encode_for_rm",
                        lambda *a, **k: calls.append((a[5], k["shuffle_seed"])) or real(*a, **k))
    rm = make_reward_model(tiny, tmp_path / "frm", factual=True)
    main(ppo_args(world, tiny, rm, tmp_path / "f", "--max_steps", "2"))
    assert all(factual for factual, _ in calls)  # the factual block is read (so its order matters)
    seeds = [seed for _, seed in calls]
    assert len(seeds) == 8 and len(set(seeds)) == 8  # 4 rollouts a step, 2 steps: each its own order


def test_non_finite_weights_are_never_saved(world, tiny, rm, tmp_path, monkeypatch):
    """A step can make the weights non-finite from a finite loss (an overflowing gradient): the run stops
    before writing that checkpoint, and the last good one stays the latest."""
    real = PPOTrainer.train_on

    def overflow(self, exp, step, ckpt):
        out = real(self, exp, step, ckpt)
        if step == 2:
            with torch.no_grad():
                next(self._module(self.actor).parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(PPOTrainer, "train_on", overflow)
    out = tmp_path / "inf"
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        main(ppo_args(world, tiny, rm, out, "--max_steps", "3", "--save_steps", "1"))
    ckpt = out / "checkpoints" / "actor"
    assert (ckpt / "latest").read_text().strip() == "step1" and not (ckpt / "step2").exists()


def test_template_override_renders_rollout_prompts_and_is_saved(world, tiny, rm, tmp_path, monkeypatch):
    """--template (as every stage takes it) renders the actor's rollout prompts and is saved with the actor;
    the reward model keeps the template it was trained with. PPO accepted the flag and ignored it."""
    from test_template_tiny import NO_EOS

    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder
    used = []
    real = ChatEncoder.render

    def render(self, messages, add_generation_prompt):
        used.append((add_generation_prompt, self.processor.chat_template if self.chat_template is None
                     else self.chat_template))
        return real(self, messages, add_generation_prompt)

    monkeypatch.setattr(ChatEncoder, "render", render)
    (tmp_path / "t.jinja").write_text(NO_EOS)
    out = tmp_path / "ppo"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "1", "--template", str(tmp_path / "t.jinja")))
    prompts = [t for gen, t in used if gen]
    assert prompts and NO_EOS in prompts  # the actor's prompts
    assert any(t != NO_EOS for t in prompts)  # the reward model's, rendered with its own template
    _, proc, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(out)), LoraArgs(), for_training=False)
    assert proc.chat_template == NO_EOS


def test_a_data_path_list_with_spaces_reads_every_file(world, tiny, rm, tmp_path, monkeypatch):
    """--data_path "a.json, b.json" stopped with "no such file": the stage split the list itself and kept the space
    in front of the second path."""
    import training.ppo.main as ppo_main
    a, b = split_rows(world / "ppo_prompts.json", tmp_path, (0, 3), (3, 8))
    usable, seen = ppo_main.usable_prompts, []
    monkeypatch.setattr(ppo_main, "usable_prompts", lambda records, *a, **k: usable(seen.extend(records) or records,
                                                                                      *a, **k))
    main(ppo_args(world, tiny, rm, tmp_path / "o", "--data_path", f"{a}, {b}", "--max_steps", "1"))
    assert len(seen) == 8  # the prompts of both files


def test_one_rollout_per_step_logs_finite_metrics(world, tiny, rm, tmp_path):
    """--rollout_batch_size 1 on one rank: reward/std was the sample std of one score, NaN in metrics.jsonl."""
    out = tmp_path / "one"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "1", "--rollout_batch_size", "1",
                  "--per_device_train_batch_size", "1"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward/std"] == 0.0 and all(v == v for v in row.values() if isinstance(v, float)), row


def test_a_negative_reward_clip_is_refused(world, tiny, rm, tmp_path):
    with pytest.raises(SystemExit, match="--reward_clip -1.0"):
        main(ppo_args(world, tiny, rm, tmp_path / "o", "--reward_clip", "-1"))


@pytest.mark.parametrize("flags, said", [
    (["--ppo_epochs", "0"], "--ppo_epochs 0: give N >= 1"),  # it trained nothing and saved the SFT actor
    (["--rollout_batch_size", "0"], "--rollout_batch_size 0: give N >= 1"),  # a division by zero
    (["--kl_target", "1", "--kl_horizon", "0"], "--kl_horizon 0: the adaptive KL controller"),  # after step 1
    (["--ptx_coef", "1", "--ptx_batch_size", "0"], "--ptx_batch_size 0: the ptx term"),
    (["--reward_norm_window", "-5"], "--reward_norm_window -5: give 0"),  # every score so far, silently
    (["--clip_eps", "-0.2"], "--clip_eps -0.2: give a value >= 0"),  # every ratio clamped to 0.8, silently
    (["--kl_target", "-1"], "--kl_target -1.0: give a value >= 0"),
    (["--lam", "1.5"], "--lam 1.5: give a value in"),
    (["--vf_coef", "-1"], "--vf_coef -1.0: give a value >= 0"),  # the critic trained away from the returns
    (["--missing_eos_penalty", "-8"], "--missing_eos_penalty -8.0: give"),  # a response that never ended got +8
    (["--ptx_coef", "-1"], "--ptx_coef -1.0: give a value >= 0"),  # no ptx term, silently
    (["--critic_warmup_steps", "-1"], "--critic_warmup_steps -1: give"),  # no warm-up, silently
    (["--critic_learning_rate", "-1"], "--critic_learning_rate -1.0: give"),  # torch's error, after the models loaded
])
def test_counts_a_ppo_run_cannot_use_are_refused_before_models_load(world, tiny, rm, tmp_path, monkeypatch, flags,
                                                                     said):
    import training.model.builder as builder

    def no_load(*a, **k):
        raise AssertionError("a model loaded before the options were checked")
    monkeypatch.setattr(builder, "load_model_and_processor", no_load)
    with pytest.raises(SystemExit, match=said):
        main(ppo_args(world, tiny, rm, tmp_path / "n", "--max_steps", "1", *flags))


@pytest.mark.parametrize("flags, said", [(["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps 4"),
                                         (["--reward_norm_window", "3"], "--reward_norm_window 3 is smaller")])
def test_a_ppo_step_shape_it_cannot_use_is_refused_before_models_load(world, tiny, rm, tmp_path, monkeypatch, flags,
                                                                      said):
    """Both were found by the trainer only after the actor, reference, reward model and critic had loaded and every
    prompt had been checked: minutes of a 7B run."""
    import training.model.builder as builder

    def no_load(*a, **k):
        raise AssertionError("a model loaded before the options were checked")
    monkeypatch.setattr(builder, "load_model_and_processor", no_load)
    with pytest.raises(ValueError, match=said):
        main(ppo_args(world, tiny, rm, tmp_path / "n", "--max_steps", "1", *flags))


def test_ptx_default_data_reads_the_worlds_images_beside_user_prompts(world, tmp_path):
    """--ptx_coef without --ptx_data_path takes the embedded world's SFT rows; with the user's own prompts and
    --image_folder, those rows' images (sft00000.png, ...) were looked up in the user's folder: file not found."""
    from types import SimpleNamespace

    from training.data.bad_rows import BadRowReport
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny import build_processor
    from training.ppo.main import ptx_data
    p = SimpleNamespace(ptx_coef=0.1, ptx_data_path="", ptx_image_folder="", max_new_tokens=8)
    d = SimpleNamespace(world_dir=str(world), image_folder=str(tmp_path), max_seq_len=160)
    ds = ptx_data(p, d, build_processor(), ARCHITECTURES["llava"], BadRowReport(), None)
    assert len(ds) == 2 * SMALL_WORLD.n_sft and ds[0] is not None


@pytest.mark.parametrize("ptx_coef, ptx_data_path, made", [(0.1, "", True), (0.1, "mine.json", False),
                                                           (0.0, "", False)])
def test_ptx_default_data_makes_the_world_beside_user_prompts(tmp_path, monkeypatch, ptx_coef, ptx_data_path, made):
    """With the user's own --data_path nothing made the embedded world, so --ptx_coef without --ptx_data_path
    stopped on data/world/sft_train.json not found; rank 0 now makes it (the other ranks wait), as the defaults do."""
    from types import SimpleNamespace

    import training.world.generate as generate
    from training.ppo.main import ensure_ptx_world
    calls, waits = [], []
    monkeypatch.setattr(generate, "ensure_world", lambda out, seed=0: calls.append((str(out), seed)))
    p = SimpleNamespace(ptx_coef=ptx_coef, ptx_data_path=ptx_data_path)
    d = SimpleNamespace(world_dir=str(tmp_path / "w"), world_seed=7)
    ensure_ptx_world(p, d, SimpleNamespace(is_main=True, barrier=lambda: waits.append(1)))
    assert calls == ([(str(tmp_path / "w"), 7)] if made else [])
    assert waits == ([1] if made else [])


def test_an_interrupted_ppo_run_says_how_to_continue(world, tiny, rm, tmp_path, capsys):
    """SFT, the reward model and DPO say "stopped after N steps; continue with --resume" when --stop_after_steps
    stops them; PPO exited with status 75 and no word of why or what next."""
    r = main(ppo_args(world, tiny, rm, tmp_path / "cut", "--max_steps", "2", "--save_steps", "1",
                      "--stop_after_steps", "1"))
    assert r["interrupted"]
    assert "stopped after 1 steps; continue with --resume" in capsys.readouterr().out


def test_fewer_prompts_than_a_rollout_batch_names_the_option(world, tiny, rm, tmp_path, monkeypatch):
    """A user's small prompt file under the default --rollout_batch_size 32 stopped on "12 prompts are fewer than
    one rollout batch (32)", naming no option to change, and only after the four models had loaded."""
    import training.model.builder as builder

    def no_load(*a, **k):
        raise AssertionError("a model loaded before the prompts were counted")
    monkeypatch.setattr(builder, "load_model_and_processor", no_load)
    with pytest.raises(ValueError, match=r"one rollout batch \(--rollout_batch_size 1000 x 1 ranks\): give a "
                                         "smaller --rollout_batch_size"):
        main(ppo_args(world, tiny, rm, tmp_path / "big", "--max_steps", "1", "--rollout_batch_size", "1000"))
