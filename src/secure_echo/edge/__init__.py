"""What happens to a socket before TLS: connection limits, the PROXY protocol reader, addresses."""
