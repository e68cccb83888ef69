"""The engine process and its client without HTTP: a ``RemoteEngine`` in this test's event loop,
the test playing the supervisor on the pipe. Answers equal the in-process engine's token for
token and text for text (the front-end detokenizes), scores equal ``score_now``'s, an abort
frees the pages within a step, a forwarded method is one line, and a lost engine's unanswered request survives its restart."""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile

import pytest

from optimus.config import engine_config
from optimus.core.errors import EngineDeadError
from optimus.core.params import SamplingParams
from optimus.core.scoring import ScoreRequest
from optimus.engine.scoring import score_now
from optimus.engine.core_proc import EngineProcSpec, engine_process_main
from optimus.engine.llm import LLM
from optimus.engine.remote import RemoteEngine, forwarded

SPAWN = multiprocessing.get_context("spawn")


class Client(RemoteEngine):
    has_work = forwarded("has_work")  # a new engine method reaches the engine process: one line


class Engines:
    """Starts engine processes (epoch 0, 1, ...) for one RemoteEngine, as the supervisor would."""

    def __init__(self, config) -> None:
        self.config = config
        self.ipc_dir = tempfile.mkdtemp(prefix="optimus-test-ipc-")
        self.mine, theirs = SPAWN.Pipe()
        self.client = Client(config, self.ipc_dir, 0, theirs)
        self.procs: list = []
        self.status: list = []

    def start(self) -> None:
        epoch = len(self.procs)
        status, conn = SPAWN.Pipe(duplex=False)
        self.status.append(status)  # the engine tells the supervisor "ready" on it
        proc = SPAWN.Process(target=engine_process_main, args=(EngineProcSpec(self.config, self.ipc_dir, epoch, 1),
                                                               conn))
        proc.start()
        self.procs.append(proc)
        self.mine.send(("engine", epoch, proc.pid))

    def close(self) -> None:
        self.client.close()
        for proc in self.procs:
            proc.kill()
            proc.join()


@pytest.fixture
def engines(tiny_checkpoint):
    config = engine_config(model=str(tiny_checkpoint("sdar")), device="cpu", num_pages=64, policy="fixed:4")
    e = Engines(config)
    yield e
    e.close()


async def _collect(client, rid: str, prompt: list[int], params: SamplingParams):
    outs = [out async for out in client.generate(rid, prompt, params)]
    return outs


def test_answers_equal_the_in_process_engine_and_a_forwarded_call_works(engines):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = [SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=9, stop=("a",))]
    llm = LLM(engines.config.model.model, device="cpu", num_pages=64, policy="fixed:4")
    reference = llm.generate(prompts, params)
    scoring = ScoreRequest(sequences=((5, 6, 7, 8, 9, 10),), context_lens=(3,), top_n=2)
    e, sc = llm.engine, llm.engine.config.scheduler
    expected = score_now(scoring, e.loaded.model, e.spec, samples=e.config.likelihood_samples, seed=e.config.seed,
                         budget=sc.max_tokens_per_step, block=e.block_size)

    async def main():
        engines.start()
        await engines.client.start()
        runs = await asyncio.gather(*(_collect(engines.client, f"r{i}", p, sp)
                                      for i, (p, sp) in enumerate(zip(prompts, params))))
        with pytest.raises(ValueError, match="sequence 0"):  # refused at once, as in-process
            await engines.client.score(ScoreRequest(sequences=((5, 10**6),), context_lens=(1,)))
        return runs, await engines.client.has_work(), await engines.client.score(scoring)

    runs, busy, scored = asyncio.run(asyncio.wait_for(main(), 120))
    assert scored.method == expected.method and scored.sequences[0].top_ids == expected.sequences[0].top_ids
    assert scored.sequences[0].logprobs == pytest.approx(expected.sequences[0].logprobs, abs=1e-5)
    for outs, ref in zip(runs, reference):
        final = outs[-1]
        assert final.finished and (final.token_ids, final.text, final.finish_reason) == (
            ref.token_ids, ref.text, ref.finish_reason)
        assert final.stats.steps == ref.stats.steps and final.stats.arrival_time > 0
        assert all(len(a.token_ids) <= len(b.token_ids) for a, b in zip(outs, outs[1:]))
    assert busy is False


def test_an_abort_frees_the_pages_within_a_step(engines):
    async def main():
        engines.start()
        await engines.client.start()
        stream = engines.client.generate("long", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        first = await stream.__anext__()
        for _ in range(40):  # the next metrics snapshot (every 0.1 s) shows the request's pages
            await asyncio.sleep(0.05)
            if engines.client.metrics().kv_usage > 0:
                break
        used = engines.client.metrics().kv_usage
        engines.client.abort("long")
        last = [out async for out in stream][-1]
        await asyncio.sleep(0.3)  # three metrics periods
        return first, used, last, engines.client.metrics(), await engines.client.has_work()

    first, used, last, metrics, busy = asyncio.run(asyncio.wait_for(main(), 120))
    assert not first.finished and used > 0
    assert last.finish_reason == "abort" and len(last.token_ids) < 200
    assert metrics.kv_usage == 0 and metrics.running == 0 and busy is False


def test_a_request_without_output_survives_a_restart_and_one_with_output_fails(engines):
    async def main():
        client = engines.client
        engines.start()
        await client.start()
        seen = client.generate("seen", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
        await seen.__anext__()
        client.ready = False  # hold the next one here, as if it were still queued when the engine died
        waiting = asyncio.ensure_future(_collect(client, "waiting", [8, 9], SamplingParams(max_tokens=6)))
        await asyncio.sleep(0.05)
        engines.procs[0].kill()
        engines.mine.send(("engine_lost", 0, True))
        with pytest.raises(EngineDeadError):
            async for _ in seen:
                pass
        engines.start()
        return await asyncio.wait_for(waiting, 60)

    outs = asyncio.run(asyncio.wait_for(main(), 120))
    assert outs[-1].finished and outs[-1].finish_reason in ("length", "stop")
