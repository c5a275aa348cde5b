"""The twistd plugin: ``twistd secure-echo``.

Only names the service maker.  ``twistd --help`` imports every plugin file, so the
service module is given as a string and loaded when the command is run.
"""

from twisted.application.service import ServiceMaker

secure_echo = ServiceMaker(
    "secure-echo",
    "secure_echo.tap",
    "A hardened TLS line-echo daemon",
    "secure-echo",
)
