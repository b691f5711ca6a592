"""Running the app under uvicorn with a graceful drain on SIGTERM.

On SIGTERM (or the first Ctrl-C) the server stops accepting connections, answers 503 to new requests that
arrive on open keep-alive connections, lets in-flight requests (streams included) run to completion for
up to ``drain_timeout_s``, stops the engine, and exits with status 0.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from reformer_dist.serve.config import ServeConfig


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, announce: str):
        super().__init__(config)
        self.app = app
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Printed once the socket accepts connections: scripts and tests wait for this line.
        print(self.announce, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.engine.drain()
        if sig == signal.SIGTERM:
            # A requested stop: drain, then return normally (exit 0). uvicorn's own handler would
            # re-raise SIGTERM after the drain, making a clean shutdown look like a kill.
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP explicitly: asyncio only sets TCP_NODELAY on connections whose socket does, and
    # without it every keep-alive response stalls ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, cfg: ServeConfig, log_level: str = "info") -> int:
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=cfg.drain_timeout_s,
                            lifespan="on", access_log=False, server_header=False)
    server = DrainingServer(config, app, f"reformer-dist serve: listening on http://{url_host}:{port}")
    server.run(sockets=[sock])
    return 0 if server.started else 1
