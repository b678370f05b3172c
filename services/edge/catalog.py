"""`/v2/` (version check and auth probe) and `/v2/_catalog` with pagination."""

from __future__ import annotations

from aiohttp import web

from services.edge import keys
from services.edge.tags import paginate
from shared.auth.access import Access, Action, unauthorized


async def version_check(request: web.Request) -> web.Response:
    # Clients (docker, skopeo) learn from this probe whether and how to authenticate; an
    # anonymous caller is still free to pull public projects afterwards.
    # A request with any valid credentials (an anonymous token included) passes.
    if request.app[keys.ACCESS].enabled and "Authorization" not in request.headers:
        raise unauthorized()
    return web.json_response({})


async def list_catalog(request: web.Request) -> web.Response:
    app = request.app
    settings = app[keys.SETTINGS]
    user = request.get(keys.USER)
    names = await app[keys.REPOSITORIES].names()
    visible = []
    for name in names:
        project = settings.project(name.split("/", 1)[0])
        if project is not None and Access.allowed(user, project, Action.PULL):
            visible.append(name)
    page, headers = paginate(request, visible)
    return web.json_response({"repositories": page}, headers=headers)
