"""Bearer tokens for the registry token flow that docker, containerd and podman speak.

A token says who the caller is (a user, or anonymous) until it expires; grants are still
checked per request. It is signed with a secret every edge replica shares, so any
replica accepts a token another one issued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

TOKEN_TTL = 300
# The `service` of our challenges and tokens (docker echoes it to the token endpoint).
TOKEN_SERVICE = "seawall"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidToken(ValueError):
    """Malformed, forged or expired."""


class TokenSigner:
    def __init__(self, secret: bytes, ttl: int = TOKEN_TTL) -> None:
        self._secret = secret
        self.ttl = ttl

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def issue(self, user: str | None, now: float | None = None) -> str:
        issued = time.time() if now is None else now
        payload = _b64(json.dumps({"sub": user or "", "exp": int(issued + self.ttl)}).encode())
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The user the token was issued to, None for an anonymous token."""
        payload, _, signature = token.strip().partition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            raise InvalidToken("token signature does not verify")
        try:
            claims = json.loads(_unb64(payload))
        except (ValueError, UnicodeDecodeError):
            raise InvalidToken("token payload is malformed") from None
        if float(claims.get("exp", 0)) < (time.time() if now is None else now):
            raise InvalidToken("token expired")
        return str(claims.get("sub") or "") or None
