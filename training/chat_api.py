"""Where an OpenAI-compatible request may go with the API key, and how it is sent: the one place for the judge
(eval.judge) and the OPA expert (training.dpo.opa.expert).

* The key comes from an environment variable, read when a request is sent; it is never written to a file, a
  log line or an error message. A key holding whitespace or control characters inside (a CRLF file read with
  `$(cat key.txt)` leaves a "\\r") is refused naming the variable: sent, Python's HTTP client raises an error
  that quotes the whole header, key included.
* A key is never sent over plain http to another machine (anyone on the way could read it): that needs https.
* A redirect is an error, not followed (urllib would send the Authorization header wherever it points).
* A plain-http (so loopback) request goes direct, never through a proxy from the environment (http_proxy),
  which would see the key; https goes through such a proxy as a tunnel, the key encrypted.
"""
from __future__ import annotations

import ipaddress
import os
import urllib.parse
import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
_OPENER = urllib.request.build_opener(_NoRedirect)  # https: the environment's proxy, if any, as a tunnel


class KeyRefused(ValueError):
    """The API key cannot be sent to this URL, or is not a usable header value; the message never holds it."""


def public_url(url: str) -> str:
    """The URL without credentials or query string (what results files and messages show)."""
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.hostname + (f":{p.port}" if p.port else "") if p.hostname else "",
                                    p.path, "", ""))


def loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


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
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" and not loopback(u.hostname):
        raise KeyRefused(f"refusing to send the API key in ${api_key_env} over plain {u.scheme} to another "
                         f"machine: give an https:// URL, or set {api_key_env} empty for a server that needs no key")
    headers["Authorization"] = f"Bearer {key}"
    return headers


def send(req: urllib.request.Request, timeout: float):
    """Open `req` without following redirects (an HTTPError 3xx instead); plain http goes around any proxy."""
    return (_OPENER if req.type == "https" else _DIRECT).open(req, timeout=timeout)
