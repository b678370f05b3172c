"""Where everything lives in the bucket: one function per kind of key.

Blobs (layers, configs and manifests alike) are stored once per digest; repositories hold
small link objects that say which digests they reference, so a blob shared by many
images and projects is one object. Repository names never collide with the `_` keys
below because a name component cannot start with `_`.
"""

from __future__ import annotations

from shared.oci.digest import Digest


def blob(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def layer_link(name: str, digest: Digest) -> str:
    return f"repositories/{name}/_layers/{digest.algorithm}/{digest.hex}"


def project_blob(project: str, digest: Digest) -> str:
    """Which blobs a project holds: a proxy project or a mount may reuse only these."""
    return f"projects/{project}/_layers/{digest.algorithm}/{digest.hex}"


def revision(name: str, digest: Digest) -> str:
    return f"repositories/{name}/_manifests/revisions/{digest.algorithm}/{digest.hex}"


def tags(name: str) -> str:
    return f"repositories/{name}/_manifests/tags/"


def tag(name: str, tag_name: str) -> str:
    return f"{tags(name)}{tag_name}"


def referrers(name: str, subject: Digest) -> str:
    return f"repositories/{name}/_referrers/{subject.algorithm}/{subject.hex}/"


def referrer(name: str, subject: Digest, digest: Digest) -> str:
    return f"{referrers(name, subject)}{digest.algorithm}-{digest.hex}"


# Settings the edges share and create on first start.
TOKEN_SECRET_KEY = "config/token-secret"


# Catalog markers are flat (`/` escaped) so a repository `a` and `a/b` never need one key
# to be both an object and a prefix, which filer-backed stores such as SeaweedFS refuse.
CATALOG = "catalog/"


def catalog_entry(name: str) -> str:
    return CATALOG + name.replace("/", "~")


def catalog_name(key: str) -> str:
    return key.removeprefix(CATALOG).replace("~", "/")


def upload(upload_id: str) -> str:
    return f"uploads/{upload_id}/"


def upload_info(upload_id: str) -> str:
    return f"uploads/{upload_id}/info"


def upload_first_part_sha256(upload_id: str) -> str:
    return f"uploads/{upload_id}/first-part.sha256"


def upload_committed(upload_id: str) -> str:
    """Written just before the upload's parts become a blob's extents (names the digest)."""
    return f"uploads/{upload_id}/committed"


# An upload's parts live apart from its session state: once committed they are the
# extents of a blob and outlive the session, which is deleted.
def upload_parts(upload_id: str) -> str:
    return f"extents/{upload_id}/"


def upload_part(upload_id: str, start: int) -> str:
    # Fixed-width offsets so a listing comes back in byte order.
    return f"{upload_parts(upload_id)}{start:016d}"


# A fill's segments, named by their first byte: staged while the fill runs (edges stream
# them to waiting clients, a new worker resumes after them), then committed as the blob's
# extents.
def fill_segments(digest: Digest) -> str:
    return f"fills/{digest.algorithm}/{digest.hex}/"


def fill_segment(digest: Digest, start: int) -> str:
    return f"{fill_segments(digest)}{start:016d}"
