"""``ReplicaSetClient``: the ``EngineClient`` of the ingress, over N engine replicas on Ray Serve.

Each replica is its own single-replica Ray Serve deployment, so a request and its abort reach
the same engine (one deployment of N replicas would let Ray pick a replica per call). Server
code sees one engine: the tokenizer, spec and limits come from a replica's ``info()``.

Invariants:
- every request routed to a replica ends, before ``generate`` returns or raises, with its
  stream finished, refused, or let go of (stream cancelled and ``abort`` sent), and the
  replica's ``in_flight`` count released;
- a replica lost mid-request (its actor died or stopped answering): a request that has yielded
  no answer token yet (nor, for the web page, a commit event) is sent to another replica, which
  starts it over (``retries``); one that has yielded some ends with
  ``EngineDeadError`` (a new engine cannot resume it), which the server turns into its
  ``engine_dead`` error envelope (an error frame in a stream);
- a status poll every ``poll_s`` keeps each replica's load and metrics snapshot and whether it
  is up; Ray Serve replaces a dead or unhealthy replica and the poll brings it back in;
- ``alive`` stays True: replicas are restarted by Ray, and while none is up a request gets 503
  ``engine_dead`` with Retry-After, not a server exit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ray.exceptions import RayError, RayTaskError

from optimus.config import EngineConfig
from optimus.core.errors import EngineDeadError, QueueFullError, RequestFailedError
from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams
from optimus.core.scoring import ScoreRequest, ScoreResult
from optimus.engine.model_facts import ModelFactsView
from optimus.engine.stats import EngineMetrics
from optimus.replicas.messages import Rebuild, Refusal, ReplicaInfo, ReplicaStatus
from optimus.replicas.routing import ReplicaView, Router, merged_metrics

log = logging.getLogger("optimus.server")

_REFUSED_BACKOFF_S = 0.25  # a replica that answered queue_full is skipped this long
_ABORT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplicaSample:
    """One replica's series for ``/metrics`` (labelled ``replica=name``)."""

    name: str
    up: bool
    metrics: EngineMetrics
    routed: int
    in_flight: int
    lost: int


class ReplicaSetClient(ModelFactsView):
    def __init__(self, config: EngineConfig, deployer, poll_s: float = 0.2, status_timeout_s: float = 2.0) -> None:
        """``deployer``: ``async deploy() -> list[ReplicaView]`` and ``async teardown()``."""
        self.config = config
        self.ready = False
        self.alive = True
        self.on_dead: Callable[[], None] | None = None
        self.retries = 0  # requests sent again to another replica after theirs was lost
        self._deployer = deployer
        self._router = Router()
        self._info: ReplicaInfo | None = None
        self._owners: dict[str, ReplicaView] = {}  # request id -> the replica holding it
        self._admitting = True
        self._poll_s, self._status_timeout_s = poll_s, status_timeout_s
        self._poller: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # ---- what the server reads (model facts: ModelFactsView) ----------------------------
    @property
    def replicas(self) -> list[ReplicaView]:
        return self._router.replicas

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Deploy the replicas (each loads the model), read one's ``info()``, start polling."""
        views = await self._deployer.deploy()
        self._router.replicas = list(views)
        self._info = await views[0].handle.info.remote()
        await asyncio.gather(*(self._poll_one(v) for v in views))
        self._poller = asyncio.create_task(self._poll_forever(), name="optimus-replica-poll")
        self.ready = True
        log.info("%d engine replicas up: %s", self._router.up_count(), ", ".join(v.name for v in views))

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._owners and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._owners):
            self.abort(request_id)
        while self._owners and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.ready = False
        await self._deployer.teardown()

    def mark_dead(self, why: str) -> None:
        """The server's watchdog never fires here (no step start is reported): each replica's
        health check watches its own steps and Ray Serve replaces a hung replica."""
        log.error("watchdog: %s (replicas watch their own steps)", why)

    # ---- requests ----------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       group: str | None = None, events: bool = False) -> AsyncIterator[RequestOutput]:
        """As ``AsyncEngine.generate``, on the least loaded replica; refusals raise before any output."""
        self._check_admitting()
        if request_id in self._owners:
            raise ValueError(f"duplicate request id {request_id!r}")
        tried: list[ReplicaView] = []
        delivered = False
        try:
            while True:
                view = self._router.pick(time.monotonic(), tried)
                tried.append(view)
                rebuild = Rebuild(request_id, tuple(prompt_token_ids))  # a retry starts over
                self._owners[request_id] = view
                view.in_flight += 1
                view.routed += 1
                stream = view.handle.options(method_name="generate", stream=True).remote(
                    request_id, list(prompt_token_ids), params, group, events)
                settled = False  # nothing left to abort on the replica
                lost = False
                try:
                    async for item in stream:
                        if isinstance(item, Refusal):
                            settled = True
                            if item.kind == "queue_full" and not delivered:
                                view.refused_until = time.monotonic() + _REFUSED_BACKOFF_S
                                break  # another replica may have room
                            raise item.error()
                        output = rebuild.apply(item)
                        settled = output.finished
                        # an output with no answer token and no commit event yet (a diffusion
                        # step that committed later positions only) leaves nothing to resume
                        delivered = delivered or bool(output.token_ids or output.events)
                        yield output
                        if settled:
                            return
                    else:
                        settled = lost = True
                        self._lost(view, "its stream ended before the request finished")
                except RayTaskError as exc:  # the replica's code raised: this request fails alone
                    settled = True
                    log.error("replica %s failed request %s", view.name, request_id, exc_info=exc)
                    raise RequestFailedError("internal error while decoding this request") from None
                except RayError as exc:  # the replica died or stopped answering
                    settled = lost = True
                    self._lost(view, f"{type(exc).__name__}")
                finally:
                    view.in_flight -= 1
                    if not settled:  # the consumer went away (client disconnect): free its pages
                        stream.cancel()
                        self._send_abort(view, request_id)
                if delivered:
                    raise EngineDeadError("the replica serving this request stopped")
                self.retries += lost
        finally:
            self._owners.pop(request_id, None)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Likelihoods on the least loaded replica; a lost replica's call is retried on another."""
        self._check_admitting()
        tried: list[ReplicaView] = []
        while True:
            view = self._router.pick(time.monotonic(), tried)
            tried.append(view)
            view.in_flight += 1
            view.routed += 1
            response = view.handle.score.remote(request)
            try:
                result = await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except RayTaskError as exc:
                log.error("replica %s failed a scoring request", view.name, exc_info=exc)
                raise RequestFailedError("internal error while scoring this request") from None
            except RayError as exc:
                self._lost(view, f"{type(exc).__name__}")
                self.retries += 1
                continue
            finally:
                view.in_flight -= 1
            if isinstance(result, Refusal):
                if result.kind == "queue_full":
                    view.refused_until = time.monotonic() + _REFUSED_BACKOFF_S
                    continue
                raise result.error()
            return result

    def abort(self, request_id: str) -> None:
        view = self._owners.get(request_id)
        if view is not None:
            self._send_abort(view, request_id)

    def metrics(self) -> EngineMetrics:
        return merged_metrics(self._router.replicas) if self.ready else EngineMetrics()

    def replica_metrics(self) -> list[ReplicaSample]:
        """Per-replica series for ``/metrics`` (``server/metrics.py`` reads this when present)."""
        return [ReplicaSample(v.name, v.up, v.status.metrics if v.up and v.status else EngineMetrics(),
                              v.routed, v.in_flight, v.lost) for v in self._router.replicas]

    # ---- helpers -----------------------------------------------------------------------
    def _check_admitting(self) -> None:
        if not self.ready:
            raise EngineDeadError("the engine replicas are not running")
        if not self._admitting:
            raise QueueFullError("the server is shutting down and admits no new requests")

    def _lost(self, view: ReplicaView, why: str) -> None:
        if view.up:
            log.warning("replica %s lost (%s); routing to the others until Ray Serve replaces it", view.name, why)
            view.lost += 1
        view.up = False

    def _send_abort(self, view: ReplicaView, request_id: str) -> None:
        self._spawn(_quietly(view.handle.abort.remote(request_id), _ABORT_TIMEOUT_S))

    def _spawn(self, awaitable) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await asyncio.gather(*(self._poll_one(v) for v in self._router.replicas))

    async def _poll_one(self, view: ReplicaView) -> None:
        response = view.handle.status.remote()
        try:
            status: ReplicaStatus = await asyncio.wait_for(_awaited(response), self._status_timeout_s)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except (asyncio.TimeoutError, Exception) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                response.cancel()
            self._lost(view, "status poll: " + (type(exc).__name__ or "timeout"))
            return
        view.status = status
        if status.ready and not view.up:
            log.info("replica %s up (pid %d)", view.name, status.pid)
        elif not status.ready:
            self._lost(view, "its engine is not ready")
        view.up = status.ready


async def _awaited(response):
    return await response


async def _quietly(response, timeout: float) -> None:
    try:
        await asyncio.wait_for(_awaited(response), timeout)
    except (Exception, asyncio.TimeoutError):
        pass
