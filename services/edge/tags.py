"""Tag listing: `/v2/<name>/tags/list` with `n` and `last` pagination."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from services.edge import keys
from services.edge.context import target
from shared.auth.access import Action
from shared.oci.errors import RegistryError


def paginate(request: web.Request, items: list[str]) -> tuple[list[str], dict[str, str]]:
    """Apply `last` and `n` to a sorted list; add a `Link: rel="next"` header when cut short."""
    last = request.query.get("last")
    if last:
        items = [i for i in items if i > last]
    raw_n = request.query.get("n")
    if raw_n is None or raw_n == "":
        return items, {}
    if not (raw_n.isascii() and raw_n.isdigit()) or len(raw_n) > 9:
        raise RegistryError("PAGINATION_INVALID", "n must be a non-negative integer")
    n = int(raw_n)
    page = items[:n]
    headers = {}
    if n and len(items) > n:
        query = urlencode({"n": n, "last": page[-1]})
        headers["Link"] = f'<{request.path}?{query}>; rel="next"'
    return page, headers


async def list_tags(request: web.Request) -> web.Response:
    repo = target(request, Action.PULL)
    repositories = request.app[keys.REPOSITORIES]
    if not await repositories.exists(repo.name):
        raise RegistryError("NAME_UNKNOWN", detail={"name": request.match_info["name"][:300]})
    page, headers = paginate(request, await repositories.tags(repo.name))
    return web.json_response({"name": request.match_info["name"], "tags": page}, headers=headers)
