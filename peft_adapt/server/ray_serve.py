"""Serving replicas on Ray Serve: N copies of the server, one base each, with requests routed by adapter.

    client -> Ray's HTTP proxy -> Front (the door: keys, body limit; reads `model`) -> a replica -> our app

Every replica runs the same app as `peft-adapt serve` (create_app: the OpenAI-compatible routes, the batcher,
auth, limits), called in-process through ASGI. The Front reads the request's `model` (the adapter) and passes it
as Ray Serve's multiplexed model id: Ray sends a request to a replica that already holds that adapter when one
does, and each replica reports the adapters it holds through the `serve.multiplexed` loader below. Answers stream
back chunk by chunk (server-sent events included) and carry `x-peft-adapt-replica`, the replica that served them.
"""



import asyncio
import json
import logging
import os
import signal
import sys

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..errors import UserInputError
from ..registry.store import Registry
from ..runtime import AdapterRuntime
from ..training.threads import available_cores
from .app import _add_error_handlers, create_app
from .guard import Guard, flat_routes
from .routes import router
from .serve import _task_of, check_served_folders

log = logging.getLogger("peft_adapt.server")
REPLICA_HEADER = "x-peft-adapt-replica"
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


def _requested_adapter(body: bytes) -> str:
    """The `model` of a JSON request body (the adapter to route by), or '' when there is none."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: the replica's parser refuses it
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= 300 else ""


def build_app(base: str, quantization: str, registry_args: dict, adapters: list[str], task: str,
              max_adapters: int | None, settings, replicas: int, threads: int):
    """The Ray Serve application: a Front deployment over `replicas` replicas of the server."""
    from ray import serve

    per_replica = max_adapters or 8

    @serve.deployment(num_replicas=replicas, ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}}})
    class AdapterReplica:
        def __init__(self):
            import httpx

            registry = Registry(**registry_args)
            self.runtime = AdapterRuntime(base, task=task, quantization=quantization, registry=registry,
                                          max_adapters=max_adapters, batch_invariant=settings.batch_invariant)
            for name in adapters:
                self.runtime.load(name, pin=True)
            self.app = create_app(self.runtime, registry, settings, check_served_folders(adapters, base))
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica",
                                            timeout=None)
            self.name = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def hold(self, adapter: str) -> str:
            """Make `adapter` resident here; Ray then routes its requests to this replica."""
            try:
                await asyncio.to_thread(self.runtime.load, adapter)
            except (UserInputError, ValueError) as exc:  # not a registry adapter (a base name, auto, a mix): the
                log.debug("%s is not held as an adapter: %s", adapter, exc)  # app answers it, or refuses it
            return adapter

        async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            adapter = serve.get_multiplexed_model_id()
            if adapter:
                await self.hold(adapter)
            url = path + (f"?{query.decode('latin-1')}" if query else "")
            async with self.client.stream(method, url, headers=headers, content=body) as response:
                kept = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_HEADERS]
                yield {"status": response.status_code, "headers": kept + [(REPLICA_HEADER, self.name)]}
                async for chunk in response.aiter_raw():
                    yield chunk

    front_app = FastAPI(title="peft-adapt (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(front_app)

    class _FrontMetrics:  # the replicas count requests (their /metrics); the Front only refuses at the door
        @staticmethod
        def observe(route, status, seconds) -> None:
            return None

    # the same door as one server's: keys checked before any body is read, the body limit counted as it arrives
    front_app.add_middleware(Guard, settings=settings, metrics=_FrontMetrics(), routes=flat_routes(router.routes))

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(front_app)
    class Front:
        def __init__(self, replica_handle):
            self.replicas = replica_handle

        @front_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def forward(self, request: Request, path: str):
            body = await request.body()
            adapter = _requested_adapter(body)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
            stream = self.replicas.options(stream=True, multiplexed_model_id=adapter).forward.remote(
                request.method, request.url.path, request.url.query.encode("latin-1"), headers, body)
            head = await stream.__anext__()
            return StreamingResponse(stream, status_code=head["status"], headers=dict(head["headers"]))

    return Front.bind(AdapterReplica.bind())


def serve_on_ray(base: str, quantization: str, registry_args: dict, adapters: list[str] | None, host: str, port: int,
                 task: str, max_adapters: int | None, settings, replicas: int, address: str | None) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy the application and serve until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserInputError("serving on Ray needs Ray Serve: pip install 'peft-adapt[ray]'") from None
    if replicas < 1:
        raise UserInputError(f"--replicas {replicas}: give 1 or more")
    check_served_folders(adapters, base)  # before a cluster starts: a bad folder is the user's to hear at once
    task = _task_of(base) if task == "auto" else task
    cores = available_cores()
    # Serve gives its HTTP proxy 5 s to answer a readiness check; a busy few-core machine (the proxy imports
    # uvicorn while replicas load their base) misses that, and Serve then kills the proxy before it ever ran
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at niceness 15: the replicas are the server here, and beside any other work on the
    # machine they would starve (measured: replicas still loading their base after 6 minutes beside two trainings)
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cores, include_dashboard=False)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, cores // replicas))
    serve.start(http_options={"host": host, "port": port})
    app = build_app(base, quantization, registry_args, list(adapters or []), task, max_adapters, settings, replicas,
                    threads)
    log.info("serving %s on Ray: %d replicas, settings %s", base, replicas, settings.loggable())
    # SIGTERM (a service manager, a test) ends the command the way Ctrl-C does: the finally below runs, and the
    # cluster this command started stops with it instead of outliving it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve.run(app, name="peft-adapt", route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
        if not address:
            ray.shutdown()
