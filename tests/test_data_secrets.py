"""Credentials in shard URLs never reach a log line, an error or a saved config; tokens can be
given by environment variable name (``token_env``, ``headers: env:NAME``) and are read only when
a shard is opened."""
from __future__ import annotations

import functools
import http.server
import json
import logging
import threading

import ml_collections
import pytest
from test_data_helpers import assert_same_batches, take, tok

from fluxflow_jax.data import DataError, make_loader, webdataset_stream
from fluxflow_jax.data.demo import write_shapes_shards
from fluxflow_jax.data.secrets import redact, redacted_json

TOKEN = "hf_S3cretT0kenAbCdEfGhIjKl"
SECRETS = (TOKEN, "s3cr3tpw", "qwerty123")


def _loader(cfg, **kw):
    base = {"img_size": 32, "resize_mode": "fixed", "max_length": 16, "shuffle_buffer": 0,
            "workers": 1, "shuffle": False}
    return make_loader({**base, **cfg, **kw}, global_batch_size=2, seed=0, tokenizer=tok(),
                       process_index=0, process_count=1)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """Failing remote shards are retried with a back-off of seconds; not worth waiting for."""
    monkeypatch.setattr(webdataset_stream, "RETRY_DELAY_S", 0.001)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds_secret")
    return write_shapes_shards(root, 8, 4, img_size=32), root


class _Server:
    """Local http server for ``root``; with ``need`` = (header, value) it answers 403 to a
    request without that header."""

    def __init__(self, root, need=None):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if need and self.headers.get(need[0]) != need[1]:
                    self.send_error(403)
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.srv.server_port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.mark.parametrize("text, want", [
    ("https://bob:s3cr3tpw@host/a-{000..009}.tar", "https://***@host/a-{000..009}.tar"),
    (f"https://host/a.tar?token={TOKEN}&part=1", "https://host/a.tar?token=***&part=1"),
    (f"pipe:curl -s -L -H 'Authorization: Bearer {TOKEN}' https://h/x.tar",
     "pipe:curl -s -L -H 'Authorization: ***' https://h/x.tar"),
    ('pipe:curl -H "X-Api-Key: qwerty123" https://h/x.tar',
     'pipe:curl -H "X-Api-Key: ***" https://h/x.tar'),
    ("pipe:curl -u bob:s3cr3tpw https://h/x.tar", "pipe:curl -u *** https://h/x.tar"),
    ("https://h/x.tar?X-Amz-Signature=abc123&X-Amz-Credential=AKIAXXX",
     "https://h/x.tar?X-Amz-Signature=***&X-Amz-Credential=***"),
    (f"error near {TOKEN} in the log", "error near *** in the log"),
    ("/data/shards/shard-{000..009}.tar", "/data/shards/shard-{000..009}.tar"),
    ("gs://bucket/x.tar", "gs://bucket/x.tar"),
])
def test_redact_masks_credentials_in_text(text, want):
    assert redact(text) == want


def test_redact_masks_a_config_without_touching_it():
    cfg = ml_collections.ConfigDict({
        "tokenizer": "/models/tok", "seed": 3,
        "datasets": {"train": {"type": "webdataset",
                               "urls": ["https://bob:s3cr3tpw@h/a.tar", "b.tar"],
                               "headers": {"Authorization": f"Bearer {TOKEN}",
                                           "X-Org": "env:ORG_TOKEN"},
                               "token_env": "HF_TOKEN"}},
        "hub": {"hf_token": TOKEN, "api_key": "qwerty123", "max_tokens": 5}})
    out = redact(cfg)
    text = json.dumps(out)
    assert not any(s in text for s in SECRETS)
    ds = out["datasets"]["train"]
    assert ds["urls"] == ["https://***@h/a.tar", "b.tar"]
    assert ds["headers"] == {"Authorization": "***", "X-Org": "env:ORG_TOKEN"}
    assert ds["token_env"] == "HF_TOKEN"
    assert out["tokenizer"] == "/models/tok" and out["hub"]["max_tokens"] == 5
    assert out["hub"]["hf_token"] == "***" and out["seed"] == 3
    assert cfg.datasets.train.urls[0] == "https://bob:s3cr3tpw@h/a.tar"   # input unchanged


def test_redacted_json_is_the_config_json_with_credentials_masked():
    cfg = ml_collections.ConfigDict({
        "stage_order": ("a", "b"), "lr": 1e-3,
        "datasets": {"train": {"type": "webdataset", "urls": f"https://h/x.tar?token={TOKEN}"}}})
    text = redacted_json(cfg)
    assert TOKEN not in text
    plain = json.loads(cfg.to_json_best_effort(indent=2))
    plain["datasets"]["train"]["urls"] = "https://h/x.tar?token=***"
    assert json.loads(text) == plain
    # a config without secrets is written exactly as before
    del cfg.datasets
    assert redacted_json(cfg) == cfg.to_json_best_effort(indent=2)


def test_tokens_in_urls_never_reach_warnings_or_errors(shards, tmp_path, caplog):
    _, root = shards
    good = f"pipe:test -n 'Authorization: Bearer {TOKEN}' && cat {root}/shard-000000.tar"
    missing = f"pipe:test -n 'Authorization: Bearer {TOKEN}' && cat {tmp_path}/nope.tar"
    with _Server(root) as srv:
        url404 = srv.base.replace("http://", "http://bob:s3cr3tpw@") + \
            f"/missing.tar?token={TOKEN}"
        with caplog.at_level(logging.INFO, logger="fluxflow_jax.data"):
            L = _loader({"type": "webdataset", "urls": [good, missing, url404]})
            take(L, 4)
            stats = L.stats()
            L.close()
            with pytest.raises(DataError) as e:
                next(_loader({"type": "webdataset", "urls": [missing, url404]}))
    assert stats["skipped_shard_error"] == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "shard_error" in logged and "***" in logged
    for text in (logged, str(e.value), json.dumps(L.get_state())):
        assert not any(s in text for s in SECRETS), text


def test_token_env_is_sent_as_a_bearer_header_and_read_at_open_time(shards, monkeypatch):
    cfg, root = shards
    want = take(_loader(cfg), 4)
    monkeypatch.setenv("FFJ_TEST_TOKEN", TOKEN)
    with _Server(root, need=("Authorization", f"Bearer {TOKEN}")) as srv:
        url = srv.base + "/shard-{000000..000001}.tar"
        L = _loader({**cfg, "urls": url, "token_env": "FFJ_TEST_TOKEN"})
        assert_same_batches(want, take(L, 4))
        assert TOKEN not in json.dumps(L.get_state()) + json.dumps(L.cfg)
        L.close()
        # without the header the server refuses: the header is what got us in
        refused = _loader({**cfg, "urls": url})
        with pytest.raises(DataError, match="a whole epoch without one usable sample"):
            next(refused)
        # the variable is read when a shard is opened, not when the loader is made
        late = _loader({**cfg, "urls": url, "token_env": "FFJ_TEST_TOKEN"})
        monkeypatch.setenv("FFJ_TEST_TOKEN", "rotated")
        with pytest.raises(DataError, match="a whole epoch without one usable sample"):
            next(late)


def test_credentials_are_not_forwarded_to_another_host_on_redirect(shards, monkeypatch):
    cfg, root = shards
    want = take(_loader(cfg), 2)
    monkeypatch.setenv("FFJ_TEST_TOKEN", TOKEN)
    seen = []

    class Cdn(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            super().do_GET()

        def log_message(self, *a):
            pass

    cdn = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Cdn, directory=str(root)))
    threading.Thread(target=cdn.serve_forever, daemon=True).start()

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(403)
                return
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{cdn.server_port}{self.path}")
            self.end_headers()

        def log_message(self, *a):
            pass

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        L = _loader({**cfg, "urls": f"http://127.0.0.1:{hub.server_port}/shard-"
                     "{000000..000001}.tar", "token_env": "FFJ_TEST_TOKEN"})
        assert_same_batches(want, take(L, 2))
        L.close()
    finally:
        for srv in (hub, cdn):
            srv.shutdown()
            srv.server_close()
    assert seen and all(h is None for h in seen)


def test_headers_with_env_values(shards, monkeypatch):
    cfg, root = shards
    want = take(_loader(cfg), 2)
    monkeypatch.setenv("FFJ_ORG", "qwerty123")
    with _Server(root, need=("X-Org-Key", "qwerty123")) as srv:
        L = _loader({**cfg, "urls": srv.base + "/shard-{000000..000001}.tar",
                     "headers": {"X-Org-Key": "env:FFJ_ORG"}})
        assert_same_batches(want, take(L, 2))
        L.close()


def test_unset_token_variable_fails_at_start_naming_key_and_variable(shards, monkeypatch):
    cfg, _ = shards
    monkeypatch.delenv("FFJ_NOT_SET", raising=False)
    http_cfg = {**cfg, "urls": "https://example.invalid/x-{0..1}.tar"}
    with pytest.raises(DataError, match=r"datasets\.train\.token_env: .*'FFJ_NOT_SET' is not set"):
        _loader({**http_cfg, "token_env": "FFJ_NOT_SET"})
    with pytest.raises(DataError, match=r"datasets\.train\.headers\.X-Key: .*'FFJ_NOT_SET'"):
        _loader({**http_cfg, "headers": {"X-Key": "env:FFJ_NOT_SET"}})


@pytest.mark.parametrize("extra, match", [
    ({"token_env": "HF_TOKEN"}, r"datasets\.train\.token_env: .*http\(s\) urls only"),
    ({"token_env": "not a name", "urls": "https://h/x.tar"}, r"token_env: must be an environment"),
    ({"headers": {"X": 3}, "urls": "https://h/x.tar"}, r"headers: must be a mapping"),
    ({"headers": {"X": "env:1bad"}, "urls": "https://h/x.tar"}, r"headers\.X: 'env:1bad'"),
])
def test_credential_keys_are_validated(shards, extra, match):
    cfg, _ = shards
    with pytest.raises(ValueError, match=match):
        _loader({**cfg, **extra})
