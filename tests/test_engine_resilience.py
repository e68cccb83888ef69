"""Failure isolation in the engine: a request whose own code raises ends alone, a step that raises
ends the requests it ran (waiting ones are kept, pages are reclaimed), and an engine whose steps
keep failing is declared dead instead of looping."""

from __future__ import annotations

import asyncio
import time

import pytest

from optimus.config import engine_config
from optimus.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError
from optimus.engine.engine import Engine
from optimus.core.params import SamplingParams
from fixtures.engine import tiny_loaded


def _engine(family: str = "sdar", **kw) -> Engine:
    config = engine_config(policy="fixed:4", device="cpu", num_pages=64, page_size=4, block_size=8, **kw)
    return Engine(config, loaded=tiny_loaded(family))


def _run(engine: Engine, max_steps: int = 500) -> dict:
    finished = {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_work():
            return finished
    raise AssertionError("the engine did not finish its requests")


@pytest.mark.parametrize("bad", [999999, 384, -1, -99999, 10**30])
def test_stop_token_ids_outside_the_vocabulary_are_refused_at_admission(bad):
    engine = _engine()
    assert engine.spec.arch.vocab_size == 384
    params = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(bad,))
    with pytest.raises(ValueError, match=r"^stop_token_ids: token id"):
        engine.add_request("a", [1, 2, 3], params)
    assert not engine.has_work()


def test_a_request_whose_sampling_raises_ends_alone(monkeypatch):
    engine = _engine()
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.add_request("bad", [4, 5, 6], SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.7))
    import optimus.engine.postprocess as engine_module

    real = engine_module.propose

    def propose(logits, params, generator):
        if params.temperature > 0:
            raise IndexError("simulated failure in one request's sampling")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "propose", propose)
    done = _run(engine)
    assert done["bad"].finish_reason == "error"
    assert done["ok"].finish_reason == "length" and len(done["ok"].token_ids) == 12
    assert engine.allocator.used_pages == 0


def test_a_request_whose_stop_check_raises_ends_alone(monkeypatch):
    engine = _engine()
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.add_request("bad", [4, 5, 6], SamplingParams(max_tokens=10, ignore_eos=True, stop=("zz",)))
    real = engine.post.settler.text

    def text(r, ids):
        if r.request_id == "bad":
            raise TypeError("simulated detokenizer failure")
        return real(r, ids)

    monkeypatch.setattr(engine.post.settler, "text", text)
    done = _run(engine)
    assert done["bad"].finish_reason == "error"
    assert done["ok"].finish_reason == "length" and len(done["ok"].token_ids) == 10


def test_a_failed_step_ends_its_requests_keeps_the_queue_and_reclaims_pages(monkeypatch):
    engine = _engine(max_running=2)
    for rid in ("r0", "r1", "w0", "w1"):
        engine.add_request(rid, [1, 2, 3, 4, 5], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # r0 and r1 run; w0 and w1 wait
    assert [r.request_id for r in engine.scheduler.running] == ["r0", "r1"]
    real_run = engine.runner.run
    calls = {"n": 0}

    def failing_run(plan, feed=None, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real_run(plan, feed, **kw)

    monkeypatch.setattr(engine.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    engine.allocator._in_use.add(63)  # a page nobody owns any more: recovery must find it
    ended = engine.recover(RuntimeError("simulated device failure"))
    assert sorted((o.request_id, o.finish_reason) for o in ended) == [("r0", "error"), ("r1", "error")]
    assert engine.allocator.used_pages == 0 and engine.allocator.free_pages == 64
    done = _run(engine)
    assert {rid: o.finish_reason for rid, o in done.items()} == {"w0": "length", "w1": "length"}
    assert all(len(o.token_ids) == 8 for o in done.values())


def _async_engine(**kw) -> AsyncEngine:
    return AsyncEngine(engine_config(policy="fixed:4", device="cpu", num_pages=64, page_size=4, block_size=8, **kw),
                       loaded=tiny_loaded("sdar"))


async def _collect(engine: AsyncEngine, rid: str, params: SamplingParams):
    last = None
    async for out in engine.generate(rid, [1, 2, 3], params):
        last = out
    return last


def test_async_engine_survives_a_failed_step_and_serves_the_next_request():
    async def main():
        engine = _async_engine()
        await engine.start()
        inner, real_step = engine.engine, engine.engine.step
        fail_once = {"armed": True}

        def step():
            if fail_once["armed"] and inner.scheduler.running:
                fail_once["armed"] = False
                raise RuntimeError("simulated step failure")
            return real_step()

        inner.step = step
        try:
            with pytest.raises(RequestFailedError) as failed:
                await _collect(engine, "first", SamplingParams(max_tokens=8, ignore_eos=True))
            assert "simulated" not in str(failed.value)  # the cause stays in the log
            out = await _collect(engine, "second", SamplingParams(max_tokens=8, ignore_eos=True))
            assert out.finish_reason == "length" and len(out.token_ids) == 8 and engine.alive
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_async_engine_whose_steps_keep_failing_is_declared_dead():
    async def main():
        engine = _async_engine()
        await engine.start()
        died = asyncio.Event()
        engine.on_dead = died.set

        def step():
            raise RuntimeError("simulated persistent failure")

        engine.engine.step = step
        try:
            for i in range(3):  # each failed step ends the request it ran
                with pytest.raises((RequestFailedError, EngineDeadError)):
                    await _collect(engine, f"r{i}", SamplingParams(max_tokens=4))
            await asyncio.wait_for(died.wait(), 5)
            assert not engine.alive
            with pytest.raises(EngineDeadError):
                await _collect(engine, "after", SamplingParams(max_tokens=4))
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_async_engine_refuses_at_once_what_does_not_fit():
    async def main():
        engine = _async_engine(max_running=1, max_waiting=1)
        await engine.start()
        try:
            with pytest.raises(ValueError, match="^stop_token_ids"):
                await _collect(engine, "bad", SamplingParams(max_tokens=4, stop_token_ids=(999999,)))
            assert not engine.engine.has_work()  # refused before the loop thread saw it
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_async_engine_refuses_a_full_queue_at_once():
    """Running slots plus waiting places bound what is accepted; the next request is refused on
    the event loop, before the loop thread (which may be inside a long step) sees it."""
    async def main():
        engine = _async_engine(max_running=2, max_waiting=1)
        await engine.start()
        release = asyncio.Event()
        real_step = engine.engine.step

        def slow_step():  # a step that lasts until the test says so
            while not release.is_set():
                time.sleep(0.01)
            return real_step()

        engine.engine.step = slow_step
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        accepted = [asyncio.create_task(_collect(engine, f"r{i}", params)) for i in range(3)]
        await asyncio.sleep(0.1)  # the three are submitted; the loop thread is stuck in a step
        try:
            with pytest.raises(QueueFullError):  # at once: a refusal that waited for the step would time out
                await asyncio.wait_for(_collect(engine, "one-too-many", params), 2)
            release.set()
            outs = await asyncio.wait_for(asyncio.gather(*accepted), 30)
            assert [len(o.token_ids) for o in outs] == [4, 4, 4]
        finally:
            release.set()
            await engine.shutdown()

    asyncio.run(main())
