"""Run the app under uvicorn, with the graceful stop a deployment expects.

The first SIGTERM (or Ctrl-C) turns new requests away (503) and waits for those in flight; then
the server exits (status 0). A second signal stops at once.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable

import uvicorn

from graft.errors import GraftError
from graft.serve.app import Settings, State, create_app
from graft.serve.model import Served


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: State) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining or self.should_exit:
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        threading.Thread(target=self.drain, name="graft-drain", daemon=True).start()

    def drain(self) -> None:
        while self.state.admitted > 0 and not self.should_exit:
            time.sleep(0.02)
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        threading.Thread(target=self.watch, name="graft-watch", daemon=True).start()

    def watch(self) -> None:
        """A model that fails to load ends the server, so that the command can say why."""
        while self.state.served is None and self.state.failure is None and not self.should_exit:
            time.sleep(0.05)
        if self.state.failure is not None:
            self.should_exit = True
        elif self.state.served is not None:  # said once ready, so that an error before is one line
            c = self.config
            print(f"graft serve: {self.state.served.name} ready on http://{c.host}:{c.port}", file=sys.stderr)


def check_port(host: str, port: int) -> None:
    """A one-line error, before the model loads, when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise GraftError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
            ) from None


def serve(loader: Callable[[], Served], settings: Settings, host: str, port: int) -> None:
    """Serve until stopped; a model that failed to load is a GraftError once the server is down."""
    check_port(host, port)
    gate = create_app(loader, settings)
    # log_config=None: uvicorn leaves logging as it is (its default config would bind handlers to
    # the sys.stderr of the moment, for the rest of the process); its warnings reach Python's
    # last-resort handler, graft's own lines the "graft" logger
    config = uvicorn.Config(
        gate, host=host, port=port, log_level="warning", access_log=False, log_config=None
    )
    Server(config, gate.state).run()
    if gate.state.failure is not None:
        raise GraftError(gate.state.failure)
