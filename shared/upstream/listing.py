"""What an upstream lists: a repository's tags, its catalog, and the referrers of a manifest,
each followed page by page through the `Link: <...>; rel="next"` header.

Listing is free on Docker Hub (no pull is counted) but every page is a request: each one
goes through the governor's request rate, and when that rate is spent the listing waits
for it rather than failing, so a repository with thousands of tags is listed slowly
instead of drawing the abuse limiter's 429.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from shared.oci.mediatypes import OCI_INDEX
from shared.upstream.auth import UpstreamAuth, pull_scope
from shared.upstream.failures import UpstreamFailure
from shared.upstream.transport import Transport

CATALOG_SCOPE = "registry:catalog:*"
# A tags list, catalog or referrers page larger than this is refused.
MAX_PAGE_BYTES = 16 * 1024 * 1024
# The governor's request rate holding a listing back this long or less is waited for; a
# longer closure (an abuse-limit 429) fails the listing with the governor's failure.
MAX_RATE_WAIT = 60.0
# The statuses with which a registry says it has no catalog, or not for us.
_NO_CATALOG = frozenset({401, 403, 404, 405})


class Listings:
    """The tags lists, catalog and referrers of one upstream."""

    def __init__(self, transport: Transport, auth: UpstreamAuth) -> None:
        self._transport = transport
        self._auth = auth
        self._name = transport.name
        self._log = transport.log

    def _v2(self, path: str) -> URL:
        return URL(f"{self._transport.base_url}/v2/{path}")

    async def tags(self, repository: str, page_size: int = 100) -> AsyncIterator[str]:
        """Every tag of `repository`, page by page; UpstreamFailure(kind="not_found") on 404."""
        url = self._v2(f"{repository}/tags/list").with_query(n=page_size)
        what = f"tags of {repository}"
        async for document in self._pages(url, kind="tags", scope=pull_scope(repository), what=what):
            for tag in _strings(document, "tags", what, self._name):
                yield tag

    async def catalog(self, page_size: int = 100) -> AsyncIterator[str]:
        """Every repository the upstream lists, page by page.

        Raises UpstreamFailure(kind="unsupported") when the registry has no catalog or
        does not show it to us (Docker Hub's answer to everyone).
        """
        url = self._v2("_catalog").with_query(n=page_size)
        pages = self._pages(url, kind="catalog", scope=CATALOG_SCOPE, what="catalog")
        try:
            async for document in pages:
                for name in _strings(document, "repositories", "catalog", self._name):
                    yield name
        except UpstreamFailure as failure:
            if failure.kind in ("auth", "status", "not_found") and failure.status in _NO_CATALOG:
                raise UpstreamFailure(
                    "unsupported",
                    f"no catalog to list ({failure.message})",
                    upstream=self._name,
                    status=failure.status,
                ) from failure
            raise

    async def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        """The descriptors in the referrers API's index for `digest` (all pages); [] when the
        registry answers 404, as registries without the API do."""
        url = self._v2(f"{repository}/referrers/{digest}")
        what = f"referrers of {repository}@{digest}"
        found: list[dict[str, Any]] = []
        try:
            async for document in self._pages(
                url, kind="referrers", scope=pull_scope(repository), what=what, accept=OCI_INDEX
            ):
                manifests = document.get("manifests") or []
                if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
                    raise UpstreamFailure(
                        "status", f"{what}: the index's manifests are not descriptors", upstream=self._name
                    )
                found.extend(manifests)
        except UpstreamFailure as failure:
            if failure.kind == "not_found":
                return []
            raise
        return found

    async def _pages(
        self, url: URL, *, kind: str, scope: str, what: str, accept: str = "application/json"
    ) -> AsyncIterator[dict[str, Any]]:
        """Each page's JSON object, following `Link: rel="next"` on the same origin."""
        seen: set[URL] = set()
        next_url: URL | None = url
        while next_url is not None:
            seen.add(next_url)
            response = await self._request(next_url, kind=kind, scope=scope, what=what, accept=accept)
            try:
                if response.status == 404:
                    await self._transport.discard(response)
                    raise UpstreamFailure("not_found", f"{what}: 404", upstream=self._name, status=404)
                if response.status != 200:
                    await self._transport.raise_for_status(response, what)
                body = await self._transport.read_limited(response, MAX_PAGE_BYTES + 1, what)
                link = response.links.get("next")
            finally:
                response.release()
            if len(body) > MAX_PAGE_BYTES:
                raise UpstreamFailure(
                    "status", f"{what}: a page exceeds {MAX_PAGE_BYTES} bytes", upstream=self._name
                )
            yield _document(body, what, self._name)
            next_url = self._next(link, next_url, seen, what)

    def _next(self, link: Any, current: URL, seen: set[URL], what: str) -> URL | None:
        """The next page's URL, None at the end; a page already read ends the listing too
        (a registry that keeps sending the same link would otherwise never finish)."""
        if link is None:
            return None
        target = link.get("url")
        if not isinstance(target, URL):
            return None
        target = current.join(target)
        if target.origin() != current.origin():
            # The credentials of this upstream are not sent to another host.
            raise UpstreamFailure(
                "status", f"{what}: the next page is on another host ({target.host})", upstream=self._name
            )
        return None if target in seen else target

    async def _request(
        self, url: URL, *, kind: str, scope: str, what: str, accept: str
    ) -> aiohttp.ClientResponse:
        """One page request; the governor's request rate is waited for when it refills soon."""
        while True:
            try:
                return await self._auth.send("GET", url, kind=kind, scope=scope, headers={"Accept": accept})
            except UpstreamFailure as failure:
                wait = failure.seconds_until_reopen()
                if failure.kind != "governor" or wait is None or wait > MAX_RATE_WAIT:
                    raise
                self._log.info("upstream_listing_paced", what=what, wait=round(wait, 2))
                await asyncio.sleep(wait)


def _document(body: bytes, what: str, upstream: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise UpstreamFailure("status", f"{what}: the answer is not a JSON object", upstream=upstream)
    return document


def _strings(document: dict[str, Any], field: str, what: str, upstream: str) -> list[str]:
    """A list of names from a page; null (Distribution's empty list) is no names."""
    values = document.get(field)
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UpstreamFailure("status", f"{what}: {field} is not a list of names", upstream=upstream)
    return values
