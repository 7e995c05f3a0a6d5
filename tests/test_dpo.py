"""DPO stage end to end on the tiny VLM: every loss type, the fast path, the reference cache, LoRA,
accumulation invariance and resume, in one process."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from dist_dpo_driver import dpo_args
from sft_helpers import pref_dataset, split_rows, tb_scalars, weights

from training.dpo.main import main

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# first-step loss with policy == reference (h = 0): sigmoid / cdpo log 2; IPO (1/(2 beta))^2 = 25;
# listwise over 3 candidates log 3! = log 6
FIRST_LOSS = {"sigmoid": math.log(2), "cdpo": math.log(2), "ipo": 25.0, "listwise": math.log(6)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "ipo", "orpo", "listwise"])
def test_end_to_end_per_loss_type(world, tiny, tmp_path, loss_type):
    out = tmp_path / loss_type
    data = "ranked_train.json" if loss_type == "listwise" else "preference_train.json"
    lr = "3e-4" if loss_type == "ipo" else "3e-3"
    main(dpo_args(world, tiny, out, "--loss_type", loss_type, "--max_steps", "4", "--per_device_train_batch_size",
                  "4", "--learning_rate", lr, data=data))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "run_config.json", "bad_rows.json"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    assert (out / "figure" / f"{loss_type}_metrics.png").stat().st_size > 1000
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    names = METRICS + (["nll_loss", "log_odds_ratio", "log_odds_chosen"] if loss_type == "orpo" else [])
    tb = tb_scalars(out)  # the scalars themselves: an empty SummaryWriter leaves an event file in the folder too
    for k in names:
        assert all(math.isfinite(r[k]) for r in rows), k
        assert tb[k] == [(r["step"], pytest.approx(r[k], rel=1e-5, abs=1e-6)) for r in rows], k
    if loss_type in FIRST_LOSS:
        assert rows[0]["loss"] == pytest.approx(FIRST_LOSS[loss_type], rel=1e-4)
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    else:  # ORPO: NLL + 0.1 * -log sigmoid(log-odds ratio), as logged
        r = rows[0]
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.1 * r["log_odds_ratio"], rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_default_adds_the_sft_term(world, tiny, tmp_path):
    """The stage default (sft_weight 1): loss = sigmoid DPO + mean over pairs of -logp(chosen)."""
    out = tmp_path / "sft_term"
    main(dpo_args(world, tiny, out, "--max_steps", "1", "--per_device_train_batch_size", "4", "--sft_weight", "1"))
    r = _rows(out)[0]
    assert r["sft_loss"] == pytest.approx(-r["logps/chosen"], rel=1e-5) and r["sft_loss"] > 1
    assert r["loss"] == pytest.approx(math.log(2) + r["sft_loss"], rel=1e-4)
    from training.dpo.main import DEFAULTS
    assert DEFAULTS["sft_weight"] == 1.0


def test_fast_path_equals_two_full_forwards(world, tiny):
    """Per-response log-probs of the shared-prefix layout == K full sequences, within 1e-4, also with
    LoRA adapters and in the backward pass (gradients of the summed log-probs)."""
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset, collate_plain, collate_prefix
    from training.dpo.forward import response_logps
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(lora_r=4))
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # non-zero adapters, so they matter
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    recs = read_preferences([str(world / "ranked_train.json")], str(world / "images"))
    ds = PreferenceDataset(recs, ChatEncoder(proc, arch, 160), str(world / "images"), BadRowReport(), 0)
    items = [ds[i] for i in range(5)]
    items[1].responses[2], items[1].targets[2] = items[1].responses[2][:3], items[1].targets[2][:3]  # ragged
    items[3].prompt_ids = torch.cat([items[3].prompt_ids, items[3].prompt_ids[-6:]])  # prompts of other lengths
    assert len({len(it.prompt_ids) for it in items}) > 1
    pad = proc.tokenizer.pad_token_id
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    packed = collate_prefix(items, pad, arch.name)
    # one row, no padding: every token is a prompt or response token of some item
    assert packed.input_ids.shape == (1, sum(len(it.prompt_ids) + sum(map(len, it.responses)) for it in items))
    fast = response_logps(model, packed)
    g_fast = torch.autograd.grad(fast.sum.sum(), params, allow_unused=True)
    plain = response_logps(model, collate_plain(items, pad, arch.name))
    g_plain = torch.autograd.grad(plain.sum.sum(), params, allow_unused=True)
    assert torch.equal(fast.count, plain.count) and fast.count[1, 2] == 3
    torch.testing.assert_close(fast.sum, plain.sum, rtol=0, atol=1e-4)
    assert fast.sum.abs().min() > 1.0  # real log-probs, not zeros
    for a, b in zip(g_fast, g_plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_packed_layout_under_gradient_checkpointing(world, tiny):
    """Recomputation in backward sees each item's mask too (it travels in the forward's kwargs)."""
    from training.config import LoraArgs, ModelArgs
    from training.dpo.data import collate_plain, collate_prefix
    from training.dpo.forward import response_logps
    from training.model.builder import load_model_and_processor

    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny), gradient_checkpointing=True),
                                                 LoraArgs())
    ds = pref_dataset(world, tiny, 160, n_responses=2)
    items = [ds[i] for i in range(4)]
    model.train()
    for mod in model.modules():  # deterministic forwards
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for batch in (collate_prefix(items, proc.tokenizer.pad_token_id, arch.name),
                  collate_plain(items, proc.tokenizer.pad_token_id, arch.name)):
        lp = response_logps(model, batch).sum
        grads.append((lp.detach(), torch.autograd.grad(lp.sum(), params, allow_unused=True)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-4)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _changed(a, b):
    return sum(float((a[k] - b[k]).abs().max()) for k in a)


SGD = ["--optimizer", "sgd", "--learning_rate", "2.0", "--max_steps", "2"]


def test_accumulation_fast_plain_and_live_reference_all_agree(world, tiny, tmp_path):
    """Batch 4 x accum 1 (fast path, cached reference, samples encoded once and kept) == batch 1 x
    accum 4 (plain path, reference recomputed every step by a frozen model, samples encoded at every
    use): one SGD step is the gradient, so the weights agree."""
    main(dpo_args(world, tiny, tmp_path / "a", *SGD, "--per_device_train_batch_size", "4"))
    main(dpo_args(world, tiny, tmp_path / "b", *SGD, "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4", "--no-fast_path", "--no-precompute_ref",
                  "--encoded_cache_mb", "0"))
    a, b, init = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tiny)
    assert _changed(a, init) > 1e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = [r["loss"] for r in _rows(tmp_path / "a")], [r["loss"] for r in _rows(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)


def test_orpo_accumulation_takes_the_token_mean_of_the_whole_step(world, tiny, tmp_path):
    """ORPO's NLL is a mean over the chosen tokens of the whole step: batch 4 x accum 1 == batch 1 x accum 4 (chosen
    answers of unequal lengths, so a mean of each micro-batch's own token mean would differ)."""
    orpo = (*SGD, "--loss_type", "orpo")
    main(dpo_args(world, tiny, tmp_path / "a", *orpo, "--per_device_train_batch_size", "4"))
    main(dpo_args(world, tiny, tmp_path / "b", *orpo, "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4"))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert _changed(a, weights(tiny)) > 1e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    nll_a, nll_b = ([r["nll_loss"] for r in _rows(tmp_path / x)] for x in ("a", "b"))
    assert nll_a == pytest.approx(nll_b, rel=1e-4)


def test_reference_cache_is_reused_and_keyed_on_the_model(world, tiny, tmp_path, capsys):
    main(dpo_args(world, tiny, tmp_path / "a", "--max_steps", "1", "--per_device_train_batch_size", "4"))
    assert "computed for 16 items" in capsys.readouterr().out
    main(dpo_args(world, tiny, tmp_path / "b", "--max_steps", "1", "--per_device_train_batch_size", "4"))
    assert "reference log-probs: loaded" in capsys.readouterr().out
    # a different starting model (the first run's output) gets its own cache
    main(dpo_args(world, tiny, tmp_path / "c", "--max_steps", "1", "--per_device_train_batch_size", "4",
                  "--from_checkpoint", str(tmp_path / "a")))
    assert "computed for 16 items" in capsys.readouterr().out
    assert len(list((tmp_path / "ref_cache").glob("*.safetensors"))) == 2
    # an image a pair names is rewritten (here: its modification time): a fresh cache
    img = Path(json.loads((world / "preference_train.json").read_text())[0]["image"])
    img = world / "images" / img
    st = img.stat()
    try:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        main(dpo_args(world, tiny, tmp_path / "d", "--max_steps", "1", "--per_device_train_batch_size", "4"))
        assert "computed for 16 items" in capsys.readouterr().out
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    # a cache file of another shape under the key (it cannot belong to this data) is computed anew
    from safetensors.torch import save_file
    oldest = min((tmp_path / "ref_cache").glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns)  # run a's key
    save_file({k: torch.zeros(3, 2, dtype=torch.float64) for k in ("sum", "count", "wsum")}, str(oldest))
    main(dpo_args(world, tiny, tmp_path / "e", "--max_steps", "1", "--per_device_train_batch_size", "4"))
    assert "holds (3, 2), not (16, 2): computing" in capsys.readouterr().out


def test_reference_cache_fingerprints(tmp_path):
    """The model's loadable files (chat template included; not predictions/), every shard of a data
    folder, and the image files records name."""
    from types import SimpleNamespace

    from eval.answers import model_fingerprint  # the one definition, shared by the reference cache and eval
    from training.dpo.refcache import data_fingerprint, images_fingerprint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("model.safetensors", "config.json", "chat_template.jinja"):
        (ckpt / name).write_text("x")
    before = model_fingerprint(str(ckpt))
    (ckpt / "predictions").mkdir()
    (ckpt / "predictions" / "pope.settings.json").write_text("{}")
    # what stages and scoring write beside a model, and loading never reads
    for name in ("eval_embedded.json", "pipeline_stage.json", "run_config.json", "bad_rows.json", "metrics.jsonl"):
        (ckpt / name).write_text("{}")
    assert model_fingerprint(str(ckpt)) == before
    (ckpt / "chat_template.jinja").write_text("another template")
    assert model_fingerprint(str(ckpt)) != before
    # a LoRA checkpoint's weights are in adapter/ (eval's answer cache looked at the top folder only, so a
    # retrained LoRA model's benchmark answers were reused), and its base model's files count too
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_text("base")
    (ckpt / "adapter").mkdir()
    (ckpt / "adapter" / "adapter_model.safetensors").write_text("a")
    (ckpt / "adapter" / "vlm_builder.json").write_text(json.dumps({"base": str(base)}))
    lora = model_fingerprint(str(ckpt))
    (ckpt / "adapter" / "adapter_model.safetensors").write_text("retrained")
    assert model_fingerprint(str(ckpt)) != lora
    lora = model_fingerprint(str(ckpt))
    (base / "model.safetensors").write_text("another base")
    assert model_fingerprint(str(ckpt)) != lora
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-0.parquet").write_bytes(b"a")
    before = data_fingerprint(str(shards))
    (shards / "train-1.parquet").write_bytes(b"b")
    assert data_fingerprint(str(shards)) != before
    (tmp_path / "i.png").write_bytes(b"p")
    recs = [SimpleNamespace(images=[str(tmp_path / "i.png"), b"bytes"]), {"image": "i.png"}]
    got = images_fingerprint(recs, str(tmp_path))
    assert len(got) == 1 and got[0][0] == str((tmp_path / "i.png").resolve())
    # OPA rows without --image_folder: their images lie under their file's folder, as OPADataset reads them
    from training.data.records import RowRef
    got = images_fingerprint([{"image": "i.png", "_where": RowRef(str(tmp_path / "pairs.json"), 0)}], "")
    assert len(got) == 1 and got[0][0] == str((tmp_path / "i.png").resolve())


def test_lora_reference_is_the_policy_with_adapters_off(world, tiny, tmp_path, monkeypatch):
    """LoRA: cached and live references (both the starting policy, no second model) give the same run, with
    only adapters training and with the projector and vision tower training too. One model is loaded per run
    (a full fine-tune's live reference loads a second: the count can tell)."""
    import training.model.builder as builder
    loads, load = [], builder.load_model_and_processor
    monkeypatch.setattr(builder, "load_model_and_processor", lambda *a, **k: (loads.append(1), load(*a, **k))[1])
    lora = ["--lora_r", "4", "--lora_dropout", "0", *SGD, "--per_device_train_batch_size", "4",
            "--freeze_vision_tower", "--freeze_projector"]
    main(dpo_args(world, tiny, tmp_path / "a", *lora))
    assert len(loads) == 1
    main(dpo_args(world, tiny, tmp_path / "b", *lora, "--no-precompute_ref"))
    assert len(loads) == 2
    main(dpo_args(world, tiny, tmp_path / "full", *SGD, "--max_steps", "1", "--no-precompute_ref"))
    assert len(loads) == 4  # the policy and a frozen reference
    la, lb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    for k in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[k] for r in la] == pytest.approx([r[k] for r in lb], rel=1e-5, abs=1e-6), k
    assert la[1]["rewards/margins"] != 0.0
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").exists()
    # the projector and vision tower training too: the live reference puts them back at their start
    # (adapters off alone would move with them), so it still equals the cached one
    main(dpo_args(world, tiny, tmp_path / "c", *lora[:-2]))
    main(dpo_args(world, tiny, tmp_path / "d", *lora[:-2], "--no-precompute_ref"))
    lc, ld = _rows(tmp_path / "c"), _rows(tmp_path / "d")
    for k in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[k] for r in lc] == pytest.approx([r[k] for r in ld], rel=1e-5, abs=1e-6), k


def test_reference_cache_key_follows_the_model_parts_and_quantisation(tmp_path):
    """A model built from --vision_tower / --language_model ignores --from_checkpoint, and the 4-bit settings
    change a QLoRA reference: each must change the cache key (they all shared one). A part in a folder counts by
    its files (a retrained language model at the same path kept the key)."""
    import dataclasses

    from training.config import DataArgs, DPOArgs, LoraArgs, ModelArgs, OptimArgs
    from training.dpo.main import reference_settings

    base = {"model": ModelArgs(), "data": DataArgs(), "dpo": DPOArgs(), "lora": LoraArgs(qlora=True),
            "optim": OptimArgs()}
    changed = [("model", {"vision_tower": "google/siglip-so400m-patch14-384"}),
               ("model", {"language_model": "Qwen/Qwen2-7B"}), ("lora", {"bnb_compute_dtype": "fp32"}),
               ("lora", {"bnb_double_quant": False})]
    keys = {str(reference_settings(base, None, 2, "llava", 1))}
    for concept, change in changed:
        cfg = {**base, concept: dataclasses.replace(base[concept], **change)}
        keys.add(str(reference_settings(cfg, None, 2, "llava", 1)))
    assert len(keys) == 1 + len(changed)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "model.safetensors").write_text("weights")
    cfg = {**base, "model": dataclasses.replace(base["model"], language_model=str(lm))}
    before = str(reference_settings(cfg, None, 2, "llava", 1))
    (lm / "model.safetensors").write_text("retrained weights")
    assert str(reference_settings(cfg, None, 2, "llava", 1)) != before


def test_a_stale_reference_cache_is_refused(world, tiny, tmp_path):
    """A cache whose key missed a change (here: its token counts tampered with) is refused naming its file,
    not silently used: its counts are checked against every batch's."""
    from safetensors.torch import load_file, save_file

    args = dpo_args(world, tiny, tmp_path / "a", "--max_steps", "1", "--per_device_train_batch_size", "4",
                    "--ref_cache_dir", str(tmp_path / "cache"))
    main(args)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    d = load_file(str(path))
    d["count"] = d["count"] + 1
    save_file(d, str(path))
    with pytest.raises(ValueError, match="does not belong to this data and model"):
        main(args)


def test_resumed_run_equals_uninterrupted(world, tiny, tmp_path):
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
              "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1"]
    main(dpo_args(world, tiny, tmp_path / "full", *common))
    r = main(dpo_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "2", "--stop_after_steps", "2"))
    assert r["interrupted"] and not (tmp_path / "cut" / "model.safetensors").exists()
    main(dpo_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3, 4]


@pytest.mark.parametrize("zero", ["0", "2", "3"])  # 2: the T4 profile's stage, with its buckets sized to LoRA
def test_a_qlora_run_resumes_exactly_from_its_trained_weights(world, tiny, tmp_path, zero):
    """A QLoRA checkpoint holds the trained weights only (the 4-bit base's quantisation state made the resume fail
    to load, and every checkpoint carried the whole frozen base); resumed, the run equals the uninterrupted one."""
    from safetensors.torch import load_file
    common = ["--qlora", "--lora_r", "4", "--lora_dropout", "0", "--freeze_vision_tower", "--max_steps", "3",
              "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--zero_stage", zero]
    main(dpo_args(world, tiny, tmp_path / "full", *common))
    r = main(dpo_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "2"))
    assert r["interrupted"]
    states = list((tmp_path / "cut" / "checkpoints" / "step2").glob("*model_states.pt"))
    saved = torch.load(states[0], weights_only=False, map_location="cpu")["module"]
    # the trained weights, and of the frozen 4-bit base only its quantisation constants (absmax, quant_map, ...)
    assert any("lora_" in k for k in saved)
    assert all("lora_" in k or "multi_modal_projector" in k or ".base_layer.weight." in k for k in saved)
    main(dpo_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    assert [x["loss"] for x in _rows(tmp_path / "cut")] == pytest.approx([x["loss"] for x in _rows(tmp_path / "full")],
                                                                           rel=0, abs=1e-6)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_missing_sft_model_stops_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run `bash run_sft.sh` first"):
        main([])


@pytest.mark.parametrize("args,named", [(["--loss_type", "ipo", "--beta", "0"], "--beta 0.0"),
                                        (["--beta", "-0.1"], "--beta -0.1"),
                                        (["--loss_type", "cdpo", "--label_smoothing", "0.6"], "--label_smoothing 0.6"),
                                        (["--loss_type", "cdpo", "--label_smoothing", "-0.1"],
                                         "--label_smoothing -0.1"),
                                        (["--sft_weight", "-1"], "--sft_weight -1.0"),
                                        (["--loss_type", "orpo", "--orpo_lambda", "-1"], "--orpo_lambda -1.0"),
                                        (["--loss_type", "opa", "--opa_c_ai", "-1"], "--opa_c_ai -1.0"),
                                        (["--loss_type", "opa", "--opa_mask_ratio", "-0.1"], "--opa_mask_ratio -0.1"),
                                        (["--loss_type", "opa", "--opa_mask_ratio", "1.5"], "--opa_mask_ratio 1.5")])
def test_loss_settings_that_cannot_train_are_refused_as_the_options_are_read(tmp_path, monkeypatch, args, named):
    """IPO with --beta 0 stopped on 'float division by zero' after the model had loaded; a negative beta, a cDPO
    label smoothing of 0.5 or more (rejected responses preferred) or a negative SFT, ORPO or OPA-DPO weight trained
    the model away from the preferences without a word; an OPA-DPO mask ratio of -0.1 masked 90% of the pixels."""
    monkeypatch.chdir(tmp_path)  # no SFT model here: a run that got past the options would stop on that
    with pytest.raises(SystemExit, match=named.replace(".", r"\.")):
        main(args)


def test_qlora_policy_learns(world, tiny, tmp_path):
    """4-bit base + LoRA adapters (bitsandbytes on CPU); the reference is the 4-bit base, adapters off."""
    out = tmp_path / "q"
    r = main(dpo_args(world, tiny, out, "--qlora", "--lora_r", "4", "--freeze_vision_tower", "--max_steps", "3",
                      "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"))
    losses = [h["loss"] for h in r["history"]]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-4) and losses[-1] < losses[0]
    assert (out / "adapter" / "adapter_config.json").exists()


def test_qlora_live_reference_with_dropout(world, tiny, tmp_path):
    """The live reference (adapters off, eval mode for dropout) of a 4-bit policy, between training steps."""
    r = main(dpo_args(world, tiny, tmp_path / "ql", "--qlora", "--lora_r", "4", "--lora_dropout", "0.1",
                      "--freeze_vision_tower", "--freeze_projector", "--no-precompute_ref", "--no-disable_dropout",
                      "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"))
    assert [h["step"] for h in r["history"]] == [1, 2] and all(h["loss"] == h["loss"] for h in r["history"])


def test_reference_pass_shows_its_progress(world, tiny, tmp_path, capsys):
    args = [a for a in dpo_args(world, tiny, tmp_path / "p", "--max_steps", "1", "--per_device_train_batch_size", "4",
                                "--per_device_eval_batch_size", "64") if a != "--no-progress"]
    main(args)
    err = capsys.readouterr().err
    n = len(json.loads((world / "preference_train.json").read_text()))
    assert "reference log-probs: 100%" in err and f"{-(-n // 64)}/{-(-n // 64)}" in err


@pytest.mark.parametrize("flag", [["--eval_data_path", "x.json"], ["--eval_steps", "5"]])
def test_opa_dpo_and_ppo_refuse_held_out_flags_they_would_ignore(flag, world, tiny):
    from training.ppo.main import main as ppo_main
    for stage, run, extra in (("OPA-DPO", main, ["--loss_type", "opa"]), ("PPO", ppo_main, [])):
        with pytest.raises(SystemExit, match=f"{stage} evaluates nothing held out"):
            run(flag + extra)
    if flag[0] == "--eval_steps":  # user data has no default held-out pairs
        with pytest.raises(SystemExit, match="give the held-out data to evaluate with --eval_data_path"):
            main(flag + ["--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json")])


def test_held_out_pairs_scored_during_and_after_training(world, tiny, tmp_path):
    """Sigmoid DPO's held-out metrics after training equal a hand computation with two plain forwards per
    pair: the saved policy against the starting model."""
    import torch.nn.functional as F

    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.dpo.data import PreferenceDataset, collate_plain
    from training.dpo.forward import response_logps
    from training.data.formats import read_preferences
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder
    out, held = tmp_path / "held", world / "preference_heldout.json"
    result = main(dpo_args(world, tiny, out, "--max_steps", "4", "--per_device_train_batch_size", "4",
                           "--eval_data_path", str(held), "--eval_steps", "2", "--per_device_eval_batch_size", "3"))
    rows = _rows(out)
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]  # during training, and after saving
    got = result["eval"]
    recs = read_preferences([str(held)], str(world / "images"))
    assert got["eval/n"] == len(recs) and got == {k: v for k, v in rows[-1].items() if k.startswith("eval/")}

    def logps(path):
        model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(path)), LoraArgs(),
                                                     for_training=False)
        ds = PreferenceDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), BadRowReport())
        with torch.no_grad():
            return torch.cat([response_logps(model, collate_plain([ds[i]], proc.tokenizer.pad_token_id,
                                                                  arch.name)).sum for i in range(len(ds))])
    pi, ref = logps(out), logps(tiny)
    rw, rl = 0.1 * (pi[:, 0] - ref[:, 0]), 0.1 * (pi[:, 1] - ref[:, 1])
    want = {"eval/loss": float(-F.logsigmoid(rw - rl).mean()), "eval/rewards/margins": float((rw - rl).mean()),
            "eval/rewards/accuracies": float((rw > rl).float().mean()), "eval/logps/rejected": float(pi[:, 1].mean())}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert abs(got["eval/rewards/margins"]) > 1e-3  # the policy moved: the check is not of zeros


def test_held_out_pairs_over_two_ranks_count_each_pair_once(world, tiny):
    """5 pairs over 2 ranks, eval batch 2: rank 1 holds pairs 1 and 3 and runs a third, discarded forward;
    the ranks' item-weighted means equal one rank's."""
    from sft_helpers import FakeRank

    from training.config import DPOArgs, LoraArgs, ModelArgs, OptimArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.dpo.trainer import DPOTrainer
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    recs = read_preferences([str(world / "preference_train.json")], str(world / "images"))[:5]
    ds = PreferenceDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), BadRowReport())
    cfg = {"dpo": DPOArgs(loss_type="orpo"), "optim": OptimArgs(per_device_train_batch_size=1,
                                                                   per_device_eval_batch_size=2)}
    res = []
    for rank, n_ranks in ((0, 1), (0, 2), (1, 2)):
        t = DPOTrainer(FakeRank(rank, n_ranks), proc, ds, cfg, arch.name, eval_set=ds)
        t.engine = model
        res.append(t.evaluate())
    one, r0, r1 = res
    assert (one["eval/n"], r0["eval/n"], r1["eval/n"]) == (5, 3, 2)
    for k in ("eval/logps/chosen", "eval/logps/rejected", "eval/log_odds_ratio", "eval/rewards/margins"):
        # abs: the margins' sum (0.0025 here) is small against the log-probs it is made of, and float32 rounding in
        # batches of other shapes moved it by 6e-8; a pair counted twice or lost moves it by its own margin, 2.2e-4
        # or more for these five pairs (their margins -1.2e-3 to 2.6e-3, from response_logps on each)
        assert 3 * r0[k] + 2 * r1[k] == pytest.approx(5 * one[k], rel=1e-5, abs=1e-6), k

    class FirstIsBad:  # pair 0 a bad row skipped at encoding (e.g. a prompt too long): rank 1's stand-in
        records = ds.records  # batch must come from another pair

        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return None if i == 0 else ds[i]
    t = DPOTrainer(FakeRank(1, 2), proc, ds, cfg, arch.name, eval_set=FirstIsBad())
    t.engine = model
    assert t.evaluate()["eval/n"] == 2

    class OnePair(FirstIsBad):  # 1 pair over 2 ranks: rank 1 runs only a stand-in, yet reduces the same values
        def __len__(self):  # in the same order as rank 0 (a collective per differing key set would hang)
            return 1

        def __getitem__(self, i):
            return ds[i]
    seen = []
    for rank in (0, 1):
        t = DPOTrainer(FakeRank(rank, 2), proc, ds, cfg, arch.name, eval_set=OnePair())
        t.engine = model
        got = t.evaluate()
        seen.append([tuple(x.shape) for x in t.s.seen])
    assert seen[0] == seen[1] == [(12,)] and got["eval/n"] == 0  # one collective of the same 12 sums


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_a_rank_whose_rows_were_all_skipped_reduces_what_the_others_do(world, tiny, loss_type):
    """A training step on a rank whose micro-batches were all bad rows (None) issues the same collectives,
    of the same sizes in the same order, as a rank with a batch: a differing set would hang the ranks."""
    from sft_helpers import FakeRank

    from training.config import DPOArgs, LoraArgs, ModelArgs, OptimArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.dpo.trainer import DPOTrainer
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    model.requires_grad_(True)  # loaded frozen for inference; trained here
    recs = read_preferences([str(world / "preference_train.json")], str(world / "images"))[:4]
    ds = PreferenceDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), BadRowReport())

    class Engine(torch.nn.Module):  # what _step asks of a DeepSpeed engine
        def __init__(self):
            super().__init__()
            self.module = model

        def forward(self, **kw):
            self.forwards = getattr(self, "forwards", 0) + 1
            return self.module(**kw)

        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

        def get_lr(self):
            return [0.0]
    class Reference(torch.nn.Module):  # a live reference (a ZeRO-3 engine gathers in its forwards too)
        def __init__(self):
            super().__init__()
            self.module, self.forwards = model, 0

        def forward(self, **kw):
            self.forwards += 1
            return self.module(**kw)

    cfg = {"dpo": DPOArgs(loss_type=loss_type), "optim": OptimArgs(per_device_train_batch_size=2)}
    seen, metrics, forwards = [], [], []
    for rank, batch in ((0, [0, 1]), (1, None)):
        t = DPOTrainer(FakeRank(rank, 2), proc, ds, cfg, arch.name)
        t.engine, t.ref_model = Engine(), Reference()
        metrics.append(t._step([t.make_batch(batch) if batch else None]))
        seen.append([tuple(torch.as_tensor(x).shape) for x in t.s.seen])
        forwards.append((t.engine.forwards, t.ref_model.forwards))
    assert seen[0] == seen[1] and len(seen[0]) == 2, seen  # the counts, then every metric in one collective
    # the idle rank runs discarded forwards too, the policy's and a live reference's (ZeRO-3 gathers in each)
    assert forwards == [(1, int(loss_type != "orpo"))] * 2
    assert metrics[0].keys() == metrics[1].keys() and metrics[1]["pairs"] == 0
    assert {"rewards/margins", "logps/chosen"} <= metrics[0].keys()
    assert ("nll_loss" in metrics[0]) == (loss_type == "orpo")




def test_a_data_path_list_with_spaces_reads_every_file(world, tiny, tmp_path):
    """--data_path / --eval_data_path "a.json, b.json" stopped with "no such file": the stage split the list itself
    and kept the space in front of the second path."""
    a, b, c = split_rows(world / "preference_train.json", tmp_path, (0, 4), (4, 8), (8, 10))
    r = main(dpo_args(world, tiny, tmp_path / "o", "--data_path", f"{a}, {b}", "--eval_data_path", f"{c}, {c}",
                      "--per_device_train_batch_size", "4", "--num_train_epochs", "1"))
    assert len([h for h in r["history"] if "loss" in h]) == 2  # one epoch over both files
