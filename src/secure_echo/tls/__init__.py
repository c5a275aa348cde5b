"""TLS: the connection lifecycle, its Twisted glue, record I/O, policy, allow-lists, the record."""
