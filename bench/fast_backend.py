"""The overhead benchmark's backend: a fake OpenAI engine cheap enough to share a core with the
load generator at 2,000 streamed requests/s.

aiohttp's server costs about 0.2 ms of CPU per streamed request, which with the load generator
on the same core capped the fixture below 2,000 requests/s. This one is a bare asyncio protocol
that answers every POST with the same pre-encoded stream: `--chunks` SSE events (each its own
write, so proxies relay them one by one), then `[DONE]`. It registers with the controller like
tests/integration/fake_engine.py, so our gateway routes to it.

    python bench/fast_backend.py --port P --controller-address URL --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.fake_engine import add_registration_flags, register_forever  # noqa: E402

_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
         b"transfer-encoding: chunked\r\n\r\n")


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream(model: str, chunks: int, token_ids: bool = False) -> list[bytes]:
    """The answer; with `token_ids`, as vLLM streams it for `"return_token_ids": true` (the
    prompt's ids in the first chunk, each chunk's own), which our gateway asks for."""
    frames = []
    for i in range(chunks):
        choice: dict[str, object] = {"index": 0, "delta": {"content": f" word{i}"},
                                     "logprobs": None,
                                     "finish_reason": "stop" if i == chunks - 1 else None}
        choice["token_ids"] = [1000 + i] if token_ids else None  # vLLM writes null without
        event: dict[str, object] = {"id": "fake-1", "object": "chat.completion.chunk",
                                    "created": 0, "model": model, "choices": [choice]}
        if i == 0:
            event["prompt_token_ids"] = list(range(100, 124)) if token_ids else None
        # Compact, as vLLM writes its chunks (pydantic's model_dump_json).
        frames.append(_frame(b"data: " + json.dumps(event, separators=(",", ":")).encode()
                             + b"\n\n"))
    frames.append(_frame(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    frames[0] = _HEAD + frames[0]
    return frames


def _models(model: str) -> bytes:
    body = json.dumps({"object": "list", "data": [
        {"id": model, "object": "model", "max_model_len": 2048}]}).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body))


class _Engine(asyncio.Protocol):
    def __init__(self, streams: tuple[list[bytes], list[bytes]], models: bytes) -> None:
        self._streams, self._models = streams, models
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:  # one or more whole requests in the buffer
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4:end + 4 + length]
            self._buffer = self._buffer[end + 4 + length:]
            self._answer(head, b'"return_token_ids":true' in body)

    def _answer(self, head: bytes, token_ids: bool) -> None:
        assert self._transport is not None
        if head.startswith(b"post"):
            for frame in self._streams[token_ids]:
                self._transport.write(frame)
        elif head.startswith(b"get /v1/models"):
            self._transport.write(self._models)
        else:  # /health and the rest
            self._transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    streams = (_stream(args.model, args.chunks), _stream(args.model, args.chunks, True))
    models = _models(args.model)
    server = await loop.create_server(lambda: _Engine(streams, models), args.host, args.port,
                                      backlog=4096)
    async with server:
        await register_forever(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_registration_flags(parser, "fast-backend")
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
