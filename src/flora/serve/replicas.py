"""Replicas on Ray Serve: ``flora serve --replicas N`` runs N flora servers as one Ray Serve application
behind the same OpenAI-compatible API, each request routed by its adapter with Ray Serve's model
multiplexing.

The application has two deployments:

- ``FloraReplica`` (N replicas, ``--num-cpus-per-replica`` CPUs each): one whole flora server each,
  built as the single process builds it (`flora.serve.server.build_state`, `flora.serve.app.create_app`,
  its lifespan included): its own engine batching many adapters together, its own adapter registry.
  A request reaches it as an `HTTPCall` and runs through that app in process (`relay`); the
  response's ASGI messages stream back through a Ray Serve streaming call. Its
  ``@serve.multiplexed`` loader only tells Serve which adapters the replica serves (flora's registry
  loads them, without stopping the batch): Serve then routes a request whose multiplexed model id is
  an adapter to a replica that holds it.
- ``FloraIngress`` (one replica, no CPU): the HTTP entry. It reads a completion's ``model`` from the
  body and calls ``FloraReplica`` with ``handle.options(multiplexed_model_id=model)``
  (``--routing multiplexed``), or without it (``--routing random``: Serve's own adapter-blind choice
  between replicas, the baseline); everything else it passes on unchanged. It answers three things
  itself: ``/metrics`` (every replica's exposition, ``DeploymentHandle.broadcast``, each series
  labelled ``replica``), ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (below), and the
  errors of a replica that dies (a 503 before the answer started, an error event in a stream).

Loads and unloads reach every replica: the ingress sends one to a replica, which answers it as the
single process does (every 4xx unchanged); if it succeeded, the ingress appends it to the
application's `AdapterCatalog` (a named Ray actor) and broadcasts ``sync`` to every running replica,
which replays what it has not applied through its own app, and answers the client once they have.
Every request the ingress forwards carries the catalog's length, and a replica behind it (one started
since, to replace a dead one or by autoscaling) replays the rest before it answers: a request that
arrives after a load's answer never meets a replica without it.

Ray is imported inside the functions and deployments (``flora[ray]``), so that this module imports with
``flora[serve]`` alone. The design, the guarantees and a KubeRay manifest: docs/serving.md ("Replicas on
Ray Serve").
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora.serve.protocol import error_body

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    from flora.serve.server import ServeSettings

logger = logging.getLogger("flora.serve")

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]  # fmt: skip

ROUTINGS = ("multiplexed", "random")
APP_NAME = "flora"  # `flora serve`'s Serve application, at route "/" (one per cluster)
INGRESS, ENGINE = "FloraIngress", "FloraReplica"
CATALOG_NAMESPACE = "flora"
REPLICA_HEADER = b"x-flora-replica"  # which replica answered (its Serve id: the `replica` label of /metrics)
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})  # routed by their body's model
RUNTIME_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
INGRESS_MAX_ONGOING = 100_000  # the ingress only relays: it never makes a request wait
CONSTRUCTOR_RETRIES = 3  # a replica that cannot start (a bad pinned adapter) fails the start after 3 tries
SYNC_TIMEOUT_S = 300.0  # a load broadcast to every replica (each reads the adapter's files)
SCRAPE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0  # --ray-address: a cluster that does not answer within it is an error


@dataclass
class ReplicaSettings:
    """How ``flora serve`` runs on Ray Serve (see ``flora serve --help``). ``max_ongoing_requests``:
    requests a replica takes at once (default ``--max-num-seqs``: what its batch holds; Serve keeps
    the others waiting and routes each to the first replica with room, preferring one that holds its
    adapter). ``autoscaling_config``: Ray Serve's, in place of a fixed number of replicas."""

    replicas: int = 1
    ray_address: str | None = None
    routing: str = "multiplexed"
    num_cpus_per_replica: float = 1.0
    max_ongoing_requests: int | None = None
    autoscaling_config: dict[str, Any] | None = None

    @property
    def on_ray(self) -> bool:
        """Whether these settings need Ray Serve (more than one replica, a cluster, or autoscaling)."""
        return self.replicas > 1 or self.ray_address is not None or self.autoscaling_config is not None

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: expected at least 1 (1 serves in this process, more run "
                             f"on Ray Serve)")  # fmt: skip
        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing {self.routing!r}: expected one of {', '.join(ROUTINGS)}")
        if not self.num_cpus_per_replica > 0:
            raise ValueError(f"--num-cpus-per-replica {self.num_cpus_per_replica}: expected a positive number")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"--max-ongoing-requests {self.max_ongoing_requests}: expected at least 1")
        if self.autoscaling_config is not None:
            from ray.serve.config import AutoscalingConfig

            if self.replicas != 1:
                raise ValueError(f"--replicas {self.replicas} and --autoscaling-config: give one of them (the "
                                 f"autoscaling config's min_replicas and max_replicas bound the replicas)")  # fmt: skip

            shown = json.dumps(self.autoscaling_config)
            unknown = sorted(set(self.autoscaling_config) - set(AutoscalingConfig.model_fields))
            if unknown:
                raise ValueError(f"--autoscaling-config {shown}: unknown keys {unknown} (Ray Serve's are "
                                 f"{', '.join(sorted(AutoscalingConfig.model_fields))})")  # fmt: skip
            try:
                AutoscalingConfig(**self.autoscaling_config)
            except Exception as err:  # noqa: BLE001  (pydantic's validation error, whatever its version)
                raise ValueError(f"--autoscaling-config {shown}: not Ray Serve's autoscaling config ({err})") from None


# -- one HTTP request across a Ray call -----------------------------------------------------------


@dataclass(frozen=True)
class HTTPCall:
    """An HTTP request as the ingress received it, body read, to be run by a replica's app."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.method,
                "scheme": "http", "path": self.path, "raw_path": self.path.encode(), "query_string": self.query,
                "root_path": "", "headers": self.headers, "client": self.client, "server": None}  # fmt: skip


async def relay(app: ASGIApp, call: HTTPCall) -> AsyncIterator[Message]:
    """Run ``call`` through ``app`` in this process and yield the response's ASGI messages as the app
    sends them (``http.response.start``, then ``http.response.body`` chunks). If the consumer stops
    early (its caller was cancelled: the client went away), the app receives ``http.disconnect``, as
    from a server, and aborts what it runs. (httpx's ``ASGITransport`` does this but holds the whole
    body back until the app ends: no streaming.)"""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    request = [{"type": "http.request", "body": call.body, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> Message:
        if request:
            return request.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    task = asyncio.create_task(app(call.scope(), receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    started = False
    try:
        while (message := await sent.get()) is not None:
            started = started or message["type"] == "http.response.start"
            yield message
        if task.exception() is not None:  # Starlette answered it with a 500 before raising it again
            if not started:
                raise task.exception()
            logger.error("%s %s failed", call.method, call.path, exc_info=task.exception())
    finally:
        gone.set()


async def answer(responses: DeploymentResponseGenerator, max_queue: int) -> AsyncIterator[Message]:
    """The ASGI messages of a replica's response, passed on as they come; if the replica fails, an
    error in OpenAI's shape instead: a whole response (503 for a replica that died, 429 when Serve's
    queue is full) before any of the answer was sent, an error event and ``[DONE]`` in an event
    stream, the end of the body otherwise. A response never stays open after its replica is gone."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    start: Message | None = None
    sent = streaming = finished = False
    try:
        async for message in responses:
            if message["type"] == "http.response.start":
                start = message  # sent with the first chunk: a response that fails before it is a whole error
                continue
            if not sent:
                streaming = dict(start.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
                yield start
                sent = True
            finished = not message.get("more_body", False)
            yield message
    except (BackPressureError, RayActorError) as err:
        logger.warning("a request failed on its replica: %s", err)
        if isinstance(err, BackPressureError):
            status = 429
            text = f"the server is at capacity: {max_queue} requests are already waiting (--max-queue)"
        else:
            status = 503
            text = ("the replica serving this request stopped before it finished (Ray Serve starts another); "
                    f"retry the request ({type(err).__name__})")  # fmt: skip
        if not sent:
            for message in _json_response(status, error_body(status, text)):
                yield message
            return
        if streaming and not finished:
            event = f"data: {json.dumps(error_body(status, text))}\n\ndata: [DONE]\n\n".encode()
            yield {"type": "http.response.body", "body": event, "more_body": False}
            return
    if not sent and start is not None:  # a response without a body
        yield start
        sent = True
    if sent and not finished:
        yield {"type": "http.response.body", "body": b"", "more_body": False}


def _json_response(status: int, payload: dict[str, Any]) -> list[Message]:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]  # fmt: skip


def multiplexed_model_id(call: HTTPCall) -> str:
    """The ``model`` of a completion's body ("" for other paths, or a body without one: the replica's
    app answers those as the single process does)."""
    if call.path not in GENERATION_PATHS:
        return ""
    try:
        model = json.loads(call.body).get("model")
    except (ValueError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


def labelled_exposition(expositions: dict[str, str]) -> bytes:
    """Prometheus expositions of several replicas as one, every sample labelled ``replica`` with the
    key it came under (series of one name from every replica grouped together, as the format needs)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))  # fmt: skip
            merged.samples.extend(s._replace(labels={**s.labels, "replica": replica}) for s in family.samples)

    class Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# -- the application's record of run-time loads ------------------------------------------------------


class AdapterCatalog:
    """The loads and unloads an application answered with success, in order (a named Ray actor:
    it outlives the replicas and the ingress; replicas replay from it what they have not applied).
    An entry is the request's path and body; the catalog's version is its length."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, bytes]] = []

    def version(self) -> int:
        return len(self.entries)

    def append(self, path: str, body: bytes) -> int:
        self.entries.append((path, body))
        return len(self.entries)

    def since(self, version: int) -> list[tuple[int, str, bytes]]:
        """``(version after it, path, body)`` of every entry after ``version``."""
        return [(i + 1, path, body) for i, (path, body) in enumerate(self.entries) if i >= version]


def catalog_name(app_name: str) -> str:
    return f"flora-adapter-catalog-{app_name}"


def _catalog(app_name: str, create: bool = False):
    """The `AdapterCatalog` actor of the Serve application ``app_name`` (made if ``create``: detached,
    so that it outlives the ingress that made it; ``flora serve`` kills it when it stops the
    application)."""
    import ray

    if not create:
        return ray.get_actor(catalog_name(app_name), namespace=CATALOG_NAMESPACE)
    actor = ray.remote(num_cpus=0, max_restarts=0)(AdapterCatalog)
    return actor.options(name=catalog_name(app_name), namespace=CATALOG_NAMESPACE, lifetime="detached",
                         get_if_exists=True).remote()  # fmt: skip


# -- the deployments ---------------------------------------------------------------------------------


class EngineReplica:
    """One flora server, as the single process builds it, in a Ray Serve replica (``FloraReplica``)."""

    async def __init__(self, settings: ServeSettings, replica: ReplicaSettings) -> None:
        import torch
        from ray import serve

        from flora.serve.app import create_app
        from flora.serve.server import build_state

        torch.set_num_threads(max(1, int(replica.num_cpus_per_replica)))
        self.state = await asyncio.to_thread(build_state, settings)
        self.app = create_app(self.state)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        context = serve.get_replica_context()
        self.name, self.app_name = context.replica_id.unique_id, context.app_name
        self.op_headers = [(b"content-type", b"application/json")]
        if settings.api_key is not None:
            self.op_headers.append((b"authorization", f"Bearer {settings.api_key}".encode()))
        self.applied = 0  # catalog entries this replica has applied
        self.sync_lock = asyncio.Lock()

        async def hold(model_id: str) -> str:
            return model_id  # flora's registry loads the adapter when the request leases it

        # Serve's record of which adapters this replica serves, as large as flora's own LRU
        self.hold = serve.multiplexed(max_num_models_per_replica=settings.max_loaded_adapters)(hold)

    async def handle(self, call: HTTPCall, version: int, claim: int | None = None) -> AsyncIterator[Message]:
        """``call``'s response messages, once this replica has applied the catalog up to ``version``.
        ``claim``: ``call`` is a load or unload that becomes the catalog's entry ``claim`` if it succeeds
        (applied here with the catalog locked, so that no replay comes between)."""
        from ray import serve

        if claim is not None:
            async with self.sync_lock:
                await self._sync(claim - 1)
                messages = [self._labelled(m) async for m in relay(self.app, call)]
                if 200 <= messages[0]["status"] < 300:
                    self.applied = claim
            for message in messages:
                yield message
            return
        await self.sync(version)
        model = serve.get_multiplexed_model_id()
        if model:
            await self.hold(model)
        async for message in relay(self.app, call):
            yield self._labelled(message)

    async def sync(self, version: int) -> int:
        """Apply the catalog's entries up to ``version`` at least (those after it too); the version reached."""
        if self.applied < version:
            async with self.sync_lock:
                await self._sync(version)
        return self.applied

    async def _sync(self, version: int) -> None:
        if self.applied >= version:
            return
        for index, path, body in await _catalog(self.app_name).since.remote(self.applied):
            call = HTTPCall("POST", path, b"", self.op_headers, body)
            messages = [m async for m in relay(self.app, call)]
            if not 200 <= messages[0]["status"] < 300:  # e.g. the files were deleted since: it stays as it was
                text = b"".join(m.get("body", b"") for m in messages[1:]).decode(errors="replace")
                logger.warning("replica %s: replaying %s %s answered %d: %s", self.name, path, body.decode(),
                               messages[0]["status"], text)  # fmt: skip
            self.applied = index

    async def metrics(self, version: int) -> tuple[str, str]:
        """This replica's name and its Prometheus exposition (after syncing: a replica started since the
        last load shows it)."""
        await self.sync(version)
        return self.name, (await asyncio.to_thread(self.state.metrics.exposition)).decode()

    def _labelled(self, message: Message) -> Message:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.name.encode())]}
        return message

    async def __del__(self) -> None:
        await self.lifespan.__aexit__(None, None, None)  # the engine and the registry's reader stop


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs of `ServeSettings` (which it does not import: that would load torch)."""

    routing: str
    api_key: str | None
    max_request_bytes: int
    max_queue: int


class Ingress:
    """The HTTP entry of the application (``FloraIngress``): see the module docstring."""

    async def __init__(self, engine: DeploymentHandle, settings: IngressSettings) -> None:
        from ray import serve

        self.engine = engine
        self.settings = settings
        self.multiplexed = settings.routing == "multiplexed"
        self.catalog = _catalog(serve.get_replica_context().app_name, create=True)
        self.version = await self.catalog.version.remote()
        self.ops_lock = asyncio.Lock()  # loads and unloads one at a time, in the catalog's order

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Flora's own middleware (a body over ``--max-request-bytes``: 413 unread; ``--api-key``: 401
        before the body is read) around `forward`."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Mount

        from flora.serve.auth import APIKeyMiddleware
        from flora.serve.body_limit import BodyLimitMiddleware

        async def http_error(request: Request, err: HTTPException) -> JSONResponse:
            return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

        middleware = [Middleware(BodyLimitMiddleware, max_bytes=self.settings.max_request_bytes)]
        if self.settings.api_key is not None:
            middleware.insert(0, Middleware(APIKeyMiddleware, api_key=self.settings.api_key))
        return Starlette(routes=[Mount("/", app=self.forward)], middleware=middleware,
                         exception_handlers={HTTPException: http_error})  # fmt: skip

    async def forward(self, scope: MutableMapping[str, Any], receive, send) -> None:
        """Answer one HTTP request (an ASGI app)."""
        from starlette.requests import Request

        body = await Request(scope, receive).body()
        call = HTTPCall(scope["method"], scope["path"], scope.get("query_string", b""), list(scope["headers"]), body,
                        scope.get("client"))  # fmt: skip
        if call.path == "/metrics" and call.method == "GET":
            messages = await self._metrics()
        elif call.path in RUNTIME_PATHS and call.method == "POST":
            messages = await self._runtime(call)
        else:
            model = multiplexed_model_id(call) if self.multiplexed else ""
            responses = self.engine.options(stream=True, multiplexed_model_id=model).handle.remote(call, self.version)
            messages = answer(responses, self.settings.max_queue)
        if isinstance(messages, list):
            for message in messages:
                await send(message)
            return
        async for message in messages:
            await send(message)

    async def _runtime(self, call: HTTPCall) -> list[Message]:
        """A load or unload: answered by one replica; if it succeeded, recorded in the catalog and
        applied by every running replica before the answer goes back."""
        async with self.ops_lock:
            responses = self.engine.options(stream=True).handle.remote(call, self.version, self.version + 1)
            messages = [m async for m in answer(responses, self.settings.max_queue)]
            if not 200 <= messages[0]["status"] < 300:
                return messages
            self.version = await self.catalog.append.remote(call.path, call.body)
            reached = await self.engine.broadcast("sync", self.version).results_async(
                timeout_s=SYNC_TIMEOUT_S, return_exceptions=True
            )
            for outcome in reached:
                if isinstance(outcome, BaseException):  # a replica that died: its successor replays the catalog
                    logger.warning("a replica did not apply %s: %s", call.path, outcome)
            return messages

    async def _metrics(self) -> list[Message]:
        outcomes = await self.engine.broadcast("metrics", self.version).results_async(
            timeout_s=SCRAPE_TIMEOUT_S, return_exceptions=True
        )
        expositions = dict(o for o in outcomes if not isinstance(o, BaseException))
        body = await asyncio.to_thread(labelled_exposition, expositions)
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        return [{"type": "http.response.start", "status": 200, "headers": headers},
                {"type": "http.response.body", "body": body, "more_body": False}]  # fmt: skip


def application(settings: ServeSettings, replica: ReplicaSettings) -> Application:
    """The Ray Serve application of ``settings`` on ``replica``'s terms (not yet running)."""
    from ray import serve

    engine_options: dict[str, Any] = {
        "name": ENGINE,
        "ray_actor_options": {"num_cpus": replica.num_cpus_per_replica},
        "max_ongoing_requests": replica.max_ongoing_requests or settings.max_num_seqs,
        "max_queued_requests": settings.max_queue,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if replica.autoscaling_config is not None:
        engine_options["autoscaling_config"] = replica.autoscaling_config
    else:
        engine_options["num_replicas"] = replica.replicas
    engine = serve.deployment(EngineReplica, **engine_options)
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)  # fmt: skip
    entry = IngressSettings(replica.routing, settings.api_key, settings.max_request_bytes, settings.max_queue)
    return ingress.bind(engine.bind(settings, replica), entry)


def build_app(args: dict[str, str]) -> Application:
    """Ray Serve's application builder (``import_path: flora.serve.replicas:build_app``), for a Serve
    config file or a KubeRay ``RayService``: ``args: {"flags": "--model ... --replicas 4"}``, ``flora
    serve``'s flags (``--host``, ``--port`` and ``--ray-address`` are the config's business there)."""
    from flora.cli import build_parser
    from flora.cli.serve import replica_settings_from_args, settings_from_args

    unknown = set(args) - {"flags"}
    if unknown:
        raise ValueError(f"flora.serve.replicas:build_app args {sorted(unknown)}: expected only 'flags'")
    parsed = build_parser("serve").parse_args(["serve", *shlex.split(args.get("flags", ""))])
    settings, replica = settings_from_args(parsed), replica_settings_from_args(parsed)
    settings.check()
    replica.check()
    return application(settings, replica)


# -- running it ----------------------------------------------------------------------------------


def preflight(settings: ServeSettings, replica: ReplicaSettings) -> None:
    """What can be wrong before Ray starts: settings out of range, a model or directory that does not
    exist here (the same paths must hold on every node), a cluster that does not answer."""
    from flora.base import resolve_model_dir

    settings.check()
    replica.check()
    resolve_model_dir(settings.model)
    if settings.adapter_dir is not None and not Path(settings.adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter-dir {settings.adapter_dir!r} is not a directory")
    for root in settings.allowed_adapter_paths:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--allowed-adapter-paths {root!r} is not a directory")
    if replica.ray_address is not None and replica.ray_address not in ("auto", "local"):
        check_reachable(replica.ray_address)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A `ValueError` unless something accepts connections at ``address`` (``HOST:PORT``, or
    ``ray://HOST:PORT``) within ``timeout_s``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r}: expected HOST:PORT (the Ray head's GCS address, e.g. "
                         f"10.0.0.1:6379), ray://HOST:PORT or auto")  # fmt: skip
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(f"--ray-address {address!r}: no Ray cluster answers there ({err or 'timed out'}); start "
                         f"one with `ray start --head`, or leave --ray-address out to start a local Ray "
                         f"instance") from None  # fmt: skip


def start(settings: ServeSettings, replica: ReplicaSettings) -> str:
    """Connect to the Ray cluster at ``replica.ray_address`` (or start a local instance: every CPU of
    this machine, no dashboard), and run the application on ``settings.host:port`` until `stop`; the
    cluster's address."""
    import ray
    from ray import serve

    if replica.ray_address is None:
        ray.init(include_dashboard=False)
    else:
        try:
            ray.init(address=replica.ray_address)
        except ConnectionError as err:
            raise ValueError(f"--ray-address {replica.ray_address!r}: {err}") from None
    address = ray.get_runtime_context().gcs_address
    try:
        _kill_catalog(APP_NAME)  # left by a run of the same name on this cluster that did not stop
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, replica), name=APP_NAME, route_prefix="/")
    except RuntimeError as err:
        reasons = _failures() or [str(err)]
        stop(replica)
        raise ValueError(f"the application did not start: {'; '.join(reasons)}") from None
    except BaseException:
        stop(replica)
        raise
    return address


def _failures() -> list[str]:
    """The last line of each failed deployment's message (a replica's constructor's exception)."""
    from ray import serve

    application = serve.status().applications.get(APP_NAME)
    deployments = application.deployments.items() if application is not None else ()
    return [f"{name}: {d.message.strip().splitlines()[-1]}" for name, d in deployments
            if d.status == "DEPLOY_FAILED" and d.message.strip()]  # fmt: skip


def stop(replica: ReplicaSettings) -> None:
    """Delete the application and its catalog from a cluster given by ``--ray-address`` (its replicas
    finish what they run), or end the local instance at once, Serve and every replica with it (a
    graceful Serve shutdown would wait 30 s for a controller already stopped when the whole process
    group got the signal), and leave Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if replica.ray_address is not None:
            serve.delete(APP_NAME)
            _kill_catalog(APP_NAME)
    finally:
        ray.shutdown()


def _kill_catalog(app_name: str) -> None:
    import ray

    try:
        ray.kill(_catalog(app_name))
    except ValueError:  # there is none
        pass


def serve_replicas(settings: ServeSettings, replica: ReplicaSettings) -> None:
    """``flora serve --replicas N``: check, start, serve in the foreground until SIGINT or SIGTERM, stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preflight(settings, replica)
    address = start(settings, replica)
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        count = "autoscaled" if replica.autoscaling_config is not None else str(replica.replicas)
        logger.info("flora serve: %s replicas (%s routing) on Ray at %s, serving http://%s:%d", count,
                    replica.routing, address, settings.host, settings.port)  # fmt: skip
        stopping.wait()
        logger.info("flora serve: stopping the application")
    finally:
        stop(replica)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
