"""OPA-DPO pieces: the ground-truth expert, the chat-endpoint expert (retries, on-disk cache), token
weights, the masked image, and the whole pipeline (rollout -> correct -> LoRA-SFT -> OPA-DPO) on the
tiny VLM, resumable step by step."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from training.dpo.opa.data import mask_image, revised_with_weights, rollout_weights
from training.dpo.weights import token_weights
from training.dpo.opa.expert import ChatExpert, GroundTruthReviser, revise, split_sentences

GT = "The image shows one blue circle and three crosses (red and blue) on a cyan background."
FACTS = ["The image contains one blue circle.", "The image contains three crosses (red and blue).",
         "The image contains no squares."]


def test_ground_truth_reviser_scores_and_rewrites():
    g = GroundTruthReviser()
    ok = g.review(GT, GT, FACTS)
    assert [r["score"] for r in ok] == [4] and revise(ok) == GT
    hall = g.review("The image shows one blue circle and one red square on a cyan background.", GT, FACTS)
    assert hall[0]["score"] == 1 and hall[0]["object"] == "square"
    assert hall[0]["error_type"] == "image_recognition_error"
    assert revise(hall) == GT
    count = g.review("The image shows one blue circle and two crosses on a cyan background.", GT, FACTS)
    assert count[0]["score"] == 2 and count[0]["object"] == "cross"
    omit = g.review("The image shows one blue circle. It is on a cyan background.", GT, FACTS)
    assert [r["score"] for r in omit] == [3, 3] and revise(omit) == GT
    assert split_sentences("A b. C d! E") == ["A b. ", "C d! ", "E"]


def test_weights_follow_the_report():
    report = [{"copied_content": "The image shows one blue circle. ", "score": 4, "error_type": "correct",
               "object": "", "rewritten_content": "The image shows one blue circle. ", "reason": ""},
              {"copied_content": "There is a red star.", "score": 1, "error_type": "image_recognition_error",
               "object": "star", "rewritten_content": "There are three crosses.", "reason": ""}]
    text, score_w, type_w = revised_with_weights(report)
    assert text == "The image shows one blue circle. There are three crosses."
    assert [w for _, w in score_w] == [1.0, 2.5] and [w for _, w in type_w] == [1.0, 3.0]
    assert [w for _, w in rollout_weights(report)] == [1.0, 2.5]

    from training.model.tiny import build_tokenizer
    tok = build_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    resp = [tok.convert_tokens_to_ids("assistant")] + ids + [tok.eos_token_id]  # template tokens around it
    w = token_weights(tok, text, score_w, resp).tolist()
    n1 = len(tok("The image shows one blue circle.", add_special_tokens=False)["input_ids"])
    assert w[0] == 1.0 and w[-1] == 1.0
    assert w[1:1 + n1] == [1.0] * n1 and w[1 + n1:-1] == [2.5] * (len(ids) - n1)


def test_mask_image_sets_thirty_percent_to_the_mean():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    a, b = np.asarray(img), np.asarray(mask_image(img, 0.3, seed=1))
    changed = (a != b).any(-1)
    assert 0.25 < changed.mean() <= 0.3
    assert np.array_equal(b, np.asarray(mask_image(img, 0.3, seed=1)))  # seeded: the reference cache stays valid


class _Fake(BaseHTTPRequestHandler):
    calls, fail_first = 0, 1

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["model"] == "judge" and self.headers["Authorization"] == "Bearer sekret"
        if type(self).calls <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        content = json.dumps([{"copied_content": "A red star.", "score": 1, "error_type": "image_recognition_error",
                               "object": "star", "rewritten_content": "A red cross.", "reason": "no star"}])
        out = json.dumps({"choices": [{"message": {"content": "Here: " + content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_chat_expert_retries_and_caches(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        img = Image.new("RGB", (8, 8), "red")
        e = ChatExpert(url, "judge", "JUDGE_KEY", tmp_path / "cache", backoff=0.01)
        rep = e.review("A red star.", question="Describe.", image=img)
        assert rep[0]["score"] == 1 and revise(rep) == "A red cross."
        assert _Fake.calls == 2  # one 503, one answer
        again = ChatExpert(url, "judge", "JUDGE_KEY", tmp_path / "cache").review("A red star.", question="Describe.",
                                                                                 image=img)
        assert again == rep and _Fake.calls == 2  # the rerun is served from the cache: no second call
    finally:
        server.shutdown()


def test_opa_pipeline_end_to_end_and_resumable(world, tiny, tmp_path, capsys):
    from training.dpo.opa.main import main

    out = tmp_path / "opa"
    args = ["--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json"), "--image_folder",
            str(world / "images"), "--n_prompts", "4", "--output_dir", str(out), "--in_process",
            "--max_new_tokens", "12", "--rollout_batch_size", "2", "--figure_dir", str(out / "fig"),
            "--sft_args", "--lora_r 4 --lora_dropout 0 --max_steps 1 --per_device_train_batch_size 4 --no-progress",
            "--dpo_args", "--max_steps 2 --per_device_train_batch_size 2 --no-progress --logging_steps 1 "
                          "--num_warmup_steps 0"]
    main(args + ["--step", "rollout"])
    rollouts = (out / "work" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 4
    assert all("<image>" in json.loads(x)["prompt"][-1]["content"] for x in rollouts)  # the messages answered
    main(args)  # the other steps; the rollout step finds its output and does nothing
    assert (out / "work" / "rollouts.jsonl").read_text().splitlines() == rollouts
    pairs = json.loads((out / "work" / "opa_pairs.json").read_text())
    assert len(pairs) == 4 and all(p["report"] and p["revised"] for p in pairs)
    assert (out / "work" / "opa_sft" / "adapter" / "adapter_config.json").exists()
    # both steps' plots in --figure_dir (the SFT step's went to the working folder's figure/)
    assert {p.name for p in (out / "fig").iterdir()} >= {"opa_sft_metrics.png", "opa_metrics.png"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # policy == reference at step 1: each pair's loss and the anchor at log 2, plus the default added SFT term (weight 1:
    # the ground-truth answer's negative log-prob)
    from training.dpo.opa.main import SFT_WEIGHT
    assert json.loads((out / "run_config.json").read_text())["dpo"]["sft_weight"] == SFT_WEIGHT == 1.0
    assert rows[0]["sft_loss"] > 0
    assert rows[0]["loss"] == pytest.approx(6.4 * np.log(2) + rows[0]["sft_loss"], rel=1e-4)
    for k in ("rewards/chosen", "opa/margin3", "opa/margin4"):
        assert k in rows[0]
    assert (out / "model.safetensors").exists()
    # the released code's per-token variant trains on the same file (live per-token reference)
    from training.dpo.main import main as dpo_main
    r = dpo_main(["--loss_type", "opa", "--opa_token_level", "--no-precompute_ref", "--from_checkpoint", str(tiny),
                  "--data_path", str(out / "work" / "opa_pairs.json"), "--image_folder", str(world / "images"),
                  "--output_dir", str(tmp_path / "tok"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                  "--no-progress", "--logging_steps", "1", "--num_warmup_steps", "0", "--learning_rate", "3e-3",
                  "--figure_dir", str(tmp_path / "fig"), "--sft_weight", "0"])
    losses = [h["loss"] for h in r["history"]]
    assert losses[0] == pytest.approx(6.4 * np.log(2), rel=1e-4) and losses[1] < losses[0]


def test_opa_sft_term_adds_the_ground_truth_nll_exactly():
    import torch

    from training.config import DPOArgs
    from training.dpo.forward import ResponseLogps
    from training.dpo.objective import opa_objective

    torch.manual_seed(0)
    n, k, length = 6, 4, 3  # 3 prompts x (real, masked) rows, 4 responses each
    lp = -torch.rand(n, k, length)
    ones = torch.ones(n, k, length)
    pol = ResponseLogps(lp.sum(-1), ones.sum(-1), lp.sum(-1), lp, ones, ones)
    ref = (lp.sum(-1) * 0.9, ones.sum(-1), lp.sum(-1) * 0.9)
    base = opa_objective(pol, ref, DPOArgs(loss_type="opa", sft_weight=0.0), {})["pair_loss_sum"]
    with_sft = opa_objective(pol, ref, DPOArgs(loss_type="opa", sft_weight=0.5), {})
    expected = base - 0.5 * lp.sum(-1)[0::2, 0].sum()  # ground truth = response 0 of each real-image row
    torch.testing.assert_close(with_sft["pair_loss_sum"], expected)
    torch.testing.assert_close(with_sft["metrics"]["sft_loss"], -0.5 * lp.sum(-1)[0::2, 0].sum())


def test_only_corrected_keeps_the_rollouts_the_expert_changed(world, tmp_path):
    from training.dpo.opa.main import main

    out = tmp_path / "opa"
    (out / "work").mkdir(parents=True)
    wrong = "The image shows one blue circle and one red square on a cyan background."
    answers = [wrong, GT, wrong.replace("red", "blue")]
    rollouts = [{"key": f"p{i}#{i}", "id": f"p{i}", "image": "x.png", "question": "Describe the image in detail.",
                 "gt": GT, "facts": FACTS, "rollout": r} for i, r in enumerate(answers)]
    (out / "work" / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    base = ["--step", "correct", "--force", "--from_checkpoint", str(tmp_path), "--data_path",
            str(world / "preference_train.json"), "--image_folder", str(world / "images"), "--output_dir", str(out)]
    ids = lambda: [p["id"] for p in json.loads((out / "work" / "opa_pairs.json").read_text())]  # noqa: E731
    main(base)
    assert ids() == ["p0", "p1", "p2"]  # the paper's default: every rollout
    main(base + ["--only_corrected"])
    assert ids() == ["p0", "p2"]
    sft = json.loads((out / "work" / "opa_sft.json").read_text())
    assert {s["id"].split("-")[0] for s in sft} == {"p0", "p2"}  # the OPA-SFT step sees the same prompts
    main(base + ["--only_corrected", "--max_pairs", "1"])
    assert ids() == ["p0"]


# ---------------------------------------------------------------- review mends: images, bad rows, field types

def _opa_row(image, **kw):
    row = {"id": "x", "image": image, "question": "Describe.", "gt": GT, "rollout": "A red star.", "revised": GT,
           "rollout_weights": [["A red star.", 2.5]], "revised_score_weights": [[GT, 1.0]],
           "revised_type_weights": [[GT, 1.0]]}
    return {**row, **kw}


def _prompt_args(data_path, image_folder="", n=100):
    import argparse
    return argparse.Namespace(data_path=str(data_path), image_folder=image_folder, n_prompts=n)


def test_rollouts_of_image_bytes_keep_a_source_that_reloads(world, tiny, tmp_path):
    """RLAIF-V / TRL parquet keep images as bytes: the work files hold base64 text (was the text "b'\\x89PNG..."),
    which every later step opens as the same image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data.bad_rows import BadRowReport
    from training.data.images import load_image
    from training.dpo.opa.data import OPADataset, read_opa
    from training.dpo.opa.main import main

    pngs = [(world / "images" / f"pref0000{i}.png").read_bytes() for i in range(2)]
    data = tmp_path / "data" / "rlaif.parquet"
    data.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"idx": f"r{i}", "image": {"bytes": b, "path": None}, "question": "Describe.",
                                          "chosen": GT, "rejected": "A red star."} for i, b in enumerate(pngs)]), data)
    out = tmp_path / "opa"
    args = ["--from_checkpoint", str(tiny), "--data_path", str(data), "--output_dir", str(out), "--no-progress",
            "--max_new_tokens", "4"]
    main(args + ["--step", "rollout"])
    main(args + ["--step", "correct"])
    pairs = json.loads((out / "work" / "opa_pairs.json").read_text())
    assert len(pairs) == 2
    for p, png in zip(pairs, pngs):
        assert np.array_equal(np.asarray(load_image(p["image"], str(data.parent))), np.asarray(load_image(png, None)))
    fake = type("Enc", (), {"tokenizer": None})()
    assert len(OPADataset(read_opa(out / "work" / "opa_pairs.json"), fake, "", BadRowReport())) == 2


def test_load_prompts_keeps_paths_relative_to_the_image_root(world, tmp_path):
    from training.data.images import load_image
    from training.dpo.opa.main import load_prompts

    a = _prompt_args(world / "preference_train.json", str(world / "images"), n=2)
    rows = load_prompts(a)
    assert [r[2] for r in rows] == ["pref00000.png", "pref00001.png"]  # was the absolute path
    load_image(rows[0][2], a.image_folder)
    # no --image_folder: the data file's folder is the root (as the readers take it), named for every step
    rows = json.loads((world / "preference_train.json").read_text())[:2]
    (world / "images" / "pref_here.json").write_text(json.dumps(rows))
    a = _prompt_args(world / "images" / "pref_here.json", "")
    assert [r[2] for r in load_prompts(a)] == ["pref00000.png", "pref00001.png"]
    assert a.image_folder == str(world / "images")


def test_load_prompts_a_row_without_an_image_is_a_bad_row(world, tmp_path):
    from training.data.bad_rows import BadRowError, BadRowReport
    from training.dpo.opa.main import load_prompts

    rows = json.loads((world / "preference_train.json").read_text())[:3]
    del rows[1]["image"]
    rows[1]["conversations"][0]["value"] = "Describe the image in detail."
    path = tmp_path / "text_only.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(BadRowError, match=r"text_only.json: row 1: field 'image': OPA-DPO needs exactly one image"):
        load_prompts(_prompt_args(path, str(world / "images")))  # was an IndexError, or a row without an image
    report = BadRowReport(skip=True)
    kept = load_prompts(_prompt_args(path, str(world / "images")), report)
    assert [r[0] for r in kept] == [rows[0]["id"], rows[2]["id"]]
    assert [(s["row"], s["field"]) for s in report.skipped] == [(1, "image")]


def test_load_prompts_does_not_hide_a_bad_preference_row(world, tmp_path):
    from training.data.bad_rows import BadRowError
    from training.dpo.opa.main import load_prompts

    rows = json.loads((world / "preference_train.json").read_text())[:3]
    rows[1]["conversations"][1]["value"] = [GT, GT]
    path = tmp_path / "pref.json"
    path.write_text(json.dumps(rows))
    # was: any error re-read the file as prompts, silently, the bad row included
    with pytest.raises(BadRowError, match=r"pref.json: row 1: field 'conversations\[1\].value': identical responses"):
        load_prompts(_prompt_args(path, str(world / "images")))
    # a prompt file (no preference format matches) is still read as prompts with their reference answers
    prompts = load_prompts(_prompt_args(world / "ppo_prompts.json", str(world / "images"), n=2))
    assert len(prompts) == 2 and all(r[3] for r in prompts)


def test_opa_pairs_image_problems_are_bad_rows_of_the_right_file(world, tmp_path):
    from training.data.bad_rows import BadRowError, BadRowReport
    from training.dpo.opa.data import OPADataset, read_opa

    work = tmp_path / "work"
    work.mkdir()
    png = world / "images" / "pref00000.png"
    (work / "ok.png").write_bytes(png.read_bytes())
    (tmp_path / "outside.png").write_bytes(png.read_bytes())
    first, second = work / "a.json", work / "b.json"
    first.write_text(json.dumps([_opa_row("ok.png"), _opa_row(base64.b64encode(png.read_bytes()).decode())]))
    second.write_text(json.dumps([_opa_row(str(tmp_path / "outside.png")), _opa_row("../outside.png"),
                                  _opa_row("missing.png"), _opa_row("ok.png")]))
    rows = [r for p in (first, second) for r in read_opa(p)]
    fake = type("Enc", (), {"tokenizer": None})()
    # no image root: the pairs file's folder, so absolute paths and '..' are refused (were opened)
    with pytest.raises(BadRowError, match=r"b.json: row 0: field 'image': path escapes the image root"):
        OPADataset(rows, fake, "", BadRowReport(), source=str(first))
    report = BadRowReport(skip=True)
    ds = OPADataset(rows, fake, "", report, source=str(first))
    assert len(ds) == 3  # rows are the file's (was: the first file and the position in all files)
    assert [(s["file"], s["row"], s["field"]) for s in report.skipped] == [(str(second), k, "image") for k in range(3)]
    assert "path escapes" in report.skipped[1]["reason"] and "file not found" in report.skipped[2]["reason"]
    (work / "ok.png").unlink()  # gone after the check: a bad row when used, not a crash
    assert ds[2] is None and report.skipped[-1]["file"] == str(second) and report.skipped[-1]["row"] == 3


@pytest.mark.parametrize("field, value, where", [
    ("question", 3, "question"), ("gt", None, "gt"), ("image", ["a.png"], "image"),
    ("rollout_weights", "A red star.", "rollout_weights"), ("revised_score_weights", [[GT, "high"]],
                                                            r"revised_score_weights\[0\]"),
    ("revised_type_weights", [[GT, float("nan")]], r"revised_type_weights\[0\]")])
def test_read_opa_checks_field_types(tmp_path, field, value, where):
    from training.dpo.opa.data import read_opa

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([_opa_row("ok.png"), {**_opa_row("ok.png"), field: value}]))
    with pytest.raises(ValueError, match=rf"pairs.json: row 1: field '{where}'"):
        read_opa(path)
    path.write_text(json.dumps([_opa_row("ok.png"), {"image": "ok.png"}]))
    with pytest.raises(ValueError, match=r"pairs.json: row 1: field 'question': missing"):
        read_opa(path)


# ---------------------------------------------------------------- review mends: keys, resume, expert answers, CoPO

def _opa_main_args(world, out, *extra):
    return ["--from_checkpoint", str(out.parent), "--data_path", str(world / "preference_train.json"),
            "--image_folder", str(world / "images"), "--output_dir", str(out), "--no-progress", *extra]


def _refused_then_skipped(world, out, match, kept, *args):
    """The correct step stops on a bad rollout (an error matching `match`), and with --skip_bad_rows pairs `kept`."""
    import training.dpo.opa.main as opa
    with pytest.raises(ValueError, match=match):
        opa.main(_opa_main_args(world, out, "--step", "correct", *args))
    opa.main(_opa_main_args(world, out, "--step", "correct", *args, "--skip_bad_rows"))
    assert [p["key"] for p in json.loads((out / "work" / "opa_pairs.json").read_text())] == kept


def _write_rollouts(work, answers):
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"key": f"p#{i}", "id": "p", "image": "x.png", "question": "Describe the image in detail.", "gt": GT,
             "facts": FACTS, "rollout": r} for i, r in enumerate(answers)]
    (work / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_sharing_an_id_are_kept_apart_and_resumed(world, tiny, tmp_path):
    """LLaVA rows are keyed by image: two prompts with one id were one work-file row (and on resume the
    second counted as done)."""
    from training.dpo.opa.main import main

    rows = json.loads((world / "preference_train.json").read_text())[:3]
    rows[1]["id"] = rows[0]["id"]
    data = world / "images" / "same_ids.json"  # beside the images: the default image root
    data.write_text(json.dumps(rows))
    out = tmp_path / "opa"
    args = ["--from_checkpoint", str(tiny), "--data_path", str(data), "--output_dir", str(out), "--no-progress",
            "--max_new_tokens", "4", "--n_prompts", "3"]
    main(args + ["--step", "rollout"])
    main(args + ["--step", "correct"])
    assert len(json.loads((out / "work" / "opa_pairs.json").read_text())) == 3  # was 2
    path = out / "work" / "rollouts.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and len({json.loads(x)["key"] for x in lines}) == 3
    path.write_text(lines[0] + "\n" + lines[2] + "\n")  # as if stopped before the second prompt
    main(args + ["--step", "rollout"])
    assert sorted(json.loads(x)["key"] for x in path.read_text().splitlines()) == \
        sorted(json.loads(x)["key"] for x in lines)
    main(args + ["--step", "correct"])
    pairs = json.loads((out / "work" / "opa_pairs.json").read_text())
    assert sorted(p["id"] for p in pairs) == sorted([rows[0]["id"], rows[0]["id"], rows[2]["id"]])
    assert len({p["key"] for p in pairs}) == 3


def test_a_new_rollout_is_reviewed_again(world, tmp_path):
    """After `--step rollout --force` the correct step reused the old rollout's report."""
    from training.dpo.opa.main import main

    out = tmp_path / "opa"
    wrong = "The image shows one blue circle and one red square on a cyan background."
    _write_rollouts(out / "work", [wrong])
    main(_opa_main_args(world, out, "--step", "correct"))
    first = json.loads((out / "work" / "opa_pairs.json").read_text())[0]
    assert first["report"][0]["score"] == 1
    _write_rollouts(out / "work", [GT])  # the rollout step made anew
    main(_opa_main_args(world, out, "--step", "correct"))
    pair = json.loads((out / "work" / "opa_pairs.json").read_text())[0]
    assert pair["rollout"] == GT and [(r["copied_content"], r["score"]) for r in pair["report"]] == [(GT, 4)]


def _record_steps(opa, monkeypatch) -> list:
    """Each step as (name, whether its work file exists when it starts) and each stage as (script, --resume)."""
    calls = []
    monkeypatch.setattr(opa, "step_rollout", lambda a, w: calls.append(("rollout", (w / "rollouts.jsonl").exists())))
    monkeypatch.setattr(opa, "step_correct", lambda a, w: calls.append(("correct", (w / "reports.jsonl").exists())))
    monkeypatch.setattr(opa, "_stage", lambda script, args, in_process: calls.append((script, "--resume" in args)))
    return calls


def test_stages_resume_unless_forced(world, tmp_path, monkeypatch):
    import training.dpo.opa.main as opa

    calls = _record_steps(opa, monkeypatch)
    out = tmp_path / "opa"
    (out / "work").mkdir(parents=True)
    opa.main(_opa_main_args(world, out, "--step", "sft"))
    opa.main(_opa_main_args(world, out, "--step", "dpo"))
    assert calls == [("run_sft.sh", True), ("run_dpo_training.sh", True)]  # an interrupted stage continues
    calls.clear()
    opa.main(_opa_main_args(world, out, "--step", "dpo", "--force"))
    assert calls == [("run_dpo_training.sh", False)]


def test_force_with_step_all_redoes_every_step(world, tmp_path, monkeypatch):
    import training.dpo.opa.main as opa

    calls = _record_steps(opa, monkeypatch)
    out = tmp_path / "opa"
    work = out / "work"
    for f in ("rollouts.jsonl", "reports.jsonl", "opa_sft/model.safetensors"):  # a finished step's model: its weights
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        (work / f).write_text("{}")
    (out / "model.safetensors").write_text("{}")
    opa.main(_opa_main_args(world, out))  # every output there: nothing redone
    assert calls == [("rollout", True), ("correct", True)]
    calls.clear()
    opa.main(_opa_main_args(world, out, "--force"))  # was: nothing redone
    assert calls == [("rollout", False), ("correct", False), ("run_sft.sh", False), ("run_dpo_training.sh", False)]


def test_a_cut_last_work_line_is_dropped_and_other_bad_lines_named(tmp_path, capsys):
    from training.dpo.opa.main import _read_jsonl

    path = tmp_path / "rollouts.jsonl"
    good = [json.dumps({"key": f"p#{i}", "id": "p", "rollout": "A."}) for i in range(2)]
    path.write_text("\n".join(good) + '\n{"key": "p#2", "id": "p", "rol')  # killed while appending
    assert list(_read_jsonl(path)) == ["p#0", "p#1"]
    assert "line 3 is cut short" in capsys.readouterr().out
    assert path.read_text() == "".join(x + "\n" for x in good)  # the next append starts on a line of its own
    path.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(SystemExit, match=r"rollouts.jsonl: line 2: invalid JSON"):
        _read_jsonl(path)


def test_correct_step_names_or_skips_a_rollout_the_expert_answers_unusably(world, tmp_path, monkeypatch):
    import training.dpo.opa.main as opa
    from training.dpo.opa.expert import parse_report

    class Expert:
        def review(self, response, **_):
            ok = [{"copied_content": response, "score": 4, "error_type": "correct", "rewritten_content": response}]
            return parse_report(json.dumps(ok) if response == GT else '[{"score": "N/A"}]')

    monkeypatch.setattr(opa, "make_expert", lambda a, work: Expert())
    out = tmp_path / "opa"
    _write_rollouts(out / "work", [GT, "A red star."])
    _refused_then_skipped(world, out, r"rollouts.jsonl: rollout p#1: expert answer: sentence 0: score 'N/A'", ["p#0"])


def test_anchor_uses_the_unweighted_chosen_rewards_as_published():
    """One prompt, one token per response. Log-ratios pi - ref: real row s = [a0, a1, a2, a3], masked row
    [m0, m1]; token weights 2 (revised, score), 3 (rollout), 4 (revised, type) on the real row, 5 on the masked
    revised. With beta b and the paper's anchor:
      L = -ls(b(a0 - a2)) - ls(b(2 a1 - 3 a2)) - 0.2 [ls(b(a0 - m0)) + ls(b(4 a3 - 5 m1))]
          - ls(b a0) - ls(b a1) - ls(b a0) - ls(b a3)
    (ls = log sigmoid): the anchor takes each chosen response's UNWEIGHTED log-ratio, as the released
    dpo_loss returns beta * chosen_logratios (ours took 2 a1 and 4 a3)."""
    import math

    import torch

    from training.config import DPOArgs
    from training.dpo.forward import ResponseLogps
    from training.dpo.objective import opa_objective

    s = torch.tensor([[0.5, -0.4, 0.3, 0.7], [-0.2, 0.6, 0.0, 0.0]])
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 5.0, 1.0, 1.0]])
    ones = torch.ones(2, 4)
    pol = ResponseLogps(s, ones, w * s, s[..., None], ones[..., None], w[..., None])
    zero = torch.zeros(2, 4)
    b = 0.5
    ls = lambda x: -math.log1p(math.exp(-b * x))  # noqa: E731
    a0, a1, a2, a3, m0, m1 = 0.5, -0.4, 0.3, 0.7, -0.2, 0.6
    want = -(ls(a0 - a2) + ls(2 * a1 - 3 * a2) + 0.2 * (ls(a0 - m0) + ls(4 * a3 - 5 * m1))
             + 2 * ls(a0) + ls(a1) + ls(a3))
    a = DPOArgs(loss_type="opa", beta=b, sft_weight=0.0)
    got = opa_objective(pol, (zero, ones, zero), a, {})["pair_loss_sum"]
    assert got.item() == pytest.approx(want, rel=1e-6)
    # the per-token variant: pair losses per token (weights inside the logits only), the same anchor
    a.opa_token_level = True
    tok = opa_objective(pol, (zero, ones, zero, torch.zeros(2, 4, 1)), a, {})["pair_loss_sum"]
    assert tok.item() == pytest.approx(want, rel=1e-6)  # one token each: the per-token form is the same


def test_opa_token_level_anchor_is_per_token():
    """The released code's per-token form applies the anchor's sigmoid per token too. The ground truth's
    per-token log-ratios (2, -2), every other response's 0, beta 0.5: with X = (sp(-1) + sp(1)) / 2,
    sp(x) = log(1 + e^x), pairs 1 and 3 give X, pairs 2 and 4 log 2, the anchor X + log 2 + X + log 2:
    3.2 X + 3.2 log 2 in all. A sequence-level anchor (r1 = r3 = 0.5 (2 - 2) = 0) would give 1.2 X + 5.2 log 2."""
    import math

    import torch

    from training.config import DPOArgs
    from training.dpo.forward import ResponseLogps
    from training.dpo.objective import opa_objective

    tok = torch.zeros(2, 4, 2)
    tok[0, 0] = torch.tensor([2.0, -2.0])
    ones = torch.ones(2, 4, 2)
    pol = ResponseLogps(tok.sum(-1), ones.sum(-1), tok.sum(-1), tok, ones, ones)
    zero = torch.zeros(2, 4)
    a = DPOArgs(loss_type="opa", beta=0.5, sft_weight=0.0, opa_token_level=True)
    got = opa_objective(pol, (zero, ones.sum(-1), zero, torch.zeros(2, 4, 2)), a, {})["pair_loss_sum"]
    x = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert got.item() == pytest.approx(3.2 * x + 3.2 * math.log(2), rel=1e-6)


def _opa_dataset(tiny, rows, root, max_len, report):
    from training.config import LoraArgs, ModelArgs
    from training.dpo.opa.data import OPADataset, read_opa
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    path = root / "pairs.json"
    path.write_text(json.dumps(rows))
    return OPADataset(read_opa(path), ChatEncoder(proc, arch, max_len), str(root), report), proc.tokenizer


def test_masked_image_is_masked_on_the_model_input(tiny, tmp_path):
    """The released code masks the processed tensor (mask_single_image): 30% of the H*W positions, all
    channels, set to its mean. Ours masked the full-resolution image, which the processor then resized."""
    import torch

    from training.data.bad_rows import BadRowReport

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    ds, _ = _opa_dataset(tiny, [_opa_row("noise.png")], tmp_path, 512, BadRowReport())
    real, mask = ds[0]
    x, y = real.vision["pixel_values"], mask.vision["pixel_values"]  # (1, C, H, W)
    h, w = x.shape[-2:]
    changed = (x != y).any(-3)
    assert changed.sum().item() == int(0.3 * h * w)
    assert torch.all(y.movedim(-3, -1)[changed] == x.mean())  # every channel of a masked pixel: the mean
    assert torch.equal(ds[0][1].vision["pixel_values"], y)  # seeded: the reference cache stays valid


def test_a_cut_response_keeps_its_token_weights_and_is_reported(tiny, tmp_path):
    """A response cut at max_seq_len: weights were silently all 1 and the cut never reported."""
    from training.data.bad_rows import BadRowReport

    png = Image.new("RGB", (64, 64), "red")
    png.save(tmp_path / "red.png")
    row = _opa_row("red.png", revised_score_weights=[[GT, 2.0]], rollout="A red star. " + GT)
    report = BadRowReport(skip=True)
    ds, tok = _opa_dataset(tiny, [row], tmp_path, 80, report)
    ids = tok(GT, add_special_tokens=False)["input_ids"]
    assert token_weights(tok, GT, [[GT, 2.0]], [7] + ids[:5]).tolist() == [1.0] + [2.0] * 5  # was all 1
    real, _ = ds[0]
    kept = real.responses[1].tolist()
    n = next(k for k in range(len(kept)) if kept[k:] == ids[:len(kept) - k])
    assert n < len(kept) and real.weights[1].tolist() == [1.0] * n + [2.0] * (len(kept) - n)
    assert real.truncated and report.cut == [{"file": str(tmp_path / "pairs.json"), "row": 0}]
    # cut so far that ground truth and rollout read the same: a bad row, as in PreferenceDataset
    same = _opa_row("red.png", rollout=GT + " And one red star.", rollout_weights=[[GT + " And one red star.", 2.5]])
    ds, _ = _opa_dataset(tiny, [same], tmp_path, 80, report)
    assert ds[0] is None and report.skipped[-1]["field"] == "rollout"


def test_a_finished_lora_step_is_not_run_again(world, tmp_path, monkeypatch):
    """A finished LoRA step leaves adapters, no config.json: the DPO step took them for no output and ran again
    (with --resume, which now refuses a finished run's folder)."""
    import shutil

    import training.dpo.opa.main as opa
    out = tmp_path / "opa"
    for d in (out / "adapter", out / "work" / "opa_sft" / "adapter"):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"")
    ran = []
    monkeypatch.setattr(opa, "_stage", lambda script, args, in_process=False: ran.append((script, "--resume" in args)))
    args = ["--from_checkpoint", str(tmp_path), "--data_path", str(world / "preference_train.json"), "--image_folder",
            str(world / "images"), "--output_dir", str(out)]
    for step in ("sft", "dpo"):
        opa.main(args + ["--step", step])
    assert ran == []
    shutil.rmtree(out / "adapter")
    opa.main(args + ["--step", "dpo"])
    assert ran == [("run_dpo_training.sh", True)]
