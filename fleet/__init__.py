"""Shared pieces of llm-fleet: the `fleet` CLI, the launcher, the demo model and the error body."""
