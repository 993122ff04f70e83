"""The one error hierarchy of sealserve.

Every error a client may see is a subclass of :class:`SealserveError` with a class-level HTTP
``status_code`` and a stable machine-readable ``code``. The ingress has one exception handler that
turns any of them into the documented body ``{"error": {"code", "message", "request_id"}}``.

These exceptions cross Ray boundaries (a model replica raises, the ingress answers), so every
constructor takes the message only: that keeps them picklable with the default ``__reduce__``.
Messages must never contain a secret, key, token or password.
"""

from __future__ import annotations


class SealserveError(Exception):
    """Base class: an error with a meaning for the client."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class BadRequestError(SealserveError):
    """The request is malformed."""

    status_code = 400
    code = "bad_request"


class PublishError(BadRequestError):
    """The model cannot be published as given (bad path, link, special file, unknown kind)."""

    code = "publish_error"


class KeyFileError(BadRequestError):
    """The key file is missing, unreadable or not a 64-hex-character key."""

    code = "bad_key_file"


class InvalidImageError(BadRequestError):
    """The image could not be decoded."""

    code = "invalid_image"


class AuthenticationError(SealserveError):
    """Missing or invalid credentials."""

    status_code = 401
    code = "unauthorized"


class PermissionDeniedError(SealserveError):
    """The credentials are valid but do not allow this."""

    status_code = 403
    code = "forbidden"


class MethodNotAllowedError(SealserveError):
    """The route does not take this HTTP method."""

    status_code = 405
    code = "method_not_allowed"


class NotFoundError(SealserveError):
    """The resource does not exist."""

    status_code = 404
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """No model with this id is in the catalog."""

    code = "model_not_found"


class PayloadTooLargeError(SealserveError):
    """The request body is larger than the configured limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(SealserveError):
    """The request body is not of a supported media type."""

    status_code = 415
    code = "unsupported_media_type"


class ValidationFailedError(SealserveError):
    """The request is well-formed but its values are not acceptable."""

    status_code = 422
    code = "validation_error"


class WrongModelKindError(ValidationFailedError):
    """The model exists but cannot serve this kind of request."""

    code = "wrong_model_kind"


class RateLimitedError(SealserveError):
    """Too many requests for this credential."""

    status_code = 429
    code = "rate_limited"


class ServiceUnavailableError(SealserveError):
    """A dependency of this request is not available right now."""

    status_code = 503
    code = "service_unavailable"


class ModelUnavailableError(ServiceUnavailableError):
    """The model is known but could not be loaded."""

    code = "model_unavailable"


class UpstreamError(ServiceUnavailableError):
    """A remote service (resource API, S3) failed after bounded retries."""

    code = "upstream_error"


class GatewayTimeoutError(SealserveError):
    """The request did not finish within its time limit."""

    status_code = 504
    code = "timeout"


class ConfigurationError(SealserveError):
    """The service is misconfigured; raised at start, never per request."""

    code = "configuration_error"


class IntegrityError(ServiceUnavailableError):
    """Sealed data failed verification: tampered, truncated, reordered, or the wrong key."""

    code = "integrity_error"


# The one mapping between HTTP statuses and errors: the first-level class of each status. The
# HTTP layer names a status it did not raise itself by it; the resource client raises it back.
ERRORS_BY_STATUS: dict[int, type[SealserveError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        MethodNotAllowedError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        ValidationFailedError,
        RateLimitedError,
        ServiceUnavailableError,
        GatewayTimeoutError,
    )
}


def code_for_status(status: int) -> str:
    """The stable ``code`` of an HTTP status (``http_error`` for one sealserve never answers)."""
    error = ERRORS_BY_STATUS.get(status)
    return error.code if error is not None else "http_error"
