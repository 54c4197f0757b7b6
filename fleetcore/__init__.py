"""The kernel every llm-fleet service shares: errors and the OpenAI error body, TLS, the cluster
token, logging, settings from flags and the environment, JSON types, chat templates, and where a
client finds the gateway. It imports no service and nothing of `fleet` (the user tools)."""
