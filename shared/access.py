"""Who may do what: HTTP Basic users with argon2 hashes and per-project grants."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import time
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from shared.oci.errors import RegistryError
from shared.settings import Project, Settings
from shared.tokens import InvalidToken, TokenSigner

# Verified credentials are remembered briefly: argon2 costs tens of milliseconds by
# design, and docker sends the same Basic header on every request of a pull.
_VERIFIED_TTL = 300.0


class Action(StrEnum):
    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"


def unauthorized(message: str = "authentication required") -> RegistryError:
    # The edge's error middleware adds the Bearer challenge, which needs the request's URL.
    return RegistryError("UNAUTHORIZED", message)


class Access:
    def __init__(self, settings: Settings, tokens: TokenSigner | None = None) -> None:
        self.tokens = tokens
        self._hashes = {u.name: u.password_hash.get_secret_value() for u in settings.users}
        self._hasher = PasswordHasher()
        self._decoy = self._hasher.hash(os.urandom(16).hex())
        self._verified: dict[bytes, tuple[str, float]] = {}
        # A per-process key so the cache never holds a reusable form of a password.
        self._cache_key = os.urandom(32)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def authenticate(self, authorization: str | None) -> str | None:
        """The user named by a Basic or Bearer header, None when anonymous; bad ones raise."""
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.tokens is not None:
            try:
                return self.tokens.verify(value)
            except InvalidToken as exc:
                raise unauthorized(f"invalid token: {exc}") from None
        if scheme.lower() != "basic":
            raise unauthorized("use HTTP Basic credentials or a token from the token endpoint")
        fingerprint = hmac.new(self._cache_key, value.strip().encode(), hashlib.sha256).digest()
        cached = self._verified.get(fingerprint)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise unauthorized("malformed Basic credentials") from None
        if not user and not password:
            # skopeo and podman answer a Basic challenge with empty credentials when
            # they have none: that is an anonymous request, not a failed login.
            return None
        stored = self._hashes.get(user)
        if stored is None:
            # Spend the same argon2 time as for a known user, so response times do not
            # tell which user names exist.
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(self._decoy, password)
            raise unauthorized("unknown user or wrong password")
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            raise unauthorized("unknown user or wrong password") from None
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[fingerprint] = (user, time.monotonic() + _VERIFIED_TTL)
        return user

    @staticmethod
    def allowed(user: str | None, project: Project, action: Action) -> bool:
        if action is Action.PULL:
            return project.public or (
                user is not None and user in {*project.pull, *project.push, *project.delete}
            )
        if action is Action.PUSH:
            return user is not None and user in project.push
        return user is not None and user in project.delete

    def require(self, user: str | None, project: Project, action: Action) -> None:
        if self.allowed(user, project, action):
            return
        if user is None:
            raise unauthorized(f"{action} on project {project.name!r} needs credentials")
        raise RegistryError("DENIED", f"user {user!r} may not {action} in project {project.name!r}")


def hash_password(password: str) -> str:
    return PasswordHasher().hash(password)
