"""A fake OpenAI engine that registers itself as a worker: for tests whose subject is the gateway.

`python -m tests.integration.fake_engine --port P --controller-address URL --model NAME`
(`--host` to listen on, and be reached at, another address than 127.0.0.1).
It answers chat and completion requests at once with a fixed few words, streamed or not, with
`usage` as vLLM counts it here: prompt tokens = characters / 4 + 1, completion tokens =
`max_tokens` (default `--chunks`, 8), capped at `--chunks` words. `--interval-ms` paces the
streamed chunks, as an engine paces its tokens; `--delay-ms` holds every answer back before
its first byte, as a long prefill does. It counts the requests it got at `GET /stats`. An upload
to `/v1/audio/transcriptions` is answered with the digest of the body that arrived.

For the ways an engine fails: `--status 503` answers every generation request with that status,
`--cut-after N` drops the connection after N streamed chunks, `--stall-after N` goes silent
after N, and `--no-listen` registers an address where nothing listens (connections are refused).

`--token-ids` streams as vLLM does for `"return_token_ids": true` (compact JSON, the prompt's
ids [1, 2, 3] in the first chunk, word i as token 100 + i), and answers a completion whose
prompt is token ids from where they leave off: what a continuation on another worker needs
(gateway/resume.py). `GET /stats` also counts the requests running now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Sequence

import httpx
from aiohttp import web

from controller.protocol import Heartbeat, Registration, WorkerState
from fleetcore.cluster_auth import ClusterTokenSettings
from worker.registration import ControllerClient

MAX_MODEL_LEN = 2048
# What it registers as serving, as a worker reports its engine's paths.
PATHS = ["/health", "/v1/audio/transcriptions", "/v1/chat/completions", "/v1/completions",
         "/v1/models"]
WORDS = ["fake", " words", " from", " a", " fake", " engine", " for", " tests"]


def _usage(body: dict, chunks: int) -> dict[str, int]:
    text = json.dumps(body.get("messages") or body.get("prompt") or "")
    completion = body.get("max_tokens") or body.get("max_completion_tokens") or chunks
    prompt = len(text) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _choice(chat: bool, text: str, stream: bool, finish: str | None) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": finish}
    key = "delta" if stream else "message"
    return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


async def _generate(request: web.Request) -> web.StreamResponse:
    request.app["requests"] += 1
    request.app["running"] += 1
    try:
        body = await request.json()
        if request.app["token_ids"] and body.get("return_token_ids"):
            return await _with_token_ids(request, body)
        return await _answer(request, body)
    finally:
        request.app["running"] -= 1


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _with_token_ids(request: web.Request, body: dict) -> web.StreamResponse:
    """A stream as vLLM writes it with return_token_ids; a token-id prompt continues it."""
    app = request.app
    chat = request.path.endswith("/chat/completions")
    prompt = body.get("prompt")
    prompt_ids = prompt if isinstance(prompt, list) else [1, 2, 3]
    start = len(prompt_ids) - 3 if prompt_ids[:3] == [1, 2, 3] else 0
    limit = body.get("max_tokens") or app["chunks"]
    end = min(app["chunks"], start + limit)
    base = {"id": f"fake-{start}", "object": "chat.completion.chunk" if chat
            else "text_completion", "created": int(time.time()), "model": body.get("model")}
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if chat:
        await response.write(_event({**base, "choices": [{
            "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}], "prompt_token_ids": [1, 2, 3]}))
    for n, i in enumerate(range(start, end)):
        if app["stall_after"] is not None and n == app["stall_after"]:
            await asyncio.sleep(300)  # silent, until the gateway gives up on it
        finish = None if i < end - 1 else ("stop" if end == app["chunks"] else "length")
        word = WORDS[i % len(WORDS)]
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice = {"index": 0, "delta": {"content": word}, **choice, "token_ids": [100 + i]}
        else:
            choice = {"index": 0, "text": word, **choice, "stop_reason": None,
                      "prompt_token_ids": prompt_ids if n == 0 else None,
                      "token_ids": [100 + i]}
        await response.write(_event({**base, "choices": [choice]}))
        if app["interval"] and finish is None:
            await asyncio.sleep(app["interval"])
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _answer(request: web.Request, body: dict) -> web.StreamResponse:
    if request.app["delay"]:
        await asyncio.sleep(request.app["delay"])
    if request.app["status"] != 200:
        return web.json_response({"error": {"message": "fake engine refuses", "type": "x"}},
                                 status=request.app["status"])
    chat = request.path.endswith("/chat/completions")
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": "fake-1", "created": int(time.time()), "model": body.get("model")}
    chunks = request.app["chunks"]
    words = [WORDS[i % len(WORDS)] for i in range(min(chunks, body.get("max_tokens") or chunks))]
    interval = request.app["interval"]
    if not body.get("stream"):
        return web.json_response({**base, "object": kind, "usage": _usage(body, chunks),
                                  "choices": [_choice(chat, "".join(words), False, "stop")]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    cut_after = request.app["cut_after"]
    for i, word in enumerate(words):
        if cut_after is not None and i == cut_after:
            assert request.transport is not None
            request.transport.abort()  # mid-answer: the chunked body never ends
            return response
        finish = "stop" if i == len(words) - 1 else None
        event = {**base, "object": chunk_kind, "choices": [_choice(chat, word, True, finish)]}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if interval and finish is None:
            await asyncio.sleep(interval)
    if (body.get("stream_options") or {}).get("include_usage"):
        event = {**base, "object": chunk_kind, "choices": [], "usage": _usage(body, chunks)}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": request.app["model"], "object": "model", "max_model_len": MAX_MODEL_LEN}]})


async def _transcribe(request: web.Request) -> web.Response:
    """An upload, answered with what arrived: its digest and content type, so that a test can
    tell the gateway relayed it unchanged."""
    request.app["requests"] += 1
    body = await request.read()
    return web.json_response({"text": "fake transcription", "bytes": len(body),
                              "sha256": hashlib.sha256(body).hexdigest(),
                              "content_type": request.headers.get("content-type")})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response({"requests": request.app["requests"],
                              "running": request.app["running"]})


async def _ok(_: web.Request) -> web.Response:
    return web.json_response({})


async def register_forever(args: argparse.Namespace,
                           engine_paths: list[str] | None = None) -> None:
    registration = Registration(
        worker_id=args.worker_id, engine_url=f"http://{args.host}:{args.port}",
        model_names=[args.model], max_model_len=MAX_MODEL_LEN, state=WorkerState.READY,
        engine_paths=engine_paths,
    )
    async with httpx.AsyncClient() as http:
        token = ClusterTokenSettings().cluster_token  # FLEET_CLUSTER_TOKEN, as a worker's
        controller = ControllerClient(args.controller_address, http,
                                      token=token.get_secret_value() if token else None)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if not controller.registered:
                    await controller.register(registration)
                else:
                    await controller.heartbeat(args.worker_id,
                                               Heartbeat(state=WorkerState.READY))
            await asyncio.sleep(0.5)


async def _serve(args: argparse.Namespace) -> None:
    app = web.Application()
    app["model"], app["requests"] = args.model, 0
    app["chunks"], app["interval"] = args.chunks, args.interval_ms / 1000
    app["delay"] = args.delay_ms / 1000
    app["status"], app["cut_after"] = args.status, args.cut_after
    app["running"], app["token_ids"], app["stall_after"] = 0, args.token_ids, args.stall_after
    if args.no_listen:
        await register_forever(args, engine_paths=PATHS)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/audio/transcriptions", _transcribe)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/health", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    # As many waiting connections as uvicorn (and so vLLM) allows: a burst of streams from the
    # gateway must not overflow the accept queue.
    await web.TCPSite(runner, args.host, args.port, backlog=2048).start()
    await register_forever(args, engine_paths=PATHS)


def add_registration_flags(parser: argparse.ArgumentParser, worker_id: str) -> None:
    """Where the engine listens and what it registers as: what `register_forever` reads."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--controller-address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--worker-id", default=worker_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_registration_flags(parser, "fake")
    parser.add_argument("--chunks", type=int, default=len(WORDS),
                        help="content chunks per streamed answer (default 8)")
    parser.add_argument("--interval-ms", type=float, default=0.0,
                        help="pause between streamed chunks (default 0)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="pause before each answer's first byte (default 0)")
    parser.add_argument("--status", type=int, default=200,
                        help="answer generation requests with this status (default 200)")
    parser.add_argument("--cut-after", type=int, default=None,
                        help="drop the connection after this many streamed chunks")
    parser.add_argument("--stall-after", type=int, default=None,
                        help="go silent after this many streamed chunks (--token-ids streams)")
    parser.add_argument("--token-ids", action="store_true",
                        help="stream token ids as vLLM does when asked, and continue from them")
    parser.add_argument("--no-listen", action="store_true",
                        help="register, but listen nowhere: connections are refused")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
