"""`fleet test-message`: ask the controller for a worker of a model and stream a reply from it.

Like FastChat's test_message, it talks to the worker's engine directly, so it checks a worker
without the gateway in the way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import httpx
import openai
from pydantic import Field, ValidationError
from pydantic_settings import SettingsConfigDict

from controller.protocol import ModelList, WorkerList, WorkerRecord, WorkerState
from fleetcore.cluster_auth import ControllerCredentials, bearer
from fleetcore.settings_cli import CliSettings
from fleetcore.tls import ClientTLSSettings


class MessageSettings(CliSettings, ControllerCredentials, ClientTLSSettings):
    """The token (read or cluster) and the CA come from the shared environment too."""

    model_config = SettingsConfigDict(env_prefix="FLEET_TEST_MESSAGE_")
    cli_prog = "fleet test-message"
    cli_description = "Send one chat message to a worker of a model."

    controller_address: str = Field("http://127.0.0.1:21001", description="The controller's URL.")
    model_name: str = Field(description="The model to ask a worker of.")
    message: str = Field("Tell me a story with more than 1000 words.",
                         description="The user message.")
    max_tokens: int = Field(256, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")


def _pick(workers: list[WorkerRecord]) -> WorkerRecord | None:
    ready = [w for w in workers if w.state is WorkerState.READY]
    return min(ready, key=lambda w: w.load.running + w.load.waiting, default=None)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = MessageSettings.from_cli(argv)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    controller = settings.controller_address.rstrip("/")
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
            response = client.get(f"{controller}/models/{settings.model_name}/workers")
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the controller at {controller}: {exc}", file=sys.stderr)
        return 1
    workers = WorkerList.model_validate_json(response.content).workers if response.is_success \
        else []
    worker = _pick(workers)
    if worker is None:
        states = ", ".join(f"{w.worker_id}={w.state.value}" for w in workers) or "none"
        print(f"error: no ready worker serves model '{settings.model_name}' (workers: {states})",
              file=sys.stderr)
        return 1
    print(f"Worker: {worker.worker_id} at {worker.engine_url} ({worker.device})")
    print(f"USER: {settings.message}")
    print("ASSISTANT: ", end="", flush=True)
    engine = openai.OpenAI(
        base_url=f"{str(worker.engine_url).rstrip('/')}/v1",
        api_key=worker.engine_api_key or "none", timeout=120.0, max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=verify),
    )
    try:
        stream = engine.chat.completions.create(
            model=settings.model_name,
            messages=[{"role": "user", "content": settings.message}],
            max_tokens=settings.max_tokens, temperature=settings.temperature, stream=True,
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
