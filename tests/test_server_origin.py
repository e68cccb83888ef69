"""Host and Origin checks (DNS rebinding, cross-site pages) and CORS: the Host x Origin x route
matrix in-process over a FakeEngine, non-loopback binds, the option parsing, the start-up
warning, and one real ``optimus serve`` with its defaults (official client, web page, raw Host)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from optimus.config import ServerConfig, add_config_args, config_from_args
from optimus.server import runner
from optimus.server.app import build_app
from optimus.server.origin import OriginPolicy, is_loopback, split_host, split_origin
from fixtures import make_tiny_checkpoint
from test_server_support import FakeEngine, ServerProcess, harness_argv

PORT = 8000
ALLOWED_ORIGIN = "https://app.example"  # given with --allowed-origins
FOREIGN = "evil.example"
DROP_HOST = "x-test-drop-host"  # asks _without_host to remove the Host header (TestClient always sets one)

HOSTS = {"localhost": f"localhost:{PORT}", "127.0.0.1": f"127.0.0.1:{PORT}", "[::1]": f"[::1]:{PORT}",
         "foreign": f"{FOREIGN}:{PORT}", "missing": None}
ORIGINS = ("none", "same", "foreign", "allowed")
ROUTES = {"api": ("POST", "/v1/completions"), "page": ("GET", "/"), "metrics": ("GET", "/metrics")}


def _without_host(app):
    """ASGI wrapper: drops the Host header of requests that carry DROP_HOST."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and any(k == DROP_HOST.encode() for k, _ in scope["headers"]):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"host"]}
        await app(scope, receive, send)
    return wrapped


def _wait_ready(client: TestClient, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the fake engine did not start"
        time.sleep(0.02)


@pytest.fixture
def serve():
    """``serve(**ServerConfig fields)`` -> a started TestClient on http://127.0.0.1:PORT."""
    opened = []

    def make(**config) -> TestClient:
        client = TestClient(_without_host(build_app(FakeEngine(token_delay=0.0), ServerConfig(**config))),
                            base_url=f"http://127.0.0.1:{PORT}", raise_server_exceptions=False)
        opened.append(client.__enter__())
        _wait_ready(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def _call(client: TestClient, route: str, host: str | None, origin: str | None = None,
          **headers: str) -> httpx.Response:
    """``route``: a ROUTES key or a path (GET); ``host`` None sends no Host header."""
    method, path = ROUTES.get(route, ("GET", route))
    headers = {**headers, "Host": host} if host is not None else {**headers, DROP_HOST: "1"}
    if origin is not None:
        headers["Origin"] = origin
    body = {"json": {"prompt": "hi", "max_tokens": 2}} if method == "POST" else {}
    return client.request(method, path, headers=headers, **body)


def _origin(kind: str, host: str | None) -> str | None:
    return {"none": None, "same": f"http://{host or f'127.0.0.1:{PORT}'}",
            "foreign": f"http://{FOREIGN}:{PORT}", "allowed": ALLOWED_ORIGIN}[kind]


def _expected(host_kind: str, origin_kind: str) -> int:
    if host_kind in ("foreign", "missing"):
        return 400  # the Host check comes first: a rebound name is refused whatever the Origin
    return 403 if origin_kind == "foreign" else 200


# ---------------------------------------------------------------- the matrix (loopback bind)

def test_host_origin_route_matrix(serve):
    client = serve(allowed_origins=(ALLOWED_ORIGIN,))
    for host_kind, host in HOSTS.items():
        for origin_kind in ORIGINS:
            for route in ROUTES:
                origin = _origin(origin_kind, host)
                r = _call(client, route, host, origin)
                want = _expected(host_kind, origin_kind)
                case = (host_kind, origin_kind, route, r.text[:200])
                assert r.status_code == want, case
                if want != 200:
                    assert r.json()["error"]["code"] in ("host_not_allowed", "missing_host",
                                                         "origin_not_allowed"), case
                    assert "access-control-allow-origin" not in r.headers, case
                elif origin is not None:  # CORS answers only for allowed origins
                    assert r.headers["access-control-allow-origin"] == origin, case
                    assert "Origin" in r.headers["vary"], case
                else:
                    assert "access-control-allow-origin" not in r.headers, case


def test_refusals_name_the_option(serve):
    client = serve()
    host = _call(client, "/health", f"{FOREIGN}:{PORT}")
    assert host.status_code == 400 and "--allowed-hosts" in host.json()["error"]["message"]
    assert FOREIGN in host.json()["error"]["message"]
    missing = _call(client, "/health", None)
    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "missing_host")
    origin = _call(client, "/health", f"localhost:{PORT}", f"https://{FOREIGN}")
    assert origin.status_code == 403 and "--allowed-origins" in origin.json()["error"]["message"]


def test_page_and_its_endpoints_work_from_localhost_and_127(serve):
    client = serve()
    for host in (f"localhost:{PORT}", f"127.0.0.1:{PORT}"):
        page = _call(client, "/", host)
        assert page.status_code == 200 and 'id="canvas"' in page.text
        assert _call(client, "/ui/assets/ui.js", host).status_code == 200
        gauges = _call(client, "/ui/gauges", host, f"http://{host}")  # the page's fetch: same origin
        assert gauges.status_code == 200 and gauges.json()["ready"] is True


def test_lookalike_hosts_are_refused(serve):
    client = serve()
    for host in ("localhost.evil.example", "127.0.0.1.nip.io", "127.1", "[::ffff:127.0.0.1]", "::1",
                 "localhost:80:80", "localhost:http", "", "local host"):
        assert _call(client, "/health", host).status_code == 400, host
    for host in ("LOCALHOST", "localhost.", "[0:0::1]:1", "127.0.0.1"):
        assert _call(client, "/health", host).status_code == 200, host
    for origin in ("null", f"http://{FOREIGN}", "http://localhost.evil.example", "file://",
                   "http://localhost@evil.example", "http://127.0.0.1/../x"):
        assert _call(client, "/health", "localhost", origin).status_code == 403, origin
    # any port and either scheme of an allowed host: another local app's page may call
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:9"):
        assert _call(client, "/health", "localhost", origin).status_code == 200, origin


def test_allowed_hosts_option(serve):
    client = serve(allowed_hosts=("optimus.lan", ".corp.example"))
    for host in ("optimus.lan", "optimus.lan:1234", "corp.example", "api.corp.example", "localhost"):
        assert _call(client, "/health", host).status_code == 200, host
    for host in ("other.lan", "badcorp.example", FOREIGN):
        assert _call(client, "/health", host).status_code == 400, host
    # an allowed host's pages are allowed origins too
    assert _call(client, "/health", "localhost", "https://api.corp.example").status_code == 200
    off = serve(allowed_hosts=("*",))
    assert _call(off, "/health", FOREIGN).status_code == 200
    assert _call(off, "/health", None).status_code == 200
    # with the Host check off a page may still call its own server, and no other site's may
    assert _call(off, "/health", FOREIGN, f"http://{FOREIGN}").status_code == 200
    assert _call(off, "/health", FOREIGN, "http://other.example").status_code == 403


def test_allowed_origins_option(serve):
    client = serve(allowed_origins=("https://app.example:8443", "null"))
    assert _call(client, "/health", "localhost", "https://app.example:8443").status_code == 200
    assert _call(client, "/health", "localhost", "null").status_code == 200
    for origin in ("https://app.example", "http://app.example:8443", "https://app.example:8444"):
        assert _call(client, "/health", "localhost", origin).status_code == 403, origin
    anyone = serve(allowed_origins=("*",))
    r = _call(anyone, "/health", "localhost", f"https://{FOREIGN}")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == f"https://{FOREIGN}"
    assert _call(anyone, "/health", FOREIGN).status_code == 400  # '*' origins leave the Host check on


# ---------------------------------------------------------------- non-loopback binds

def test_wildcard_bind_without_allowed_hosts_turns_the_host_check_off(serve):
    client = serve(host="0.0.0.0")
    for host in ("192.168.1.5:8000", FOREIGN, None):
        assert _call(client, "/health", host).status_code == 200, host
    assert _call(client, "/health", "192.168.1.5:8000", "http://192.168.1.5:8000").status_code == 200
    assert _call(client, "/health", "192.168.1.5:8000", "http://192.168.1.5:9000").status_code == 403
    assert _call(client, "/health", "192.168.1.5", "http://localhost:3000").status_code == 200
    assert _call(client, "/health", "192.168.1.5", f"http://{FOREIGN}").status_code == 403


def test_non_loopback_bind_with_allowed_hosts_checks_them(serve):
    client = serve(host="0.0.0.0", allowed_hosts=("optimus.lan",))
    assert _call(client, "/health", "optimus.lan:8000").status_code == 200
    assert _call(client, "/health", "localhost").status_code == 200
    assert _call(client, "/health", "192.168.1.5").status_code == 400
    assert _call(client, "/health", None).status_code == 400
    bound = serve(host="192.168.1.5", allowed_hosts=("optimus.lan",))
    assert _call(bound, "/health", "192.168.1.5:8000").status_code == 200  # the bound address itself


def test_bind_address_classes():
    for bind in ("127.0.0.1", "127.0.0.2", "localhost", "LocalHost", "::1", "[::1]"):
        assert is_loopback(bind), bind
    for bind in ("0.0.0.0", "::", "", "192.168.1.5", "optimus.lan"):
        assert not is_loopback(bind), bind
    assert OriginPolicy.build("127.0.0.1").check_host
    assert not OriginPolicy.build("0.0.0.0").check_host
    assert OriginPolicy.build("::", ["x.lan"]).check_host
    assert not OriginPolicy.build("127.0.0.1", ["*"]).check_host
    assert "[fe80::1]" in OriginPolicy.build("fe80::1", ["x"]).hosts


# ---------------------------------------------------------------- CORS, the key, simple POSTs

def test_preflight_answers_only_allowed_origins_before_the_key_check(serve):
    client = serve(api_key="k", allowed_origins=(ALLOWED_ORIGIN,))
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    ok = client.options("/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **ask})
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"]
    refused = client.options("/v1/chat/completions", headers={"Origin": f"https://{FOREIGN}", **ask})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    # the key is still needed for the call itself; its 401 is readable by the allowed page
    no_key = _call(client, "api", "127.0.0.1", ALLOWED_ORIGIN)
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    keyed = _call(client, "api", "127.0.0.1", ALLOWED_ORIGIN, Authorization="Bearer k")
    assert keyed.status_code == 200 and keyed.json()["choices"][0]["text"] == "aa"


def test_api_key_still_guards_every_api_route(serve):
    client = serve(api_key="k")
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("POST", "/tokenize"), ("GET", "/tokenizer_info"), ("POST", "/detokenize"),
                         ("POST", "/ui/generate")):
        r = client.request(method, path, json={})
        assert r.status_code == 401, (path, r.text)


def test_cross_site_text_plain_posts_are_not_served(serve):
    client = serve()
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    plain = {"Content-Type": "text/plain"}
    assert client.post("/v1/completions", content=body, headers=plain).status_code == 400
    foreign = client.post("/v1/completions", content=body, headers={**plain, "Origin": f"http://{FOREIGN}"})
    assert foreign.status_code == 403
    same = client.post("/v1/completions", content=body, headers={**plain, "Origin": f"http://127.0.0.1:{PORT}"})
    assert same.status_code == 400


# ---------------------------------------------------------------- options and start-up

def _parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerConfig)
    return config_from_args(ServerConfig, parser.parse_args(list(argv)))


def test_list_flags_parse_to_tuples():
    assert _parse().allowed_hosts == () and _parse().allowed_origins == ()
    cfg = _parse("--allowed-hosts", "a.lan", "b.lan,c.lan", "--port", "9", "--allowed-hosts", "d.lan",
                 "--allowed-origins", "https://x.example")
    assert cfg.allowed_hosts == ("a.lan", "b.lan", "c.lan", "d.lan") and cfg.port == 9
    assert cfg.allowed_origins == ("https://x.example",)
    hash(cfg)  # the config stays frozen and hashable


def test_malformed_entries_fail_at_start_up():
    for config in (ServerConfig(allowed_hosts=("http://x.lan",)), ServerConfig(allowed_hosts=("x.lan:80",)),
                   ServerConfig(allowed_origins=("app.example",)),
                   ServerConfig(allowed_origins=("https://app.example/path",))):
        with pytest.raises(ValueError, match="--allowed-"):
            build_app(FakeEngine(), config)


def test_parsers():
    assert split_host("LocalHost:8000") == ("localhost", 8000)
    assert split_host("[::1]") == ("[::1]", None)
    assert split_host("[0:0:0:0:0:0:0:1]:80") == ("[::1]", 80)
    assert split_host("localhost.") == ("localhost", None)
    for bad in ("", "::1", "[::1", "[zz]", "a:b", "a:99999", "a b", "a/b", "[::1]x"):
        assert split_host(bad) is None, bad
    assert split_origin("https://app.example") == ("https", "app.example", 443)
    assert split_origin("http://[::1]:9") == ("http", "[::1]", 9)
    for bad in ("null", "file://", "ftp://x", "http://x/y", "http://u@x", "x"):
        assert split_origin(bad) is None, bad


@pytest.mark.parametrize("config, warned", [(ServerConfig(host="0.0.0.0"), True),
                                            (ServerConfig(host="192.168.1.5"), True),
                                            (ServerConfig(host="0.0.0.0", api_key="k"), False),
                                            (ServerConfig(), False), (ServerConfig(host="localhost"), False)])
def test_start_up_warning_for_open_non_loopback_binds(monkeypatch, caplog, config, warned):
    monkeypatch.setattr(runner.DrainingServer, "run", lambda self: None)
    with caplog.at_level(logging.WARNING, logger="optimus.server"):
        assert runner.run_server(FakeEngine(), config) == 0
    lines = [r.getMessage() for r in caplog.records if "anyone who can reach" in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines


# ---------------------------------------------------------------- a real server, defaults

def _raw_get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_real_server_with_defaults(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "sdar", "sdar")
    argv = harness_argv(model, 0.0, "--policy", "fixed:4", "--num-pages", "64", "--served-model-name", "tiny")
    with ServerProcess(argv, tmp_path / "server.log") as proc:
        proc.wait_healthy()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=4).choices[0].finish_reason
        rebound = httpx.get(proc.url + "/health", headers={"Host": f"{FOREIGN}:{proc.port}"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
        assert b" 400 " in _raw_get(proc.port, b"GET /health HTTP/1.0\r\n\r\n").split(b"\r\n")[0]
        page_origin = {"Origin": proc.url}  # what the browser sends for the page's own POST
        with httpx.stream("POST", proc.url + "/ui/generate", headers=page_origin, timeout=60,
                          json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True}) as r:
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == proc.url
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1]["type"] == "done", events[-1]
        cross = httpx.post(proc.url + "/ui/generate", headers={"Origin": f"http://{FOREIGN}"},
                           json={"prompt": "hi", "max_tokens": 4})
        assert cross.status_code == 403
        assert "anyone who can reach" not in proc.log()
