"""MMHal-Bench and LLaVA-Bench judges against a fake OpenAI-compatible server on 127.0.0.1.

The server answers from a script keyed by the question inside the prompt; it can fail the first N
requests (HTTP 500) and refuses to serve more than MAX_REQUESTS, so a runaway retry loop fails the
test instead of hanging it. Retried requests, cached re-runs and the API key's handling are checked.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eval.benchmark import main as bench_main
from eval.judge import Judge, JudgeConfig, JudgeError
from eval.llava_bench import parse_score
from eval.mmhal import parse_rating

MAX_REQUESTS = 40
KEY = "sk-test-0123456789-secret"


class FakeOpenAI:
    def __init__(self, reply_for, fail_first=0, status=500):
        self.reply_for, self.fail_first, self.status = reply_for, fail_first, status
        self.requests, self.auth = [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body})
                server.auth.append(self.headers.get("Authorization"))
                if len(server.requests) > MAX_REQUESTS:
                    return self._send(429, {"error": "too many requests in this test"})
                if server.fail_first > 0:
                    server.fail_first -= 1
                    return self._send(server.status, {"error": "scripted failure"})
                content = server.reply_for(body["messages"][-1]["content"])
                self._send(200, {"model": body["model"], "choices": [{"message": {"role": "assistant",
                                                                                    "content": content}}],
                                 "usage": {"total_tokens": 1}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(reply_for, **kw):
        servers.append(FakeOpenAI(reply_for, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def _judge_flags(server, tmp_path):
    return ["--judge_url", server.url, "--judge_api_key_env", "EVAL_TEST_JUDGE_KEY", "--judge_cache_dir",
            str(tmp_path / "cache"), "--judge_backoff", "0.01", "--judge_retries", "3", "--judge_timeout", "10"]


def test_rating_and_score_parsing():
    assert parse_rating("The answer is fine. Rating: 5, very informative") == 5
    assert parse_rating("RATING: 3") == 3                        # the reply is lowercased
    assert parse_rating("no rating given") == 0                   # zero ratings -> 0
    assert parse_rating("Rating: 4 ... on reflection Rating: 2") == 0  # two ratings -> 0
    assert parse_rating("Rating: 4, and again rating: 4") == 4   # one distinct rating
    assert parse_score("8 9\nwhy") == [8.0, 9.0] and parse_score("7,7") == [7.0, 7.0]
    assert parse_score("Score: 8 6") == [-1.0, -1.0] and parse_score("8  9") == [-1.0, -1.0]
    assert parse_score("eight 9") == [-1.0, -1.0]


MMHAL_REPLIES = ["Good. Rating: 6, very informative with good analysis", "rating: 2", "No rating here.",
                 "Rating: 4 ... or rather Rating: 5", "RATING: 3", "Rating: 5", "Rating: 1", "Rating: 4", "Rating: 6"]


def _mmhal(tmp_path):
    records = [{"question_type": "x", "question_topic": "t", "image_id": f"img{i}",
                "image_src": f"https://example.org/images/heldout0000{i % 4}.png",  # read from --image_folder
                "image_content": ["Shape", "Circle"], "question": f"question {i}?", "gt_answer": f"answer {i}",
                "model_answer": ""} for i in range(9)]
    path = tmp_path / "response_template.json"
    path.write_text(json.dumps(records))
    return path


def _mmhal_reply(prompt):
    i = int(prompt.split("### Question\nquestion ")[1].split("?")[0])
    return MMHAL_REPLIES[i]


def test_mmhal_judge_retry_cache_and_key(tmp_path, fake_server, monkeypatch, world, tiny):
    """Generates with the tiny model, then judges: 9 questions + 1 retried failure = 10 requests;
    the re-run makes none. Ratings 6 2 0 0 3 5 1 4 6 (zero and two ratings give 0)."""
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", KEY)
    server = fake_server(_mmhal_reply, fail_first=1)
    data = _mmhal(tmp_path)
    argv = ["--benchmark", "mmhal", "--model_path", str(tiny), "--data", str(data), "--image_folder",
            str(world / "images"), "--output_dir", str(tmp_path / "run"), "--max_new_tokens", "4", "--no-progress",
            "--model_name", "tiny", *_judge_flags(server, tmp_path)]
    rec = bench_main(argv)
    assert len(server.requests) == 10  # one 500, retried, then 9 replies
    m = rec["metrics"]
    assert m["score"] == pytest.approx(27 / 9) and m["hallucination_rate"] == pytest.approx(4 / 9)
    assert m["score_attribute"] == 6 and m["score_adversarial"] == 2 and m["score_comparison"] == 0
    assert m["score_counting"] == 0 and m["score_relation"] == 3 and m["score_other"] == 4
    assert "9 records" in rec["details"]["warnings"][0]  # per-type scores by index need MMHal's 96 in order
    body = server.requests[-1]["body"]
    assert body["model"] == "gpt-4-0314" and body["temperature"] == 0.0 and "max_tokens" not in body
    assert body["messages"][0]["role"] == "user"
    assert "### Image Contents\nShape, Circle\n" in body["messages"][0]["content"]
    assert set(server.auth) == {f"Bearer {KEY}"}
    assert rec["judge"]["model"] == "gpt-4-0314" and rec["judge"]["requests_sent"] == 10
    assert rec["judge"]["decoding"] == [{"temperature": 0.0, "max_tokens": None}]

    rerun = bench_main(argv)  # answers resume (all present) and every judgement comes from the cache
    assert len(server.requests) == 10
    assert rerun["metrics"] == m and rerun["judge"]["requests_sent"] == 0 and rerun["judge"]["cache_hits"] == 9
    stored = [p.read_text() for p in (tmp_path / "cache").rglob("*.json")] + \
        [p.read_text() for p in (tmp_path / "run").rglob("*.json*")]
    assert len(stored) > 9 and not any(KEY in s for s in stored)  # the key is never written down
    response = json.loads((tmp_path / "run" / "predictions" / "mmhal_response.json").read_text())
    assert len(response) == 9 and all(isinstance(r["model_answer"], str) for r in response)


LLAVA_REPLIES = {"q1": "8 9\nAssistant 2 is more detailed.", "q2": "7,7\nequal", "q3": "Score: 8 6\nbad format",
                 "q4": "10 5\n..."}


def _llava(tmp_path):
    d = tmp_path / "llava-bench-in-the-wild"
    d.mkdir()
    qs = [("q1", "conv"), ("q2", "detail"), ("q3", "complex"), ("q4", "conv")]
    (d / "questions.jsonl").write_text("".join(json.dumps({"question_id": i, "image": f"{i % 2}.jpg", "text": q,
                                                           "category": c}) + "\n" for i, (q, c) in enumerate(qs)))
    (d / "answers_gpt4.jsonl").write_text("".join(json.dumps({"question_id": i, "text": f"reference {i}",
                                                              "answer_id": f"r{i}"}) + "\n" for i in range(4)))
    (d / "context.jsonl").write_text(json.dumps({"id": "0", "image": "0.jpg", "caption": "A cat on a mat."}) + "\n" +
                                     json.dumps({"id": "1", "image": "1.jpg", "caption": ["A dog.", "Grass."]}) + "\n")
    ans = tmp_path / "llava_answers.jsonl"
    ans.write_text("".join(json.dumps({"question_id": str(i), "text": f"model {i}"}) + "\n" for i in range(4)))
    return d, ans


def _llava_reply(content):
    return LLAVA_REPLIES[content.split("[Question]\n")[1].split("\n")[0]]


def test_llava_bench_relative_score_retry_and_cache(tmp_path, fake_server, monkeypatch, capsys):
    """Pairs (ref, model): (8,9) (7,7) (-1,-1) (10,5): means 24/4 and 20/4 -> 5/6 * 100."""
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", KEY)
    server = fake_server(_llava_reply, fail_first=2, status=503)
    d, ans = _llava(tmp_path)
    argv = ["--benchmark", "llava_bench", "--data", str(d), "--answers", str(ans), "--output_dir",
            str(tmp_path / "run"), *_judge_flags(server, tmp_path)]
    rec = bench_main(argv)
    assert len(server.requests) == 6  # two 503s retried, then 4 replies
    m = rec["metrics"]
    assert m["relative_score"] == pytest.approx(5 / 6 * 100)
    assert m["relative_conv"] == pytest.approx(7 / 9 * 100) and m["relative_detail"] == pytest.approx(100)
    assert m["parse_failures"] == 1 and m["reference_mean"] == pytest.approx(6.0)
    first = server.requests[-4]["body"]
    assert first["temperature"] == 0.2 and first["max_tokens"] == 1024
    assert first["messages"][0] == {"role": "system", "content":
                                    "You are a helpful and precise assistant for checking the quality of the answer."}
    content = first["messages"][1]["content"]
    assert content.startswith("[Context]\nA cat on a mat.\n\n[Question]\nq1\n\n[Assistant 1]\nreference 0\n\n"
                              "[End of Assistant 1]\n\n[Assistant 2]\nmodel 0\n\n[End of Assistant 2]\n\n[System]\n"
                              "We would like to request your feedback")
    assert content.endswith("does not affect your judgment.\n\n")
    assert "[Context]\nA dog.\nGrass.\n\n" in server.requests[-3]["body"]["messages"][1]["content"]

    # the judge's progress bar: replies, sent vs cached
    assert "4reply" in (err := capsys.readouterr().err) and "cached=0, requests=6" in err

    rerun = bench_main(argv)
    assert len(server.requests) == 6 and rerun["metrics"] == m and rerun["judge"]["cache_hits"] == 4
    assert "cached=4, requests=0" in capsys.readouterr().err


def test_judge_fails_fast_on_auth_error_and_gives_up_after_retries(tmp_path, fake_server):
    bad = fake_server(lambda c: "x", fail_first=100, status=401)
    judge = Judge(JudgeConfig(url=bad.url + "/chat/completions", cache_dir=str(tmp_path / "c"), backoff_s=0.01,
                              max_retries=2, api_key_env="EVAL_TEST_UNSET_VARIABLE"))
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.chat([{"role": "user", "content": "hi"}])
    assert len(bad.requests) == 1 and bad.auth == [None]  # not retried; no key set: no header
    down = fake_server(lambda c: "x", fail_first=100, status=500)
    judge = Judge(JudgeConfig(url=down.url, cache_dir=str(tmp_path / "c"), backoff_s=0.01, max_retries=2,
                              api_key_env="EVAL_TEST_UNSET_VARIABLE"))
    with pytest.raises(JudgeError, match="after 3 attempts"):
        judge.chat([{"role": "user", "content": "hi"}])
    assert len(down.requests) == 3 and not list(Path(tmp_path / "c").rglob("*.json"))  # failures not cached


def test_objhal_llm_extractor_through_judge(tmp_path, fake_server):
    """RLAIF-V's --use_gpt path: the judge lists objects; answers of <= 3 words ask nothing."""
    from test_eval_chair import _coco_files
    d = _coco_files(tmp_path)
    server = fake_server(lambda c: '```json\n["man", "black dog", "park bench"]\n```')
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": "x.jpg", "question": "Describe.", "image_id": i})
                         + "\n" for i in (1, 2)))
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"question_id": "1", "text": "A man walks a black dog past a bench."}) + "\n" +
                 json.dumps({"question_id": "2", "text": "A toilet."}) + "\n")
    rec = bench_main(["--benchmark", "objhal", "--data", str(q), "--coco_annotations", str(d), "--answers", str(a),
                      "--objhal_extractor", "llm", "--output_dir", str(tmp_path / "run"),
                      *_judge_flags(server, tmp_path)])
    assert len(server.requests) == 1 and server.requests[0]["body"]["model"] == "gpt-3.5-turbo-0613"
    assert server.requests[0]["body"]["messages"][0]["role"] == "system"
    assert server.requests[0]["body"]["temperature"] == 0.2 and server.requests[0]["body"]["max_tokens"] == 512
    # man -> person, "black dog" -> dog, "park bench" -> bench (hallucinated); answer 2 has no objects
    m = rec["metrics"]
    assert m["CHAIRi"] == pytest.approx(1 / 3) and m["CHAIRs"] == pytest.approx(1 / 2)
    assert m["CHAIRs_refine"] == pytest.approx(1.0)


def test_a_redirect_is_not_followed_so_the_key_goes_nowhere_else(fake_server, monkeypatch, tmp_path):
    """urllib follows a 30x and copies the Authorization header to the new address (another host
    included): the judge stops on a redirect instead, and the target never sees the key."""
    target = fake_server(lambda prompt: "Rating: 5")

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target.url.replace("127.0.0.1", "localhost") + "/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", KEY)
    try:
        judge = Judge(JudgeConfig(url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m",
                                  api_key_env="EVAL_TEST_JUDGE_KEY", cache_dir=str(tmp_path / "cache"),
                                  max_retries=1, backoff_s=0.01, timeout_s=10))
        with pytest.raises(JudgeError, match="redirect, not followed"):
            judge.chat([{"role": "user", "content": "q"}])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert target.requests == [] and target.auth == []


def _raw_server(replies):
    """A server that answers each POST with the next (body bytes, Content-Length) of `replies`, then closes."""
    class Raw(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body, length = replies.pop(0) if replies else (b"{}", 2)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Raw)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


def _ok(text):
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    return body, len(body)


def _judge_on(httpd, tmp_path):
    """A judge of the local raw server, no key, two tries with a short backoff."""
    return Judge(JudgeConfig(url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m",
                             api_key_env="EVAL_TEST_UNSET_VARIABLE", cache_dir=str(tmp_path / "c"), max_retries=2,
                             backoff_s=0.01, timeout_s=10))


@pytest.mark.parametrize("bad", [b"[]", b'{"choices": [{"message": null}]}', b'{"choices": ["x"]}',
                                 b'{"choices": [{"message": {"content": 3}}]}', b'"text"'])
def test_a_reply_body_of_another_shape_is_retried(bad, tmp_path):
    """A body that is not {"choices": [{"message": {"content": text}}]} (a list, a null message, ...) is a
    failed request, retried as any other: not an AttributeError or TypeError out of the judge."""
    httpd = _raw_server([(bad, len(bad)), _ok("Rating: 4")])
    try:
        judge = _judge_on(httpd, tmp_path)
        assert judge.chat([{"role": "user", "content": "q"}]) == "Rating: 4" and judge.requests == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_reply_cut_short_is_retried(tmp_path, capsys):
    """The connection closes before Content-Length bytes came: http.client.IncompleteRead (an HTTPException,
    not an OSError) is retried like a network error."""
    body = _ok("Rating: 5")[0]
    httpd = _raw_server([(body[:10], len(body)), _ok("Rating: 5")])
    try:
        judge = _judge_on(httpd, tmp_path)
        assert judge.chat([{"role": "user", "content": "q"}]) == "Rating: 5" and judge.requests == 2
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "IncompleteRead" in capsys.readouterr().err


def test_the_key_never_goes_over_plain_http_to_another_machine(monkeypatch, tmp_path, capsys):
    """With a key set, a plain http:// URL of another host is refused before anything is sent (anyone on the
    way could read the Bearer header); https, loopback addresses and an empty key variable are sent."""
    import urllib.error

    from training import chat_api

    sent = []

    def send(req, timeout):  # stands in for the network: records the Authorization header of each request
        sent.append((req.full_url, req.get_header("Authorization")))
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(chat_api, "send", send)
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", KEY)

    def ask(url):
        judge = Judge(JudgeConfig(url=url, model="m", api_key_env="EVAL_TEST_JUDGE_KEY", max_retries=0,
                                  cache_dir=str(tmp_path / "c"), backoff_s=0.01))
        with pytest.raises(JudgeError) as info:
            judge.chat([{"role": "user", "content": "q"}])
        return str(info.value)

    err = ask("http://judge.example.com:8000/v1")
    assert "https://" in err and "EVAL_TEST_JUDGE_KEY empty" in err and KEY not in err and sent == []
    for url in ("https://judge.example.com/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1",
                "http://127.0.0.2/v1"):
        assert "after 1 attempts" in ask(url)
    assert [auth for _, auth in sent] == [f"Bearer {KEY}"] * 4
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", "")
    assert "after 1 attempts" in ask("http://judge.example.com:8000/v1")
    assert sent[-1] == ("http://judge.example.com:8000/v1/chat/completions", None)
    assert KEY not in capsys.readouterr().err


def test_judge_cache_is_kept_apart_per_endpoint(tmp_path):
    """Two endpoints answering to one model name (a local server and a hosted one) are two judges: a reply cached
    from one is not the other's (the key held the model name, messages and decoding only)."""
    from eval.judge import Judge, JudgeConfig
    msgs, dec = [{"role": "user", "content": "rate it"}], {"temperature": 0.0}
    a = Judge(JudgeConfig(url="http://127.0.0.1:8000/v1", model="gpt-4", cache_dir=str(tmp_path)))
    b = Judge(JudgeConfig(url="https://api.example.com/v1", model="gpt-4", cache_dir=str(tmp_path)))
    again = Judge(JudgeConfig(url="http://127.0.0.1:8000/v1", model="gpt-4", cache_dir=str(tmp_path)))
    assert a.key(msgs, dec) != b.key(msgs, dec) and a.key(msgs, dec) == again.key(msgs, dec)


def test_replies_from_another_model_are_counted_and_warned_about(tmp_path, capsys):
    """The reply's model name was stored in the cache but never looked at: a server routing the asked-for judge to
    another model scored under the asked-for name. Every replying model is counted (cached replies too) and one
    that is not the asked-for model (nor a dated variant of its name) is warned about."""
    def reply(text, model):
        body = json.dumps({"model": model, "choices": [{"message": {"content": text}}]}).encode()
        return body, len(body)

    httpd = _raw_server([reply("Rating: 4", "m-2024-05-13"), reply("Rating: 2", "m-mini-2024-07-18")])
    try:
        judge = _judge_on(httpd, tmp_path)
        judge.chat([{"role": "user", "content": "q1"}])
        assert "reply came from" not in capsys.readouterr().err  # a dated variant of "m"
        judge.chat([{"role": "user", "content": "q2"}])
        assert "asked for model 'm', the reply came from 'm-mini-2024-07-18'" in capsys.readouterr().err
        again = _judge_on(httpd, tmp_path)
        again.chat([{"role": "user", "content": "q2"}])  # from the cache: no request, the same model counted
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert judge.record()["reply_models"] == {"m-2024-05-13": 1, "m-mini-2024-07-18": 1}
    assert again.requests == 0 and again.record()["reply_models"] == {"m-mini-2024-07-18": 1}
