"""Exceptions of the rungate client.

Owns the mapping from the gateway's error frames (``{"code", "message",
"retryable", "details"}``) to exception classes, and the client-side
failures (lost connection, timeout, refused handshake). Must not decide what
to do about an error: the runtime and viewer clients do.
"""

from __future__ import annotations

from typing import Any, Mapping


class RungateError(Exception):
    """Base of every error this package raises.

    ``code`` is the protocol error code (``"STALE_EPOCH"``, ``"RUN_ENDED"``,
    ...) when the gateway sent one, else ``None``.
    """

    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.message = message
        if code is not None:
            self.code = code
        self.retryable = retryable
        self.details: dict[str, Any] = dict(details or {})

    @property
    def run_id(self) -> str | None:
        """The run the error names in ``details.runId``, if any."""
        run = self.details.get("runId")
        return run if isinstance(run, str) else None


class GatewayError(RungateError):
    """The gateway answered with an error frame (or refused the handshake
    with an error body)."""

    @staticmethod
    def from_body(body: Mapping[str, Any]) -> GatewayError:
        code = body.get("code")
        code = code if isinstance(code, str) else "INTERNAL"
        message = body.get("message")
        details = body.get("details")
        cls = _BY_CODE.get(code, GatewayError)
        return cls(
            message if isinstance(message, str) else "",
            code=code,
            retryable=body.get("retryable") is True,
            details=details if isinstance(details, dict) else None,
        )


class BadFrameError(GatewayError):
    code = "BAD_FRAME"


class UnknownTypeError(GatewayError):
    code = "UNKNOWN_TYPE"


class InvalidPayloadError(GatewayError):
    code = "INVALID_PAYLOAD"


class UnauthenticatedError(GatewayError):
    code = "UNAUTHENTICATED"


class ForbiddenError(GatewayError):
    code = "FORBIDDEN"


class NotAttachedError(GatewayError):
    code = "NOT_ATTACHED"


class StaleEpochError(GatewayError):
    """The session moved to a newer connection (``session.superseded``, or a
    command answered ``STALE_EPOCH``): this client no longer holds it."""

    code = "STALE_EPOCH"


class SessionExpiredError(GatewayError):
    """The session's lease ran out (``session.expired`` or
    ``SESSION_EXPIRED``) and could not be renewed."""

    code = "SESSION_EXPIRED"


class ConflictError(GatewayError):
    code = "CONFLICT"


class NotFoundError(GatewayError):
    code = "NOT_FOUND"


class RateLimitedError(GatewayError):
    code = "RATE_LIMITED"


class PayloadTooLargeError(GatewayError):
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedProtocolError(GatewayError):
    code = "UNSUPPORTED_PROTOCOL"


class DrainingError(GatewayError):
    code = "DRAINING"


class InternalError(GatewayError):
    code = "INTERNAL"


class RunEndedError(GatewayError):
    """The run has ended (``runtime.finish``); ``details.outcome`` says how."""

    code = "RUN_ENDED"


class QuotaExceededError(GatewayError):
    """The write would take the token's tenant past a quota; nothing was
    stored. ``details`` has ``quota`` (``runs``, ``kvBytes`` or
    ``checkpointBytes``), ``used``, ``requested`` and ``limit``."""

    code = "QUOTA_EXCEEDED"


_BY_CODE: dict[str, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        BadFrameError,
        UnknownTypeError,
        InvalidPayloadError,
        UnauthenticatedError,
        ForbiddenError,
        NotAttachedError,
        StaleEpochError,
        SessionExpiredError,
        ConflictError,
        NotFoundError,
        RateLimitedError,
        PayloadTooLargeError,
        UnsupportedProtocolError,
        DrainingError,
        InternalError,
        RunEndedError,
        QuotaExceededError,
    )
    if cls.code is not None
}


def error_from_body(body: Mapping[str, Any]) -> GatewayError:
    """An error frame's ``error`` object as an exception."""
    return GatewayError.from_body(body)


class ConnectError(RungateError):
    """The gateway could not be reached, or refused the WebSocket handshake.

    ``status`` is the HTTP status of a refusal (401, 403, 429, 503...);
    ``code`` is the error code from the refusal's body when it had one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = True,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable, details=details)
        self.status = status

    @property
    def is_refusal(self) -> bool:
        """A refused token (401/403): retrying with the same one is useless."""
        return self.status in (401, 403)


class ConnectionLostError(RungateError):
    """The socket was lost after the request was sent and before its answer
    came: the request may or may not have been applied. Publishes never fail
    this way (they are resent)."""

    def __init__(self, message: str = "the connection was lost before the answer came") -> None:
        super().__init__(message, retryable=True)


class RequestTimeoutError(RungateError):
    """No answer within the request timeout; the request may have been applied."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no answer within {timeout:g} s", retryable=True)
        self.timeout = timeout


class ClientClosedError(RungateError):
    """The client was closed (or gave up: see ``__cause__``)."""

    def __init__(self, message: str = "the client is closed") -> None:
        super().__init__(message)


class NoSessionError(RungateError):
    """The run was not attached through this client."""


class BadReplyError(RungateError):
    """A reply did not have the shape the protocol promises."""
