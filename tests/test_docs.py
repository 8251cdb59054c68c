"""The documentation runs: every fenced shell and Python block in README.md and docs/*.md is
executed as written, and every relative link points at a file (and heading) that exists.

How a block is run is chosen by its fence's info string, ``LANGUAGE [FLAG ...]``:

- ``bash`` / ``sh``: run by ``bash -e -o pipefail`` in a temporary folder, with this
  interpreter's ``bin`` folder first on ``PATH`` (so ``normfold`` and ``python`` are the ones
  under test).
- ``python``: run in a fresh namespace with the same temporary folder as working directory. A
  fresh namespace per block means a snippet cannot lean on names an earlier one defined.
- Any other language (``text``, ``json``, none) is an output example and is not run.

Blocks of one page run in order in one folder, so a later block may read a file an earlier one
wrote (``resnet.onnx``). Flags:

- ``setup``: a fresh-machine line ``python3 -m venv .venv && . .venv/bin/activate && pip install
  ... && REST``. The install part is checked (torch pinned to the CPU wheel, extras that
  pyproject.toml defines), not run — it would reinstall the package under test; REST runs.
- ``slow``: run only under ``-m slow``, alone in its own folder (so it builds its own inputs).
- ``root``: run in the repository root (the benchmarks are run from there as ``python -m
  benchmarks.NAME``).
- ``no-run``: not executed. The line before the fence must be an HTML comment
  ``<!-- no-run: why -->``; it is meant for commands that take many minutes, gigabytes or
  packages outside the test extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"bash": "shell", "sh": "shell", "python": "python"}
FLAGS = {"setup", "slow", "root", "no-run"}
README_LIMIT = 15 * 1024
# The fresh-machine install every set-up line starts with (the extras are checked separately).
SETUP_PREFIX = re.compile(
    r'^python3 -m venv \.venv && \. \.venv/bin/activate && '
    r'pip install (?:-q )?torch==2\.13\.0 -e "\.\[(?P<extras>[a-z,]+)\]"(?: && (?P<rest>.+))?$'
)
SNIPPET_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, how it is fenced, what it says."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    flags: frozenset[str]
    code: str
    comment: str  # the line before the fence

    @property
    def label(self) -> str:
        where = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{where}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and "no-run" not in self.flags


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, in order (fences may be indented, e.g. inside a list)."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = re.match(r"^(\s*)(```+)\s*(.*)$", lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, info = opening.groups()
        words = info.split()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[end]):
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end])
            end += 1
        found.append(
            Block(
                page=page,
                line=index + 1,
                language=words[0] if words else "",
                flags=frozenset(words[1:]),
                code="\n".join(body) + "\n",
                comment=lines[index - 1].strip() if index else "",
            )
        )
        index = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def _shell_command(block: Block) -> str | None:
    """What to run for a shell block: the block, or for ``setup`` the part after the install."""
    if "setup" not in block.flags:
        return block.code
    match = SETUP_PREFIX.match(block.code.strip())
    assert match, f"{block.label}: a setup block is one line: {SETUP_PREFIX.pattern}"
    return match.group("rest")


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_block(block: Block, folder: Path) -> None:
    """Run one block in ``folder`` (the repository root for ``root`` blocks); fail with its label."""
    where = ROOT if "root" in block.flags else folder
    if RUN_LANGUAGES[block.language] == "python":
        code = compile(block.code, block.label, "exec")
        with _working_directory(where):
            exec(code, {"__name__": "__main__"})  # a fresh namespace: the snippet defines its names
        return
    command = _shell_command(block)
    if command is None:
        return
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block.label} exited {result.returncode}\n--- command\n{command}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(page: Path, tmp_path: Path) -> None:
    """Every runnable, not-slow block of the page, in order, in one folder."""
    for block in blocks(page):
        if block.runs and "slow" not in block.flags:
            run_block(block, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in ALL_BLOCKS if b.runs and "slow" in b.flags], ids=lambda b: b.label
)
def test_slow_snippet_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path)


def test_blocks_are_well_formed() -> None:
    """Known flags only; every no-run block says why; setup lines have the pinned install."""
    extras = set(importlib.metadata.metadata("normfold").get_all("Provides-Extra") or [])
    for block in ALL_BLOCKS:
        assert block.flags <= FLAGS, f"{block.label}: unknown flags {sorted(block.flags - FLAGS)}"
        if block.flags:
            assert block.language in RUN_LANGUAGES, f"{block.label}: flags on a block that never runs"
        if "no-run" in block.flags:
            assert re.fullmatch(r"<!-- no-run: .+ -->", block.comment), (
                f"{block.label}: a no-run block needs '<!-- no-run: why -->' on the line before it"
            )
        if "setup" in block.flags:
            match = SETUP_PREFIX.match(block.code.strip())
            assert match, f"{block.label}: a setup block is one line: {SETUP_PREFIX.pattern}"
            unknown = set(match.group("extras").split(",")) - extras
            assert not unknown, f"{block.label}: normfold has no extra {sorted(unknown)}"


def test_readme_front_page() -> None:
    """The README stays short and starts with exactly two set-up lines: the example, the tests."""
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= README_LIMIT, f"README.md is {readme.stat().st_size} bytes"
    setups = [b for b in blocks(readme) if "setup" in b.flags]
    assert len(setups) == 2, [b.label for b in setups]
    first, tests = (SETUP_PREFIX.match(b.code.strip()) for b in setups)
    assert first and "normfold optimize --example" in (first.group("rest") or "")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests and tests.group(0) in ci.splitlines(), "the README's test line is not .ci/run's"


def test_the_runner_fails_on_a_broken_snippet(tmp_path: Path) -> None:
    """The harness can fail: a failing command, and a Python block that uses a name only an
    earlier block defined (each block runs in a fresh namespace)."""
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nnormfold verify missing.onnx missing.onnx\n```\n\n"
        "```python\nvalue = 1\n```\n\n```python\nprint(value)\n```\n"
    )
    failing_command, defines, uses = blocks(page)
    with pytest.raises(AssertionError, match="exited 2"):
        run_block(failing_command, tmp_path)
    run_block(defines, tmp_path)
    with pytest.raises(NameError):
        run_block(uses, tmp_path)


# ---- links -------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](image)


def _without_fences(page: Path) -> str:
    return re.sub(r"^\s*(```+).*?^\s*\1\s*$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def _prose(page: Path) -> str:
    """The page without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(page))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', '-N' on repeats."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*#*\s*$", _without_fences(page), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _linked_files(page: Path) -> set[Path]:
    return {
        (page.parent / target.partition("#")[0]).resolve()
        for target in _LINK.findall(_prose(page))
        if not target.startswith("#")
    }


def test_every_docs_page_is_on_the_map() -> None:
    """docs/index.md links every page of docs/, and the README links docs/index.md."""
    linked = _linked_files(ROOT / "docs" / "index.md")
    missing = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked and p.name != "index.md")
    assert not missing, f"docs/index.md does not link: {missing}"
    assert (ROOT / "docs" / "index.md").resolve() in _linked_files(ROOT / "README.md")


# ---- the reference pages name everything there is ---------------------------------------------


def _help_flags(verb: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    from normfold.cli import main

    with pytest.raises(SystemExit):
        main([verb, "--help"])
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}


@pytest.mark.parametrize("verb", ["optimize", "verify", "inspect", "collapse", "passes"])
def test_commands_page_names_every_flag(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each flag of each command is in docs/commands.md (collapse's may be in docs/collapse.md)."""
    text = (ROOT / "docs" / "commands.md").read_text()
    if verb == "collapse":
        text += (ROOT / "docs" / "collapse.md").read_text()
    missing = sorted(flag for flag in _help_flags(verb, capsys) if f"`{flag}" not in text)
    assert not missing, f"normfold {verb}: flags not documented: {missing}"


def test_passes_page_names_every_pass() -> None:
    from normfold.catalog import PASSES

    text = (ROOT / "docs" / "passes.md").read_text()
    missing = [info.name for info in PASSES if f"`{info.name}`" not in text]
    assert not missing, f"docs/passes.md does not describe: {missing}"


def test_zoo_page_names_every_model() -> None:
    from normfold.models import NAMES

    text = (ROOT / "docs" / "zoo.md").read_text()
    missing = [name for name in NAMES if f"`{name}`" not in text]
    assert not missing, f"docs/zoo.md does not name: {missing}"
