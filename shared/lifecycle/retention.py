"""Tag retention for hosted projects: Harbor-style rules, evaluated together.

Each rule selects tags (`repositories` globs on the path inside the project, `tags` globs)
and keeps some of them: the `keep_most_recent` most recently pushed in each repository
(push time: the tag object's last-modified), those pulled within `keep_pulled_within`
(shared/lifecycle/pulls.py), or all (`keep: always`). In a repository that some rule
applies to, a tag goes only if no rule keeps it; a repository no rule's `repositories`
matches is left alone. Deleting a tag deletes the tag only: what it was the last to
reach is collected by garbage collection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from shared.globs import matches
from shared.lifecycle.inventory import RepositoryView, read_repositories
from shared.lifecycle.policies import RetentionRule
from shared.lifecycle.pulls import (
    PullHistory,
    image_member,
    note_first_seen,
    read_history,
    save_history,
    tag_member,
)
from shared.lifecycle.runs import LifecycleDeps, LifecycleReport, exclusive
from shared.oci.digest import Digest
from shared.registry import layout
from shared.registry.storage import ObjectMissing

log = structlog.get_logger("lifecycle")
Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the rules decide for one repository's tags."""

    kept: list[str]
    doomed: list[str]


def judge(
    view: RepositoryView, path: str, rules: list[RetentionRule], history: PullHistory, now: float
) -> Verdict | None:
    """The tags of `view` (whose path inside the project is `path`) each rule keeps, and the
    rest; None when no rule applies to the repository."""
    if not any(matches(path, rule.repositories) for rule in rules):
        return None
    keep: set[str] = set()
    for rule in rules:
        matching = [t for t in view.tags if rule.matches(path, t)]
        if rule.keep == "always":
            keep.update(matching)
        elif rule.keep_most_recent is not None:
            # Latest push first; a tag name breaks ties so that a run is repeatable.
            newest = sorted(matching, key=lambda t: (-view.tags[t][1], t))
            keep.update(newest[: rule.keep_most_recent])
        elif rule.keep_pulled_within is not None:
            horizon = now - rule.keep_pulled_within.total_seconds()
            keep.update(t for t in matching if history.age_floor([tag_member(view.name, t)]) >= horizon)
    return Verdict(sorted(t for t in view.tags if t in keep), sorted(t for t in view.tags if t not in keep))


async def apply_retention(
    deps: LifecycleDeps, project: str, *, dry_run: bool = False, progress: Progress | None = None
) -> LifecycleReport:
    """Delete the tags of `project` that no retention rule keeps (a dry run only lists them)."""
    found = deps.settings.project(project)
    if found is None or found.type != "hosted":
        raise ValueError(f"retention applies to hosted projects; {project!r} is not one")
    report = LifecycleReport(job="retention", project=project, dry_run=dry_run)
    async with exclusive(deps.redis, "retention") as lease:
        views = await read_repositories(deps.objects, deps.blobs, project=project, progress=progress)
        now = time.time()
        history = await read_history(deps.redis, deps.objects, project, now)
        tag_members = [tag_member(v.name, t) for v in views.values() for t in v.tags]
        # A tag with no record of a pull counts as pulled now: a lost record never makes it old.
        await note_first_seen(deps.redis, project, history, tag_members, now)
        gone: set[str] = set()
        for name in sorted(views):
            view = views[name]
            verdict = judge(view, name.removeprefix(f"{project}/"), found.retention, history, now)
            report.examined.add(0, len(view.tags))
            if verdict is None:
                report.kept.add(0, len(view.tags))
                continue
            report.kept.add(0, len(verdict.kept))
            for tag in verdict.doomed:
                if lease.lost:
                    report.outcome, report.error = (
                        "failed",
                        "the lifecycle lease was lost (another job may have started); stopped",
                    )
                    return report.finish()
                if dry_run or await _delete_tag(deps, view, tag):
                    report.deleting("tag", item=f"{name}:{tag}")
                    gone.add(tag_member(name, tag))
                else:
                    report.kept.add(0)
                if progress is not None:
                    progress(1)
        if not dry_run:
            current = {m for m in tag_members if m not in gone}
            current.update(image_member(v.name, d) for v in views.values() for d in v.images)
            await save_history(deps.redis, deps.objects, project, history, current, now)
    log.info("retention_applied", project=project, dry_run=dry_run, tags=report.deleted_objects)
    return report.finish()


async def _delete_tag(deps: LifecycleDeps, view: RepositoryView, tag: str) -> bool:
    """Delete the tag unless it was pushed again since the listing (then the rules judged
    an older state: it stays, and the next run judges it afresh)."""
    digest, pushed = view.tags[tag]
    key = layout.tag(view.name, tag)
    try:
        now_points_at = Digest.parse((await deps.objects.get_bytes(key)).decode())
    except ObjectMissing:
        return False
    # A listing gives the last-modified; the tag's own key sorts before any key it prefixes.
    listed = await deps.objects.list_objects(key, limit=1)
    if not listed or listed[0].key != key:
        return False
    if now_points_at != digest or listed[0].modified > pushed:
        log.info("retention_tag_pushed_meanwhile", repository=view.name, tag=tag)
        return False
    return await deps.repositories.delete_tag(view.name, tag)
