"""Scale-out (chapter 8): the same app as ``graft serve``, as a Ray Serve deployment of N replicas.

    graft serve MODEL --ray --replicas 4 [--host 0.0.0.0] [--port 8000]

Each replica is a Ray actor that builds graft's app (``create_app``: endpoints, batching, limits,
metrics, playground) and loads its own copy of the model; Ray's HTTP proxy on --host:--port spreads
requests over them. With RAY_ADDRESS set (``ray start --head`` on one machine, ``ray start
--address HEAD:6379`` on the others), the replicas are placed across that cluster; without it, Ray
starts on this machine alone. /metrics answers for the replica that took the request: scrape Ray's
own metrics for the whole deployment.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from graft.errors import GraftError
from graft.serve.app import Settings, create_app
from graft.serve.model import Served

NAME = "graft"


def deployment(loader: Callable[[], Served], settings: Settings, replicas: int):
    """The bound Ray Serve application: ``replicas`` copies of graft's app."""
    from ray import serve

    def build():  # runs on each replica: the model loads there, before Ray counts it as running
        served = loader()
        return create_app(lambda: served, settings)

    replica = serve.deployment(name=NAME, num_replicas=replicas)(serve.ingress(build)())
    return replica.bind()


def running_replicas() -> int:
    from ray import serve

    states = serve.status().applications[NAME].deployments[NAME].replica_states
    return int(states.get("RUNNING", 0))


def interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def serve_on_ray(
    loader: Callable[[], Served], settings: Settings, host: str, port: int, replicas: int
) -> None:
    """Serve until SIGTERM or Ctrl-C, then take the deployment down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise GraftError("--ray needs Ray Serve: pip install 'graft[ray]'") from None
    from graft.serve.server import check_port

    cluster = os.environ.get("RAY_ADDRESS")
    if not cluster:
        check_port(host, port)  # on a cluster the proxy listens on every node: Ray says so itself
    # without RAY_ADDRESS a Ray of our own, never another one that happens to run on this machine
    ray.init(
        address=cluster or "local", include_dashboard=False, logging_level="warning", log_to_driver=False
    )
    signal.signal(signal.SIGTERM, interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(loader, settings, replicas), name=NAME, route_prefix="/", blocking=False)
        print(
            f"graft serve: {running_replicas()} replicas on Ray Serve, ready on http://{host}:{port}",
            file=sys.stderr,
            flush=True,
        )
        while True:
            signal.pause()  # until SIGTERM or Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
