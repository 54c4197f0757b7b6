"""`fleet test-message`: ask the controller for a worker of a model and stream a reply from it.

Like FastChat's test_message, it talks to the worker's engine directly, so it checks a worker
without the gateway in the way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import httpx
import openai
from pydantic import ValidationError

from controller.protocol import ModelList, WorkerList, WorkerRecord, WorkerState
from fleet.cluster_auth import ControllerCredentials, add_token_flags, bearer
from fleet.tls import ClientTLSSettings, add_client_tls_flags


class _ClientSettings(ControllerCredentials, ClientTLSSettings):
    """The token (read or cluster) and the CA; from flags over the shared environment."""


def _pick(workers: list[WorkerRecord]) -> WorkerRecord | None:
    ready = [w for w in workers if w.state is WorkerState.READY]
    return min(ready, key=lambda w: w.load.running + w.load.waiting, default=None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet test-message", description="Send one chat message to a worker of a model."
    )
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--message", default="Tell me a story with more than 1000 words.")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    add_token_flags(parser, read=True)
    add_client_tls_flags(parser)
    args = parser.parse_args(argv)
    controller = args.controller_address.rstrip("/")
    try:
        settings = _ClientSettings(**{
            k: getattr(args, k) for k in ("cluster_token_file", "read_token_file", "ssl_ca_file")
            if getattr(args, k) is not None
        })
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verify = settings.ssl_context()

    try:
        with httpx.Client(timeout=10.0, verify=verify,
                          headers=bearer(settings.controller_token())) as client:
            listed = client.get(f"{controller}/models")
            if listed.status_code in (401, 403):
                print(f"error: the controller refused the token ({listed.status_code}): set "
                      "FLEET_CLUSTER_TOKEN or FLEET_READ_TOKEN, or pass --cluster-token-file",
                      file=sys.stderr)
                return 1
            models = ModelList.model_validate_json(listed.content)
            print(f"Models: {', '.join(models.models) or '(none)'}")
            response = client.get(f"{controller}/models/{args.model_name}/workers")
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the controller at {controller}: {exc}", file=sys.stderr)
        return 1
    workers = WorkerList.model_validate_json(response.content).workers if response.is_success \
        else []
    worker = _pick(workers)
    if worker is None:
        states = ", ".join(f"{w.worker_id}={w.state.value}" for w in workers) or "none"
        print(f"error: no ready worker serves model '{args.model_name}' (workers: {states})",
              file=sys.stderr)
        return 1
    print(f"Worker: {worker.worker_id} at {worker.engine_url} ({worker.device})")
    print(f"USER: {args.message}")
    print("ASSISTANT: ", end="", flush=True)
    engine = openai.OpenAI(
        base_url=f"{str(worker.engine_url).rstrip('/')}/v1",
        api_key=worker.engine_api_key or "none", timeout=120.0, max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=verify),
    )
    try:
        stream = engine.chat.completions.create(
            model=args.model_name,
            messages=[{"role": "user", "content": args.message}],
            max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
    except openai.OpenAIError as exc:
        print(f"\nerror: the worker failed: {exc}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
