"""Replication rules as `seawall.yaml` states them: filters, triggers, naming at the destination.

Repository names are full names as the registry that holds them lists them: a local
project's repositories start with the project's name (`apps/web`), an upstream's are its
own (`library/python` on Docker Hub). A pull rule copies from an upstream into a hosted
project, a push rule from a local project to an upstream.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from wcmatch import glob

from shared.globs import GLOB_FLAGS, Patterns, name_globs, tag_globs

# Rule names follow project names: they appear in Redis keys, bucket keys and metric labels.
RULE_NAME = r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$"

_NAMESPACE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


class Filters(BaseModel):
    """Which repositories and tags a rule copies; an empty `name` or `tag` list means all."""

    name: Patterns = Field(default_factory=list)
    tag: Patterns = Field(default_factory=list)
    exclude_tag: Patterns = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_globs(cls, patterns: list[str]) -> list[str]:
        return name_globs(patterns)

    @field_validator("tag", "exclude_tag")
    @classmethod
    def _tag_globs(cls, patterns: list[str]) -> list[str]:
        return tag_globs(patterns)

    def matches_repository(self, repository: str) -> bool:
        return not self.name or glob.globmatch(repository, self.name, flags=GLOB_FLAGS)

    def matches_tag(self, tag: str) -> bool:
        if self.tag and not glob.globmatch(tag, self.tag, flags=GLOB_FLAGS):
            return False
        return not (self.exclude_tag and glob.globmatch(tag, self.exclude_tag, flags=GLOB_FLAGS))

    def literal_names(self) -> list[str]:
        """The name patterns that are plain names (no glob syntax): what a run lists when
        the source has no catalog (Docker Hub), where a pattern cannot be expanded."""
        return [p for p in self.name if not glob.is_magic(p, flags=GLOB_FLAGS)]


class ManualTrigger(BaseModel):
    """Runs only when asked (`seawall replicate RULE`)."""

    type: Literal["manual"] = "manual"


class CronTrigger(BaseModel):
    """Runs on a cron schedule, fired by the scheduler's leader."""

    type: Literal["cron"] = "cron"
    schedule: str

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"invalid cron expression {value!r}: use five fields, e.g. '0 */6 * * *'")
        return value


class OnPushTrigger(BaseModel):
    """Runs for one tag when it is pushed to the rule's source (a hosted project)."""

    type: Literal["on_push"] = "on_push"


Trigger = Annotated[ManualTrigger | CronTrigger | OnPushTrigger, Field(discriminator="type")]
TriggerType = Literal["manual", "cron", "on_push"]

_RATE_SUFFIX = re.compile(r"\s*/\s*s(?:ec(?:ond)?)?\s*$", re.IGNORECASE)
_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


def parse_bandwidth(value: Any) -> Any:
    """Accept `20MiB/s`, `500KB/s`, `1GB` or a number of bytes per second."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(_BYTE_SIZE.validate_python(_RATE_SUFFIX.sub("", value)))
        except ValidationError:
            raise ValueError(
                f"invalid bandwidth {value!r}: use e.g. 20MiB/s, 500KB/s or bytes per second"
            ) from None
    return value


Bandwidth = Annotated[int, BeforeValidator(parse_bandwidth), Field(gt=0)]


def _problem(location: tuple[int | str, ...], message: str) -> str:
    field = ".".join(str(part) for part in location) or "rule"
    return f"{field}: {message.removeprefix('Value error, ')}"


class ReplicationRule(BaseModel):
    """One rule: what to copy from where to where, when, and how fast."""

    name: str = Field(pattern=RULE_NAME)
    mode: Literal["pull", "push"]
    # An upstream (pull) or a local project (push).
    source: str
    filters: Filters = Field(default_factory=Filters)
    # A hosted project (pull) or an upstream (push).
    destination: str
    # A path put in front of every name at the destination (below the project, for a pull).
    destination_namespace: str = ""
    # Harbor's meaning: how many leading path components of the source name to drop; `all`
    # keeps only the last. The last component (the image's own name) is always kept.
    flatten: Annotated[int, Field(ge=0)] | Literal["all"] = 1
    overwrite: bool = True
    copy_referrers: bool = True
    delete_missing: bool = False
    trigger: Trigger = Field(default_factory=ManualTrigger)
    # Bytes per second over this rule's transfers; None: no cap.
    bandwidth: Bandwidth | None = None
    enabled: bool = True

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_rule(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> ReplicationRule:
        """Errors name the rule, not only its position in the list."""
        try:
            rule: ReplicationRule = handler(data)
        except ValidationError as exc:
            name = data.get("name") if isinstance(data, dict) else None
            if not isinstance(name, str) or not name:
                raise
            problems = "; ".join(_problem(error["loc"], error["msg"]) for error in exc.errors())
            raise ValueError(f"replication rule {name!r}: {problems}") from None
        return rule

    @field_validator("flatten", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"invalid flatten {value!r}: a number of levels to drop (0, 1, 2, ...) or 'all'")

    @field_validator("destination_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        value = value.strip("/")
        if value and not _NAMESPACE.match(value):
            raise ValueError(
                f"invalid destination_namespace {value!r}: lowercase path components"
                " separated by '/', e.g. 'mirror' or 'team/images'"
            )
        return value

    def destination_repository(self, source_repository: str) -> str:
        """The full name at the destination of a repository named `source_repository` at
        the source: flattened, under `destination_namespace`, and for a pull rule inside
        the destination project.

        `library/python` with flatten 1 pulled into project `mirror` is `mirror/python`;
        `apps/web/api` pushed with flatten 0 under namespace `team` is `team/apps/web/api`.
        """
        parts = source_repository.strip("/").split("/")
        drop = len(parts) - 1 if self.flatten == "all" else min(self.flatten, len(parts) - 1)
        prefix = [self.destination] if self.mode == "pull" else []
        if self.destination_namespace:
            prefix.append(self.destination_namespace)
        return "/".join([*prefix, *parts[drop:]])


def check_rules(rules: Iterable[ReplicationRule], projects: Mapping[str, str], upstreams: set[str]) -> None:
    """Refuse rules whose ends do not exist or do not fit the mode, and duplicate names.

    `projects` maps each project's name to its type (`hosted` or `proxy`).
    """
    rules = list(rules)
    for name, count in Counter(rule.name for rule in rules).items():
        if count > 1:
            raise ValueError(f"replication rule {name!r} is defined {count} times; rule names must be unique")
    for rule in rules:
        _check_ends(rule, projects, upstreams)


def _check_ends(rule: ReplicationRule, projects: Mapping[str, str], upstreams: set[str]) -> None:
    where = f"replication rule {rule.name!r}"
    if rule.mode == "pull":
        if rule.source not in upstreams:
            kind = (
                "a local project; a push rule copies from one"
                if rule.source in projects
                else "not an upstream"
            )
            raise ValueError(
                f"{where}: source {rule.source!r} is {kind} (a pull rule's source is an upstream)"
            )
        if projects.get(rule.destination) != "hosted":
            kind = "a proxy project" if rule.destination in projects else "not a project"
            raise ValueError(
                f"{where}: destination {rule.destination!r} is {kind}"
                " (a pull rule copies into a hosted project)"
            )
    else:
        if rule.source not in projects:
            kind = "an upstream; a pull rule copies from one" if rule.source in upstreams else "not a project"
            raise ValueError(
                f"{where}: source {rule.source!r} is {kind} (a push rule's source is a local project)"
            )
        if rule.destination not in upstreams:
            kind = "a local project" if rule.destination in projects else "not an upstream"
            raise ValueError(
                f"{where}: destination {rule.destination!r} is {kind} (a push rule copies to an upstream)"
            )
    if rule.trigger.type == "on_push" and (rule.mode != "push" or projects.get(rule.source) != "hosted"):
        raise ValueError(
            f"{where}: trigger on_push fires on pushes to a hosted project, so it needs mode push"
            " and a hosted project as source"
        )
