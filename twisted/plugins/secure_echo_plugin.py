"""The twistd plugin: ``twistd secure-echo``.

Only names the service maker.  ``twistd --help`` imports every plugin file, so the
service module is given as a string and loaded when the command is run.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

secure_echo = ServiceMaker(
    "secure-echo",
    "secure_echo.tap",
    "A hardened TLS line-echo daemon",
    "secure-echo",
)

#: ``twistd --reactor=secure-echo-epoll``: the epoll reactor without a log context
#: per socket event (see :mod:`secure_echo.daemon.reactor`).
secure_echo_epoll = Reactor(
    "secure-echo-epoll",
    "secure_echo.daemon.reactor",
    "epoll, dispatching socket events without a legacy log context each",
)
