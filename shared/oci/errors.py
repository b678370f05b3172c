"""One table of OCI error codes and one exception that carries them to the error middleware."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    status: int
    message: str


_CODES = [
    # The distribution-spec's table, with the statuses its endpoint list gives.
    ErrorCode("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    ErrorCode("BLOB_UPLOAD_INVALID", 400, "blob upload invalid"),
    ErrorCode("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"),
    ErrorCode("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ErrorCode("MANIFEST_BLOB_UNKNOWN", 404, "manifest references a manifest or blob unknown to registry"),
    ErrorCode("MANIFEST_INVALID", 400, "manifest invalid"),
    ErrorCode("MANIFEST_UNKNOWN", 404, "manifest unknown to registry"),
    ErrorCode("NAME_INVALID", 400, "invalid repository name"),
    ErrorCode("NAME_UNKNOWN", 404, "repository name not known to registry"),
    ErrorCode("SIZE_INVALID", 400, "provided length did not match content length"),
    ErrorCode("UNAUTHORIZED", 401, "authentication required"),
    ErrorCode("DENIED", 403, "requested access to the resource is denied"),
    ErrorCode("UNSUPPORTED", 405, "the operation is unsupported"),
    ErrorCode("TOOMANYREQUESTS", 429, "too many requests"),
    # Codes of our own, for what the spec leaves open; clients show the message.
    ErrorCode("RANGE_INVALID", 416, "requested range not satisfiable"),
    ErrorCode("MANIFEST_TOO_LARGE", 413, "manifest exceeds the size limit"),
    ErrorCode("PAGINATION_INVALID", 400, "invalid pagination parameters"),
    ErrorCode("UPSTREAM_ERROR", 502, "the upstream registry answered with an error"),
    ErrorCode("UNAVAILABLE", 503, "service unavailable"),
    ErrorCode("UPSTREAM_TIMEOUT", 504, "the upstream registry did not answer in time"),
    ErrorCode("METHOD_UNKNOWN", 405, "method not allowed"),
    ErrorCode("NOT_FOUND", 404, "not found"),
    ErrorCode("INTERNAL", 500, "internal error"),
]
CODES: dict[str, ErrorCode] = {c.code: c for c in _CODES}


class RegistryError(Exception):
    """A failure the client should see as an OCI error envelope.

    `status` overrides the table's status where the spec allows several (e.g. 416 for an
    out-of-order chunk is still BLOB_UPLOAD_INVALID).
    """

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        detail: Any = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        entry = CODES[code]
        self.code = code
        self.message = message or entry.message
        self.detail = detail
        self.status = status or entry.status
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")

    def envelope(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}
