"""Bearer tokens for the registry token flow that docker, containerd and podman speak.

A token says who the caller is (a user, or anonymous) until it expires; grants are still
checked per request. It is signed with a secret every edge replica shares, so any
replica accepts a token another one issued. A user's token is also bound to the account's
stored password hash: removing the account or changing its password voids every token
issued before, on every replica, without a revocation list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Mapping

from shared import validity

TOKEN_TTL = 300
# The `service` of our challenges and tokens (docker echoes it to the token endpoint).
TOKEN_SERVICE = "seawall"
# Tokens are base64url segments joined by a dot; anything longer is not one of ours.
_MAX_TOKEN_CHARS = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidToken(ValueError):
    """Malformed, forged, expired, or issued to an account that changed or is gone."""


class TokenSigner:
    def __init__(self, secret: bytes, ttl: int = TOKEN_TTL) -> None:
        self._secret = secret
        self.ttl = ttl

    def _sign(self, payload: str) -> bytes:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()).encode()

    def _binding(self, user: str, password_hash: str) -> str:
        # Keyed, so the claim tells nothing about the hash; short, as it only has to differ
        # when the hash does.
        message = b"password-binding\0" + user.encode() + b"\0" + password_hash.encode()
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest()[:12])

    def issue(self, user: str | None, password_hash: str | None = None, now: float | None = None) -> str:
        """A token for `user` (bound to its stored `password_hash`), or an anonymous one."""
        issued = time.time() if now is None else now
        claims: dict[str, str | int] = {"sub": user or "", "exp": int(issued + self.ttl)}
        if user:
            if not password_hash:
                raise ValueError("a user's token must be bound to the user's password hash")
            claims["pwd"] = self._binding(user, password_hash)
        payload = _b64(json.dumps(claims).encode())
        return f"{payload}.{self._sign(payload).decode()}"

    def verify(self, token: str, accounts: Mapping[str, str], now: float | None = None) -> str | None:
        """The user the token was issued to, None for an anonymous token.

        `accounts` maps each user to its current stored password hash: a token whose user is
        missing from it, or whose binding names another hash, no longer verifies.
        """
        token = token.strip()
        # Header values reach us as text that may hold any character; a token is ASCII.
        if not token.isascii() or len(token) > _MAX_TOKEN_CHARS:
            raise InvalidToken("token is malformed")
        payload, _, signature = token.partition(".")
        if not payload or not hmac.compare_digest(signature.encode(), self._sign(payload)):
            raise InvalidToken("token signature does not verify")
        try:
            claims = json.loads(_unb64(payload))
            expires = float(claims["exp"])
            user = claims["sub"]
            binding = claims.get("pwd", "")
        except (ValueError, UnicodeDecodeError, binascii.Error, TypeError, KeyError, AttributeError):
            raise InvalidToken("token payload is malformed") from None
        if not isinstance(user, str) or not isinstance(binding, str) or not math.isfinite(expires):
            raise InvalidToken("token payload is malformed")
        if expires < (time.time() if now is None else now):
            raise InvalidToken("token expired")
        validity.depends_until_wallclock(expires)
        if not user:
            return None
        stored = accounts.get(user)
        if stored is None or not hmac.compare_digest(binding.encode(), self._binding(user, stored).encode()):
            # One message for both, so a token's holder cannot tell a removed account
            # from a changed password.
            raise InvalidToken("token was issued for credentials that are no longer valid")
        return user
