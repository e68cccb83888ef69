"""Echo + logprobs on /v1/completions, /tokenizer_info and /tokenize as lm-eval's
``local-completions`` uses them, in-process over the real engine on tiny random checkpoints;
and scoring jobs running in the engine loop while generations decode."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from fastapi.testclient import TestClient

from fixtures import make_tiny_checkpoint
from optimus.config import ServerConfig, engine_config
from optimus.core.params import SamplingParams
from optimus.core.scoring import ScoreRequest
from optimus.engine import scoring as scoring_module
from optimus.engine.async_engine import AsyncEngine, RequestFailedError
from optimus.engine.scoring import score_now
from optimus.reference.adapter import ModelCall
from optimus.server.app import build_app

BASE = "http://127.0.0.1:8000"
PROMPT = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]


def _engine(path, **overrides) -> AsyncEngine:
    policy = overrides.pop("policy", "fixed:4")
    return AsyncEngine(engine_config(model=str(path), device="cpu", dtype="float32", policy=policy, num_pages=128,
                                     likelihood_samples=overrides.pop("likelihood_samples", 8), **overrides))


def _client(engine: AsyncEngine, **server) -> TestClient:
    client = TestClient(build_app(engine, ServerConfig(**server)), base_url=BASE, raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 30
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the engine did not start"
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    return {family: make_tiny_checkpoint(root / family, family) for family in ("llama", "sdar")}


@pytest.fixture(scope="module")
def causal(checkpoints):
    engine = _engine(checkpoints["llama"], policy="ar")
    client = _client(engine)
    yield client, engine
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def diffusion(checkpoints):
    engine = _engine(checkpoints["sdar"], max_tokens_per_step=256)
    client = _client(engine)
    yield client, engine
    client.__exit__(None, None, None)


@torch.no_grad()
def _log_softmax(engine: AsyncEngine, tokens: list[int]) -> torch.Tensor:
    """[L, V]: row i is the model's log-distribution of token i + 1."""
    logits, _ = ModelCall(engine.engine.loaded.model)(torch.tensor([tokens]))
    return logits[0].float().log_softmax(-1)


def _piece(tokenizer, token: int) -> str:
    """A token's text in logprobs: its decode, or its vocabulary entry when the decode is a
    partial character (U+FFFD), which would merge alternatives."""
    text = tokenizer.decode([token], skip_special_tokens=False)
    return tokenizer.id_to_token(token) if "\ufffd" in text else text


def _completion(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_causal_loglikelihood_over_the_api_is_the_models_log_softmax(causal):
    client, engine = causal
    ref = _log_softmax(engine, PROMPT)
    choice = _completion(client, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "length" and len(lp["tokens"]) == len(PROMPT)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [ref[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    tokenizer = engine.tokenizer
    for i in range(1, len(PROMPT)):
        top = ref[i - 1].topk(3)
        expected = {_piece(tokenizer, t): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        expected[lp["tokens"][i]] = want[i - 1]  # the token itself is always listed (vLLM's rule)
        assert lp["top_logprobs"][i] == pytest.approx(expected, abs=1e-4)
        assert list(lp["top_logprobs"][i].values()) == sorted(lp["top_logprobs"][i].values(), reverse=True)
    # text_offset: each token's text starts at its offset, and the pieces make up the echoed text
    text, offsets = choice["text"], lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert "".join(text[a:b] for a, b in zip(offsets, offsets[1:] + [len(text)])) == text
    for token, offset in zip(lp["tokens"], offsets):
        assert text[offset:offset + len(token)] == token


def test_lm_eval_loglikelihood_payload_with_generation(causal):
    """lm-eval sends echo + logprobs 1 + max_tokens 1 and sums token_logprobs[ctxlen:-1]."""
    client, engine = causal
    ctxlen = 7
    ref = _log_softmax(engine, PROMPT)
    body = _completion(client, model=None, prompt=[PROMPT, PROMPT[:9]], echo=True, logprobs=1, max_tokens=1,
                       temperature=0, seed=1234)
    first = body["choices"][0]["logprobs"]
    assert len(first["tokens"]) == len(PROMPT) + 1
    greedy = int(ref[-1].argmax())
    assert first["top_logprobs"][-1] == pytest.approx({first["tokens"][-1]: ref[-1, greedy].item()}, abs=1e-4)
    total = sum(first["token_logprobs"][ctxlen:-1])
    assert total == pytest.approx(sum(ref[i - 1, PROMPT[i]].item() for i in range(ctxlen, len(PROMPT))), abs=1e-3)
    second = body["choices"][1]["logprobs"]
    assert second["token_logprobs"][1:9] == pytest.approx(first["token_logprobs"][1:9], abs=1e-5)


def test_the_stop_token_that_ended_a_completion_is_scored(causal):
    """A completion cut by its stop token still reports that token (not in the text), so a
    caller that drops the last entry as the generated one drops the right one."""
    client, engine = causal
    greedy = int(_log_softmax(engine, PROMPT)[-1].argmax())
    choice = _completion(client, prompt=PROMPT, echo=True, logprobs=0, max_tokens=3, temperature=0,
                         stop_token_ids=[greedy])["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["tokens"]) == len(PROMPT) + 1
    assert choice["logprobs"]["text_offset"][-1] == len(choice["text"])


def test_logprobs_without_echo_and_string_prompts(causal):
    client, engine = causal
    body = _completion(client, prompt=["the quick brown fox", "hello world"], logprobs=2, max_tokens=3,
                       temperature=0, ignore_eos=True)
    for choice, prompt in zip(body["choices"], ["the quick brown fox", "hello world"]):
        ids = engine.tokenizer.encode(prompt)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == 3 and None not in lp["token_logprobs"]
        answer = []  # greedy decoding, by hand
        for _ in range(3):
            answer.append(int(_log_softmax(engine, ids + answer)[-1].argmax()))
        assert lp["tokens"] == [_piece(engine.tokenizer, t) for t in answer]
        ref = _log_softmax(engine, ids + answer)
        want = [ref[len(ids) - 1 + k, answer[k]].item() for k in range(3)]
        assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    echo = _completion(client, prompt="hello world", echo=True, max_tokens=2, temperature=0, ignore_eos=True)
    assert echo["choices"][0]["text"].startswith("hello world") and echo["choices"][0]["logprobs"] is None


def test_diffusion_prompt_tokens_are_chained_and_the_completion_estimated_given_the_prompt(diffusion, monkeypatch):
    client, engine = diffusion
    seen = []
    score = engine.score

    async def recording(request):
        seen.append((request, await score(request)))
        return seen[-1][1]

    monkeypatch.setattr(engine, "score", recording)
    payload = dict(prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, temperature=0, ignore_eos=True, seed=5)
    a = _completion(client, **payload)["choices"][0]["logprobs"]
    assert _completion(client, **payload)["choices"][0]["logprobs"] == a  # reproducible
    request, result = seen[0]
    (prompt, full), (ctx_prompt, ctx_full) = request.sequences, request.context_lens
    assert prompt == tuple(PROMPT) and ctx_prompt == 1 and request.chained == (True, False)
    assert full[:len(PROMPT)] == tuple(PROMPT) and len(full) == len(PROMPT) + 3 and ctx_full == len(PROMPT)
    assert a["token_logprobs"] == [None, *result.sequences[0].logprobs, *result.sequences[1].logprobs]
    spec, model = engine.spec, engine.engine.loaded.model
    chained = score_now(ScoreRequest((tuple(PROMPT),), (1,), chained=(True,)), model, spec, samples=8).sequences[0]
    estimate = score_now(ScoreRequest((full,), (len(PROMPT),), seed=5), model, spec, samples=8,
                         block=engine.engine.block_size).sequences[0]
    assert a["token_logprobs"][1:len(PROMPT)] == pytest.approx(chained.logprobs, abs=1e-5)
    assert a["token_logprobs"][len(PROMPT):] == pytest.approx(estimate.logprobs, abs=1e-5)
    for value, top in zip(a["token_logprobs"][1:], a["top_logprobs"][1:]):
        assert max(top.values()) >= value  # is_greedy in lm-eval compares on this one scale


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": -1, "max_tokens": 0}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 1, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "stream": True, "max_tokens": 1}, "echo"),
    ("/v1/completions", {"prompt": [PROMPT, [5] * 300], "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt.1"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 1, "max_tokens": 150, "ignore_eos": True}, "prompt"),
])
def test_refusals_are_400_with_a_message(diffusion, path, body, param):
    client, _ = diffusion
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if param == "prompt":  # the completion's estimate: 162 clean + 150 noised tokens in one forward > 256
        assert "--max-tokens-per-step" in error["message"] and error["code"] == "context_length_exceeded"


def test_tokenizer_info_and_tokenize_as_lm_eval_reads_them(diffusion):
    client, engine = diffusion
    info = client.get("/tokenizer_info").json()
    tokenizer = engine.tokenizer
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (info["eos_token"], info["pad_token"], info["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert info["model_max_length"] == engine.max_model_len and "<|im_start|>" in info["chat_template"]
    assert info["added_tokens_decoder"][str(tokenizer.token_to_id("<|MASK|>"))] == "<|MASK|>"
    # RemoteTokenizer.eos_token_id: /tokenize of the eos string without special tokens
    r = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False,
                                       "return_token_strs": True}).json()
    assert r["tokens"] == [tokenizer.eos_token_id] and r["token_strs"] == ["<|im_end|>"]
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "<|im_end|>"}


def test_tokenizer_info_is_behind_the_key_and_the_host_and_origin_checks(checkpoints):
    client = _client(_engine(checkpoints["sdar"]), api_key="k")
    try:
        assert client.get("/tokenizer_info").status_code == 401
        key = {"Authorization": "Bearer k"}
        assert client.get("/tokenizer_info", headers=key).status_code == 200
        assert client.get("/tokenizer_info", headers={**key, "Host": "evil.example"}).status_code == 400
        assert client.get("/tokenizer_info", headers={**key, "Origin": "http://evil.example"}).status_code == 403
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------- the engine loop

async def _generate(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int) -> tuple[tuple, float]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    last = None
    async for out in engine.generate(rid, prompt, params):
        last = out
    return last.token_ids, time.monotonic()


async def _scoring_during_generation(path, policy: str):
    """Generations alone, then again with scoring jobs (many small forwards each) submitted
    while they decode: the tokens must match and the scores equal a direct computation."""
    engine = _engine(path, policy=policy, max_tokens_per_step=64)
    await engine.start()
    try:
        prompts = [PROMPT, PROMPT[:5]]
        alone = [(await _generate(engine, f"a{i}", p, 40))[0] for i, p in enumerate(prompts)]
        request = ScoreRequest((tuple(PROMPT), tuple(PROMPT[:8])), (1, 3), top_n=2, seed=9)
        gens = [asyncio.create_task(_generate(engine, f"b{i}", p, 40)) for i, p in enumerate(prompts)]
        await asyncio.sleep(0)
        scored = await engine.score(request)
        scored_at = time.monotonic()
        together = await asyncio.gather(*gens)
        assert [t for t, _ in together] == alone
        assert scored_at < max(done for _, done in together)  # the scoring really ran between steps
        direct = score_now(request, engine.engine.loaded.model, engine.spec, samples=8, budget=64,
                           block=engine.engine.block_size)
        for got, want in zip(scored.sequences, direct.sequences):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5) and got.top_ids == want.top_ids
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("family,policy", [("llama", "ar"), ("sdar", "fixed:4")])
def test_scoring_between_steps_leaves_generations_unchanged(checkpoints, family, policy):
    asyncio.run(_scoring_during_generation(checkpoints[family], policy))


async def _a_failing_job_fails_alone(path, monkeypatch):
    engine = _engine(path)
    await engine.start()
    original = scoring_module.ScoringJob.advance

    def advance(job):
        if job.seed_used == 666:
            raise RuntimeError("simulated scoring failure")
        return original(job)

    monkeypatch.setattr(scoring_module.ScoringJob, "advance", advance)
    try:
        gen = asyncio.create_task(_generate(engine, "g", PROMPT, 12))
        with pytest.raises(RequestFailedError):
            await engine.score(ScoreRequest((tuple(PROMPT),), (1,), seed=666))
        ok = await engine.score(ScoreRequest((tuple(PROMPT),), (1,), seed=1))
        tokens, _ = await gen
        assert len(tokens) == 12 and len(ok.sequences[0].logprobs) == len(PROMPT) - 1 and engine.alive
    finally:
        await engine.shutdown()


def test_a_failing_scoring_job_fails_only_its_request(checkpoints, monkeypatch):
    asyncio.run(_a_failing_job_fails_alone(checkpoints["sdar"], monkeypatch))
