"""The route table of the OCI Distribution API and the operational endpoints."""

from __future__ import annotations

from aiohttp import web

from services.edge import auth, blobs, catalog, keys, manifests, ops, referrers, tags, uploads

# Repository names contain slashes, so `name` is greedy and each route ends with the
# fixed segment that tells the resources apart (distribution's route regexps do the same).
NAME = r"{name:[^?#]+?}"
UPLOAD = r"{upload:[^/]+}"


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v2/", catalog.version_check, name="base")
    r.add_get("/v2", catalog.version_check, name="base_no_slash")
    r.add_get("/v2/_catalog", catalog.list_catalog, name="catalog")
    # The hottest route first: aiohttp tries the /v2/<name>/... patterns in this order.
    r.add_get(f"/v2/{NAME}/manifests/{{reference}}", manifests.get_manifest, name="manifest")
    r.add_get(f"/v2/{NAME}/tags/list", tags.list_tags, name="tags")
    r.add_get(f"/v2/{NAME}/referrers/{{digest}}", referrers.list_referrers, name="referrers")
    r.add_put(f"/v2/{NAME}/manifests/{{reference}}", manifests.put_manifest, name="manifest_put")
    r.add_delete(f"/v2/{NAME}/manifests/{{reference}}", manifests.delete_manifest, name="manifest_delete")
    r.add_post(f"/v2/{NAME}/blobs/uploads/", uploads.start_upload, name="upload")
    r.add_post(f"/v2/{NAME}/blobs/uploads", uploads.start_upload, name="upload_no_slash")
    r.add_get(
        f"/v2/{NAME}/blobs/uploads/{UPLOAD}", uploads.upload_status, allow_head=False, name="upload_status"
    )
    r.add_patch(f"/v2/{NAME}/blobs/uploads/{UPLOAD}", uploads.upload_chunk, name="upload_chunk")
    r.add_put(f"/v2/{NAME}/blobs/uploads/{UPLOAD}", uploads.finish_upload, name="upload_finish")
    r.add_delete(f"/v2/{NAME}/blobs/uploads/{UPLOAD}", uploads.cancel_upload, name="upload_cancel")
    r.add_get(f"/v2/{NAME}/blobs/{{digest}}", blobs.get_blob, name="blob")
    r.add_delete(f"/v2/{NAME}/blobs/{{digest}}", blobs.delete_blob, name="blob_delete")
    r.add_get("/token", auth.issue_token, name="token")
    r.add_post("/token", auth.issue_token, name="token_post")
    if app[keys.SETTINGS].metrics_on_registry_port:
        # Off by default: metrics (project names, counters) go to `metrics_listen`.
        r.add_get("/metrics", ops.metrics, name="metrics")
    r.add_get("/healthz", ops.healthz, name="healthz")
    r.add_get("/readyz", ops.readyz, name="readyz")
