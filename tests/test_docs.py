"""The docs work as written: links and anchors resolve, paths exist, code blocks load or parse,
and the commands they show name commands, options and make targets that exist.

Reads README.md and docs/*.md only; starts no server.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, get_args, get_origin

import click
import pytest
import yaml
from pydantic import BaseModel

from services.cli import main as seawall_cli
from shared.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Block languages and what is checked of them; a block of any other language fails, so a
# new kind of block gets a check before it can go stale.
SHELL = {"sh", "bash", "shell", "console"}
CHECKED = {"yaml", "yml", "toml", "json", *SHELL}
UNCHECKED = {"text"}  # program output

# SEAWALL_* names in the docs that are not settings, and why.
NOT_SETTINGS = {
    "SEAWALL_CONFIG",  # the configuration file's path
    "SEAWALL_UPSTREAMS__0__URL",  # the docs' example of a per-index override that does not exist
}

# A minimal configuration naming the users, upstreams and projects that fragments in the docs
# refer to. A fragment's top-level keys replace the base's, so a complete example (the README's)
# is checked on its own.
BASE_CONFIG: dict[str, Any] = {
    "users": [
        {"name": "admin", "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"},
        {"name": "ci", "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"},
    ],
    "upstreams": [{"name": "dockerhub", "url": "https://registry-1.docker.io"}],
    "projects": [
        {"name": "local", "type": "hosted", "push": ["admin"]},
        {"name": "dockerhub", "type": "proxy", "upstream": "dockerhub"},
    ],
}

# Top-level entries of the repository: an inline code span starting with one of them followed
# by "/" names a path that must exist.
REPO_DIRS = {"services", "workers", "shared", "tests", "bench", "deploy", "k8s", "docs", ".ci"}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def _split(doc: Path) -> tuple[list[Block], str]:
    """The fenced code blocks of a document, and its prose with the blocks blanked out."""
    blocks: list[Block] = []
    prose: list[str] = []
    fence = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = fence.match(lines[i])
        if not opening:
            prose.append(lines[i])
            i += 1
            continue
        indent, marker = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(marker[0])}{{{len(marker)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        assert j < len(lines), f"{doc.relative_to(ROOT)}:{i + 1}: code block never closed"
        blocks.append(Block(doc, i + 1, opening["info"].lower(), "\n".join(body) + "\n"))
        prose.extend([""] * (j - i + 1))
        i = j + 1
    return blocks, "\n".join(prose)


SPLIT = {doc: _split(doc) for doc in DOCS}
BLOCKS = [block for blocks, _ in SPLIT.values() for block in blocks]


def _prose(doc: Path) -> str:
    return SPLIT[doc][1]


def _blocks(*langs: str) -> list[Block]:
    return [block for block in BLOCKS if block.lang in langs]


def _ids(blocks: Sequence[Block]) -> list[str]:
    return [block.where for block in blocks]


# ------------------------------------------------------------------ links and anchors


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation but - and _ dropped,
    spaces turned into -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(doc).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = github_anchor(heading[1])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(doc: Path) -> Iterator[str]:
    """Targets of the inline links and images of a document's prose (not of code spans)."""
    prose = re.sub(r"`[^`]*`", "", _prose(doc))
    yield from re.findall(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


def test_github_anchor_rule() -> None:
    assert (
        github_anchor("Native TLS: trusting the edge's certificate")
        == "native-tls-trusting-the-edges-certificate"
    )
    assert (
        github_anchor("podman / CRI-O / skopeo: `registries.conf`") == "podman--cri-o--skopeo-registriesconf"
    )
    assert github_anchor("`users`, `projects`") == "users-projects"
    assert github_anchor("`disk_cache`") == "disk_cache"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto: nothing here may reach outside hosts
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(resolved):
            broken.append(f"{target}: {resolved.relative_to(ROOT)} has no heading #{anchor}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_paths_named_in_code_spans_exist(doc: Path) -> None:
    missing = []
    for span in re.findall(r"`([^`\s]+)`", _prose(doc)):
        first, slash, _ = span.partition("/")
        named = slash and first in REPO_DIRS and not re.search(r"[<>*…]", span)
        if named and not (ROOT / span.split("::")[0]).exists():
            missing.append(span)
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_every_block_is_of_a_checked_kind() -> None:
    unchecked = [
        f"{b.where} ({b.lang or 'no language'})" for b in BLOCKS if b.lang not in CHECKED | UNCHECKED
    ]
    assert not unchecked, f"blocks without a check: {unchecked}; name a language this test checks"


# ------------------------------------------------------------------ configuration blocks


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (`S3Settings | None`, `list[Project]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models(arg)]


def unknown_keys(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys the settings would silently ignore (the models ignore extra keys)."""
    if not isinstance(data, dict):
        return []
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            problems.append(f"{where}{key}")
            continue
        # A union of models (replication triggers): judged by the model that fits best.
        subs = _models(field.annotation)
        for item in value if isinstance(value, list) else [value]:
            if subs:
                problems += min((unknown_keys(sub, item, f"{where}{key}.") for sub in subs), key=len)
    return problems


def is_seawall_config(document: Any) -> bool:
    """A YAML document is (a fragment of) a Seawall configuration if a top-level key is a setting."""
    return isinstance(document, dict) and any(key in Settings.model_fields for key in document)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings as the file alone gives them: no SEAWALL_* variable of the test run leaks in."""
    for name in [n for n in os.environ if n.startswith("SEAWALL_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("block", _blocks("yaml", "yml"), ids=_ids(_blocks("yaml", "yml")))
@pytest.mark.usefixtures("clean_env")
def test_yaml_blocks_load(block: Block, tmp_path: Path) -> None:
    try:
        document = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        pytest.fail(f"{block.where}: not YAML: {exc}")
    if not is_seawall_config(document):
        return  # k3s registries.yaml and the like: parsing is all we can check
    unknown = unknown_keys(Settings, document)
    assert not unknown, f"{block.where}: keys Seawall does not know: {unknown}"
    config = tmp_path / "seawall.yaml"
    config.write_text(yaml.safe_dump({**BASE_CONFIG, **document}))
    try:
        load_settings(config)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        pytest.fail(f"{block.where}: does not load as a Seawall configuration:\n{exc}")


def test_docs_hold_seawall_configurations() -> None:
    configs = [b for b in _blocks("yaml", "yml") if is_seawall_config(yaml.safe_load(b.text))]
    assert any(b.doc.name == "README.md" and b.doc.parent == ROOT for b in configs)
    assert len(configs) >= 4


@pytest.mark.parametrize("block", _blocks("toml"), ids=_ids(_blocks("toml")))
def test_toml_blocks_parse(block: Block) -> None:
    try:
        tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{block.where}: not TOML: {exc}")


@pytest.mark.parametrize("block", _blocks("json"), ids=_ids(_blocks("json")))
def test_json_blocks_parse(block: Block) -> None:
    try:
        json.loads(block.text)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{block.where}: not JSON: {exc}")


def _setting(name: str) -> bool:
    """Whether SEAWALL_A__B names a setting (a field of Settings, then of its nested model)."""
    models: list[type[BaseModel]] = [Settings]
    for part in name.removeprefix("SEAWALL_").lower().split("__"):
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            return False
        models = [] if get_origin(field.annotation) is list else _models(field.annotation)
    return True


def test_seawall_variables_named_in_the_docs_are_settings() -> None:
    named = set()
    for doc in DOCS:
        named |= {n.rstrip("_") for n in re.findall(r"\bSEAWALL_[A-Z0-9_]+", doc.read_text())}
    wrong = sorted(n for n in named - NOT_SETTINGS if not _setting(n))
    assert not wrong, f"SEAWALL_* variables that are no setting: {wrong}"


def test_every_setting_has_its_variable_in_the_configuration_reference() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    expected = []
    for name, field in Settings.model_fields.items():
        nested = [] if get_origin(field.annotation) is list else _models(field.annotation)
        if not nested:
            expected.append(f"SEAWALL_{name.upper()}")
        for model in nested:
            expected += [f"SEAWALL_{name.upper()}__{sub.upper()}" for sub in model.model_fields]
    missing = [v for v in expected if f"`{v}`" not in reference]
    assert not missing, f"docs/configuration.md does not list {missing}"


# ------------------------------------------------------------------ command lines


def command_lines(block: Block) -> Iterator[list[str]]:
    """Each simple command of a shell block, as words (comments, prompts and pipes split off)."""
    text = re.sub(r"\\\n", " ", block.text)
    for line in text.splitlines():
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in lexer:
            if token in {"|", "||", "&&", ";", "&"}:
                if words:
                    yield words
                words = []
            else:
                words.append(token)
        if words:
            yield words


def without_assignments(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words


def parse_click(command: click.Command, prog: str, args: Sequence[str]) -> str | None:
    """Parse args as click would, without running the command: None, or what is wrong."""
    try:
        with command.make_context(prog, list(args)):
            pass
    except click.exceptions.Exit as done:
        return None if done.exit_code == 0 else f"exits {done.exit_code}"
    except click.ClickException as exc:
        return exc.format_message()
    return None


def check_seawall(args: Sequence[str]) -> str | None:
    if args and not args[0].startswith("-"):
        sub = seawall_cli.commands.get(args[0]) if isinstance(seawall_cli, click.Group) else None
        if sub is None:
            return f"seawall has no command {args[0]!r}"
        return parse_click(sub, f"seawall {args[0]}", args[1:])
    return parse_click(seawall_cli, "seawall", args)


class _ParserCaught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _argparse_parser(main: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser an argparse `main(argv)` builds, caught as it is about to parse."""

    def caught(self: argparse.ArgumentParser, *_: Any, **__: Any) -> NoReturn:
        raise _ParserCaught(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        try:
            main([])
        except _ParserCaught as got:
            return got.parser
    raise AssertionError(f"{main.__module__}.main built no argparse parser")


def check_module(module: str, args: Sequence[str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """`python -m module args`, for the repository's own modules (click or argparse)."""
    if module.split(".")[0] not in {"services", "workers", "shared", "tests", "bench"}:
        return None
    try:
        imported = importlib.import_module(module)
        if hasattr(imported, "__path__"):
            imported = importlib.import_module(f"{module}.__main__")
    except ImportError as exc:
        return f"python -m {module}: {exc}"
    main = getattr(imported, "main", None)
    if isinstance(main, click.Command):
        return parse_click(main, f"python -m {module}", args)
    if not callable(main):
        return f"python -m {module}: the module has no main()"
    parser = _argparse_parser(main, monkeypatch)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as exited:
        return None if exited.code == 0 else errors.getvalue().strip()
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m for m in re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE) if m != ".PHONY"}


def pytest_markers() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {m.split(":")[0].strip() for m in config["tool"]["pytest"]["ini_options"]["markers"]}


def check_pytest(args: Sequence[str]) -> str | None:
    takes_value = {"-m", "-k", "-p", "-o", "-c", "--timeout", "--maxfail"}
    words = iter(args)
    for word in words:
        if word == "-m":
            used = set(re.findall(r"[A-Za-z_][\w-]*", next(words, ""))) - {"and", "or", "not"}
            if used - pytest_markers():
                return f"pytest has no marker {sorted(used - pytest_markers())}"
        elif word in takes_value:
            next(words, None)
        elif not word.startswith("-") and not (ROOT / word.split("::")[0]).exists():
            return f"pytest: no such path {word}"
    return None


def check_command(words: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, str | None] | None:
    """(kind, problem or None) for a command this test knows how to check, else None."""
    words = without_assignments(words)
    if not words:
        return None
    program, args = Path(words[0]).name, words[1:]
    if program == "seawall":
        return "seawall", check_seawall(args)
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and args[:1] == ["-m"] and len(args) > 1:
        return "python -m", check_module(args[1], args[2:], monkeypatch)
    if program == "make":
        unknown = [t for t in args if not t.startswith("-") and "=" not in t and t not in make_targets()]
        return "make", (f"the Makefile has no target {unknown}" if unknown else None)
    if program == "pytest":
        return "pytest", check_pytest(args)
    return None


SHELL_BLOCKS = _blocks(*SHELL)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_shell_blocks_name_commands_and_options_that_exist(
    block: Block, monkeypatch: pytest.MonkeyPatch
) -> None:
    problems = []
    for words in command_lines(block):
        checked = check_command(words, monkeypatch)
        if checked and checked[1]:
            problems.append(f"{shlex.join(words)}: {checked[1]}")
    assert not problems, f"{block.where}: " + "; ".join(problems)


def test_docs_show_commands_of_every_kind_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = set()
    for block in SHELL_BLOCKS:
        for words in command_lines(block):
            checked = check_command(words, monkeypatch)
            if checked:
                kinds.add(checked[0])
    assert kinds == {"seawall", "python -m", "make", "pytest"}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_seawall_commands_in_prose_exist(doc: Path) -> None:
    """`seawall <command> [--option]` in tables and text: the command and its options exist."""
    assert isinstance(seawall_cli, click.Group)
    problems = []
    for span in re.findall(r"`((?:\.venv/bin/)?seawall\s[^`]*)`", _prose(doc)):
        words = span.split()
        if not re.fullmatch(r"[a-z][a-z-]*", words[1]):
            continue  # a log line such as `seawall | edge was killed`
        sub = seawall_cli.commands.get(words[1])
        if sub is None:
            problems.append(f"{span!r}: no such command")
            continue
        options = {opt for param in sub.params for opt in param.opts} | {"--help"}
        for word in words[2:]:
            option = word.strip("[]").split("=")[0]
            if option.startswith("--") and option not in options:
                problems.append(f"{span!r}: seawall {words[1]} has no {option}")
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)
