"""``--workers N``: the supervisor, the worker process and their wire contract."""
