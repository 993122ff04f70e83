"""Human durations for the command line and settings: ``90m``, ``12h``, ``30d``, ``2w``."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from lib.errors import ValidationFailedError

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"^\s*(\d{1,6})\s*([smhdw])\s*$", re.IGNORECASE)
# Far beyond any key's useful life, and far from the ends of datetime's range: a date this far
# from now is always representable (999999w is 19,000 years: an OverflowError, a 500, before).
MAX_DURATION = timedelta(days=100 * 366)


def parse_duration(text: str) -> timedelta:
    """``N`` followed by s, m, h, d or w; must be positive and at most :data:`MAX_DURATION`."""
    match = _DURATION.match(text)
    if not match:
        raise ValidationFailedError(
            f"invalid duration {text[:40]!r}: expected a number and a unit, like 90m, 12h, 30d or 2w"
        )
    amount = int(match.group(1))
    if amount == 0:
        raise ValidationFailedError("a duration must be positive")
    duration = timedelta(**{_UNITS[match.group(2).lower()]: amount})
    if duration > MAX_DURATION:
        raise ValidationFailedError(f"a duration must be at most {MAX_DURATION.days // 366} years")
    return duration


def parse_since(text: str, now: datetime) -> datetime:
    """A point in time: a duration back from ``now`` (``7d``) or an ISO date/datetime (UTC if naive)."""
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationFailedError(
            f"invalid time {text[:40]!r}: expected a duration like 7d or an ISO date like 2025-01-31"
        ) from None
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last representable moment in UTC
        raise ValidationFailedError(f"time {text[:40]!r} is out of range") from None
