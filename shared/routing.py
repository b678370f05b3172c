"""Which project a request path names: Harbor-style prefix, mirror default, containerd `?ns=`."""

from __future__ import annotations

from dataclasses import dataclass

from shared.oci.errors import RegistryError
from shared.oci.reference import validate_name
from shared.settings import Project, Settings, Upstream

DOCKER_HUB_HOSTS = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})


@dataclass(frozen=True, slots=True)
class Target:
    """A repository as the client named it, as we store it, and as the upstream knows it."""

    project: Project
    name: str  # the repository in our storage: <project>/<path>
    path: str  # the repository within the project (for a proxy: the upstream's name)


class ProjectUnknown(RegistryError):
    """No project serves the name. The edge answers it as it answers a private project
    the caller may not use, so that callers cannot tell which private projects exist."""

    def __init__(self, project_name: str) -> None:
        super().__init__("NAME_UNKNOWN", f"no project named {project_name[:300]!r}")


def resolve(settings: Settings, requested: str, namespace: str | None = None) -> Target:
    validate_name(requested)
    if namespace:
        project_name = settings.mirror.namespaces.get(namespace)
        if project_name is None:
            raise RegistryError("NAME_UNKNOWN", f"no project mirrors {namespace!r}")
        return _target(settings, project_name, requested, namespace)
    head, _, rest = requested.partition("/")
    project = settings.project(head)
    if project is not None and rest:
        return _target(settings, project.name, rest, None)
    if settings.mirror.default:
        return _target(settings, settings.mirror.default, requested, None)
    raise ProjectUnknown(head)


def _target(settings: Settings, project_name: str, path: str, namespace: str | None) -> Target:
    project = settings.project(project_name)
    if project is None:  # settings validation makes this unreachable for mirror targets
        raise ProjectUnknown(project_name)
    if project.type == "proxy":
        path = upstream_path(settings, project, path)
    return Target(project, f"{project.name}/{path}", path)


def upstream_path(settings: Settings, project: Project, path: str) -> str:
    """Docker Hub keeps official images under `library/`: `alpine` is `library/alpine`.

    A project whose upstreams include Docker Hub asks each of them for that name: the
    others (a central Seawall in front of Docker Hub) serve Docker Hub's names as they are.
    """
    if "/" in path:
        return path
    upstreams = [found for name in project.upstreams if (found := settings.upstream(name))]
    if any(is_docker_hub(upstream) for upstream in upstreams):
        return f"library/{path}"
    return path


def is_docker_hub(upstream: Upstream) -> bool:
    if upstream.flavor != "auto":
        return upstream.flavor == "dockerhub"
    host = upstream.url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host in DOCKER_HUB_HOSTS
