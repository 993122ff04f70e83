"""Login backoff and bounded password hashing for the resource API (docs/security-sealed.md).

Each login costs a scrypt (~100 ms of CPU, 32 MiB). :class:`LoginThrottle` counts failed logins
per client address and per account; past a few free failures each further one locks that key for
an exponentially growing time (capped), and a locked key is answered ``429`` with ``Retry-After``
*before* any hashing, so guessing gets slow and cheap to refuse. A success clears both counts;
a key with no failure for ``forget_s`` is forgotten. :class:`HashingSlots` bounds how many hashes
run at once (the rest wait briefly, then get a 429), so a flood of logins cannot take all memory.

The counts live in the memory of one server process: with several replicas, each throttles on
its own (an attacker gets replicas x the free attempts, no more).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lib.errors import RateLimitedError


class ThrottledError(RateLimitedError):
    """Too many failed logins, or too many at once: try again after ``Retry-After`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def __reduce__(self) -> tuple[type[ThrottledError], tuple[str, int]]:
        return (ThrottledError, (self.message, self.retry_after))


@dataclass
class _Count:
    failures: int = 0
    locked_until: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class BackoffPolicy:
    free_failures: int
    base_s: float
    max_s: float

    def lock_for(self, failures: int) -> float:
        """How long the ``failures``-th failure in a row locks: from the ``free_failures``-th on."""
        extra = failures - self.free_failures
        return 0.0 if extra < 0 else min(self.max_s, self.base_s * 2**extra)


# A client address: 5 failures, then locked 1 s, 2 s, 4 s ... after each further one, up to 15 min.
ADDRESS_POLICY = BackoffPolicy(free_failures=5, base_s=1.0, max_s=900.0)
# An account, whatever the address (a distributed guesser): 10 free, then up to one minute, so
# an attacker cannot lock a fleet's reader account out for long.
ACCOUNT_POLICY = BackoffPolicy(free_failures=10, base_s=1.0, max_s=60.0)


class LoginThrottle:
    """Failed-login counts per address and per account, bounded to ``max_keys`` entries each."""

    def __init__(
        self,
        *,
        address_policy: BackoffPolicy = ADDRESS_POLICY,
        account_policy: BackoffPolicy = ACCOUNT_POLICY,
        forget_s: float = 3600.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies = {"address": address_policy, "account": account_policy}
        self._counts: dict[str, OrderedDict[str, _Count]] = {
            "address": OrderedDict(), "account": OrderedDict()
        }
        self._forget_s = forget_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()

    def _keys(self, account: str, address: str) -> Iterator[tuple[str, str]]:
        yield "address", address
        yield "account", account

    def check(self, account: str, address: str) -> None:
        """:class:`ThrottledError` while the address or the account is locked."""
        now = self._clock()
        with self._lock:
            wait = 0.0
            for kind, key in self._keys(account, address):
                count = self._counts[kind].get(key)
                if count is not None:
                    wait = max(wait, count.locked_until - now)
        if wait > 0:
            raise ThrottledError("too many failed logins: try again later", retry_after=math.ceil(wait))

    def failed(self, account: str, address: str) -> None:
        now = self._clock()
        with self._lock:
            for kind, key in self._keys(account, address):
                counts = self._counts[kind]
                count = counts.get(key)
                if count is None or now - count.last > self._forget_s:
                    count = _Count()
                count.failures += 1
                count.last = now
                count.locked_until = now + self._policies[kind].lock_for(count.failures)
                counts[key] = count
                counts.move_to_end(key)
                while len(counts) > self._max_keys:
                    counts.popitem(last=False)

    def succeeded(self, account: str, address: str) -> None:
        with self._lock:
            for kind, key in self._keys(account, address):
                self._counts[kind].pop(key, None)


class HashingSlots:
    """At most ``slots`` password hashes at once; a caller waits up to ``wait_s`` for one."""

    def __init__(self, slots: int, *, wait_s: float = 5.0) -> None:
        self._semaphore = threading.BoundedSemaphore(slots)
        self._wait_s = wait_s

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._semaphore.acquire(timeout=self._wait_s):
            raise ThrottledError("the server is busy with other logins: try again shortly", retry_after=1)
        try:
            yield
        finally:
            self._semaphore.release()
