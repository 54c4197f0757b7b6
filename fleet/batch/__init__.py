"""`fleet batch`: files of requests through the gateway, or offline with vLLM's `LLM` class."""
