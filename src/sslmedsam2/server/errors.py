"""What the server answers when it refuses a request: a one-line message and an HTTP status."""

from __future__ import annotations

from sslmedsam2.errors import UserError


class ServiceError(UserError):
    """A request the server refuses; `status` is its HTTP status."""

    status = 400
    code = "bad_request"


class TooLarge(ServiceError):
    status = 413
    code = "too_large"


class OutOfMemory(ServiceError):
    status = 507
    code = "out_of_memory"


class Timeout(ServiceError):
    status = 408
    code = "timeout"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class SessionGone(NotFound):
    code = "session_gone"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
