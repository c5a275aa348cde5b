"""Command-line tools and certificate making: the client, secure-echo-certs, dev certificates."""
