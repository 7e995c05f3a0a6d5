"""DPO data: a prompt and its responses encoded once, the encoded-sample cache, and the rows that cannot be
trained on (too long, responses alike once tokenised or cut), reported naming file, row and field."""
import json

import pytest
import torch
from sft_helpers import pref_dataset


def test_group_processes_its_image_once_and_encodes_like_separate_conversations(world, tiny):
    from training.data.images import load_image
    from training.data.records import Message

    ds = pref_dataset(world, tiny, 160)
    enc, rec = ds.encoder, ds.records[0]
    calls = []
    proc_call = type(enc.processor).__call__
    type(enc.processor).__call__ = lambda self, *a, **k: (calls.append(1), proc_call(self, *a, **k))[1]
    try:
        item = ds[0]
    finally:
        type(enc.processor).__call__ = proc_call
    assert len(rec.responses) == 3 and len(calls) == 1  # three responses, one image processing
    images = [load_image(src, ds.image_root) for src in rec.images]
    for k, text in enumerate(rec.responses):  # each response encoded alone, without the shared memo
        e = enc.encode(rec.prompt + [Message("assistant", text)], images)
        assert torch.equal(e.input_ids[:e.prompt_len], item.prompt_ids)
        assert torch.equal(e.input_ids[e.prompt_len:], item.responses[k])
        assert torch.equal(e.labels[e.prompt_len:], item.targets[k])
        for key, v in e.vision.items():
            assert torch.equal(v, item.vision[key])

def test_encoded_cache_keeps_items_within_its_budget(world, tiny):
    from training.data.encoded_cache import EncodedCache, nbytes

    ds = pref_dataset(world, tiny, 160)
    one = nbytes(ds[0])
    assert one > 3 * 32 * 32 * 4  # pixel values and token ids are counted
    cache = EncodedCache(ds, budget_mb=2.5 * one / 2 ** 20)  # room for two items
    first = [cache[i] for i in range(4)]
    assert sorted(cache.kept) == [0, 1] and cache.used <= cache.budget
    assert cache[0] is first[0] and cache[1] is first[1]  # kept: the same object, not re-encoded
    assert cache[2] is not first[2] and torch.equal(cache[2].prompt_ids, first[2].prompt_ids)
    assert len(cache) == len(ds) and cache.n_responses == ds.n_responses  # the dataset's attributes


def test_encoded_cache_times_encoding_alone():
    """encode_seconds adds up the wrapped dataset's encodes: a kept item read again adds nothing."""
    import time

    from training.data.encoded_cache import EncodedCache

    class Slow:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            time.sleep(0.1)
            return torch.zeros(4)

    cache = EncodedCache(Slow(), budget_mb=1)
    for i in (0, 1, 0, 1, 0):
        cache[i]
    assert 0.2 <= cache.encode_seconds < 0.3  # two encodes (a third would pass 0.3), three reads from memory

def test_a_too_long_item_is_counted_once_over_several_passes(world, tiny):
    from training.data.bad_rows import BadRowReport

    report = BadRowReport(skip=True)
    ds = pref_dataset(world, tiny, 40, report)  # the image alone needs more than 40 tokens
    for _ in range(3):  # the reference pass and two epochs
        assert ds[0] is None and ds[1] is None
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, "conversations"), (1, "conversations")]

def test_a_bad_row_names_the_fields_its_format_holds_the_texts_in(world, tiny, tmp_path):
    """An RLAIF-V row (question, chosen, rejected) too long for max_seq_len is reported under its own fields,
    not under "conversations", which the row does not have."""
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    row = json.loads((world / "preference_train.json").read_text())[0]
    chosen, rejected = row["conversations"][1]["value"][:2]
    path = tmp_path / "rlaif_v.json"
    path.write_text(json.dumps([{"idx": 0, "image": row["image"], "question": "Describe the image.", "chosen": chosen,
                                 "rejected": rejected}]))
    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    report = BadRowReport(skip=True)
    ds = PreferenceDataset(read_preferences([str(path)], str(world / "images")), ChatEncoder(proc, arch, 40),
                           str(world / "images"), report)  # the image alone needs more than 40 tokens
    assert ds[0] is None
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, "question/chosen/rejected")]

def test_responses_the_tokenizer_makes_alike_are_bad_rows(world, tiny, tmp_path):
    """Responses that differ as text but tokenise to the same ids (the tiny tokenizer lowercases) make a pair no
    loss can tell apart (a constant log 2): a bad row for DPO and the reward model, not only when cut."""
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.model.builder import load_model_and_processor
    from training.rm.data import RMDataset
    from training.templates.chat import ChatEncoder

    rows = json.loads((world / "preference_train.json").read_text())[:2]
    turn = rows[1]["conversations"][1]
    turn["value"] = [turn["value"][0], turn["value"][0].upper()]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    recs = read_preferences([str(path)], str(world / "images"))
    for make in (lambda rep: PreferenceDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), rep),
                 lambda rep: RMDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), rep, True)):
        report = BadRowReport(skip=True)
        ds = make(report)
        assert ds[0] is not None and ds[1] is None
        assert [(s["row"], "tokenise to the same ids" in s["reason"]) for s in report.skipped] == [(1, True)]

def test_responses_cut_alike_are_bad_rows_and_cut_ones_are_counted(world, tiny, tmp_path):
    """A pair whose responses truncation at max_seq_len makes the same tokens cannot be told apart (a
    constant loss of log 2; for the reward model a pair it can never rank): a bad row. A pair cut but
    still different is kept and counted in bad_rows.json, not silently."""
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowError, BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.model.builder import load_model_and_processor
    from training.rm.data import RMDataset
    from training.data.images import load_image
    from training.data.records import Message
    from training.templates.chat import ChatEncoder
    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    rec = read_preferences([str(world / "preference_train.json")], str(world / "images"))[0]
    rec.responses = ["There are three red circles and one blue star.", "There are three red circles and two stars."]
    whole = ChatEncoder(proc, arch, 4096).encode(rec.prompt + [Message("assistant", rec.responses[0])],
                                                  [load_image(s, "") for s in rec.images])
    tok = proc.tokenizer
    same = len(tok("There are three red circles and", add_special_tokens=False).input_ids)
    for cls in (PreferenceDataset, RMDataset):
        extra = {"factual": False} if cls is RMDataset else {}
        short = ChatEncoder(proc, arch, whole.prompt_len + same - 1)
        ds = cls([rec], short, str(world / "images"), BadRowReport(), **extra)
        with pytest.raises(BadRowError, match="identical once cut"):
            ds[0]
        report = BadRowReport(skip=True)
        ds = cls([rec], short, str(world / "images"), report, **extra)
        assert ds[0] is None and ds[0] is None and len(report.skipped) == 1
        report = BadRowReport(skip=True)
        ds = cls([rec], ChatEncoder(proc, arch, whole.prompt_len + same + 2), str(world / "images"), report, **extra)
        assert ds[0] is not None and ds[0] is not None and not report.skipped and len(report.cut) == 1
        saved = json.loads(report.write(tmp_path).read_text())
        assert saved["n_truncated"] == 1 and saved["truncated_rows"][0]["row"] == rec.source.row

def test_bad_row_reports_of_ranks_merge_each_row_once(tmp_path):
    """Ranks encode different rows (their bad rows and cut rows differ); rows bad on reading are found
    by every rank. The written report lists each once."""
    from training.data.bad_rows import BadRowReport
    read_bad = {"file": "d.json", "row": 0, "field": "image", "reason": "missing"}
    r0 = ([read_bad, {"file": "d.json", "row": 4, "field": "conversations", "reason": "too long"}],
          [{"file": "d.json", "row": 2}])
    r1 = ([read_bad, {"file": "d.json", "row": 5, "field": "conversations", "reason": "too long"}],
          [{"file": "d.json", "row": 3}])
    report = BadRowReport(skip=True)
    report.merge([r0, r1])
    saved = json.loads(report.write(tmp_path).read_text())
    assert [r["row"] for r in saved["rows"]] == [0, 4, 5] and saved["n_skipped"] == 3
    assert [r["row"] for r in saved["truncated_rows"]] == [2, 3]


def test_a_reference_cache_file_gets_the_umask_mode(tmp_path, monkeypatch):
    """The cache is written with safetensors (a 0600 file) beside the data when that folder is writable: another user
    of a shared data folder then found the file under their run's key and stopped on PermissionError reading it."""
    import os
    import stat
    from contextlib import nullcontext
    from types import SimpleNamespace

    from training.dpo import refcache
    monkeypatch.setattr(refcache, "adapters_disabled", lambda engine: nullcontext())
    monkeypatch.setattr(refcache, "response_logps", lambda engine, batch: SimpleNamespace(
        sum=torch.ones(len(batch.indices), 2), count=torch.ones(len(batch.indices), 2),
        wsum=torch.ones(len(batch.indices), 2)))
    strategy = SimpleNamespace(is_main=True, world_size=1, rank=0, barrier=lambda: None)
    old = os.umask(0o022)
    try:
        refcache.RefCache.load_or_build(tmp_path / "ref.safetensors", strategy, torch.nn.Linear(1, 1),
                                        lambda idx: SimpleNamespace(indices=idx), 4, 2, 2)
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / "ref.safetensors").stat().st_mode)) == "0o644"


def test_a_stale_reference_cache_is_refused_before_any_update(world, tiny, tmp_path, monkeypatch):
    """A stale cache is refused as it is loaded, every item's counts checked: before an optimizer step changes the
    weights or a checkpoint is written (it was refused after the first step, and an item outside the steps run was
    never checked)."""
    from dist_dpo_driver import dpo_args
    from safetensors.torch import load_file, save_file

    from training.dpo.main import main
    from training.engine.strategy import Strategy

    args = dpo_args(world, tiny, tmp_path / "a", "--max_steps", "1", "--per_device_train_batch_size", "4",
                    "--save_steps", "1", "--ref_cache_dir", str(tmp_path / "cache"))
    main(args)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    good = load_file(str(path))
    engines, prepare = [], Strategy.prepare

    def prepared(self, *a, **k):  # the engine, and its weights as training starts
        engine = prepare(self, *a, **k)
        engines.append((engine, {n: w.detach().clone() for n, w in engine.module.named_parameters()}))
        return engine

    monkeypatch.setattr(Strategy, "prepare", prepared)
    for item in (None, 11):  # every item's counts, or one item's (a 1-step run reads 4 of the 16)
        d = dict(good)
        d["count"] = good["count"].clone()
        d["count"][slice(None) if item is None else item, 0] += 1
        save_file(d, str(path))
        out = tmp_path / f"b{item}"
        with pytest.raises(ValueError, match=rf"cache {path} does not belong to this data and model: item "
                                             rf"{item or 0}'s response token counts"):
            main([*args[:args.index("--output_dir") + 1], str(out), *args[args.index("--output_dir") + 2:]])
        assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
        engine, start = engines[-1]
        for k, w in engine.module.named_parameters():
            torch.testing.assert_close(w.detach(), start[k], rtol=0, atol=0, msg=k)
