"""A first start as a user meets it: ``optimus serve`` says which latency profile it uses and,
once the engine is ready, one line with the URL, the web page, the model and the policy;
polls stay out of the access log; ``--help`` names each default once; ``--max-tokens-cap``
defaults to the model's context."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from optimus.bench.server_process import free_port
from optimus.cli import build_parser
from optimus.config import ServerConfig
from optimus.server.runner import QuietPolls, base_url, quiet_polls, ready_line
from optimus.server.state import ServerState


def _wait_for_text(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text(errors="replace"))
        if match:
            return match
        assert proc.poll() is None, f"the server exited:\n{path.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the server log:\n{path.read_text()}")


def test_serve_names_its_profile_announces_ready_and_keeps_polls_out_of_the_log(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("sdar")
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "OPTIMUS_CACHE": str(tmp_path / "cache")}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "optimus.cli", "serve", "--model", str(model),
                                 "--device", "cpu", "--num-pages", "64", "--port", str(port),
                                 "--max-running", "1"],  # one request, block 4: chunks 1 and 4, 2 steps
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        ready = _wait_for_text(log_path, r"ready: .*", proc).group(0)
        base = f"http://127.0.0.1:{port}"
        assert ready == ready_line(base, model.name, "elastic")
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/metrics").status_code == 200
        assert httpx.get(base + "/ui/gauges?t=1").status_code == 200
        assert httpx.get(base + "/v1/models").status_code == 200
        _wait_for_text(log_path, r'"GET /v1/models HTTP/1.1" 200', proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    log = log_path.read_text()
    # The first start measured the elastic policy's latency profile, with a progress bar, and said where it went.
    assert "latency profile: measuring 2 steps" in log and "profiling step latency" in log
    assert re.search(r"latency profile: \S+cache/profiles/\S+\.json \(measured .* by start-up", log)
    assert log.index("latency profile: measuring") < log.index("ready: ")
    assert not re.search(r'"GET /(health|metrics|ui/gauges)', log), log


def test_quiet_polls_filter_drops_only_polled_paths():
    def record(path: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:1", "GET", path, "1.1", 200), None)

    quiet = QuietPolls()
    assert not quiet.filter(record("/health")) and not quiet.filter(record("/metrics"))
    assert not quiet.filter(record("/ui/gauges?x=1"))
    assert quiet.filter(record("/v1/models")) and quiet.filter(record("/ui/generate"))
    assert quiet.filter(record("/health/extra")) and quiet.filter(record("/"))


def test_quiet_polls_installs_once_and_debug_removes_it():
    access = logging.getLogger("uvicorn.access")
    try:
        quiet_polls(True)
        quiet_polls(True)
        assert sum(isinstance(f, QuietPolls) for f in access.filters) == 1
        quiet_polls(False)  # --log-level debug: every access line
        assert not any(isinstance(f, QuietPolls) for f in access.filters)
    finally:
        quiet_polls(False)


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8000"), ("0.0.0.0", "http://127.0.0.1:8000"),
                                       ("::1", "http://[::1]:8000"), ("example.org", "http://example.org:8000")])
def test_base_url_is_one_a_browser_here_can_open(host, url):
    assert base_url(host, 8000) == url


# ---- --help ----------------------------------------------------------------------------------------
# A statement of a default ("(default: 8)", "defaults to the model's"), not the value 'default'.
_DEFAULT_MENTION = re.compile(r"\bdefault:|\bdefaults to\b|\(the default\)")


def _help_texts(command: str) -> dict[str, str]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    formatter = sub._get_formatter()
    return {a.option_strings[-1]: formatter._expand_help(a) for a in sub._actions
            if a.help and a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("command", ["serve", "generate", "profile"])
def test_help_names_each_default_at_most_once(command):
    for flag, text in _help_texts(command).items():
        assert len(_DEFAULT_MENTION.findall(text)) <= 1, f"{flag}: {text}"


def test_serve_help_names_every_config_default_once():
    texts = _help_texts("serve")
    for flag, text in texts.items():
        assert len(_DEFAULT_MENTION.findall(text)) == 1, f"{flag}: {text}"
    assert texts["--max-tokens-cap"].endswith("(default: the model's context length)")
    assert texts["--block-size"].endswith("defaults to the model's (32 if it has none)")
    assert texts["--no-cuda-graphs"].endswith("(default: on)") and texts["--api-key"].endswith("(default: none)")


# ---- --max-tokens-cap ------------------------------------------------------------------------------
def _state(config: ServerConfig) -> ServerState:
    engine = SimpleNamespace(spec=SimpleNamespace(arch=SimpleNamespace(vocab_size=100)), max_model_len=40960)
    return ServerState(engine=engine, config=config, metrics=None, lifecycle=None)


def test_max_tokens_cap_defaults_to_the_models_context():
    assert ServerConfig().max_tokens_cap is None
    assert _state(ServerConfig()).limits().max_tokens_cap == 40960
    assert _state(ServerConfig(max_tokens_cap=100)).limits().max_tokens_cap == 100
