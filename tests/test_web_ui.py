"""The web page and its endpoints, on a real engine over a tiny SDAR checkpoint: the SSE canvas
stream, the gauges, and the page itself driven in headless Chromium over the DevTools protocol
(``--remote-debugging-pipe``: NUL-separated JSON on fds 3/4, no websocket library needed)."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from optimus.bench.server_process import free_port
from optimus.config import engine_config
from optimus.engine.async_engine import AsyncEngine
from optimus.config import ServerConfig
from optimus.server.app import build_app
from optimus.server.ui import STATIC_DIR
from fixtures.checkpoints import make_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1400,1000")


@contextmanager
def _ui_server(tmp_path_factory, name: str, config: ServerConfig):
    """A real app (the page's routes check requests as the API does) over a tiny SDAR engine."""
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp(name) / "sdar", "sdar")
    engine = AsyncEngine(engine_config(model=str(ckpt), policy="fixed:4", num_pages=64))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(engine, config), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (uv.started and engine.ready):
        assert time.monotonic() < deadline, f"the {name} server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _ui_server(tmp_path_factory, "ui", ServerConfig()) as url:
        yield url


def _events(base: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + "/ui/generate", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


# ---- endpoints ------------------------------------------------------------------------------
def test_page_and_assets_are_served_with_no_external_urls(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="canvas"' in page.text and "/ui/assets/ui.js" in page.text
    for name in ("ui.js", "ui.css"):
        asset = httpx.get(f"{server}/ui/assets/{name}")
        assert asset.status_code == 200 and len(asset.text) > 500
    assert httpx.get(server + "/ui/assets/index.py").status_code == 404
    for path in STATIC_DIR.iterdir():  # no CDN: nothing is loaded from another origin
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""",
                             path.read_text()), path.name


def test_generate_streams_the_canvas_filling_in(server):
    events = _events(server, {"prompt": "hello world", "max_tokens": 16, "ignore_eos": True, "chat": False})
    start, done = events[0], events[-1]
    assert start["type"] == "start" and done["type"] == "done", (start, done)
    assert start["canvas"] >= 16 and start["max_tokens"] == 16 and start["block_size"] >= 1
    commits = [e for e in events if e["type"] == "commit"]
    positions = [p for e in commits for p in e["positions"]]
    assert len(positions) == len(set(positions)), "a position was committed twice"
    assert set(range(16)) <= set(positions) and max(positions) < start["canvas"]
    for e in commits:
        lo, hi = e["chunk"]
        assert all(lo <= p < hi for p in e["positions"]) and len(e["tokens"]) == len(e["positions"])
        assert hi - lo <= 4  # policy fixed:4
    assert [e["step"] for e in commits] == sorted(e["step"] for e in commits)
    assert done["finish_reason"] == "length" and done["tokens_committed"] == len(positions)
    assert done["answer_tokens"] == 16  # max_tokens with ignore_eos: the whole answer
    assert done["steps"] == len(commits) and set(done["chunk_sizes"]) <= {"1", "2", "3", "4"}
    texts = [e["text"] for e in events if e["type"] == "text"]
    assert texts and texts[-1] == done["text"]


def test_gauges_report_engine_counters(server):
    before = httpx.get(server + "/ui/gauges").json()
    _events(server, {"prompt": "two plus two", "max_tokens": 6, "ignore_eos": True})
    after = httpx.get(server + "/ui/gauges").json()
    assert after["ready"] is True and after["waiting"] == 0
    assert after["steps"] > before["steps"] and after["tokens_committed"] >= before["tokens_committed"] + 6
    assert sum(after["chunk_size_counts"].values()) > sum(before["chunk_size_counts"].values())


def test_bad_requests_are_refused(server):
    assert httpx.post(server + "/ui/generate", json={"prompt": "x", "policy": "bogus"}).status_code == 400
    # The API's error handlers: schema violations are 400s in the OpenAI envelope, never 422.
    assert httpx.post(server + "/ui/generate", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    assert httpx.post(server + "/ui/generate", json={"prompt": ""}).status_code == 400


def test_policy_override_reaches_the_engine(server):
    events = _events(server, {"prompt": "hi", "max_tokens": 4, "ignore_eos": True, "policy": "ar"})
    assert all(e["chunk"][1] - e["chunk"][0] == 1 for e in events if e["type"] == "commit")


# ---- the page in a real browser -----------------------------------------------------------------
class DevTools:
    """Chromium driven over ``--remote-debugging-pipe``: commands go to its fd 3, replies and
    events come back on its fd 4, each message JSON followed by a NUL byte."""

    def __init__(self, user_dir: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child's ends move above fd 4 first, so the shell's 3/4 redirections cannot clobber them
        to_browser_r, from_browser_w = (_above_4(fd) for fd in (to_browser_r, from_browser_w))
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, CHROMIUM, *CHROMIUM_FLAGS,
                                      f"--user-data-dir={user_dir}", "about:blank"],
                                     pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cv:
                        self._replies[msg["id"]] = msg
                        self._cv.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: self._next in self._replies, timeout):
                raise TimeoutError(f"no reply to {method}")
            reply = self._replies.pop(self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session)
        self.call("Page.navigate", {"url": url}, session)
        return session

    def eval(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)


def _above_4(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> int:
    return int((np.abs(pixels[..., :3].astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_page_in_headless_chromium_streams_and_colours_the_canvas(server, tmp_path):
    import matplotlib.image

    browser = DevTools(tmp_path / "profile")
    try:
        tab = browser.open(server + "/")
        _wait_for(lambda: browser.eval(tab, "document.readyState === 'complete' && !!window.optimusUI"), 30, "page load")
        browser.eval(tab, """
            document.getElementById('prompt').value = 'hello world';
            document.getElementById('max-tokens').value = '32';
            document.getElementById('send').click();""")
        # the canvas fills in while the answer streams: tokens commit before the request is done
        seen = _wait_for(lambda: browser.eval(tab, "window.optimusUI.committed"), 60, "first commit")
        assert seen > 0
        state = _wait_for(lambda: browser.eval(tab, "(u => (u.done || u.error) && u)(window.optimusUI)"),
                          120, "answer done")
        assert state["error"] is None, state["error"]
        dom = browser.eval(tab, """({
            committed: document.querySelectorAll('#canvas .cell.committed').length,
            masked: document.querySelectorAll('#canvas .cell.masked').length,
            steps: document.querySelectorAll('#steps li').length,
            chunk: document.querySelectorAll('#canvas .cell.in-chunk').length,
            answer: document.querySelector('.msg.assistant').textContent})""")
        assert dom["committed"] >= 32 and dom["steps"] == state["steps"] > 0 and 1 <= dom["chunk"] <= 4
        assert dom["masked"] == 0 and state["committed"] <= 32  # done: no mask left, answer tokens only
        assert "steps" in dom["answer"]  # the stats line under the answer
        _wait_for(lambda: browser.eval(tab, "document.getElementById('g-tps').textContent !== '–'"), 10,
                  "tokens-per-step gauge")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"}, tab)["data"])
    finally:
        browser.close()
    out = Path(os.environ.get("OPTIMUS_UI_SCREENSHOT", tmp_path / "ui.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(shot)
    pixels = (matplotlib.image.imread(io.BytesIO(shot)) * 255).round().astype(np.uint8)
    assert pixels.shape[0] >= 900 and pixels.shape[1] >= 1300
    assert pixels[..., :3].std() > 20, "blank screenshot"
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50
    assert _has_colour(pixels, (238, 160, 160)) > 100  # cells of the first step: hsl(0 70% 78%)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A second server that requires an API key."""
    with _ui_server(tmp_path_factory, "ui-key", ServerConfig(api_key="sesame")) as url:
        yield url


def _open_page(browser: DevTools, url: str) -> str:
    tab = browser.open(url + "/")
    _wait_for(lambda: browser.eval(tab, "document.readyState === 'complete' && !!window.optimusUI"), 30, "page load")
    return tab


def _send(browser: DevTools, tab: str, prompt: str, max_tokens: int) -> dict:
    """Type a prompt, send it, and wait until the page reports the answer or an error."""
    browser.eval(tab, f"""
        document.getElementById('prompt').value = {json.dumps(prompt)};
        document.getElementById('max-tokens').value = '{max_tokens}';
        document.getElementById('send').click();""")
    return _wait_for(lambda: browser.eval(tab, "(u => (u.done || u.error) && u)(window.optimusUI)"), 120,
                     "answer or error")


# A canvas of 8 over a 6-token request whose answer is 2 tokens: end-of-text fills positions
# 2-5 and position 4-5 commit in a later step; 6-7 (past max_tokens) are never decoded.
SCRIPTED_FRAMES = [
    {"type": "start", "request_id": "ui-x", "prompt_tokens": 3, "max_tokens": 6, "canvas": 8,
     "block_size": 4, "block_phase": 0},
    {"type": "commit", "step": 1, "chunk": [0, 4], "positions": [0, 1, 2, 3],
     "tokens": ["a", "b", "<eos>", "<eos>"], "t": 0.01},
    {"type": "text", "text": "ab", "n": 2},
    {"type": "commit", "step": 2, "chunk": [4, 8], "positions": [4, 5], "tokens": ["<eos>", "<eos>"], "t": 0.02},
    {"type": "done", "finish_reason": "stop", "text": "ab", "elapsed_s": 0.03, "steps": 2,
     "tokens_committed": 6, "tokens_computed": 8, "tokens_per_step": 3.0, "chunk_sizes": {"4": 2}},
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_page_counts_only_answer_tokens_and_clears_the_masks_when_done(server, tmp_path):
    sse = "".join(f"data: {json.dumps(frame)}\n\n" for frame in SCRIPTED_FRAMES)
    browser = DevTools(tmp_path / "profile")
    try:
        tab = _open_page(browser, server)
        # The page reads /ui/generate through fetch: serve it this scripted stream instead.
        browser.eval(tab, f"""(() => {{
            const real = window.fetch;
            window.fetch = (url, opts) => url === '/ui/generate'
              ? Promise.resolve(new Response({json.dumps(sse)},
                  {{status: 200, headers: {{'Content-Type': 'text/event-stream'}}}}))
              : real(url, opts);
        }})()""")
        state = _send(browser, tab, "scripted", 6)
        assert state["error"] is None, state["error"]
        dom = browser.eval(tab, """({
            masked: document.querySelectorAll('#canvas .cell.masked').length,
            after: document.querySelectorAll('#canvas .cell.after-answer').length,
            status: document.getElementById('canvas-status').textContent,
            meta: document.querySelector('.msg.assistant .meta').textContent})""")
    finally:
        browser.close()
    assert state["committed"] == 2 and state["afterAnswer"] == 4  # the padding is not answer
    assert dom["masked"] == 0 and dom["after"] == 6
    assert dom["status"].startswith("2 committed · 0 masked · 2 steps"), dom["status"]
    assert "2 tokens in 2 steps (1.00 per step)" in dom["meta"], dom["meta"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_page_asks_for_the_api_key_on_401(keyed_server, tmp_path):
    browser = DevTools(tmp_path / "profile")
    try:
        tab = _open_page(browser, keyed_server)
        state = _send(browser, tab, "hello", 8)
        opened = browser.eval(tab, """({
            open: document.getElementById('api-key-box').open,
            focused: document.activeElement && document.activeElement.id,
            shown: document.querySelector('.msg.error').textContent})""")
        assert "needs an API key" in state["error"] and "{" not in state["error"]
        assert opened == {"open": True, "focused": "api-key", "shown": state["error"]}
        browser.eval(tab, "document.getElementById('api-key').value = 'wrong'")
        assert "did not accept" in _send(browser, tab, "hello", 8)["error"]
        browser.eval(tab, "document.getElementById('api-key').value = 'sesame'")
        state = _send(browser, tab, "hello", 8)
    finally:
        browser.close()
    assert state["error"] is None and state["done"]
