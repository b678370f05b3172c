"""Repository names and tags, validated with the distribution-spec's grammar."""

from __future__ import annotations

import re

from shared.oci.errors import RegistryError

# distribution-spec: <name> is path components separated by `/`, each matching this.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    """Return the name if it is a valid repository name, else raise NAME_INVALID.

    Checking every component also rejects `..`, empty components and encoded slashes
    (aiohttp decodes `%2F` into the path, so it arrives here as a `/` inside a component
    only if it was split differently; `..` never matches the grammar).
    """
    if not name or len(name) > MAX_NAME_LENGTH:
        raise RegistryError("NAME_INVALID", "repository name must be 1 to 255 characters")
    for component in name.split("/"):
        if not _COMPONENT.match(component):
            raise RegistryError("NAME_INVALID", f"invalid repository name {name[:300]!r}")
    return name


def is_valid_tag(tag: str) -> bool:
    return bool(_TAG.match(tag))


def validate_tag(tag: str) -> str:
    if not is_valid_tag(tag):
        raise RegistryError("MANIFEST_INVALID", f"invalid tag {tag[:200]!r}", status=400)
    return tag
