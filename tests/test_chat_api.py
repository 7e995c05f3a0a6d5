"""Where the API key may go (training.chat_api, used by the judge and the OPA expert): never through an
environment proxy over plain http, never along a redirect, never over plain http to another machine, never
in a message."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from training.dpo.opa.expert import ChatExpert

KEY = "sk-test-0123456789"


def _serve(on_request):
    """A local HTTP server calling on_request(handler) for every request (GET, POST, or a proxied request)."""
    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            n = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(n) if n else b""
            on_request(self)

        do_GET = do_POST = _any  # noqa: N815

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _send(h, content: str, declared_extra: int = 0):
    """A chat-completions reply of `content` (declared_extra: bytes announced beyond those sent)."""
    out = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
    h.send_response(200)
    h.send_header("Content-Length", str(len(out) + declared_extra))
    h.end_headers()
    h.wfile.write(out)


def _answer(h):
    _send(h, json.dumps([{"copied_content": "A red star.", "score": 4, "error_type": "correct"}]))


def _expert(url, tmp_path, env="OPA_TEST_KEY"):
    return ChatExpert(url, "judge", env, tmp_path / "cache", retries=0, backoff=0.01)


def test_plain_http_to_this_machine_goes_around_an_environment_proxy(tmp_path, monkeypatch):
    """With http_proxy set, urllib sent the loopback request, Authorization header included, to the proxy."""
    seen_by_proxy, seen_by_server = [], []
    proxy = _serve(lambda h: (seen_by_proxy.append(h.headers.get("Authorization")), _answer(h)))
    server = _serve(lambda h: (seen_by_server.append(h.headers.get("Authorization")), _answer(h)))
    try:
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_port}")
        monkeypatch.setenv("OPA_TEST_KEY", KEY)
        report = _expert(f"http://127.0.0.1:{server.server_port}/v1", tmp_path).review("A red star.")
    finally:
        proxy.shutdown()
        server.shutdown()
    assert report[0]["score"] == 4
    assert seen_by_proxy == [] and seen_by_server == [f"Bearer {KEY}"]


def test_a_redirect_is_not_followed_with_the_key(tmp_path, monkeypatch):
    """urlopen followed a 302 to another address with the Authorization header."""
    other_saw = []
    other = _serve(lambda h: (other_saw.append(h.headers.get("Authorization")), _answer(h)))

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", f"http://127.0.0.1:{other.server_port}/v1/chat/completions")
        h.send_header("Content-Length", "0")
        h.end_headers()
    first = _serve(redirect)
    try:
        monkeypatch.setenv("OPA_TEST_KEY", KEY)
        with pytest.raises(RuntimeError, match="redirect, not followed") as info:
            _expert(f"http://127.0.0.1:{first.server_port}/v1", tmp_path).review("A red star.")
    finally:
        first.shutdown()
        other.shutdown()
    assert other_saw == [] and KEY not in str(info.value)


def test_the_key_goes_over_https_or_to_this_machine_only_and_is_never_quoted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPA_TEST_KEY", KEY)
    with pytest.raises(RuntimeError, match="over plain http to another machine") as info:
        _expert("http://192.0.2.1:8000/v1", tmp_path).review("A red star.")  # refused before any connection
    assert KEY not in str(info.value)
    monkeypatch.setenv("OPA_TEST_KEY", KEY[:6] + "\n" + KEY[6:])  # a key with a line break inside
    with pytest.raises(RuntimeError, match=r"\$OPA_TEST_KEY holds whitespace") as info:
        _expert("http://127.0.0.1:9/v1", tmp_path).review("A red star.")
    assert KEY[6:] not in str(info.value)


def test_a_key_read_from_a_crlf_file_is_sent_without_the_carriage_return(tmp_path, monkeypatch):
    """`$(cat key.txt)` of a CRLF file leaves "\\r": Python's HTTP client then raised an error quoting the whole
    header, key included, which the judge printed on every retry."""
    from eval.judge import Judge, JudgeConfig

    seen = []
    server = _serve(lambda h: (seen.append(h.headers.get("Authorization")), _answer(h)))
    try:
        monkeypatch.setenv("OPA_TEST_KEY", KEY + "\r")
        judge = Judge(JudgeConfig(url=f"http://127.0.0.1:{server.server_port}/v1", model="m", max_retries=0,
                                  api_key_env="OPA_TEST_KEY", cache_dir=str(tmp_path / "c")))
        judge.chat([{"role": "user", "content": "q"}])
    finally:
        server.shutdown()
    assert seen == [f"Bearer {KEY}"]


def test_judge_and_expert_retry_alike_and_show_a_refusal_without_the_key(tmp_path, monkeypatch, capsys):
    """One retry loop for both (training.chat_api.post_chat): a reply without text is asked again and each failure
    is printed; a refused request (HTTP 400) fails at once showing the server's reason, the key replaced should the
    server echo it. The judge showed no reason; the expert showed the body with the key in it."""
    from eval.judge import Judge, JudgeConfig

    def empty_then_answer(h):
        seen.append(h.headers.get("Authorization"))
        if len(seen) == 1:
            out = b'{"choices": []}'
            h.send_response(200)
            h.send_header("Content-Length", str(len(out)))
            h.end_headers()
            h.wfile.write(out)
        else:
            _answer(h)

    def refuse(h):
        out = json.dumps({"error": f"model not found; header was {h.headers.get('Authorization')}"}).encode()
        h.send_response(400)
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def ask(client):
        if isinstance(client, ChatExpert):
            return client.review("A red star.")[0]["score"]
        return json.loads(client.chat([{"role": "user", "content": "q"}]))[0]["score"]

    clients = {"expert": lambda url, d: ChatExpert(url, "m", "OPA_TEST_KEY", d, retries=1, backoff=0.01),
               "judge": lambda url, d: Judge(JudgeConfig(url=url, model="m", api_key_env="OPA_TEST_KEY",
                                                         cache_dir=str(d), max_retries=1, backoff_s=0.01))}
    monkeypatch.setenv("OPA_TEST_KEY", KEY)
    ok, bad = _serve(empty_then_answer), _serve(refuse)
    try:
        for name, make in clients.items():
            seen = []
            assert ask(make(f"http://127.0.0.1:{ok.server_port}/v1", tmp_path / name)) == 4 and len(seen) == 2
            assert "no text choices[0].message.content); attempt 1 of 2" in capsys.readouterr().err
            with pytest.raises(RuntimeError, match=r"HTTP 400 \(not retried\).*model not found; header was "
                                                   r"Bearer \*\*\*") as info:
                ask(make(f"http://127.0.0.1:{bad.server_port}/v1", tmp_path / f"{name}_refused"))
            assert KEY not in str(info.value) and KEY not in capsys.readouterr().err
    finally:
        ok.shutdown()
        bad.shutdown()


def test_a_refusal_is_the_experts_bad_row_and_a_long_echo_loses_all_of_the_key(tmp_path, monkeypatch):
    """A reply whose message has no text (a refusal) is not asked again: the expert's parse makes it the rollout's
    bad row (a ValueError the correct step skips with --skip_bad_rows), as before the shared loop. An error body
    echoing the key across the 300 characters shown kept the key's first characters."""
    from training.chat_api import ChatAPIError
    sent = []

    def refusal(h):
        sent.append(1)
        out = json.dumps({"choices": [{"message": {"content": None, "refusal": "I can't."}}]}).encode()
        h.send_response(200)
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    def long_echo(h):
        out = ("x" * 262 + f" header was {h.headers.get('Authorization')}").encode()
        h.send_response(403)
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        h.wfile.write(out)

    monkeypatch.setenv("OPA_TEST_KEY", KEY)
    first, second = _serve(refusal), _serve(long_echo)
    try:
        with pytest.raises(ValueError, match="no text"):
            ChatExpert(f"http://127.0.0.1:{first.server_port}/v1", "m", "OPA_TEST_KEY", tmp_path / "a", retries=3,
                       backoff=0.01).review("A red star.")
        assert len(sent) == 1
        with pytest.raises(ChatAPIError, match="HTTP 403") as info:
            _expert(f"http://127.0.0.1:{second.server_port}/v1", tmp_path / "b").review("A red star.")
    finally:
        first.shutdown()
        second.shutdown()
    assert KEY[:8] not in str(info.value) and "x" * 200 in str(info.value)


def test_endpoints_are_shown_without_secrets_and_keyed_alike_by_judge_and_expert(tmp_path):
    """The OPA expert stripped credentials from its cache key its own way and the judge another (query dropped, host
    lowercased); one key now. public_url lost an IPv6 host's brackets ("http://::1:8000/v1")."""
    from eval.judge import Judge, JudgeConfig
    from training.chat_api import endpoint_key, public_url
    from training.dpo.opa.expert import ChatExpert
    assert public_url("http://[::1]:8000/v1/chat?code=SECRET") == "http://[::1]:8000/v1/chat"
    assert public_url("https://user:pw@Host.example:8443/v1?k=SECRET#x") == "https://Host.example:8443/v1"
    assert endpoint_key("https://user:pw@h.example/v1?api-version=2") == "https://h.example/v1?api-version=2"
    for malformed in ("https://bob:s3cr?et@api.example.com/v1", "https://bob:1234/et@api.example.com/v1"):
        assert "s3cr" not in public_url(malformed) and "1234" not in public_url(malformed)  # a password unencoded

    def judge_key(url):
        return Judge(JudgeConfig(url=url, model="m", cache_dir=str(tmp_path))).key([{"role": "user", "content": "x"}],
                                                                                 {"temperature": 0.0})
    assert judge_key("https://u:p@h.example/v1?api-version=1") == judge_key("https://h.example/v1?api-version=1")
    assert judge_key("https://h.example/v1?api-version=1") != judge_key("https://h.example/v1?api-version=2")
    seen = []
    for url in ("https://u:p@h.example/v1?api-version=1", "https://h.example/v1?api-version=1",
                "https://h.example/v1?api-version=2"):
        expert = ChatExpert(url, "m", "NO_SUCH_KEY", tmp_path / "expert")
        expert._post = lambda body, url=url: seen.append(url) or '[{"copied_content": "A red star.", "score": 4}]'
        expert.review("A red star.")
    assert seen == ["https://u:p@h.example/v1?api-version=1", "https://h.example/v1?api-version=2"]  # 2nd: cached


@pytest.mark.parametrize("url", ["https://bob:s3cret@api.example.com/v1", "https://bob:s3cr/et@api.example.com/v1"])
def test_credentials_in_the_url_are_refused_before_any_request_and_never_shown(tmp_path, url, capsys):
    """urllib took "bob:s3cret@api.example.com" for a host and port: every request failed, and its error
    (InvalidURL: nonnumeric port: 's3cret@api.example.com') was printed on each retry and kept in the message."""
    from training.chat_api import ChatAPIError, post_chat
    sent = []
    with pytest.raises(ChatAPIError, match="credentials are never sent in the URL") as err:
        post_chat(url, {"x": 1}, "", retries=2, backoff_s=0.0, timeout_s=1.0, who="judge", url_flag="--judge_url",
                  on_request=lambda: sent.append(1))
    assert not sent and "s3cr" not in str(err.value) and "s3cr" not in capsys.readouterr().err


def test_an_endpoint_with_a_query_gets_the_path_before_its_query(tmp_path):
    """A URL with a query (an API version: "…/v1?api-version=1", or Azure's full "…/chat/completions?api-version=…")
    had "/chat/completions" appended after the query: the request went to "…/v1" with api-version "1/chat/completions"
    (or to "…/chat/completions" with a mangled version), while messages showed the right-looking path."""
    from eval.judge import Judge, JudgeConfig
    from training.chat_api import chat_completions_url
    full = "https://r.example/openai/deployments/d/chat/completions?api-version=2024-02-01"
    assert chat_completions_url(full) == full
    assert chat_completions_url("https://h.example/v1/?api-version=1") == \
        "https://h.example/v1/chat/completions?api-version=1"
    seen = []

    def record(h):
        seen.append(h.path)
        _send(h, "yes")
    server = _serve(record)
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1?api-version=7"
        judge = Judge(JudgeConfig(url=url, model="m", api_key_env="", cache_dir=str(tmp_path), max_retries=0))
        assert judge.chat([{"role": "user", "content": "x"}]) == "yes"
    finally:
        server.shutdown()
    assert seen == ["/v1/chat/completions?api-version=7"]


def test_a_key_with_a_character_outside_ascii_is_refused_by_name_before_any_request(monkeypatch, capsys):
    """A key pasted with a typographic dash ("sk-abc—def") passed the check, then every attempt failed inside the HTTP
    client with "UnicodeEncodeError: ordinal not in range(256)", retried with backoff, never naming the variable."""
    from training.chat_api import ChatAPIError, post_chat
    sent = []
    monkeypatch.setenv("OPA_TEST_KEY", "sk-abc\u2014def0123")
    with pytest.raises(ChatAPIError, match=r"\$OPA_TEST_KEY") as err:
        post_chat("http://127.0.0.1:9/v1/chat/completions", {"x": 1}, "OPA_TEST_KEY", retries=2, backoff_s=0.0,
                  timeout_s=1.0, who="judge", url_flag="--judge_url", on_request=lambda: sent.append(1))
    assert not sent and "abc" not in str(err.value) and "abc" not in capsys.readouterr().err


@pytest.mark.parametrize("make", ["judge", "expert"])
def test_a_key_given_where_the_variables_name_goes_is_refused_and_never_written(tmp_path, make, capsys):
    """--judge_api_key_env sk-... (the key, not its variable's name) sent no key, and the results file recorded
    judge.api_key_env: the key itself, in a file meant to be shared."""
    from eval.judge import Judge, JudgeConfig
    with pytest.raises(SystemExit, match="NAME of the environment variable") as err:
        if make == "judge":
            Judge(JudgeConfig(api_key_env="sk-proj-Abc123", cache_dir=str(tmp_path))).record()
        else:
            ChatExpert("https://h.example/v1", "m", "sk-proj-Abc123", tmp_path)
    assert "Abc123" not in str(err.value) and "Abc123" not in capsys.readouterr().err
