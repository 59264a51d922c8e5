"""The documentation a newcomer reads: a short README, links that lead somewhere, a command-line synopsis that the
real parser accepts, and no test counts or suite timings in prose (they go stale at the next commit).

Each check is a function that returns its problems; the tests run it on the real files, and once on a bad example,
so that a check that could never fail would be caught.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_LIMIT = 15 * 1024  # bytes
SYNOPSIS_FENCE = "synopsis"  # the README's synopsis is the fenced block tagged ```synopsis


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


# --- reading markdown ----------------------------------------------------------------------------------------------
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(_INLINE_CODE.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


# --- the checks ----------------------------------------------------------------------------------------------------
def size_problems(path: Path, limit: int = README_LIMIT) -> list[str]:
    size = path.stat().st_size
    return [] if size < limit else [f"{path.name} is {size} bytes; keep it under {limit} (move detail into docs/)"]


def link_problems(path: Path) -> list[str]:
    """Every relative link (and image) of `path` leads to an existing file, and to an existing heading when it names
    one in a markdown file."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for line in prose_lines(text):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            if not destination.exists():
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
                continue
            if anchor and destination.suffix == ".md" and anchor not in anchors(destination.read_text(encoding="utf-8")):
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such heading")
    return problems


TEST_COUNT_PATTERNS = [
    re.compile(r"\b\d[\d,]*\s+tests\b", re.I),
    re.compile(r"\btests?\s+(?:pass|passed)\b", re.I),
    re.compile(r"\bsuite\b[^.\n]{0,60}?\b\d+(?:\.\d+)?\s*(?:s|sec|seconds?|min|minutes?|h|hours?)\b", re.I),
]


def count_and_timing_problems(path: Path) -> list[str]:
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for pattern in TEST_COUNT_PATTERNS:
            match = pattern.search(line)
            if match:
                problems.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} (test counts and suite timings "
                                "belong in pytest's output, not in the docs)")
    return problems


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_LEGEND = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.*)$")


def synopsis_lines(readme_text: str) -> list[str]:
    lines, inside = [], False
    for line in readme_text.splitlines():
        stripped = line.strip()
        if not inside and stripped == f"```{SYNOPSIS_FENCE}":
            inside = True
        elif inside and stripped.startswith("```"):
            break
        elif inside:
            lines.append(line)
    return lines


def synopsis_problems(readme_text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every command of the synopsis exists, every option written for it (directly or through a named group of
    options, `NAME = [--a] [--b]`) is one of its options, and every command of the parser is in the synopsis."""
    lines = synopsis_lines(readme_text)
    if not lines:
        return [f"the README has no ```{SYNOPSIS_FENCE} block"]
    legends = {m.group(1): m.group(2) for m in map(_LEGEND.match, (line.strip() for line in lines)) if m}
    commands = [line.strip() for line in lines if line.strip().startswith("sslmedsam2 ")]
    if not commands:
        return ["the synopsis names no command"]
    problems, covered = [], set()
    top = _subcommands(parser)
    for line in commands:
        words = line.split()
        name, rest = words[1], words[2:]
        if name not in top:
            problems.append(f"synopsis: `sslmedsam2 {name}` is not a command")
            continue
        command, label = top[name], name
        sub = _subcommands(command)
        if sub:
            if not rest or rest[0] not in sub:
                problems.append(f"synopsis: `sslmedsam2 {name} {rest[0] if rest else ''}` is not a command")
                continue
            command, label, rest = sub[rest[0]], f"{name} {rest[0]}", rest[1:]
        covered.add(label)
        text = " ".join(rest)
        for key, value in legends.items():
            if re.search(rf"\b{key}\b", text):
                text += " " + value
        known = set(command._option_string_actions)
        for option in sorted(set(_OPTION.findall(text))):
            if option not in known:
                problems.append(f"synopsis: `sslmedsam2 {label}` has no option {option}")
    every = {name for name, p in top.items() if not _subcommands(p)}
    every |= {f"{name} {s}" for name, p in top.items() for s in _subcommands(p)}
    problems += [f"synopsis: `sslmedsam2 {label}` is missing" for label in sorted(every - covered)]
    return problems


# --- the tests on the real files -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from sslmedsam2.cli.command import build_parser

    return build_parser()


def test_readme_is_short():
    assert size_problems(README) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    assert link_problems(path) == []


def test_synopsis_matches_the_parser(parser):
    assert synopsis_problems(README.read_text(encoding="utf-8"), parser) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_test_counts_or_suite_timings(path):
    assert count_and_timing_problems(path) == []


# --- each check fails where it should ------------------------------------------------------------------------------
def test_the_checks_can_fail(tmp_path, parser, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # problems name files relative to ROOT
    long = tmp_path / "README.md"
    long.write_text("x" * (76 * 1024))
    assert size_problems(long)

    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[gone](missing.md) [bad anchor](there.md#no-heading) [good](there.md#a-heading) "
                    "[web](https://example.org/x) `[code](not-checked.md)`\n```\n[fenced](nowhere.md)\n```\n")
    found = link_problems(page)
    assert len(found) == 2 and "missing.md" in found[0] and "no-heading" in found[1]

    counts = tmp_path / "counts.md"
    counts.write_text("The suite: 343 tests.\nAll tests passed.\nThe test suite takes about 13 minutes.\nfine\n")
    assert len(count_and_timing_problems(counts)) == 3

    bad = ("```synopsis\nsslmedsam2 propagate IMAGE SEEDS -o OUT --no-such-option MODEL\nsslmedsam2 frobnicate X\n"
           "sslmedsam2 workspace nosuch WS\nMODEL = [--bogus]\n```\n")
    found = synopsis_problems(bad, parser)
    assert any("--no-such-option" in p for p in found) and any("--bogus" in p for p in found)
    assert any("frobnicate" in p for p in found) and any("workspace nosuch" in p for p in found)
    assert any("`sslmedsam2 serve` is missing" in p for p in found)
    assert synopsis_problems("no block here", parser) == ["the README has no ```synopsis block"]
