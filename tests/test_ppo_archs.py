"""PPO's rollouts, their log-probs, greedy prediction and reward scores on every tiny VLM family: a batch of prompts
of different lengths, images of different sizes and a text-only prompt gives each sample what it gets alone; and
one PPO step runs through the stage on each family (actor and reward model of the same family)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import LoraArgs, ModelArgs
from training.data.collate import collate_sft
from training.data.records import Message
from training.logprobs import token_logprobs
from training.model.builder import load_model_and_processor, save_model
from training.model.tiny_archs import SUPPORTED_TINY, make_tiny_checkpoint
from training.predict.generate import DecodeArgs, generate_batch
from training.ppo.rollout import generate_rollouts
from training.ppo.trainer import _select
from training.rm.data import RewardScorer
from training.rm.model import RewardModel
from training.templates.chat import IGNORE, ChatEncoder, Encoded

PROMPTS = [[Message("user", "<image>\nDescribe the image in detail, please, with every object and its color.")],
           [Message("user", "<image>\nWhat?")],
           [Message("user", "What is a circle?")]]
SIZES = [(32, 32), (64, 32), None]  # (width, height); None: a text-only prompt
# idefics3 with the real checkpoints' image splitting (tiles + a global image: more images per sample)
CASES = SUPPORTED_TINY + ["idefics3_split"]


def _img(seed: int, size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = [[_img(i, s)] if s else [] for i, s in enumerate(SIZES)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """case -> (model in eval mode, processor, ArchSpec), built on first use."""
    root, cache = tmp_path_factory.mktemp("ppo_archs"), {}

    def get(case):
        if case not in cache:
            arch = case.removesuffix("_split")
            path = make_tiny_checkpoint(arch, root / arch)
            model, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(),
                                                         for_training=False)
            if case.endswith("_split"):
                proc.image_processor.do_image_splitting = True
                proc.image_processor.size = {"longest_edge": 64}  # tiles of max_image_size (32 px)
            cache[case] = model.eval(), proc, spec
        return cache[case]
    return get


def _response_logprobs(model, batch, suppressed) -> list[torch.Tensor]:
    with torch.no_grad():
        lp, mask = token_logprobs(model(**batch.model_inputs()).logits, batch.labels, 1.0, suppressed)
    return [lp[i][mask[i]] for i in range(lp.shape[0])]


@pytest.mark.parametrize("case", CASES)
def test_rollout_logprobs_in_the_batch_equal_one_forward_of_each_sample_alone(case, family):
    model, proc, spec = family(case)
    enc = ChatEncoder(proc, spec, 512)
    torch.manual_seed(0)
    ro = generate_rollouts(model, proc, enc, spec.name, PROMPTS, IMAGES,
                           DecodeArgs(max_new_tokens=4, do_sample=True), "cpu")
    batched = _response_logprobs(model, ro.batch, ro.suppressed)
    assert len({int(m.sum()) for m in ro.batch.attention_mask}) > 1  # rows of other lengths: padding
    for i, (prompt, images) in enumerate(zip(PROMPTS, IMAGES)):
        e = enc.encode(prompt, images, add_generation_prompt=True)
        resp = ro.batch.input_ids[i, len(e.input_ids):int(ro.batch.attention_mask[i].sum())]
        assert len(resp) == int(ro.lengths[i]) > 0
        alone = Encoded(torch.cat([e.input_ids, resp]), torch.cat([torch.full_like(e.input_ids, IGNORE), resp]),
                        e.vision, prompt_len=len(e.input_ids))
        want = _response_logprobs(model, collate_sft([alone], proc.tokenizer.pad_token_id, spec.name), ro.suppressed)
        torch.testing.assert_close(batched[i], want[0], rtol=0, atol=1e-4, msg=f"{case} row {i}")
        # a PPO minibatch of this rollout alone (the update's forward) reads the same
        got = _response_logprobs(model, _select(ro.batch, [i], ro.vision_rows, ro.with_vision), ro.suppressed)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4, msg=f"{case} minibatch of row {i}")


@pytest.mark.parametrize("case", CASES)
def test_greedy_batched_prediction_equals_each_prompt_alone(case, family):
    model, proc, spec = family(case)
    enc = ChatEncoder(proc, spec, 512)
    decode = DecodeArgs(max_new_tokens=5)
    together = generate_batch(model, proc, enc, spec.name, PROMPTS, IMAGES, decode)
    alone = [generate_batch(model, proc, enc, spec.name, [p], [im], decode)[0] for p, im in zip(PROMPTS, IMAGES)]
    assert together == alone


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("factual", [False, True])
def test_reward_scores_in_a_batch_equal_each_alone(case, factual, family):
    model, proc, spec = family(case)
    torch.manual_seed(0)
    scorer = RewardScorer(RewardModel(model, factual=factual).eval(), proc, spec, 512, batch_size=8)
    responses = ["A red circle.", "Two big blue squares and a star on the table.", "round"]
    facts = [["a red circle"], ["two blue squares", "one green star"], ["a round shape"]] if factual else None
    together = scorer.score(PROMPTS, IMAGES, responses, facts)
    alone = torch.cat([scorer.score([PROMPTS[i]], [IMAGES[i]], [responses[i]], [facts[i]] if facts else None)
                       for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    assert together.unique().numel() == 3


@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_one_ppo_step_on_each_family(arch, tmp_path):
    """Minibatches of one rollout each: the text-only prompt's rollout is a minibatch alone."""
    from training.ppo.main import main

    ckpt = make_tiny_checkpoint(arch, tmp_path / "base")
    torch.manual_seed(0)
    backbone, proc, _ = load_model_and_processor(ModelArgs(from_checkpoint=ckpt), LoraArgs())
    save_model(RewardModel(backbone, factual=True), proc, tmp_path / "rm")
    (tmp_path / "images").mkdir()
    rows = []
    for i, size in enumerate([(32, 32), (64, 32), (32, 64), None]):
        rows.append({"id": f"p{i}", "facts": [f"There are {i} circles."], "conversations": [
            {"from": "human", "value": ("<image>\n" if size else "") + "Describe" + " it" * i},
            {"from": "gpt", "value": "unused"}]})
        if size:
            _img(i, size).save(tmp_path / "images" / f"{i}.png")
            rows[-1]["image"] = f"{i}.png"
    (tmp_path / "prompts.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    main(["--from_checkpoint", ckpt, "--reward_model", str(tmp_path / "rm"), "--data_path",
          str(tmp_path / "prompts.json"), "--image_folder", str(tmp_path / "images"), "--output_dir", str(out),
          "--no-progress", "--rollout_batch_size", "4", "--per_device_train_batch_size", "1", "--max_new_tokens",
          "4", "--max_seq_len", "256", "--logging_steps", "1", "--figure_dir", str(out / "figure"),
          "--max_steps", "1", "--critic_warmup_steps", "0"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["actor_trained"] == 1.0
    assert all(np.isfinite(metrics[0][k]) for k in ("reward/mean", "policy_loss", "value_loss", "kl"))
    assert (out / "model.safetensors").is_file()
