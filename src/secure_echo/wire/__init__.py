"""Pure codecs of what crosses the wire before our protocol: no I/O, no Twisted.

The server reads with them (:mod:`secure_echo.edge`) and the client writes with them
(:mod:`secure_echo.tools.client`), so they sit below both.
"""
