"""The worker: runs vLLM's OpenAI server pinned to a device and keeps the controller informed."""
