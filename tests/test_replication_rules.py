"""Replication rules as seawall.yaml states them: validation and its messages, the filters'
globs, naming at the destination (flatten and namespace) and bandwidth. No servers."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from shared.replication.rules import CronTrigger, Filters, ReplicationRule, check_rules
from shared.settings import Settings

ISSUE_EXAMPLE = """
replication:
  - name: python-slim
    mode: pull
    source: dockerhub
    filters:
      name: "library/python"
      tag: ["3.12*-slim", "3.13*-slim"]
      exclude_tag: "*-rc*"
    destination: mirror
    destination_namespace: ""
    flatten: 1
    overwrite: true
    copy_referrers: true
    delete_missing: false
    trigger: {type: cron, schedule: "0 */6 * * *"}
    bandwidth: 20MiB/s
"""

PROJECTS: dict[str, Any] = {
    "projects": [
        {"name": "mirror"},
        {"name": "apps"},
        {"name": "hub", "type": "proxy", "upstream": "dockerhub"},
    ],
    "upstreams": [
        {"name": "dockerhub", "url": "https://registry-1.docker.io"},
        {"name": "site-a", "url": "https://site-a.example"},
    ],
}


def settings_with(*rules: dict[str, Any]) -> Settings:
    return Settings(**PROJECTS, replication=list(rules))


def rule(**fields: Any) -> ReplicationRule:
    values: dict[str, Any] = {"name": "r", "mode": "pull", "source": "dockerhub", "destination": "mirror"}
    return ReplicationRule.model_validate(values | fields)


def refusal(**fields: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        settings_with({"name": "r", "mode": "pull", "source": "dockerhub", "destination": "mirror"} | fields)
    return str(caught.value)


def test_the_issues_example_loads_with_its_meaning() -> None:
    settings = Settings(**PROJECTS, **yaml.safe_load(ISSUE_EXAMPLE))
    loaded = settings.rule("python-slim")
    assert loaded is not None
    assert settings.rule("nothing") is None
    assert (loaded.mode, loaded.source, loaded.destination) == ("pull", "dockerhub", "mirror")
    assert loaded.filters.name == ["library/python"]
    assert loaded.filters.exclude_tag == ["*-rc*"]
    assert loaded.trigger == CronTrigger(schedule="0 */6 * * *")
    assert loaded.bandwidth == 20 * 1024 * 1024
    assert loaded.destination_repository("library/python") == "mirror/python"
    assert [
        t
        for t in ["3.12.7-slim", "3.13-slim", "3.13-rc1-slim", "3.12.7", "3.11-slim"]
        if loaded.filters.matches_tag(t)
    ] == [
        "3.12.7-slim",
        "3.13-slim",
    ]


def test_defaults_copy_everything_by_hand_with_flatten_1() -> None:
    plain = rule()
    assert plain.filters.matches_repository("any/thing/at/all")
    assert plain.filters.matches_tag("latest")
    assert (plain.flatten, plain.overwrite, plain.copy_referrers, plain.delete_missing) == (
        1,
        True,
        True,
        False,
    )
    assert plain.trigger.type == "manual"
    assert plain.bandwidth is None
    assert plain.enabled


def test_name_globs_keep_star_within_a_component_and_globstar_across() -> None:
    one_level = Filters(name="library/*")
    assert one_level.matches_repository("library/python")
    assert not one_level.matches_repository("library/python/slim")
    assert not one_level.matches_repository("other/python")
    any_depth = Filters(name="library/**")
    assert any_depth.matches_repository("library/python")
    assert any_depth.matches_repository("library/python/slim")
    either = Filters(name=["library/{python,node}", "team/app?"])
    assert [
        n
        for n in ["library/python", "library/node", "library/ruby", "team/app1", "team/app12"]
        if either.matches_repository(n)
    ] == [
        "library/python",
        "library/node",
        "team/app1",
    ]
    assert either.literal_names() == []
    assert Filters(name=["library/python", "library/*"]).literal_names() == ["library/python"]


def test_tag_filters_take_one_pattern_or_a_list_and_exclusions_win() -> None:
    filters = Filters(tag="v1.*", exclude_tag=["*-rc*", "*-beta"])
    assert filters.tag == ["v1.*"]
    assert filters.matches_tag("v1.2")
    assert not filters.matches_tag("v1.2-rc1")
    assert not filters.matches_tag("v1.3-beta")
    assert not filters.matches_tag("v2.0")
    assert not Filters(exclude_tag="latest").matches_tag("latest")
    assert Filters(exclude_tag="latest").matches_tag("stable")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"tag": "v1.["}, "filters.tag: tag pattern 'v1.[' leaves a '[' open"),
        ({"tag": "{a,b"}, "filters.tag: tag pattern '{a,b' leaves a '{' open"),
        ({"name": "library/Python"}, "filters.name: repository name pattern 'library/Python' has characters"),
        ({"exclude_tag": ""}, "filters.exclude_tag: empty tag pattern"),
    ],
)
def test_a_bad_glob_is_refused_naming_the_rule_and_the_field(filters: dict[str, Any], expected: str) -> None:
    message = refusal(filters=filters)
    assert "replication rule 'r'" in message
    assert expected in message


def test_a_bad_cron_expression_is_refused_naming_the_field() -> None:
    message = refusal(trigger={"type": "cron", "schedule": "every six hours"})
    assert "replication rule 'r'" in message
    assert "trigger.cron.schedule: invalid cron expression 'every six hours'" in message


def test_an_unknown_trigger_type_is_refused() -> None:
    assert "replication rule 'r': trigger" in refusal(trigger={"type": "hourly"})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"source": "dockerhb"}, "source 'dockerhb' is not an upstream"),
        ({"source": "apps"}, "source 'apps' is a local project"),
        ({"destination": "nowhere"}, "destination 'nowhere' is not a project"),
        ({"destination": "hub"}, "destination 'hub' is a proxy project"),
        (
            {"mode": "push", "source": "dockerhub", "destination": "site-a"},
            "source 'dockerhub' is an upstream",
        ),
        ({"mode": "push", "source": "nowhere", "destination": "site-a"}, "source 'nowhere' is not a project"),
        (
            {"mode": "push", "source": "apps", "destination": "mirror"},
            "destination 'mirror' is a local project",
        ),
        (
            {"mode": "push", "source": "apps", "destination": "site-b"},
            "destination 'site-b' is not an upstream",
        ),
        ({"trigger": {"type": "on_push"}}, "trigger on_push fires on pushes to a hosted project"),
        (
            {"mode": "push", "source": "hub", "destination": "site-a", "trigger": {"type": "on_push"}},
            "trigger on_push fires on pushes to a hosted project",
        ),
    ],
)
def test_ends_that_do_not_exist_or_do_not_fit_the_mode_are_refused(
    fields: dict[str, Any], expected: str
) -> None:
    message = refusal(**fields)
    assert "replication rule 'r'" in message
    assert expected in message


def test_push_rules_copy_from_hosted_or_proxy_projects_to_upstreams() -> None:
    settings = settings_with(
        {
            "name": "out",
            "mode": "push",
            "source": "apps",
            "destination": "site-a",
            "trigger": {"type": "on_push"},
        },
        {"name": "cache-out", "mode": "push", "source": "hub", "destination": "site-a"},
    )
    assert [r.name for r in settings.replication] == ["out", "cache-out"]


def test_two_rules_with_one_name_are_refused() -> None:
    with pytest.raises(ValidationError, match="replication rule 'twice' is defined 2 times"):
        settings_with(
            {"name": "twice", "mode": "pull", "source": "dockerhub", "destination": "mirror"},
            {"name": "twice", "mode": "push", "source": "apps", "destination": "site-a"},
        )


def test_check_rules_takes_projects_by_type_and_upstream_names() -> None:
    pull = rule()
    check_rules([pull], {"mirror": "hosted"}, {"dockerhub"})
    with pytest.raises(ValueError, match="destination 'mirror' is a proxy project"):
        check_rules([pull], {"mirror": "proxy"}, {"dockerhub"})


def test_rule_names_follow_project_names() -> None:
    assert "replication rule 'Python Slim': name" in refusal(name="Python Slim")


# Harbor's flatten, on `a/b/c/img`: 0 keeps every level, n drops the first n, `all` keeps
# the image's own name; the namespace goes in front, and a pull lands in its project.
@pytest.mark.parametrize(
    ("mode", "flatten", "namespace", "expected"),
    [
        ("pull", 0, "", "mirror/a/b/c/img"),
        ("pull", 1, "", "mirror/b/c/img"),
        ("pull", 2, "", "mirror/c/img"),
        ("pull", "all", "", "mirror/img"),
        ("pull", 0, "team", "mirror/team/a/b/c/img"),
        ("pull", 1, "team/images", "mirror/team/images/b/c/img"),
        ("pull", "all", "team", "mirror/team/img"),
        ("pull", 9, "", "mirror/img"),
        ("push", 0, "", "a/b/c/img"),
        ("push", 1, "", "b/c/img"),
        ("push", "all", "site", "site/img"),
        ("push", 2, "site/", "site/c/img"),
    ],
)
def test_flatten_and_namespace_name_the_destination_repository(
    mode: str, flatten: int | str, namespace: str, expected: str
) -> None:
    fields: dict[str, Any] = {"mode": mode, "flatten": flatten, "destination_namespace": namespace}
    if mode == "push":
        fields |= {"source": "apps", "destination": "site-a"}
    assert rule(**fields).destination_repository("a/b/c/img") == expected


def test_flattening_never_drops_the_image_name() -> None:
    assert rule(flatten=1).destination_repository("nginx") == "mirror/nginx"
    assert rule(mode="push", source="apps", destination="site-a").destination_repository("apps") == "apps"


@pytest.mark.parametrize("value", [-1, "some", True])
def test_flatten_is_a_number_of_levels_or_all(value: Any) -> None:
    assert "flatten: invalid flatten" in refusal(flatten=value)


def test_a_bad_destination_namespace_is_refused() -> None:
    assert "destination_namespace: invalid destination_namespace 'Team Images'" in refusal(
        destination_namespace="Team Images"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20MiB/s", 20 * 1024 * 1024),
        ("500KB/s", 500_000),
        ("1.5 MiB / s", 1_572_864),
        ("2GB", 2_000_000_000),
        (1_000_000, 1_000_000),
        ("4096", 4096),
        (None, None),
    ],
)
def test_bandwidth_reads_sizes_per_second(value: Any, expected: int | None) -> None:
    assert rule(bandwidth=value).bandwidth == expected


@pytest.mark.parametrize("value", ["fast", "20 furlongs/s", 0, "0MiB/s"])
def test_a_bad_bandwidth_is_refused(value: Any) -> None:
    assert "replication rule 'r': bandwidth" in refusal(bandwidth=value)
