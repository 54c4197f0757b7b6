"""A Python client for the gateway: `Chat` (multi-turn, streamed or not) and typed errors.

    from fleet.client import Chat, NoWorkerError
"""

from fleet.client.chat import Chat, ChatStream, Message, Sampling, api_base
from fleet.client.errors import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    FleetAPIError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    ModelNotFoundError,
    NoWorkerError,
    OverloadedError,
    PermissionDeniedError,
    RequestTimeoutError,
    ServerError,
    StreamError,
    from_openai,
)

__all__ = [
    "AuthenticationError", "BadGatewayError", "BadRequestError", "Chat", "ChatStream",
    "FleetAPIError", "GatewayTimeoutError", "GatewayUnreachableError", "Message",
    "ModelNotFoundError", "NoWorkerError", "OverloadedError", "PermissionDeniedError",
    "RequestTimeoutError", "Sampling", "ServerError", "StreamError", "api_base", "from_openai",
]
