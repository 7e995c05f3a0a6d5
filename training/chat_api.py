"""Where an OpenAI-compatible request may go with the API key, and how it is sent: the one place for the judge
(eval.judge) and the OPA expert (training.dpo.opa.expert), and how a request is retried (`post_chat`).

* The key comes from an environment variable, read when a request is sent; it is never written to a file, a
  log line or an error message. A key holding whitespace or control characters inside (a CRLF file read with
  `$(cat key.txt)` leaves a "\\r") or characters outside ASCII is refused naming the variable: sent, Python's HTTP
  client raises an error that quotes the whole header, key included, or fails at every attempt.
* A key is never sent over plain http to another machine (anyone on the way could read it): that needs https.
* A redirect is an error, not followed (urllib would send the Authorization header wherever it points).
* A plain-http (so loopback) request goes direct, never through a proxy from the environment (http_proxy),
  which would see the key; https goes through such a proxy as a tunnel, the key encrypted.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

RETRY_STATUS = frozenset({408, 409, 425, 429})  # and every 5xx: the server may answer the same request later
ENDPOINT_STATUS = frozenset({401, 403, 404, 405, 407})  # no request to this URL with this key is answered


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
_OPENER = urllib.request.build_opener(_NoRedirect)  # https: the environment's proxy, if any, as a tunnel


class KeyRefused(ValueError):
    """The API key cannot be sent to this URL, or is not a usable header value; the message never holds it."""


class ChatAPIError(RuntimeError):
    """The endpoint gave no usable reply (or the key cannot go to it); the message never holds the key.
    row: whether another request may still be answered (no reply after the retries, an HTTP 4xx refusing this
    request: a bad row of the caller's), or none can (the URL, the key, a redirect, HTTP 401, 403, 404, 405 or 407,
    no server listening)."""

    def __init__(self, message: str, row: bool = False):
        super().__init__(message)
        self.row = row


def chat_completions_url(url: str) -> str:
    """A base URL (…/v1) or the full …/chat/completions URL -> the chat-completions endpoint. The path is completed,
    a query (an API version: "…/v1?api-version=…") kept after it."""
    p = urllib.parse.urlsplit(url)
    path = p.path.rstrip("/")
    return p._replace(path=path if path.endswith("/chat/completions") else path + "/chat/completions").geturl()


def _message(out) -> dict | None:
    """choices[0].message of a reply body, or None when the body (of any JSON type) lacks it."""
    choices = out.get("choices") if isinstance(out, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    return message if isinstance(message, dict) else None


def reply_text(out) -> str | None:
    """choices[0].message.content of a reply body, or None when the body (of any JSON type) lacks it."""
    content = (_message(out) or {}).get("content")
    return content if isinstance(content, str) else None


def _without_credentials(p: urllib.parse.SplitResult) -> urllib.parse.SplitResult:
    return p._replace(netloc=p.netloc.rpartition("@")[2])  # user:password@ dropped; port, IPv6 brackets kept


def public_url(url: str) -> str:
    """The URL without credentials or query string (what results files and messages show). A URL with an '@' that
    does not end its host part (a password holding an unencoded '/', '?' or '#') is not shown at all: where the
    credentials end cannot be told."""
    p = urllib.parse.urlsplit(url)
    if "@" in url and "@" not in p.netloc:
        return f"{p.scheme}://<URL not shown: an '@' outside its host part (encode the password's special characters)>"
    return _without_credentials(p)._replace(query="", fragment="").geturl()


def endpoint_key(url: str) -> str:
    """The endpoint as a cache of its replies (the judge's, the OPA expert's) knows it: the URL less any credentials
    written in it, its query kept (it can choose a deployment or an API version); hashed into keys, never shown."""
    return _without_credentials(urllib.parse.urlsplit(url)).geturl()


def loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def check_key_env(api_key_env: str, flag: str) -> None:
    """The API-key option names a variable: what is not a variable's name (an "sk-..." key given in its place) is
    refused, never quoted; results files record the name."""
    if api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
        raise SystemExit(f"{flag} takes the NAME of the environment variable that holds the API key (letters, digits "
                         "and _), not the key itself: export the key in a variable and give its name")


def auth_headers(url: str, api_key_env: str) -> dict[str, str]:
    """JSON request headers for `url`, with `Authorization: Bearer <key>` when the variable `api_key_env` holds a
    key (surrounding whitespace dropped); raises KeyRefused for plain http to another machine or a bad key."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env, "").strip() if api_key_env else ""
    if not key:
        return headers
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise KeyRefused(f"${api_key_env} holds whitespace or a control character inside the key: set it to the "
                         "key alone")
    if not key.isascii():  # a pasted typographic dash or quote: the HTTP client fails on it at every attempt
        raise KeyRefused(f"${api_key_env} holds a character outside ASCII (a typographic dash or quote pasted with "
                         "the key?): set it to the key alone")
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" and not loopback(u.hostname):
        raise KeyRefused(f"refusing to send the API key in ${api_key_env} over plain {u.scheme} to another "
                         f"machine: give an https:// URL, or set {api_key_env} empty for a server that needs no key")
    headers["Authorization"] = f"Bearer {key}"
    return headers


def send(req: urllib.request.Request, timeout: float):
    """Open `req` without following redirects (an HTTPError 3xx instead); plain http goes around any proxy."""
    return (_OPENER if req.type == "https" else _DIRECT).open(req, timeout=timeout)


def post_chat(url: str, body: dict, api_key_env: str, *, retries: int, backoff_s: float, timeout_s: float,
              who: str, url_flag: str, on_request=None, require_text: bool = True) -> dict:
    """POST `body` to the chat-completions endpoint `url` -> the reply (a JSON object with a text
    choices[0].message.content). A failed request (network error, timeout, a reply cut short, HTTP 408, 409, 425,
    429 or 5xx, a reply without that text) is retried up to `retries` times, sleeping backoff_s * 2**k before retry
    k+1, each failure printed to stderr; a redirect or another HTTP error (400, 401, 403, 404) fails at once,
    with the first 300 characters of the error body (the key, should a server echo it, replaced by ***).
    on_request: called before each request is sent. require_text False: a reply whose choices[0].message has no
    text (a refusal: content null) is returned, not asked again (the same request gets the same refusal); the
    caller decides. Raises ChatAPIError naming `who` and the URL (never the key)."""
    where = f"{who} {public_url(url)}"
    if "@" in url:  # urllib would take user:password@host for a host and port and print them in its errors
        raise ChatAPIError(f"{where}: the URL holds an '@': credentials are never sent in the URL (give the key in "
                           f"the environment variable the API-key option names); write an '@' elsewhere as %40")
    try:
        headers = auth_headers(url, api_key_env)
    except KeyRefused as err:
        raise ChatAPIError(f"{where}: {err}") from None
    key = headers.get("Authorization", "").removeprefix("Bearer ")
    data, last = json.dumps(body).encode(), ""
    for k in range(retries + 1):
        if k:
            time.sleep(backoff_s * 2 ** (k - 1))
        if on_request is not None:
            on_request()
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        unreachable = False  # no server listening there (or no such host): no other request is answered either
        try:
            with send(req, timeout=timeout_s) as resp:
                out = json.loads(resp.read().decode("utf-8"))
            if reply_text(out) is not None or not require_text and _message(out) is not None:
                return out
            last = "reply has no text choices[0].message.content"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
            if 300 <= err.code < 400:
                raise ChatAPIError(f"{where}: {last} redirect, not followed (the API key would go with it): give "
                                   f"{url_flag} the address it redirects to") from None
            if err.code not in RETRY_STATUS and err.code < 500:
                raise ChatAPIError(f"{where}: {last} (not retried): {_error_body(err, key)!r}",
                                   row=err.code not in ENDPOINT_STATUS) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError,
                http.client.HTTPException) as err:  # HTTPException: e.g. IncompleteRead, a body cut short
            last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            unreachable = isinstance(getattr(err, "reason", err), (ConnectionRefusedError, socket.gaierror))
        print(f"{where}: request failed ({last}); attempt {k + 1} of {retries + 1}", file=sys.stderr)
    raise ChatAPIError(f"{where}: no reply after {retries + 1} attempts ({last})", row=not unreachable)


def _error_body(err: urllib.error.HTTPError, key: str) -> str:
    """The first 300 characters of an error body, the key replaced before the cut (a key across the cut would
    leave its first characters unreplaced)."""
    try:
        text = err.read(1 << 16).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - no body to show is no reason to hide the status
        return ""
    return (text.replace(key, "***") if key else text)[:300]
