"""The referrers API: `/v2/<name>/referrers/<digest>`, optionally filtered by artifactType."""

from __future__ import annotations

import json

from aiohttp import web

from services.edge import keys
from services.edge.context import target
from shared.auth.access import Action
from shared.oci import mediatypes
from shared.oci.digest import Digest


async def list_referrers(request: web.Request) -> web.Response:
    repo = target(request, Action.PULL)
    subject = Digest.parse(request.match_info["digest"])
    descriptors = await request.app[keys.REPOSITORIES].referrers(repo.name, subject)
    descriptors.sort(key=lambda d: d.get("digest", ""))
    headers = {}
    artifact_type = request.query.get("artifactType")
    if artifact_type:
        descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": descriptors}
    return web.Response(body=json.dumps(index).encode(), content_type=mediatypes.OCI_INDEX, headers=headers)
