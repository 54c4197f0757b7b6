"""A Python client for the gateway: `Chat` (multi-turn, streamed or not) and typed errors.

    from fleet.client import Chat, NoWorkerError

The errors are `fleetcore.errors`' classes, the ones the gateway raised; four go by the names
this client has always given them: `FleetAPIError` (every error), `BadRequestError` (400),
`ModelNotFoundError` (404) and `NoWorkerError` (503).
"""

from fleet.client.chat import Chat, ChatStream, Message, Sampling, api_base
from fleetcore.errors import (
    AuthenticationError,
    BadGatewayError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    StreamError,
)
from fleetcore.errors import FleetError as FleetAPIError
from fleetcore.errors import InvalidRequestError as BadRequestError
from fleetcore.errors import NotFoundError as ModelNotFoundError
from fleetcore.errors import ServiceUnavailableError as NoWorkerError
from fleetcore.openai_errors import from_openai

__all__ = [
    "AuthenticationError", "BadGatewayError", "BadRequestError", "Chat", "ChatStream",
    "FleetAPIError", "GatewayTimeoutError", "GatewayUnreachableError", "Message",
    "ModelNotFoundError", "NoWorkerError", "OverloadedError", "PermissionDeniedError",
    "RateLimitError", "RequestTimeoutError", "Sampling", "ServerError", "StreamError", "api_base",
    "from_openai",
]
