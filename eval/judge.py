"""An LLM judge: any OpenAI-compatible chat-completions endpoint, with a disk cache and retries.

    judge = Judge(JudgeConfig(url="http://127.0.0.1:8000/v1", model="gpt-4-0314"))
    reply = judge.chat([{"role": "user", "content": "..."}], temperature=0.0)

* The API key is read from the environment variable named by `api_key_env` when a request is
  sent; it is never written to a file, a log line or an error message. With the variable unset or
  empty, requests go without an Authorization header (local servers). A key is never sent over plain
  http to another machine (anyone on the way could read it): that needs an https URL. Redirects are not
  followed and plain http never goes through a proxy (training.chat_api, shared with the OPA expert).
* Every request and reply is cached on disk, keyed by a hash of (endpoint, model, messages, decoding
  settings), so re-scoring the same answers sends no request at all. Only successful replies are
  cached; a reply the caller cannot parse can be asked again with `attempt=1, 2, ...`.
* The model name of every reply is counted (`record()["reply_models"]`), with a warning when one is not
  the model asked for (nor a dated variant of its name).
* A failed request (network error, timeout, a reply cut short, HTTP 408/409/425/429/5xx, a reply
  body without a text choices[0].message.content)
  is retried with exponential backoff; other HTTP errors (400, 401, 403, 404) fail at once.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from training.chat_api import (ChatAPIError, chat_completions_url, check_key_env, endpoint_key, post_chat, public_url,
                               reply_text)
from training.files import write_text_atomic

JudgeError = ChatAPIError  # the judge endpoint could not give a reply


@dataclass
class JudgeConfig:
    url: str = "https://api.openai.com/v1"  # base URL (…/v1) or the full …/chat/completions URL
    model: str = "gpt-4-0314"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key, never the key
    cache_dir: str = "output/judge_cache"
    max_retries: int = 5
    backoff_s: float = 2.0  # sleep backoff_s * 2**k before retry k+1
    timeout_s: float = 120.0

    @property
    def endpoint(self) -> str:
        return chat_completions_url(self.url)


class Judge:
    def __init__(self, cfg: JudgeConfig, progress: bool = False):
        check_key_env(cfg.api_key_env, "--judge_api_key_env")
        self.cfg = cfg
        self.requests = 0  # HTTP requests sent (failed ones included)
        self.cache_hits = 0
        self.progress, self._bar = progress, None  # a running count of replies, sent vs cached
        self.decodings: list[dict] = []  # every distinct decoding setting used, for the results file
        self.reply_models: dict[str, int] = {}  # the model name each reply gave -> replies (cached ones too)

    def key(self, messages: list[dict], decoding: dict, attempt: int = 0) -> str:
        # the endpoint too: two servers answering to one model name (a local one and a hosted one) are two judges
        payload = {"endpoint": endpoint_key(self.cfg.endpoint), "model": self.cfg.model, "messages": messages,
                   "decoding": decoding}
        if attempt:
            payload["attempt"] = attempt
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int | None = None,
             attempt: int = 0) -> str:
        """The reply text to `messages`, from the cache when this exact request was made before."""
        decoding = {"temperature": temperature, "max_tokens": max_tokens}
        if decoding not in self.decodings:
            self.decodings.append(decoding)
        key = self.key(messages, decoding, attempt)
        path = Path(self.cfg.cache_dir) / key[:2] / f"{key}.json"
        if path.exists():
            self.cache_hits += 1
            self._tick()
            cached = json.loads(path.read_text(encoding="utf-8"))
            self._seen_model(cached.get("response_model"))
            return cached["reply"]
        body = {"model": self.cfg.model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        response = self._post(body)
        reply = reply_text(response)
        _write_atomic(path, {"request": {"model": self.cfg.model, "messages": messages, "decoding": decoding,
                                         "attempt": attempt},
                             "reply": reply, "response_model": response.get("model"),
                             "usage": response.get("usage")})
        self._seen_model(response.get("model"))
        self._tick()
        return reply

    def _seen_model(self, name) -> None:
        """Count the model that answered; warn once for a name that is not the one asked for (a proxy or server
        routing to another model would otherwise score under the asked-for name). A dated variant of the name
        ("gpt-4o" -> "gpt-4o-2024-08-06", "gpt-4" -> "gpt-4-0613") is the same model; "gpt-4o-mini" is not."""
        name = name if isinstance(name, str) else "(none given)"
        dated = re.fullmatch(re.escape(self.cfg.model) + r"(-\d{4}(-\d{2}-\d{2})?)?", name)
        if name not in self.reply_models and name != "(none given)" and not dated:
            print(f"judge {public_url(self.cfg.endpoint)}: asked for model {self.cfg.model!r}, the reply came from "
                  f"{name!r} (the results file lists every replying model under judge.reply_models)", file=sys.stderr)
        self.reply_models[name] = self.reply_models.get(name, 0) + 1

    def _tick(self) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(desc=f"judge {self.cfg.model}", unit="reply", dynamic_ncols=True)
        self._bar.update(1)
        self._bar.set_postfix(requests=self.requests, cached=self.cache_hits)

    def _post(self, body: dict) -> dict:
        def sent():
            self.requests += 1
        return post_chat(self.cfg.endpoint, body, self.cfg.api_key_env, retries=self.cfg.max_retries,
                         backoff_s=self.cfg.backoff_s, timeout_s=self.cfg.timeout_s, who="judge",
                         url_flag="--judge_url", on_request=sent)

    def record(self) -> dict:
        """What a results file records about the judge (never the key)."""
        return {"url": public_url(self.cfg.endpoint), "model": self.cfg.model, "api_key_env": self.cfg.api_key_env,
                "decoding": self.decodings, "reply_models": dict(sorted(self.reply_models.items())),
                "requests_sent": self.requests, "cache_hits": self.cache_hits,
                "cache_dir": str(self.cfg.cache_dir)}


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


def add_judge_args(p) -> None:
    """The judge's command-line options (shared by every judged benchmark)."""
    g = p.add_argument_group("judge (OpenAI-compatible chat completions)")
    g.add_argument("--judge_url", default=JudgeConfig.url, help="base URL (…/v1) or full chat-completions URL")
    g.add_argument("--judge_model", default=None, help="default: the benchmark's published judge model")
    g.add_argument("--judge_api_key_env", default=JudgeConfig.api_key_env,
                   help="name of the environment variable holding the API key")
    g.add_argument("--judge_temperature", type=float, default=None, help="default: the benchmark's setting")
    g.add_argument("--judge_max_tokens", type=int, default=None, help="default: the benchmark's setting")
    g.add_argument("--judge_cache_dir", default=JudgeConfig.cache_dir)
    g.add_argument("--judge_retries", type=int, default=JudgeConfig.max_retries)
    g.add_argument("--judge_backoff", type=float, default=JudgeConfig.backoff_s)
    g.add_argument("--judge_timeout", type=float, default=JudgeConfig.timeout_s)


def judge_from_args(args, default_model: str) -> Judge:
    return Judge(JudgeConfig(url=args.judge_url, model=args.judge_model or default_model,
                             api_key_env=args.judge_api_key_env, cache_dir=args.judge_cache_dir,
                             max_retries=args.judge_retries, backoff_s=args.judge_backoff,
                             timeout_s=args.judge_timeout), progress=getattr(args, "progress", False))


def judge_decoding(args, temperature: float, max_tokens: int | None) -> dict:
    """The benchmark's published judge decoding, unless overridden on the command line."""
    t = args.judge_temperature if getattr(args, "judge_temperature", None) is not None else temperature
    m = args.judge_max_tokens if getattr(args, "judge_max_tokens", None) is not None else max_tokens
    return {"temperature": t, "max_tokens": m}
