"""README.md and docs/: every link resolves, every page is reachable, every command shown exists.

Links: each markdown link ``[text](target#anchor)`` (outside code) in README.md and docs/*.md must
name a file or folder that exists relative to the linking file, and its anchor a heading of the
target by GitHub's slug rule (lower case, punctuation other than ``-`` and ``_`` removed, spaces to
``-``, ``-1``, ``-2`` … for repeated headings). Commands: every project script a code block or
inline code shows (``train.py``, ``bench/*.py``, ``python -m pipeline.*`` …) must exist, and every
``--option`` given to it must appear in its ``--help``.
"""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def code_texts(text: str) -> list[str]:
    """Code a reader may copy: fenced and indented code-block lines, and inline code spans."""
    out, fenced, previous_blank = [], False, True
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or (line.startswith("    ") and previous_blank):
            out.append(line.strip())
            continue  # an indented block continues while its lines stay indented
        previous_blank = not line.strip()
        out.extend(m.group(2) for m in CODE_SPAN.finditer(line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation except ``-``
    and ``_`` removed, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a markdown file, with GitHub's ``-1``, ``-2`` suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return frozenset(out)


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code blocks and code spans."""
    out = []
    for line in prose_lines(path.read_text()):
        out.extend(m.group(1) for m in LINK.finditer(CODE_SPAN.sub("", line)))
    return out


def test_github_slug_rule():
    assert github_slug("A longer run: does SimSiam beat the raw pixels here?") == \
        "a-longer-run-does-simsiam-beat-the-raw-pixels-here"
    assert github_slug("`--loader dali` (NVIDIA DALI)") == "--loader-dali-nvidia-dali"
    assert github_slug("The paper's findings") == "the-papers-findings"
    assert github_slug("torch_loader and 1×1 maps") == "torch_loader-and-11-maps"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_to_files_and_headings(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_page_is_reachable_from_the_front_page():
    front = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md") if not t.startswith("#")}
    index = {(REPO / "docs" / t.partition("#")[0]).resolve() for t in links(REPO / "docs" / "README.md")
             if not t.startswith("#")}
    pages = {p.resolve() for p in PAGES[1:]}
    assert (REPO / "docs" / "README.md").resolve() in front
    assert pages - {(REPO / "docs" / "README.md").resolve()} <= index, "pages missing from docs/README.md"
    assert pages <= front | index


def test_front_page_is_short_and_keeps_its_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make train" in text and "make test" in text
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


SCRIPT = re.compile(r"(?:(python\d?)\s+)?(?:-m\s+(pipeline(?:\.\w+)+)|((?:bench/)?[\w-]+\.(?:py|sh)))(?=\s|$)")
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, options) for each project command a page shows: ``python -m pipeline.X[.Y]``,
    ``bench/X.py`` or ``bench/X.sh``, and a top-level ``X.py`` that is run with ``python`` or exists
    (a bare name such as the official ``main_lincls.py`` is a reference, not a command)."""
    out = []
    for page in PAGES:
        for code in code_texts(page.read_text()):
            code = code.split(" #")[0]  # a shell comment
            for m in SCRIPT.finditer(code):
                if m.start() > 0 and not code[m.start() - 1].isspace():
                    continue  # part of a longer path, e.g. model/lars.py
                python, module, path = m.groups()
                if module:  # a module, or a package run through its __main__.py
                    script = module.replace(".", "/") + ".py"
                    if not (REPO / script).exists() and (REPO / module.replace(".", "/") / "__main__.py").exists():
                        script = module.replace(".", "/") + "/__main__.py"
                elif path.startswith("bench/") or python or (REPO / path).is_file():
                    script = path
                else:
                    continue
                options = []
                for token in code[m.end():].split():
                    if token in ("--", "|", "&&", ";") or token.endswith((".py", ".sh")):
                        break  # the options of another command from here on
                    option = token.strip("[]").split("=")[0]  # [--optional] and --key=value as --key
                    if OPTION.fullmatch(option):
                        options.append(option)
                out.append((str(page.relative_to(REPO)), script, options))
    return out


# Prints each script's --help in one process (torch is imported once, not once per script).
HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            if script.startswith("pipeline/"):
                runpy.run_module(script[:-3].replace("/", "."), run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
        except SystemExit:
            pass
    out[script] = buf.getvalue()
print(json.dumps(out))
"""


def help_options(scripts: set[str]) -> dict[str, frozenset[str]]:
    """Every ``--option`` each script's ``--help`` names (a ``.sh`` wrapper: its ``.py``)."""
    py = {s: s[:-3] + ".py" if s.endswith(".sh") else s for s in scripts}
    res = subprocess.run([sys.executable, "-c", HELP_ALL, *sorted(set(py.values()))], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    helps = json.loads(res.stdout.splitlines()[-1])
    empty = sorted(p for p, text in helps.items() if "--help" not in text)
    assert not empty, f"no --help output from {empty}"
    return {s: frozenset(re.findall(r"--[a-z][a-z0-9-]*", helps[p])) for s, p in py.items()}


def test_commands_shown_exist_with_their_options():
    shown = commands()
    scripts = {s for _, s, _ in shown}
    assert {"train.py", "knn_eval.py", "linear_eval.py", "bench/throughput.py", "pipeline/datasets.py"} <= scripts
    missing = sorted({f"{page}: {script}" for page, script, _ in shown if not (REPO / script).exists()})
    assert not missing, "scripts shown but not in the repository: " + "; ".join(missing)
    known = help_options({s for _, s, opts in shown if opts})
    unknown = sorted({f"{page}: {script} {opt}" for page, script, opts in shown for opt in opts
                      if opt not in known[script]})
    assert not unknown, "options shown but not in the script's --help: " + "; ".join(unknown)
