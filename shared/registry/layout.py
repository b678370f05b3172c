"""Where everything lives in the bucket: one function per kind of key.

Blobs (layers, configs and manifests alike) are stored once per digest; repositories hold
small link objects that say which digests they reference, so a blob shared by many
images and projects is one object. Repository names never collide with the `_` keys
below because a name component cannot start with `_`.
"""

from __future__ import annotations

import secrets

from shared.oci.digest import Digest


def unique_suffix() -> str:
    """A name part no other write uses: an object that may become a committed blob's bytes
    is written once under a key of its own, so no later or concurrent write (a late chunk,
    a retried part, a fill that lost its lease) can replace the bytes a blob points to."""
    return secrets.token_hex(8)


def start_of(key: str) -> int:
    """The first byte of a part or segment, from its key (`<start>` or `<start>.<suffix>`)."""
    return int(key.rsplit("/", 1)[1].split(".", 1)[0])


def blob(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def blob_data(digest: Digest) -> str:
    """A new object for bytes that arrived whole (a monolithic push, a rewritten upload)."""
    return f"blobdata/{digest.algorithm}/{digest.hex}/{unique_suffix()}"


def quarantined(digest: Digest, stamp: str) -> str:
    """Where a blob whose bytes turned out not to hash to its digest is moved aside."""
    return f"quarantine/{digest.algorithm}/{digest.hex}/{stamp}"


QUARANTINE = "quarantine/"
BLOBS = "blobs/"
# The other top-level prefixes, for listings over all of them (the garbage collection).
BLOB_DATA = "blobdata/"
REPOSITORIES = "repositories/"
PROJECTS = "projects/"
UPLOADS = "uploads/"
UPLOAD_PARTS = "extents/"
FILLS = "fills/"


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


def upload_part_sha256(upload_id: str, part_key: str) -> str:
    """The sha256 of a first part, recorded as it was written (named after that part)."""
    return f"uploads/{upload_id}/sha256/{part_key.rsplit('/', 1)[1]}"


def upload_committed(upload_id: str) -> str:
    """Written when the upload is finished: no chunk is accepted after it; it names the
    digest and the exact part keys that become the blob's extents."""
    return f"uploads/{upload_id}/committed"


def upload_cancelled(upload_id: str) -> str:
    """Written when a client cancels the upload: a finish that sees it commits nothing."""
    return f"uploads/{upload_id}/cancelled"


# An upload's parts live apart from its session state: once committed they are the
# extents of a blob and outlive the session, which is deleted.
def upload_parts(upload_id: str) -> str:
    return f"extents/{upload_id}/"


def upload_part(upload_id: str, start: int) -> str:
    """A new key for a chunk starting at `start`: fixed-width offsets so a listing comes
    back in byte order, and a suffix of its own so two writes never share a key."""
    return f"{upload_parts(upload_id)}{start:016d}.{unique_suffix()}"


# A fill's segments, named by their first byte: staged while the fill runs (edges stream
# them to waiting clients, a new worker resumes after them), then committed as the blob's
# extents.
def fill_segments(digest: Digest) -> str:
    return f"fills/{digest.algorithm}/{digest.hex}/"


def fill_segment(digest: Digest, start: int) -> str:
    """A new key for a segment starting at `start` (unique: see `unique_suffix`)."""
    return f"{fill_segments(digest)}{start:016d}.{unique_suffix()}"


# Finished replication executions, each with its tasks (running ones live in Redis), and a
# summary of each (the execution without its tasks) under its rule, which listings read.
# Ids sort by start time, so a listing comes back oldest first.
REPLICATION_EXECUTIONS = "replication/executions/"
REPLICATION_RULES = "replication/rules/"


def replication_execution(execution_id: str) -> str:
    return f"{REPLICATION_EXECUTIONS}{execution_id}.json"


def execution_id_of(key: str) -> str:
    """The execution id in a key under REPLICATION_EXECUTIONS or REPLICATION_RULES."""
    return key.rsplit("/", 1)[1].removesuffix(".json")


def replication_rule_executions(rule: str) -> str:
    return f"{REPLICATION_RULES}{rule}/executions/"


def replication_rule_execution(rule: str, execution_id: str) -> str:
    """The summary of one execution of `rule`."""
    return f"{replication_rule_executions(rule)}{execution_id}.json"
