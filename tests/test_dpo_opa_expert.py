"""OPA-DPO's expert for real data: parsing its per-sentence answers, and the OpenAI-compatible client
(retries, cut-short replies, its on-disk cache per endpoint)."""
import json

import pytest
from test_chat_api import _send, _serve

from training.chat_api import ChatAPIError
from training.dpo.opa.expert import ChatExpert

_NULLS = {"copied_content": "A red star.", "score": 1, "error_type": "image_recognition_error", "object": None,
          "rewritten_content": None, "reason": None}


def test_parse_report_reads_null_as_no_text():
    from training.dpo.opa.expert import parse_report

    assert parse_report(json.dumps([_NULLS])) == [{"copied_content": "A red star.", "score": 1, "object": "",
                                                   "error_type": "image_recognition_error", "rewritten_content": "",
                                                   "reason": ""}]  # was the text "None"


def test_parse_report_refuses_unusable_answers():
    from training.dpo.opa.expert import parse_report

    row = {**_NULLS, "rewritten_content": "A red cross."}
    rep = parse_report("Here: " + json.dumps([row]) + " Note [1]: done.")  # prose with brackets after the list
    assert [(r["score"], r["rewritten_content"]) for r in rep] == [(1, "A red cross.")]
    assert parse_report(json.dumps([{**row, "score": "3"}]))[0]["score"] == 3
    for bad, why in [(json.dumps([{**row, "score": "N/A"}]), "sentence 0: score 'N/A'"),
                     (json.dumps(["A red star."]), "sentence 0 is a str"), (None, "has no text"),
                     ("I cannot review this.", "holds no JSON list")]:
        with pytest.raises(ValueError, match=why):
            parse_report(bad)


def _reply(h, score, declared_extra=0):
    _send(h, json.dumps([{"copied_content": "A red star.", "score": score, "error_type": "correct"}]), declared_extra)


def test_chat_expert_retries_a_reply_cut_short(tmp_path):
    """More bytes announced than sent: http.client.IncompleteRead in r.read(), which was not retried."""
    calls = []

    def answer(h):
        calls.append(h.path)
        _reply(h, 1, declared_extra=100 if len(calls) == 1 else 0)

    server = _serve(answer)
    try:
        e = ChatExpert(f"http://127.0.0.1:{server.server_port}/v1", "judge", "NO_SUCH_KEY", tmp_path, backoff=0.01)
        assert e.review("A red star.")[0]["score"] == 1 and len(calls) == 2
        assert not list(tmp_path.glob("*.tmp"))  # the cache entry written whole, through a temporary file
    finally:
        server.shutdown()


def test_chat_expert_asks_again_for_a_half_written_cache_entry(tmp_path):
    """Entries are written through a temporary file now; one cut short (killed mid-write by an older version)
    was a bare JSONDecodeError on every rerun."""
    calls = []
    server = _serve(lambda h: (calls.append(1), _reply(h, 1)))
    try:
        e = ChatExpert(f"http://127.0.0.1:{server.server_port}/v1", "judge", "NO_SUCH_KEY", tmp_path)
        e.review("A red star.")
        (entry,) = tmp_path.glob("*.json")
        entry.write_text(entry.read_text()[:10])
        assert e.review("A red star.")[0]["score"] == 1 and len(calls) == 2
        assert json.loads(entry.read_text())["content"]  # written whole again
    finally:
        server.shutdown()


def test_chat_expert_cache_is_per_endpoint(tmp_path):
    calls = []

    def answer(h):
        calls.append(h.path)
        _reply(h, 1 if h.path.startswith("/a") else 3)

    server = _serve(answer)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        a = ChatExpert(f"{base}/a", "judge", "NO_SUCH_KEY", tmp_path / "cache")
        assert a.review("A red star.")[0]["score"] == 1 and len(calls) == 1
        b = ChatExpert(f"{base}/b", "judge", "NO_SUCH_KEY", tmp_path / "cache")
        assert b.review("A red star.")[0]["score"] == 3 and len(calls) == 2  # was /a's cached answer
        assert a.review("A red star.")[0]["score"] == 1 and len(calls) == 2  # each endpoint's answer cached
    finally:
        server.shutdown()


def test_a_report_inside_a_json_object_reads_as_before():
    """The release's report object ("0", "1", ..., "Added") is read by its keys; any other object holding the list
    of sentences ({"sentences": [...]}) still reads by the list inside it (it was refused: "sentence 0 is a list")."""
    from training.dpo.opa.expert import parse_report
    for key in ("sentences", "report"):
        r = parse_report(json.dumps({key: [{"copied_content": "A red star.", "score": 3}]}))
        assert [(x["copied_content"], x["score"]) for x in r] == [("A red star.", 3)]


def test_stated_counts_split_words_as_the_scorer_does():
    """The reviser split at every non-letter: "two star-shaped crosses" stated two stars (a count error for a scene
    with no star), where the CHAIR scorer keeps "star-shaped" whole."""
    from training.dpo.opa.expert import _stated_counts
    assert _stated_counts("There are two star-shaped crosses.") == {"cross": 2}
    assert _stated_counts("The image shows two red circles and one blue star.") == {"circle": 2, "star": 1}


def test_sentences_keep_a_point_inside_a_sentence():
    """A point not followed by a space (a decimal) ends no sentence: splitting the rewrite "The sign reads 3.5 km."
    dropped "The sign reads 3" from the revised answer and its weights."""
    from training.dpo.opa.data import revised_with_weights
    from training.dpo.opa.expert import split_sentences
    text = "The sign reads 3.5 km. A cross.The star is red!  End"
    assert split_sentences(text) == ["The sign reads 3.5 km. ", "A cross.The star is red!  ", "End"]
    assert "".join(split_sentences(text)) == text
    report = [{"copied_content": "The sign reads 3 km.", "score": 2, "error_type": "image_recognition_error",
               "rewritten_content": "The sign reads 3.5 km. It is blue."}]
    revised, score_w, _ = revised_with_weights(report)
    assert revised == "The sign reads 3.5 km. It is blue."
    assert score_w == [["The sign reads 3.5 km.", 2.0], ["It is blue.", 2.0]]


def test_an_answer_reviewing_no_sentence_is_not_cached(tmp_path):
    """An answer of "[]" for a rollout with text was cached as a valid report: the correct step refused it as a bad
    rollout "asked again on the next run", but every rerun read the same empty report from the cache."""
    calls = []

    def answer(h):
        calls.append(1)
        _send(h, "[]" if len(calls) == 1 else json.dumps([{"copied_content": "A red star.", "score": 1}]))

    server = _serve(answer)
    try:
        e = ChatExpert(f"http://127.0.0.1:{server.server_port}/v1", "judge", "NO_SUCH_KEY", tmp_path)
        with pytest.raises(ValueError, match="reviews no sentence"):
            e.review("A red star.")
        assert e.review("A red star.")[0]["score"] == 1 and len(calls) == 2  # asked again, then cached
        assert e.review("A red star.")[0]["score"] == 1 and len(calls) == 2
    finally:
        server.shutdown()


def _correct_step(world, tmp_path, server, rollouts: list[str], gts: list[str] | None = None):
    """OPA-DPO's work folder under tmp_path/opa holding `rollouts` (keys p#0, p#1, ...; each ground truth "A red
    star." unless `gts` says) of the world's first image, and the arguments of its correct step against `server`'s
    chat endpoint -> (work folder, arguments)."""
    image = json.loads((world / "preference_train.json").read_text())[0]["image"]
    out = tmp_path / "opa"
    work = out / "work"
    work.mkdir(parents=True)
    gts = gts or ["A red star."] * len(rollouts)
    rows = [{"key": f"p#{i}", "id": "p", "image": image, "question": "Describe the image.", "gt": gt,
             "facts": [], "rollout": r} for i, (r, gt) in enumerate(zip(rollouts, gts))]
    (work / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work, ["--from_checkpoint", str(tmp_path), "--data_path", str(world / "preference_train.json"),
                  "--image_folder", str(world / "images"), "--output_dir", str(out), "--no-progress", "--step",
                  "correct", "--expert", "chat", "--expert_url", f"http://127.0.0.1:{server.server_port}/v1",
                  "--expert_api_key_env", "NO_SUCH_KEY"]


def test_a_rollout_the_endpoint_never_answers_is_a_bad_row_with_skip_bad_rows(world, tmp_path, monkeypatch):
    """A request that failed after its retries (here HTTP 500 for one rollout) stopped the correct step with a bare
    ChatAPIError, --skip_bad_rows or not. It is now that rollout's bad row: named without the option, skipped and
    counted with it, and asked again on the next run, which reuses the answers of the rollouts that succeeded."""
    import training.dpo.opa.main as opa
    monkeypatch.setattr("training.chat_api.time.sleep", lambda s: None)
    failing, asked = [True], []

    def answer(h):
        asked.append(h.body)
        if failing[0] and b"Broken rollout." in h.body:
            h.send_response(500)
            h.end_headers()
        else:  # the rollout's sentence, copied verbatim
            copied = "Broken rollout." if b"Broken rollout." in h.body else "A red star."
            _send(h, json.dumps([{"copied_content": copied, "score": 4, "error_type": "correct"}]))

    server = _serve(answer)
    work, args = _correct_step(world, tmp_path, server, ["A red star.", "Broken rollout."])
    try:
        with pytest.raises(ValueError, match=r"rollouts.jsonl: rollout p#1: expert .* no reply after 5 attempts "
                                             r"\(HTTP 500\) \(pass --skip_bad_rows"):
            opa.main(args)
        asked.clear()
        opa.main(args + ["--skip_bad_rows"])
        assert [p["key"] for p in json.loads((work / "opa_pairs.json").read_text())] == ["p#0"]
        assert len(asked) == 5  # the failing rollout's five attempts; the first's answer was cached
        failing[0] = False
        asked.clear()
        opa.main(args + ["--skip_bad_rows"])
        assert [p["key"] for p in json.loads((work / "opa_pairs.json").read_text())] == ["p#0", "p#1"]
        assert len(asked) == 1
        (work / "reports.jsonl").unlink()
        # an error of the endpoint itself (here its key) is no rollout's: it stops the step
        server.shutdown()
        server = _serve(lambda h: (h.send_response(401), h.end_headers()))
        args[args.index("--expert_url") + 1] = f"http://127.0.0.1:{server.server_port}/v1"
        with pytest.raises(ChatAPIError, match="HTTP 401"):
            opa.main(args + ["--skip_bad_rows"])
    finally:
        server.shutdown()


def test_a_report_whose_copied_content_is_not_in_the_rollout_is_a_bad_rollout(world, tmp_path, monkeypatch):
    """An expert that paraphrased a sentence instead of copying it gave a report whose rollout weight had no tokens
    to go to: the correct step stored it and wrote its pairs, and the DPO step (after the SFT step's minutes) refused
    the row. The correct step now names the rollout, or with --skip_bad_rows skips and counts it."""
    import training.dpo.opa.main as opa
    server = _serve(lambda h: _send(h, json.dumps([
        {"copied_content": "There is a red star." if b"A red star." in h.body else "A blue square.", "score": 4}])))
    # the third has no ground-truth answer: no pairs (printed alone, it was counted nowhere)
    work, args = _correct_step(world, tmp_path, server, ["A red star.", "A blue square.", "A blue square."],
                               gts=["A red star.", "A red star.", " "])
    try:
        with pytest.raises(ValueError, match=r"rollout p#0: expert answer: copied_content 'There is a red star.' is "
                                             r"not in the rollout .* \(pass --skip_bad_rows"):
            opa.main(args)
        opa.main(args + ["--skip_bad_rows"])
        assert [p["key"] for p in json.loads((work / "opa_pairs.json").read_text())] == ["p#1"]
        # counted where a bad row is (it was printed alone): the rollout by its key, and why
        bad = json.loads((work / "bad_rollouts.json").read_text())
        assert bad["n_skipped"] == 2 and [(r["file"], r["row"], r["field"]) for r in bad["rows"]] == [
            (str(work / "rollouts.jsonl"), "p#0", "rollout"), (str(work / "rollouts.jsonl"), "p#2", "gt")]
        assert "copied_content 'There is a red star.' is not in the rollout" in bad["rows"][0]["reason"]
    finally:
        server.shutdown()
