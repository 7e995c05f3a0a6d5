"""SFT stage end to end on the tiny VLM, and its invariances (accumulation, resume), in one process."""
import json

import pytest
import torch
from sft_helpers import FakeRank, sft_args, split_rows, weights

from training.data.bad_rows import BadRowError
from training.sft.main import main


def test_sft_end_to_end_writes_a_reloadable_checkpoint(world, tiny, tmp_path):
    out = tmp_path / "sft"
    main(sft_args(world, tiny, out, "--max_steps", "40", "--per_device_train_batch_size", "4",
                  "--learning_rate", "3e-3"))
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json",
                 "run_config.json", "metrics.jsonl", "bad_rows.json"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    assert (out / "figure" / "sft_metrics.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # it learns
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor
    model, _, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(out)), LoraArgs(), for_training=False)
    assert arch.name == "llava"
    saved = weights(out)
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k


def _changed(a, b):
    return sum(float((a[k] - b[k]).abs().max()) for k in a)


def test_gradient_accumulation_invariance(world, tiny, tmp_path):
    """Batch 4 x accumulation 1 == batch 1 x accumulation 4 (SGD: the update is the gradient)."""
    common = ["--max_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.5"]
    main(sft_args(world, tiny, tmp_path / "a", *common, "--per_device_train_batch_size", "4"))
    main(sft_args(world, tiny, tmp_path / "b", *common, "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4"))
    a, b, init = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tiny)
    assert _changed(a, init) > 1e-3  # the step did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def test_resumed_run_equals_uninterrupted(world, tiny, tmp_path):
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
              "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1", "--logging_steps", "3"]
    main(sft_args(world, tiny, tmp_path / "full", *common))
    r = main(sft_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "2", "--stop_after_steps", "2"))
    assert r["interrupted"] and not (tmp_path / "cut" / "model.safetensors").exists()
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("full", "cut")}
    assert [r["step"] for r in rows["cut"]] == [3, 4]
    # step 3's row is the mean over steps 1-3 (the checkpoint at step 2 carried steps 1-2 of it)
    assert [r["loss"] for r in rows["cut"]] == pytest.approx([r["loss"] for r in rows["full"]], rel=1e-6)
    # --resume of a finished run that left no checkpoint: it retrained from step 0, replacing the model
    before = (tmp_path / "full" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="holds a finished run's model and no checkpoint to resume from"):
        main(sft_args(world, tiny, tmp_path / "full", *common, "--resume"))
    assert (tmp_path / "full" / "model.safetensors").stat().st_mtime_ns == before


def test_resume_with_nothing_to_resume_says_it_starts_afresh(world, tiny, tmp_path, capsys):
    """--resume in an empty folder (a requeued job that never reached its first checkpoint) trained from step 0
    without a word: indistinguishable in the log from a resume."""
    main(sft_args(world, tiny, tmp_path / "new", "--max_steps", "1", "--per_device_train_batch_size", "2", "--resume"))
    assert f"--resume: no checkpoint under {tmp_path / 'new' / 'checkpoints'} yet: training from the start" in \
        capsys.readouterr().out
    assert (tmp_path / "new" / "model.safetensors").exists()


def test_resume_with_other_options_is_refused_and_keeps_the_runs_config(world, tiny, tmp_path):
    """Only the shape (batch, accumulation, seed, data size) was checked: a resume with another --learning_rate ran
    on at the checkpoint's (DeepSpeed restores the optimizer and schedule), another --max_steps stretched the
    schedule midway, and run_config.json was rewritten with the new options even when the resume was refused."""
    out = tmp_path / "cut"
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]
    main(sft_args(world, tiny, out, *common, "--save_steps", "2", "--stop_after_steps", "2"))
    config = (out / "run_config.json").read_text()
    for other, said in ((["--learning_rate", "5e-2"], "--learning_rate 0.001 in the checkpoint, 0.05 now"),
                        (["--max_steps", "6"], "--max_steps 4 in the checkpoint, 6 now")):
        with pytest.raises(SystemExit, match=said):
            main(sft_args(world, tiny, out, *common, *other, "--resume"))
        assert (out / "run_config.json").read_text() == config
    # another ZeRO stage: DeepSpeed failed inside its load (FileNotFoundError: ..._optim_states.pt), naming nothing
    with pytest.raises(SystemExit, match="--zero_stage 0 in the checkpoint, 2 now"):
        main(sft_args(world, tiny, out, *common, "--zero_stage", "2", "--resume"))
    # how it is logged, saved, evaluated or shown may change, and what costs only memory or time, or skips bad rows
    record = out / "checkpoints" / "step2" / "run.json"
    kept = record.read_text()
    record.unlink()  # a checkpoint of an earlier version: DeepSpeed failed on its one parameter group
    with pytest.raises(SystemExit, match="written by an earlier version of this project"):
        main(sft_args(world, tiny, out, *common, "--resume"))
    record.write_text(kept)
    main(sft_args(world, tiny, out, *common, "--resume", "--logging_steps", "2", "--no-gradient_checkpointing",
                  "--skip_bad_rows"))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 4]


def test_resume_with_an_edited_deepspeed_config_is_refused(world, tiny, tmp_path):
    """The checkpoint kept --deepspeed_config's path only: the file edited between the interrupt and the resume (its
    gradient clipping here) went on under the new settings as the same run."""
    ds, out = tmp_path / "ds.json", tmp_path / "cut"
    ds.write_text(json.dumps({"gradient_clipping": 1.0}))
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--deepspeed_config", str(ds)]
    main(sft_args(world, tiny, out, *common, "--save_steps", "2", "--stop_after_steps", "2"))
    ds.write_text(json.dumps({"gradient_clipping": 0.01}))
    with pytest.raises(SystemExit, match=r"--deepspeed_config \(its text's sha256\)"):
        main(sft_args(world, tiny, out, *common, "--resume"))
    ds.write_text(json.dumps({"gradient_clipping": 1.0}))
    main(sft_args(world, tiny, out, *common, "--resume"))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_with_a_dangling_latest_stops_and_keeps_the_checkpoints(world, tiny, tmp_path):
    """`latest` naming a missing checkpoint stopped the run with a bare assertion inside DeepSpeed (or, where
    DeepSpeed returns nothing, started afresh, deleting the checkpoints there). It stops naming the tag."""
    common = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "1"]
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--stop_after_steps", "2"))
    ckpt = tmp_path / "cut" / "checkpoints"
    (ckpt / "latest").write_text("step9")
    with pytest.raises(SystemExit, match="names checkpoint 'step9'"):
        main(sft_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    assert (ckpt / "step2").is_dir() and (ckpt / "step1").is_dir()


class _RunsCode:  # unpickling this calls print: what a planted checkpoint would do with os.system
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("zero", ["2", "3"])
def test_resume_loads_weights_only_under_zero(world, tiny, tmp_path, zero, capsys):
    """ZeRO 2 / 3 checkpoints (their optimizer states hold a few DeepSpeed objects) resume with every
    torch.load at weights_only; a checkpoint file holding anything else is refused, not run."""
    common = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--zero_stage", zero]
    main(sft_args(world, tiny, tmp_path / "full", *common))
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "1"))
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    main(sft_args(world, tiny, tmp_path / "bad", *common, "--save_steps", "1", "--stop_after_steps", "1"))
    optim = next((tmp_path / "bad" / "checkpoints").rglob("*optim_states.pt"))
    state = torch.load(optim, weights_only=False)
    state["planted"] = _RunsCode()
    torch.save(state, optim)
    capsys.readouterr()
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        main(sft_args(world, tiny, tmp_path / "bad", *common, "--resume"))
    assert "code ran" not in capsys.readouterr().out


def _bad_copy(world, tmp_path):
    rows = json.loads((world / "sft_train.json").read_text())
    rows[3]["image"] = "../../escape.png"
    rows[5]["conversations"][1]["value"] = "  "
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return path, len(rows)


def test_bad_rows_stop_the_run_naming_file_row_field(world, tiny, tmp_path):
    path, _ = _bad_copy(world, tmp_path)
    args = sft_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--data_path", str(path))
    with pytest.raises(BadRowError) as e:
        main(args)
    assert str(path) in str(e.value) and "row 3" in str(e.value) and "image" in str(e.value)


def test_bad_rows_skipped_and_counted(world, tiny, tmp_path):
    path, n = _bad_copy(world, tmp_path)
    out = tmp_path / "o"
    main(sft_args(world, tiny, out, "--max_steps", "1", "--data_path", str(path), "--skip_bad_rows"))
    report = json.loads((out / "bad_rows.json").read_text())
    assert report["n_skipped"] == 2
    assert sorted(r["row"] for r in report["rows"]) == [3, 5]


def test_micro_batches_of_bad_rows_at_zero3(world, tiny, tmp_path):
    """A micro-batch whose rows were all skipped takes a discarded step; at ZeRO-3 its zero gradients were
    empty placeholders, which DeepSpeed's reduce-scatter refused (the run died at the first such step)."""
    rows = json.loads((world / "sft_train.json").read_text())[:8]
    for r in rows[1:]:  # seven of eight rows too long for --max_seq_len 100: most micro-batches are all bad
        r["conversations"][0]["value"] += " Describe every shape." * 40
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "o"
    main(sft_args(world, tiny, out, "--data_path", str(path), "--max_seq_len", "100", "--skip_bad_rows",
                  "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--max_steps", "2",
                  "--zero_stage", "3"))
    assert json.loads((out / "bad_rows.json").read_text())["n_skipped"] == 7
    assert (out / "model.safetensors").exists()


def test_a_cut_answer_is_counted_not_silent(world, tiny, tmp_path):
    """An answer cut at --max_seq_len (its EOS lost) is trained on as far as it fits, and counted in bad_rows.json
    as the RM and DPO stages count theirs (SFT said nothing)."""
    rows = json.loads((world / "sft_train.json").read_text())[:4]
    rows[2]["conversations"][1]["value"] += " It also shows a circle." * 30
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "o"
    main(sft_args(world, tiny, out, "--data_path", str(path), "--max_seq_len", "120", "--max_steps", "1",
                  "--per_device_train_batch_size", "4"))
    report = json.loads((out / "bad_rows.json").read_text())
    assert report["n_truncated"] == 1 and report["truncated_rows"][0]["row"] == 2


def test_prompt_too_long_is_a_bad_row(world, tiny, tmp_path):
    args = sft_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--max_seq_len", "60")
    with pytest.raises(BadRowError, match="max_seq_len=60"):
        main(args)


def _held_out(world, tmp_path, n=5):
    rows = json.loads((world / "sft_train.json").read_text())[:n]
    path = tmp_path / "sft_eval.json"
    path.write_text(json.dumps(rows))
    return path, rows


def _plain_loss(model_dir, world, rows):
    """Token-mean NLL of the rows' target tokens, one row at a time with the saved model (hand path)."""
    from training.config import LoraArgs, ModelArgs
    from training.data.collate import collate_sft
    from training.data.images import load_image
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(model_dir)), LoraArgs(),
                                                 for_training=False)
    enc = ChatEncoder(proc, arch, 512)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for r in rows:
            x = enc.encode(r.messages, [load_image(s, str(world / "images")) for s in r.images])
            b = collate_sft([x], proc.tokenizer.pad_token_id, arch.name)
            logp = torch.log_softmax(model(**b.model_inputs()).logits[0, :-1].float(), -1)
            target = b.labels[0, 1:]
            keep = target != -100
            nll -= float(logp[keep].gather(-1, target[keep, None]).sum())
            tokens += int(keep.sum())
    return nll / tokens


def test_held_out_loss_logged_during_and_after_training(world, tiny, tmp_path):
    from training.data.formats import read_sft
    path, _ = _held_out(world, tmp_path)
    out = tmp_path / "sft_eval"
    result = main(sft_args(world, tiny, out, "--max_steps", "4", "--per_device_train_batch_size", "4",
                           "--per_device_eval_batch_size", "2", "--learning_rate", "3e-3",
                           "--eval_data_path", str(path), "--eval_steps", "2"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]  # during training, and after saving
    final = [r for r in rows if "eval/loss" in r][-1]
    assert final["eval/n"] == 5 and final == {**result["eval"], "step": 4, "time": final["time"]}
    recs = read_sft([str(path)], str(world / "images"))
    assert final["eval/loss"] == pytest.approx(_plain_loss(out, world, recs), rel=1e-4)  # batched, padded = plain


def test_held_out_loss_over_two_ranks_counts_each_row_once(world, tiny, tmp_path):
    """5 rows over 2 ranks, batch 2: rank 1 holds rows 1, 3 and a wrapped-around copy of row 0 that must not
    count; the ranks' sums together equal one rank's."""
    from training.config import LoraArgs, ModelArgs, OptimArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_sft
    from training.model.builder import load_model_and_processor
    from training.sft.trainer import SFTDataset, SFTTrainer
    from training.templates.chat import ChatEncoder
    path, _ = _held_out(world, tmp_path)
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    ds = SFTDataset(read_sft([str(path)], str(world / "images")), ChatEncoder(proc, arch, 512), str(world / "images"),
                    BadRowReport())
    cfg = {"optim": OptimArgs(per_device_train_batch_size=1, per_device_eval_batch_size=2)}
    sums = []
    for rank, n_ranks in ((0, 1), (0, 2), (1, 2)):
        t = SFTTrainer(FakeRank(rank, n_ranks), model, proc, ds, cfg, arch.name, eval_set=ds)
        m = t.evaluate()
        sums.append(t.s.seen[0].tolist())  # one collective: nll, tokens, rows
    one, r0, r1 = sums
    assert (r0[2], r1[2], one[2]) == (3, 2, 5)
    assert r0[1] + r1[1] == one[1] and r0[0] + r1[0] == pytest.approx(one[0], rel=1e-5)
    assert m["eval/loss"] == pytest.approx(r1[0] / r1[1])
    assert one[0] / one[1] == pytest.approx(_plain_loss(tiny, world, ds.records), rel=1e-4)


def test_a_template_override_is_saved_with_the_model(world, tiny, tmp_path):
    """--template renders the training data; the checkpoint keeps it, so generation from the saved model
    (predict, PPO rollouts) renders prompts as training did."""
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder
    from test_template_tiny import CONV, NO_EOS, _img
    (tmp_path / "t.jinja").write_text(NO_EOS)
    main(sft_args(world, tiny, tmp_path / "sft", "--max_steps", "1", "--template", str(tmp_path / "t.jinja")))
    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tmp_path / "sft")), LoraArgs(),
                                             for_training=False)
    saved = ChatEncoder(proc, arch, 300).encode(CONV[:1], [_img()], add_generation_prompt=True)
    given = ChatEncoder(proc, arch, 300, NO_EOS).encode(CONV[:1], [_img()], add_generation_prompt=True)
    assert proc.chat_template == NO_EOS and torch.equal(saved.input_ids, given.input_ids)


def test_resume_is_exact_with_dropout_and_logs_each_step_once(world, tiny, tmp_path):
    """LoRA dropout draws random numbers every step: seeded by (seed, step, rank), a resumed run equals an
    uninterrupted one. A run that crashed after its last checkpoint logged steps the resumed run logs
    again: those rows are dropped, so every step appears once in metrics.jsonl."""
    import shutil
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lora_r", "4",
              "--lora_dropout", "0.5"]
    main(sft_args(world, tiny, tmp_path / "full", *common))
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "2", "--stop_after_steps", "3"))
    ckpt = tmp_path / "cut" / "checkpoints"
    shutil.rmtree(ckpt / "step3")  # as if killed after logging step 3, before its checkpoint
    (ckpt / "latest").write_text("step2")
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("full", "cut"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("full", "cut")}
    assert [r["step"] for r in rows["cut"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows["cut"]] == pytest.approx([r["loss"] for r in rows["full"]], rel=1e-6)


def test_a_fresh_run_clears_an_earlier_runs_checkpoints(world, tiny, tmp_path, capsys):
    """Without --resume the run starts over: the earlier run's checkpoints (which rotation would keep over
    this run's, and a later --resume would load) and tensorboard events go."""
    from training.engine.loop import INTERRUPTED, exit_status
    out = tmp_path / "sft"
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--save_steps", "1"]
    r = main(sft_args(world, tiny, out, *common, "--stop_after_steps", "3"))
    assert exit_status(r) == INTERRUPTED and (out / "checkpoints" / "step3").is_dir()
    capsys.readouterr()
    r = main(sft_args(world, tiny, out, *common, "--stop_after_steps", "1"))
    assert "removing the earlier run's" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step1"]
    assert exit_status(main(sft_args(world, tiny, out, "--max_steps", "1", "--per_device_train_batch_size", "2"))) == 0


def test_eval_steps_without_held_out_data_stops():
    with pytest.raises(SystemExit, match="--eval_data_path"):
        main(["--eval_steps", "5"])


def test_held_out_data_that_is_the_default_training_file_is_refused(world, tiny, tmp_path, monkeypatch):
    """Without --data_path the embedded world's sft_train.json is the training data: as --eval_data_path it was
    taken for held-out data (checked before the defaults were filled in) and its loss reported as held-out."""
    monkeypatch.setattr("training.world.generate.ensure_world", lambda out, seed=0: out)
    args = ["--from_checkpoint", str(tiny), "--world_dir", str(world), "--eval_data_path",
            str(world / "sft_train.json"), "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--no-progress",
            "--figure_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="is training data too"):
        main(args)


def test_a_fresh_run_leaves_no_earlier_model_in_its_folder(world, tiny, tmp_path):
    """A LoRA run's adapter/ left beside a later full fine-tune's weights was loaded instead of them (by every later
    stage); a fresh run stopped early left the earlier run's finished model beside its own config and metrics."""
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor
    out = tmp_path / "out"
    main(sft_args(world, tiny, out, "--max_steps", "1", "--lora_r", "4", "--lora_dropout", "0"))
    assert (out / "adapter").is_dir()
    main(sft_args(world, tiny, out, "--max_steps", "1", "--learning_rate", "1e-3"))
    assert not (out / "adapter").exists()
    model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(out)), LoraArgs(), for_training=False)
    saved = weights(out)
    assert all(torch.equal(p, saved[n]) for n, p in model.state_dict().items() if n in saved)
    main(sft_args(world, tiny, out, "--max_steps", "2", "--stop_after_steps", "1"))  # fresh, stopped early
    assert not (out / "model.safetensors").exists() and not (out / "adapter").exists()
    # a run that reads its input from its own folder keeps it
    main(sft_args(world, tiny, out, "--max_steps", "1"))
    args = sft_args(world, tiny, out, "--max_steps", "2", "--stop_after_steps", "1")
    args[args.index("--from_checkpoint") + 1] = str(out)
    main(args)
    assert (out / "model.safetensors").exists()


def test_bad_rows_report_of_a_resumed_run_counts_the_rows_before_the_stop(world, tiny, tmp_path):
    """Rows cut (or skipped) while encoding the steps before a stop were counted in memory only: the resumed run's
    bad_rows.json listed only the rows it encoded itself (2 of 3 truncated rows)."""
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--skip_bad_rows", "--max_seq_len", "100"]
    main(sft_args(world, tiny, tmp_path / "full", *common))
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "2", "--stop_after_steps", "2"))
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    full, cut = (json.loads((tmp_path / r / "bad_rows.json").read_text()) for r in ("full", "cut"))
    assert full["n_truncated"] > 0
    assert sorted(map(json.dumps, cut["truncated_rows"])) == sorted(map(json.dumps, full["truncated_rows"]))
    assert cut["n_skipped"] == full["n_skipped"]


def test_bad_rows_found_before_a_kill_are_listed_after_the_resume(world, tiny, tmp_path, monkeypatch):
    """Only a clean stop wrote them: a run killed after its last checkpoint lost the rows found before it, and
    the resumed run listed only those it encoded itself. They are written with every resumable checkpoint."""
    from training.engine.loop import StepLog
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--skip_bad_rows", "--max_seq_len", "100"]
    main(sft_args(world, tiny, tmp_path / "full", *common))
    after = StepLog.after

    def killed_at_step_3(self, step, *a, **k):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return after(self, step, *a, **k)

    monkeypatch.setattr(StepLog, "after", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(sft_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "2"))
    monkeypatch.setattr(StepLog, "after", after)
    main(sft_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    full, cut = (json.loads((tmp_path / r / "bad_rows.json").read_text()) for r in ("full", "cut"))
    assert sorted(map(json.dumps, cut["truncated_rows"])) == sorted(map(json.dumps, full["truncated_rows"]))


def test_a_data_path_list_with_spaces_reads_every_file(world, tiny, tmp_path):
    """--data_path "a.json, b.json" (the list the readers and require_held_out take) stopped with "no such file":
    the stage split it itself and kept the space in front of the second path."""
    a, b, c = split_rows(world / "sft_train.json", tmp_path, (0, 4), (4, 8), (8, 10))
    r = main(sft_args(world, tiny, tmp_path / "o", "--data_path", f"{a}, {b}", "--eval_data_path", f"{c}, {c}",
                      "--per_device_train_batch_size", "4", "--num_train_epochs", "1"))
    assert len([h for h in r["history"] if "loss" in h]) == 2  # one epoch over both files


def test_held_out_rows_that_all_fail_to_encode_give_no_loss(world, tiny, tmp_path):
    """Held-out rows that read well but each fail to encode (skipped as they are encoded, after training): the final
    evaluation stopped with a bare StopIteration, the trained model saved but the run failed."""
    import math
    rows = json.loads((world / "sft_train.json").read_text())[-4:]
    for r in rows:
        r["conversations"][0]["value"] += " more" * 600
    held = tmp_path / "held.json"
    held.write_text(json.dumps(rows))
    r = main(sft_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--eval_data_path", str(held),
                      "--skip_bad_rows"))
    assert r["eval"]["eval/n"] == 0 and math.isnan(r["eval"]["eval/loss"])
