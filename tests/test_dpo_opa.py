"""OPA-DPO pieces: the ground-truth expert, the chat-endpoint expert (retries, on-disk cache), token
weights, the masked image, and the whole pipeline (rollout -> correct -> LoRA-SFT -> OPA-DPO) on the
tiny VLM, resumable step by step."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from training.dpo.opa.data import mask_image, revised_with_weights, rollout_weights, token_weights
from training.dpo.opa.expert import ChatExpert, GroundTruthReviser, revise, split_sentences

GT = "The image shows one blue circle and three crosses (red and blue) on a cyan background."
FACTS = ["The image contains one blue circle.", "The image contains three crosses (red and blue).",
         "The image contains no squares."]


def test_ground_truth_reviser_scores_and_rewrites():
    g = GroundTruthReviser()
    ok = g.review(GT, GT, FACTS)
    assert [r["score"] for r in ok] == [4] and revise(ok) == GT
    hall = g.review("The image shows one blue circle and one red square on a cyan background.", GT, FACTS)
    assert hall[0]["score"] == 1 and hall[0]["object"] == "square" and hall[0]["error_type"] == "image_recognition_error"
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
            "--max_new_tokens", "12", "--rollout_batch_size", "2",
            "--sft_args", "--lora_r 4 --lora_dropout 0 --max_steps 1 --per_device_train_batch_size 4 --no-progress",
            "--dpo_args", f"--max_steps 2 --per_device_train_batch_size 2 --no-progress --logging_steps 1 "
                          f"--num_warmup_steps 0 --figure_dir {out / 'fig'}"]
    main(args + ["--step", "rollout"])
    rollouts = (out / "work" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 4
    main(args)  # the other steps; the rollout step finds its output and does nothing
    assert (out / "work" / "rollouts.jsonl").read_text().splitlines() == rollouts
    pairs = json.loads((out / "work" / "opa_pairs.json").read_text())
    assert len(pairs) == 4 and all(p["report"] and p["revised"] for p in pairs)
    assert (out / "work" / "opa_sft" / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(6.4 * np.log(2), rel=1e-4)  # policy == reference at step 1
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
    rollouts = [{"id": f"p{i}", "image": "x.png", "question": "Describe the image in detail.", "gt": GT,
                 "facts": FACTS, "rollout": r} for i, r in enumerate([wrong, GT, wrong.replace("red", "blue")])]
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
