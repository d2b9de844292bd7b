"""TLS helpers shared by destinations that speak HTTPS."""

from __future__ import annotations

import ssl

__all__ = ["untrusted_certificate"]


def untrusted_certificate(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate-verification failure somewhere in `exc`'s chain of causes, if there is one.

    httpx and trio wrap it a few layers deep; destinations report it as a configuration problem (halted,
    with a `tls.ca_file` hint) rather than retrying it as network trouble."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 32:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None
