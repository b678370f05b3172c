"""Name and tag globs, as replication filters and retention rules use them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from wcmatch import glob

# `**` crosses `/` (any depth of repository path), `*` and `?` stay within one component,
# `{a,b}` is either. Each pattern is matched whole.
GLOB_FLAGS = glob.GLOBSTAR | glob.BRACE
# What a pattern may contain besides the glob syntax (`*?{},[]!`): the characters of a
# repository name (lowercase, OCI's grammar) or of a tag. Anything else could never match.
NAME_GLOB = re.compile(r"^[a-z0-9._\-/*?{},\[\]!]+$")
TAG_GLOB = re.compile(r"^[A-Za-z0-9._\-*?{},\[\]!]+$")


def as_list(value: Any) -> Any:
    """A filter accepts one pattern or a list of them; `null` means none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


def check_glob(pattern: str, allowed: re.Pattern[str], what: str) -> str:
    if not pattern:
        raise ValueError(f"empty {what} pattern")
    if not allowed.match(pattern):
        raise ValueError(f"{what} pattern {pattern!r} has characters no {what} can contain")
    depth = 0
    in_class = False
    for char in pattern:
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what} pattern {pattern!r} closes a '}}' it never opened")
    if in_class:
        raise ValueError(f"{what} pattern {pattern!r} leaves a '[' open")
    if depth:
        raise ValueError(f"{what} pattern {pattern!r} leaves a '{{' open")
    try:
        glob.translate(pattern, flags=GLOB_FLAGS)
    except Exception as exc:  # wcmatch's own refusals (e.g. a brace expansion too large)
        raise ValueError(f"{what} pattern {pattern!r} is not a valid glob: {exc}") from None
    return pattern


Patterns = Annotated[list[str], BeforeValidator(as_list)]


def matches(value: str, patterns: list[str]) -> bool:
    """Whether `value` matches any of `patterns` (each matched whole)."""
    return glob.globmatch(value, patterns, flags=GLOB_FLAGS)


def name_globs(patterns: list[str]) -> list[str]:
    return [check_glob(p, NAME_GLOB, "repository name") for p in patterns]


def tag_globs(patterns: list[str]) -> list[str]:
    return [check_glob(p, TAG_GLOB, "tag") for p in patterns]
