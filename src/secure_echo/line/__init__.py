"""The line protocol: framing, the handler interface, ordered replies.

Knows nothing of TLS: it is the application protocol of any transport.
"""
