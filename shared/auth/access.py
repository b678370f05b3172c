"""Who may do what: HTTP Basic users with argon2 hashes and per-project grants."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from shared import validity
from shared.auth.logins import LoginLimiter
from shared.auth.tokens import InvalidToken, TokenSigner
from shared.metrics import LOGINS
from shared.oci.errors import RegistryError
from shared.settings import Project, Settings

# Verifications waiting for a hashing thread, per thread, before further logins are
# answered 429 at once: bounds the memory and the wait a flood from many addresses causes.
_QUEUED_PER_THREAD = 32
# Verified credentials remembered at most; each user has one right password, so only a
# flood of successful logins for thousands of users could reach it.
_MAX_VERIFIED = 10_000
_HASHING_NICENESS = 19


class Action(StrEnum):
    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"


def unauthorized(message: str = "authentication required") -> RegistryError:
    # The edge's error middleware adds the Bearer challenge, which needs the request's URL.
    return RegistryError("UNAUTHORIZED", message)


def _basic_credentials(value: str) -> tuple[str, str]:
    value = value.strip()
    if not value.isascii():
        raise unauthorized("malformed Basic credentials")
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise unauthorized("malformed Basic credentials") from None
    user, colon, password = decoded.partition(":")
    if not colon:
        raise unauthorized("malformed Basic credentials: expected user:password")
    return user, password


def _yield_cpu() -> None:
    """Run in each hashing thread: let the event loop's thread have the CPU first.

    argon2 hashes its four lanes in threads of its own, so two verifications fill two
    cores; at the same priority they took a fair share of the CPU from the thread that
    serves every other request (its p99 grew 5-7x on a 2-core machine). Niced, hashing
    gets what the loop leaves: under load logins slow down, other requests do not.
    Linux keeps a nice value per thread, and argon2's lane threads inherit it.
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _HASHING_NICENESS)


class Access:
    def __init__(self, settings: Settings, tokens: TokenSigner | None = None) -> None:
        logins = settings.logins
        self.tokens = tokens
        self._hashes = {u.name: u.password_hash.get_secret_value() for u in settings.users}
        self._hasher = PasswordHasher()
        self._decoy = self._hasher.hash(os.urandom(16).hex())
        # argon2-cffi releases the GIL while it hashes, so threads keep the event loop free.
        self._pool = ThreadPoolExecutor(
            max_workers=logins.hash_threads, thread_name_prefix="password-check", initializer=_yield_cpu
        )
        self._queued = 0
        self._max_queued = logins.hash_threads * _QUEUED_PER_THREAD
        self._limiter = LoginLimiter(logins, self._hashes)
        self._cache_ttl = logins.cache_ttl.total_seconds()
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        # A per-process key so the cache never holds a reusable form of a password.
        self._cache_key = os.urandom(32)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def token_ttl(self) -> int:
        return self.tokens.ttl if self.tokens is not None else 0

    def issue_token(self, user: str | None) -> str:
        """A token for `user` (None: anonymous), bound to the user's current password."""
        if self.tokens is None:
            raise RuntimeError("no token signer configured")
        return self.tokens.issue(user, self._hashes.get(user) if user else None)

    async def authenticate(self, authorization: str | None, remote: str | None = None) -> str | None:
        """The user named by a Basic or Bearer header, None when anonymous; bad ones raise.

        `remote` is the client's address, which failed logins are limited by.
        """
        if authorization is None:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        if not scheme:
            raise unauthorized("empty Authorization header")
        scheme = scheme.lower()
        if scheme == "bearer" and self.tokens is not None:
            try:
                return self.tokens.verify(value, self._hashes)
            except InvalidToken as exc:
                raise unauthorized(f"invalid token: {exc}") from None
        if scheme != "basic":
            raise unauthorized("use HTTP Basic credentials or a token from the token endpoint")
        user, password = _basic_credentials(value)
        if not user and not password:
            # skopeo and podman answer a Basic challenge with empty credentials when
            # they have none: that is an anonymous request, not a failed login.
            return None
        return await self._login(user, password, remote)

    async def _login(self, user: str, password: str, remote: str | None) -> str:
        # Limits come before the cache: otherwise a blocked guesser would learn, for free,
        # that a guess is right whenever the real user had logged in recently.
        try:
            self._limiter.check(remote, user)
        except RegistryError:
            LOGINS.labels("limited").inc()
            raise
        stored = self._hashes.get(user)
        fingerprint = None
        if stored is not None:
            # Keyed by the stored hash too: a changed password never matches an old entry.
            # (No user name holds a colon and no hash a newline: the message is unambiguous.)
            message = f"{stored}\n{user}:{password}".encode()
            fingerprint = hmac.new(self._cache_key, message, hashlib.sha256).digest()
            expires = self._verified.get(fingerprint)
            if expires is not None and expires > time.monotonic():
                LOGINS.labels("cached").inc()
                validity.depends_until(expires)
                return user
        validity.read_elsewhere()
        if self._queued >= self._max_queued:
            LOGINS.labels("limited").inc()
            raise RegistryError(
                "TOOMANYREQUESTS", "too many logins in progress; retry shortly", headers={"Retry-After": "1"}
            )
        attempt = self._limiter.begin(remote, user)
        self._queued += 1
        try:
            verified = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._verify, stored, password
            )
        finally:
            self._queued -= 1
        if not verified or fingerprint is None:
            LOGINS.labels("refused").inc()
            raise unauthorized("unknown user or wrong password")
        LOGINS.labels("accepted").inc()
        attempt.succeeded()
        self._remember(fingerprint)
        return user

    def _verify(self, stored: str | None, password: str) -> bool:
        """argon2, in a hashing thread. An unknown user costs the same time as a known one,
        so response times do not tell which user names exist."""
        try:
            self._hasher.verify(stored or self._decoy, password)
        except (VerificationError, InvalidHashError):
            return False
        return stored is not None

    def _remember(self, fingerprint: bytes) -> None:
        self._verified.pop(fingerprint, None)
        while len(self._verified) >= _MAX_VERIFIED:
            self._verified.popitem(last=False)
        self._verified[fingerprint] = time.monotonic() + self._cache_ttl

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
        if not self.allowed(user, project, action):
            raise self.refusal(user, action)

    @staticmethod
    def refusal(user: str | None, action: Action) -> RegistryError:
        """What a caller who may not `action` a repository is told.

        The same whether the project exists or not, and naming no project: otherwise
        anyone could probe which private projects exist.
        """
        if user is None:
            return unauthorized(f"{action} needs credentials, or the repository does not exist")
        return RegistryError(
            "DENIED", f"user {user!r} may not {action} there, or the repository does not exist"
        )


def hash_password(password: str) -> str:
    return PasswordHasher().hash(password)
