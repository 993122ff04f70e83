"""Turning Ray's wrappers back into the errors our code raised."""

from __future__ import annotations

from ray.exceptions import RayTaskError


def unwrap(exc: BaseException) -> BaseException:
    """The exception a remote method raised, without Ray's RayTaskError wrapper(s).

    A deployment or actor that raises ``ModelNotFoundError`` reaches its caller as a
    ``RayTaskError`` whose ``cause`` is the original; re-raising the original keeps the error's
    class, status code and clean message across any number of hops.
    """
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc
