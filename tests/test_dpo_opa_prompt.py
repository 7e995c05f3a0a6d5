"""OPA-DPO trains on the prompt its rollout was sampled from: the rollout step keeps the row's messages (earlier
turns, a system message, where the image stands), and the OPA-SFT rows and the four pairs are built on them. The
work files kept the last question only, rebuilt as "<image>\\n" + question: another prompt than the policy answered
wherever the image came after the text or the conversation had earlier turns."""
import json

from PIL import Image

from test_dpo_opa import FACTS, GT

PROMPT = [{"role": "system", "content": "Answer in one sentence."},
          {"role": "user", "content": "Is there a circle?"}, {"role": "assistant", "content": "Yes."},
          {"role": "user", "content": "Describe the image in detail.\n<image>"}]


def test_the_pairs_and_the_sft_rows_keep_the_rollouts_prompt(world, tiny, tmp_path):
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.records import Message
    from training.dpo.opa.data import OPADataset, read_opa
    from training.dpo.opa.main import main
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    out = tmp_path / "opa"
    (out / "work").mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 200, 200)).save(tmp_path / "x.png")
    wrong = "The image shows one blue circle and one red square on a cyan background."
    row = {"key": "p0#0", "id": "p0", "image": "x.png", "question": "Describe the image in detail.",
           "prompt": PROMPT, "gt": GT, "facts": FACTS, "rollout": wrong}
    (out / "work" / "rollouts.jsonl").write_text(json.dumps(row) + "\n")
    main(["--step", "correct", "--force", "--from_checkpoint", str(tiny), "--data_path",
          str(world / "preference_train.json"), "--image_folder", str(tmp_path), "--output_dir", str(out)])
    pairs = read_opa(str(out / "work" / "opa_pairs.json"))
    assert pairs[0]["prompt"] == PROMPT
    sft = json.loads((out / "work" / "opa_sft.json").read_text())
    assert sft[0]["prompt"] == PROMPT and [m["role"] for m in sft[0]["completion"]] == ["assistant"]

    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    enc = ChatEncoder(proc, arch, 1024)
    image = Image.open(tmp_path / "x.png").convert("RGB")
    answered = enc.encode([Message(m["role"], m["content"]) for m in PROMPT], [image], add_generation_prompt=True)
    real, masked = OPADataset(pairs, enc, str(tmp_path), BadRowReport())[0]
    for item in (real, masked):  # the tokens the rollout was sampled after
        assert item.prompt_ids.tolist() == answered.input_ids.tolist()
    # the OPA-SFT row trains its answer alone: the prompt's earlier answer ("Yes.") was trained too
    from training.data.formats import read_sft
    from training.sft.trainer import SFTDataset
    from training.templates.chat import IGNORE
    rows = read_sft([str(out / "work" / "opa_sft.json")], str(tmp_path))
    item = SFTDataset(rows, enc, str(tmp_path), BadRowReport())[0]
    n = len(answered.input_ids)
    assert item.input_ids[:n].tolist() == answered.input_ids.tolist() and (item.labels[:n] == IGNORE).all()
    assert proc.tokenizer.decode(item.labels[n:][item.labels[n:] != IGNORE]).startswith(proc.tokenizer.decode(
        proc.tokenizer(GT, add_special_tokens=False)["input_ids"]))


def test_an_interrupted_rollout_step_rerun_with_other_settings_is_refused(world, tiny, tmp_path):
    """The rollout step resumed by prompt key alone: rerun with another policy or temperature, it appended those
    rollouts to the first ones without a word."""
    import pytest

    from training.dpo.opa.main import main
    out = tmp_path / "opa"
    args = ["--step", "rollout", "--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json"),
            "--image_folder", str(world / "images"), "--output_dir", str(out), "--max_new_tokens", "6",
            "--rollout_batch_size", "2"]
    main(args + ["--n_prompts", "2"])
    with pytest.raises(SystemExit, match=r"other settings \(temperature differ"):
        main(args + ["--n_prompts", "3", "--temperature", "0.5"])
    main(args + ["--n_prompts", "3"])  # the same settings: the rest of the prompts
    assert len((out / "work" / "rollouts.jsonl").read_text().splitlines()) == 3


def test_a_prompt_too_long_for_the_rollout_is_a_bad_row(world, tiny, tmp_path):
    """The rollout step encoded prompts within a fixed 4096 tokens and a longer one stopped it with an uncaught
    PromptTooLong: a bad row now, within --max_seq_len, naming file, row and field (or skipped and counted)."""
    import pytest

    from training.data.bad_rows import BadRowError
    from training.dpo.opa.main import main
    data = world / "preference_train.json"
    args = ["--step", "rollout", "--from_checkpoint", str(tiny), "--data_path", str(data), "--image_folder",
            str(world / "images"), "--max_new_tokens", "4", "--n_prompts", "2", "--max_seq_len", "40"]
    with pytest.raises(BadRowError, match=rf"{data}: row 0: field 'conversations'.*exceeds max_seq_len=40"):
        main(args + ["--output_dir", str(tmp_path / "a")])
    main(args + ["--output_dir", str(tmp_path / "b"), "--skip_bad_rows"])
    assert json.loads((tmp_path / "b" / "work" / "bad_rows.json").read_text())["n_skipped"] == 2
    assert not (tmp_path / "b" / "work" / "rollouts.jsonl").read_text()
