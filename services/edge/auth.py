"""The token endpoint (`/token`): docker's and containerd's registry token flow.

Clients that were challenged with `Bearer realm=.../token` come here, with Basic
credentials when they have them (GET, as `docker login` does) or as an OAuth2 password
grant (POST). Callers without credentials get an anonymous token, good for public pulls.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from aiohttp import web

from services.edge import keys
from shared.auth.access import unauthorized
from shared.oci.errors import RegistryError

# An OAuth2 password grant is a few short fields.
_MAX_FORM_BYTES = 64 * 1024


async def issue_token(request: web.Request) -> web.Response:
    access = request.app[keys.ACCESS]
    authorization = request.headers.get("Authorization")
    if request.method == "POST":
        # The whole form is read into memory: refuse one that could be large.
        if request.content_length is None or request.content_length > _MAX_FORM_BYTES:
            raise RegistryError("SIZE_INVALID", f"a token request form is at most {_MAX_FORM_BYTES} bytes")
        form = await request.post()
        if form.get("grant_type") == "password":
            credentials = f"{form.get('username', '')}:{form.get('password', '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    if authorization and not authorization.lower().startswith("basic "):
        raise unauthorized("the token endpoint takes Basic credentials")
    user = await access.authenticate(authorization, request.remote)
    token = access.issue_token(user)
    return web.json_response(
        {
            "token": token,
            "access_token": token,
            "expires_in": access.token_ttl,
            "issued_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
    )
