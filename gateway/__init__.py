"""The gateway: the OpenAI-compatible front door that routes each request to a worker's engine."""
