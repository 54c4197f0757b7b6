"""Bare relays: the floor under issue 18's CPU goal, measured beside our gateway.

Each takes a POST, sends its body to one backend through the gateway's own engine client
(gateway/engine_client.py) and streams the answer's bytes back as they come: no keys, limits,
metrics, request ids, routing or continuation. What our gateway costs beyond one of these is
what its features cost; what one of these costs against vLLM's router is what a Python
server costs before it does anything.

- `uvicorn`: an ASGI app under uvicorn's httptools protocol and uvloop, as our gateway runs.
- `granian`: an RSGI app under granian (a Rust HTTP server; PyPI granian), with uvloop: a
  maintained server that parses and writes HTTP outside Python.

`bench/overhead_interleaved.py --bare uvicorn,granian` starts them beside the other proxies
(granian in a peer venv of its own, bench/peers.py).

    python bench/bare_relay.py uvicorn PORT BACKEND_URL
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.engine_client import Endpoint, EngineClient  # noqa: E402

_HEADERS = {"Content-Type": "application/json"}
_state: dict[str, Any] = {}


def _upstream() -> tuple[EngineClient, Endpoint]:
    # Made on first use, inside the server's running loop.
    if not _state:
        _state["client"] = EngineClient(connect_timeout=5, read_timeout=60,
                                        dead_peer_timeout=30)
        _state["endpoint"] = Endpoint.from_url(
            f"{os.environ['BARE_RELAY_BACKEND'].rstrip('/')}/v1/chat/completions")
    return _state["client"], _state["endpoint"]


async def asgi_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    client, endpoint = _upstream()
    upstream = await client.request("POST", endpoint, _HEADERS, b"".join(parts))
    content_type = (upstream.content_type or "application/json").encode()
    await send({"type": "http.response.start", "status": upstream.status,
                "headers": [(b"content-type", content_type)]})
    while chunk := await upstream.read_chunk():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    upstream.release()
    await send({"type": "http.response.body", "body": b""})


class RsgiApp:
    async def __call__(self, scope: Any, protocol: Any) -> None:
        body = await protocol()
        client, endpoint = _upstream()
        upstream = await client.request("POST", endpoint, _HEADERS, body)
        stream = protocol.response_stream(
            upstream.status, [("content-type", upstream.content_type or "application/json")])
        while chunk := await upstream.read_chunk():
            await stream.send_bytes(chunk)
        upstream.release()


rsgi_app = RsgiApp()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", choices=["uvicorn", "granian"])
    p.add_argument("port", type=int)
    p.add_argument("backend")
    args = p.parse_args()
    os.environ["BARE_RELAY_BACKEND"] = args.backend  # granian's worker process reads it too
    if args.server == "uvicorn":
        import uvicorn

        uvicorn.run(asgi_app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                    lifespan="off", log_level="warning", access_log=False)
    else:
        from granian import Granian  # type: ignore[import-not-found]
        from granian.constants import Interfaces, Loops  # type: ignore[import-not-found]

        # One worker process with one runtime thread: all of it on the core it is pinned to.
        Granian("bare_relay:rsgi_app", address="127.0.0.1", port=args.port,
                interface=Interfaces.RSGI, workers=1, runtime_threads=1, loop=Loops.uvloop,
                log_enabled=False, working_dir=Path(__file__).parent).serve()


if __name__ == "__main__":
    main()
