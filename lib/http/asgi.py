"""The ASGI type aliases, written against the ASGI spec alone (one definition for all of lib/http).

``AsgiScope`` is the ASGI connection scope; it is not :class:`lib.accounts.records.Scope`, the
permission a key grants.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

AsgiScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[AsgiScope, Receive, Send], Awaitable[None]]
