"""Keep credentials out of logs, errors and saved configs.

Shard URLs are where tokens end up: ``https://user:tok@host/x.tar``, ``...?token=...``, or a
``pipe:curl -H 'Authorization: Bearer ...'`` command. Every message that can show a URL goes
through :func:`redact`, and the run's saved config should too (a workdir is shared far more
widely than a shell history). The better way to authenticate is not to write the token at all:
the ``token_env`` and ``headers: {'X': 'env:NAME'}`` dataset keys name an environment variable
that is read only when a shard is opened (:func:`resolve_headers`) and never stored.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# Config keys whose string values are secrets whatever they look like: the word as a whole
# ``_``/``-`` separated part of the key, so ``hf_token`` is masked and ``tokenizer`` is not.
SECRET_KEYS = re.compile(r"(?:^|[_-])(?:token|password|passwd|secret|api[_-]?key|apikey|"
                         r"credentials?|auth|authorization|cookie|signature)(?:$|[_-])",
                         re.IGNORECASE)
ENV_PREFIX = "env:"

_PATTERNS = [
    # scheme://user:password@host -> scheme://***@host (and scheme://token@host)
    (re.compile(r"(?P<k>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@"), r"\g<k>" + MASK + "@"),
    # Authorization/Cookie/X-...-Token style headers, quoted or not: keep the name, mask the rest
    (re.compile(r"(?P<k>\b(?:proxy-)?(?:authorization|cookie|x-[a-z0-9-]*"
                r"(?:token|key|auth|secret)[a-z0-9-]*)\s*[:=]\s*)[^'\"\n]+", re.IGNORECASE),
     r"\g<k>" + MASK),
    # query / form parameters with a secret-looking name
    (re.compile(r"(?P<k>[?&;](?:[a-z0-9_.-]*(?:token|key|secret|passw(?:or)?d?|sig|signature|"
                r"credential|auth)[a-z0-9_.-]*)=)[^&#\s'\"]*", re.IGNORECASE), r"\g<k>" + MASK),
    # curl -u user:password / --user user:password
    (re.compile(r"(?P<k>(?:^|\s)(?:-u|--user)\s+)\S+"), r"\g<k>" + MASK),
    # well-known token shapes, wherever they appear (Hugging Face, GitHub, AWS access keys)
    (re.compile(r"\b(?:hf_|gh[pousr]_)[A-Za-z0-9]{16,}\b"), MASK),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), MASK),
]


def _redact_text(text: str) -> str:
    for pat, repl in _PATTERNS:
        text = pat.sub(repl, text)
    return text


def redact(value: Any) -> Any:
    """``value`` with credentials masked as ``***``: a string, or a config (ConfigDict, Mapping,
    list, tuple - returned as plain dicts and lists, the input is not modified).

    In a config, every string is scanned for URL credentials, auth headers, secret query
    parameters and known token shapes, and the string value of a key that names a secret
    (``token``, ``password``, ``api_key``, every value under ``headers``, ...) is masked whole -
    except ``env:NAME`` references and ``token_env`` (they name a variable, they hold no secret).
    """
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = str(k)
            if key == "headers" and isinstance(v, Mapping):
                out[k] = {hk: _mask_value(hv) for hk, hv in v.items()}
            elif key != "token_env" and SECRET_KEYS.search(key) and isinstance(v, str):
                out[k] = _mask_value(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def redacted_json(config: Any, indent: int = 2) -> str:
    """``config`` as JSON text with credentials masked - what to write as a run's
    ``config.json``. A ConfigDict goes through its own ``to_json_best_effort`` first, so values
    plain JSON cannot hold are encoded exactly as an unredacted file would encode them."""
    if hasattr(config, "to_json_best_effort"):
        config = json.loads(config.to_json_best_effort())
    return json.dumps(redact(config), indent=indent)


def _mask_value(v: Any) -> Any:
    if isinstance(v, str) and v.startswith(ENV_PREFIX):
        return v
    return MASK if isinstance(v, str) and v else v


class MissingSecret(LookupError):
    """An environment variable named by ``token_env`` / ``headers: env:NAME`` is not set."""


def resolve_headers(headers: Mapping | None, token_env: str | None, name: str) -> dict[str, str]:
    """HTTP headers for opening a shard: ``env:NAME`` values and ``token_env`` (as
    ``Authorization: Bearer <token>``) read from the environment now. Called at open time
    only, so the token lives in no config, state or log; a variable that is not set fails naming
    the dataset key and the variable."""
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        if isinstance(v, str) and v.startswith(ENV_PREFIX):
            var = v[len(ENV_PREFIX):]
            if var not in os.environ:
                raise MissingSecret(f"datasets.{name}.headers.{k}: environment variable {var!r} is "
                               f"not set; export {var}=... before starting")
            v = os.environ[var]
        out[str(k)] = str(v)
    if token_env:
        if token_env not in os.environ:
            raise MissingSecret(f"datasets.{name}.token_env: environment variable {token_env!r} is not "
                           f"set; export {token_env}=... before starting")
        out.setdefault("Authorization", f"Bearer {os.environ[token_env]}")
    return out
