"""How long an answer stays right: the earliest expiry of everything it was built from.

A request that may keep its answer (the edge's warm manifest answers, services/edge/hot.py)
opens a `Validity` around its handler. What the handler reads from an expiring source
tells it: an in-process lookup entry (`shared/localcache.py`) gives its expiry, a token its
`exp`, a cached login its own expiry. Anything read from elsewhere (Redis, the bucket, a
full login) marks it incomplete, and an incomplete answer is not kept at all: the next
request, served from the entries this one left behind, can be.

Outside such a request nothing is tracked and every call here costs one context lookup.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar, Token


class Validity:
    __slots__ = ("complete", "until")

    def __init__(self) -> None:
        self.until = math.inf  # time.monotonic() when the first dependency expires
        self.complete = True

    def keepable_for(self, now: float) -> float:
        """Seconds the answer may be kept from `now` (0 when it may not be kept)."""
        if not self.complete or self.until == math.inf:
            return 0.0
        return max(self.until - now, 0.0)


_CURRENT: ContextVar[Validity | None] = ContextVar("seawall_validity", default=None)


def track() -> tuple[Validity, Token[Validity | None]]:
    """Start tracking this request's dependencies; give the token to `untrack`."""
    validity = Validity()
    return validity, _CURRENT.set(validity)


def untrack(token: Token[Validity | None]) -> None:
    _CURRENT.reset(token)


def depends_until(expires: float) -> None:
    """The answer being built depends on something that expires at `expires` (monotonic)."""
    validity = _CURRENT.get()
    if validity is not None and expires < validity.until:
        validity.until = expires


def depends_until_wallclock(expires: float) -> None:
    """As `depends_until`, for an expiry in `time.time()` seconds (a token's `exp`)."""
    if _CURRENT.get() is not None:
        depends_until(time.monotonic() + (expires - time.time()))


def read_elsewhere() -> None:
    """The answer being built read something that no local expiry covers: do not keep it."""
    validity = _CURRENT.get()
    if validity is not None:
        validity.complete = False
