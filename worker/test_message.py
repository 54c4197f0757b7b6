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

from controller.protocol import ModelList, WorkerList, WorkerRecord, WorkerState


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
    args = parser.parse_args(argv)
    controller = args.controller_address.rstrip("/")

    try:
        with httpx.Client(timeout=10.0) as client:
            models = ModelList.model_validate_json(client.get(f"{controller}/models").content)
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
    client = openai.OpenAI(
        base_url=f"{str(worker.engine_url).rstrip('/')}/v1",
        api_key=worker.engine_api_key or "none", timeout=120.0, max_retries=0,
    )
    try:
        stream = client.chat.completions.create(
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
