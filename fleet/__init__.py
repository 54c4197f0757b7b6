"""The user tools of llm-fleet: the `fleet` CLI, `fleet up`, `fleet chat`, `fleet batch`, the
Python client and the demo model. What the services share is `fleetcore`."""
