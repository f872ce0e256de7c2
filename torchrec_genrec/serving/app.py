"""``genrec serve``: an HTTP endpoint over a :class:`~torchrec_genrec.inference.Predictor`.

FastAPI + uvicorn. Requests are validated in the handler (a bad request never reaches a
batch), then queued; one worker gathers up to ``max_batch`` requests or waits
``max_wait_ms`` after the first, runs them as one encoder pass on a single inference
thread, and answers each. Endpoints::

    POST /recommend  {"history": {"items": [...], "actions": [...], "timestamps": [...]},
                      "k": 10, "exclude": [...]}       -> {"items": [...], "scores": [...]}
    POST /score      {"history": {...}, "candidates": [...]}  -> {"scores": [...]}
    POST /rank       (ranker artifacts) {"user": id, "history": {...}, "candidates": [...],
                      "timestamp": t}                    -> {"scores": [...]} (probabilities)
    GET  /healthz    -> {"status": "ok", "model": ...}
    GET  /metrics    -> Prometheus text: requests by endpoint and status, latency, batch sizes

Bad requests get a 4xx with ``{"error": "..."}`` saying what is wrong: malformed JSON
(400), an unknown path (404), a body over ``max_body_bytes`` (413), a body not sent within
``request_timeout_s`` (408), unknown ids, empty or over-long history, ``k`` out of range,
wrong field types (422).

The server's state stays bounded whatever clients send: metrics are labelled by route
template (every unknown path counts under one label), a connection that sends no complete
request head within ``header_timeout_s`` is closed, as is an idle keep-alive connection after
``keep_alive_s``, and a request body must arrive within ``request_timeout_s``.

Example::

    app = create_app(Predictor.load("artifacts/hstu_int8"), ServeConfig(max_batch=64))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from torchrec_genrec.config import ConfigError
from torchrec_genrec.inference.artifact import MANIFEST
from torchrec_genrec.inference.predictor import History, Predictor, RequestError, serving_device
from torchrec_genrec.inference.ranker import RANKER_FORMAT, RankerPredictor

__all__ = ["ServeConfig", "create_app", "guarded_h11_protocol", "serve"]

RawId = Union[StrictInt, StrictStr]


@dataclasses.dataclass
class ServeConfig:
    """Args:
    max_batch (int): most requests answered by one encoder pass.
    max_wait_ms (float): how long the first request of a batch waits for company.
    max_body_bytes (int): larger request bodies get 413.
    max_candidates (int): most candidates one /score request may send.
    header_timeout_s (float): a connection must send a complete request head within this
        long (after it opens, or after its previous response), else it is closed.
    request_timeout_s (float): a request body must arrive within this long, else 408.
    keep_alive_s (int): an idle keep-alive connection is closed after this long.
    threads (int): torch threads for inference (0: torch's default, every core). Fewer
        leave cores to the event loop and to other processes on the machine.
    """

    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_body_bytes: int = 1 << 20
    max_candidates: int = 10000
    header_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    keep_alive_s: int = 5
    threads: int = 0

    def validate(self) -> "ServeConfig":
        """Checks every limit at start-up, naming the option and the allowed range."""
        checks = [("max_batch", self.max_batch >= 1, ">= 1"), ("max_wait_ms", 0 <= self.max_wait_ms <= 10_000,
                                                              "in [0, 10000]"),
                  ("max_body_bytes", 1024 <= self.max_body_bytes <= 1 << 30, "in [1024, 2**30]"),
                  ("max_candidates", self.max_candidates >= 1, ">= 1"),
                  ("header_timeout_s", self.header_timeout_s > 0, "> 0"),
                  ("request_timeout_s", self.request_timeout_s > 0, "> 0"),
                  ("keep_alive_s", self.keep_alive_s >= 1, ">= 1"), ("threads", self.threads >= 0, ">= 0")]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)}")
        return self


class HistoryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: List[RawId]
    actions: Optional[List[Union[StrictInt, StrictFloat]]] = None
    timestamps: Optional[List[StrictInt]] = None


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: HistoryIn
    k: StrictInt = 10
    exclude: List[RawId] = Field(default_factory=list)


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: HistoryIn
    candidates: List[RawId]


class RankIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: RawId
    history: HistoryIn
    candidates: List[RawId]
    timestamp: StrictInt


#: The interpreter's thread switch interval while serving (Python's default is 5 ms).
SWITCH_INTERVAL_S = 0.0005
#: The metrics label of every request whose path matches no route.
UNMATCHED = "unmatched"


class _Metrics:
    def __init__(self) -> None:
        self.routes: set = set()  # known route templates, filled by create_app
        self.registry = CollectorRegistry()
        self.requests = Counter("genrec_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("genrec_request_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch_size = Histogram("genrec_batch_size", "requests per encoder pass", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge("genrec_queue_depth", "requests waiting for a batch", registry=self.registry)

    def endpoint(self, scope: Dict[str, Any]) -> str:
        """The route template a request matched (``/recommend``), or one label for every
        unknown path: labels never grow with what clients send."""
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path is None:
            path = scope.get("path", "")
        return path if path in self.routes else UNMATCHED


def _json_bytes(content: Any) -> bytes:
    """``content`` as JSONResponse renders it (compact, UTF-8, NaN refused)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class _MicroBatcher:
    """Gathers validated requests into batches for one inference thread.

    The thread also renders each answer's JSON body: the event loop then only writes bytes,
    and the requests a batch wakes are released one loop iteration apart, so ``/healthz``
    and new connections are served between them instead of after the whole batch."""

    def __init__(self, runners: Dict[str, Any], config: ServeConfig, metrics: _Metrics) -> None:
        # kind -> f(prepared requests, their arguments) -> one JSON-able answer per request
        self.runners = runners
        self.config = config
        self.metrics = metrics
        self.queue: Optional[asyncio.Queue] = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="genrec-infer")
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, kind: str, prepared: Any, arg: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((kind, prepared, arg, future))
        self.metrics.queue.set(self.queue.qsize())
        return await future

    def _infer(self, batch: List[Tuple[str, Any, Any, asyncio.Future]]) -> List[Any]:
        results: List[Any] = [None] * len(batch)
        for kind, answer in self.runners.items():
            mine = [i for i, item in enumerate(batch) if item[0] == kind]
            if mine:
                for i, result in zip(mine, answer([batch[i][1] for i in mine], [batch[i][2] for i in mine])):
                    results[i] = _json_bytes(result)
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.config.max_wait_ms / 1000.0
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + wait
            while len(batch) < self.config.max_batch:
                remaining = deadline - loop.time()
                try:
                    item = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(item)
            self.metrics.queue.set(self.queue.qsize())
            self.metrics.batch_size.observe(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self._infer, batch)
            except Exception as e:  # noqa: BLE001 - answered as 500 to each waiting request
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (*_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
                    await asyncio.sleep(0)  # one woken request per loop iteration: I/O is polled between


def _json_response(body: bytes) -> Response:
    return Response(content=body, media_type="application/json")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _describe(errors: List[Dict[str, Any]]) -> Tuple[int, str]:
    """A pydantic error list -> (status, one readable line)."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return 422, "; ".join(parts)


class _BodyLimit:
    """ASGI middleware: reads at most ``limit`` bytes of a request body, else 413, within
    ``timeout`` seconds, else 408."""

    def __init__(self, app: Any, limit: int, metrics: _Metrics, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.timeout = timeout

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not too_big:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                response = _error(408, f"request body not received within {self.timeout:g} s")
                self.metrics.requests.labels(self.metrics.endpoint(scope), "408").inc()
                await response(scope, receive, send)
                return
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.limit
            if not message.get("more_body"):
                break
        if too_big:
            response = _error(413, f"request body over {self.limit} bytes")
            self.metrics.requests.labels(self.metrics.endpoint(scope), "413").inc()
            await response(scope, receive, send)
            return
        body, sent = b"".join(chunks), False

        async def replay() -> Dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(predictor: Union[Predictor, RankerPredictor], config: Optional[ServeConfig] = None) -> Any:
    """The FastAPI application serving ``predictor`` (see the module docstring).

    Args:
        predictor (Union[Predictor, RankerPredictor]): a loaded artifact: retrieval
            (``/recommend``, ``/score``) or ranking (``/rank``).
        config (Optional[ServeConfig]): batching and request limits.

    Returns:
        the ASGI app (FastAPI behind a body-size limit); run it with uvicorn.
    """
    config = (config or ServeConfig()).validate()
    metrics = _Metrics()
    ranking = isinstance(predictor, RankerPredictor)
    def recommend_answers(prepared: List[Any], ks: List[int]) -> List[Dict[str, Any]]:
        return [{"items": rec.items, "scores": rec.scores} for rec in predictor.recommend_prepared(prepared, ks)]

    def score_answers(prepared: List[Any], candidates: List[Any]) -> List[Dict[str, Any]]:
        return [{"scores": scores.tolist()} for scores in predictor.score_prepared(prepared, candidates)]

    runners = ({"rank": lambda prepared, _: [{"scores": s.tolist()} for s in predictor.score_prepared(prepared)]}
               if ranking else {"recommend": recommend_answers, "score": score_answers})
    batcher = _MicroBatcher(runners, config, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="torchrec-genrec", lifespan=lifespan)
    app.state.metrics = metrics

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - counted, then FastAPI's 500
            metrics.requests.labels(metrics.endpoint(request.scope), "500").inc()
            raise
        endpoint = metrics.endpoint(request.scope)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_describe(exc.errors()))

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return _error(422, str(exc))

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"status": "ok", **predictor.info()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def check_candidates(candidates: List[Any]) -> None:
        if not candidates:
            raise RequestError("no candidates to score")
        if len(candidates) > config.max_candidates:
            raise RequestError(f"{len(candidates)} candidates, at most {config.max_candidates} per request")

    if ranking:
        @app.post("/rank")
        async def rank(body: RankIn) -> Response:
            check_candidates(body.candidates)
            prepared = predictor.prepare(body.user, History(**body.history.model_dump()), body.candidates,
                                         body.timestamp)
            return _json_response(await batcher.submit("rank", prepared, None))

        return _finish(app, config, metrics)

    @app.post("/recommend")
    async def recommend(body: RecommendIn) -> Response:
        k = predictor.check_k(body.k)
        prepared = predictor.prepare(body.history.model_dump(), exclude=body.exclude)
        return _json_response(await batcher.submit("recommend", prepared, k))

    @app.post("/score")
    async def score(body: ScoreIn) -> Response:
        check_candidates(body.candidates)
        prepared = predictor.prepare(body.history.model_dump())
        candidates = predictor.dense_item_ids(body.candidates, "candidate")
        return _json_response(await batcher.submit("score", prepared, candidates))

    return _finish(app, config, metrics)


def _finish(app: FastAPI, config: ServeConfig, metrics: _Metrics) -> Any:
    metrics.routes.update(getattr(route, "path", "") for route in app.routes)
    return _BodyLimit(app, config.max_body_bytes, metrics, config.request_timeout_s)


def guarded_h11_protocol(header_timeout: float) -> Any:
    """uvicorn's h11 protocol with a deadline for the request head: a connection that sends
    no complete head within ``header_timeout`` seconds (after it opens, or after its previous
    response) is closed. uvicorn arms a timer only between requests, so an idle or half-sent
    connection would otherwise be held for ever. uvicorn is imported only to run a server."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_deadline()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._cancel_head_deadline()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            self._cancel_head_deadline()
            self._head_deadline = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_deadline(self) -> None:
            handle = getattr(self, "_head_deadline", None)
            if handle is not None:
                handle.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, config: Optional[ServeConfig] = None,
          check_versions: bool = True, announce: Optional[Any] = None, device: str = "cpu") -> None:
    """Loads ``artifact`` and serves it until interrupted (``announce()`` is called once
    the artifact has loaded, before the server listens); the model runs on ``device``
    (``cpu`` or ``cuda[:N]``), retrieval and ranker artifacts alike."""
    import uvicorn  # the server itself (~0.1 s to import): only needed to run one

    try:
        with open(os.path.join(artifact, MANIFEST)) as f:
            kind = json.load(f).get("format")
    except (OSError, ValueError):
        kind = None  # Predictor.load says what is wrong with it
    config = (config or ServeConfig()).validate()
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    try:
        serving_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if kind == RANKER_FORMAT:
        predictor: Any = RankerPredictor.load(artifact, check_versions=check_versions, device=device)
    else:
        predictor = Predictor.load(artifact, check_versions=check_versions, device=device)
    if announce is not None:
        announce()
    # The inference thread holds the GIL between the (small) kernels of a batch; a short
    # switch interval lets the event loop answer /healthz and parse requests in between
    # instead of waiting up to 5 ms per hand-over.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    uvicorn.run(create_app(predictor, config), host=host, port=port, log_level="warning", access_log=False,
                http=guarded_h11_protocol(config.header_timeout_s), timeout_keep_alive=config.keep_alive_s)
