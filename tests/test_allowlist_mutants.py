"""The allow-list's refusal text, word for word (mutation testing found it unchecked)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.allowlist import AllowList, AllowListError


class SpkiMessageTests(SynchronousTestCase):
    """A malformed pin's message tells the operator what to give instead."""

    def test_whole_message(self) -> None:
        """The message names the option, the value and what a pin is, exactly."""
        error = self.assertRaises(AllowListError, AllowList.build, spki=["abc"])
        self.assertEqual(
            str(error),
            "--allow-spki-sha256: 'abc' is not 64 hex digits; give the SHA-256 of "
            "the client key's SubjectPublicKeyInfo in hex",
        )
