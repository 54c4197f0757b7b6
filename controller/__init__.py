"""The controller: the registry of workers, with register, heartbeat, expiry, models and load."""
