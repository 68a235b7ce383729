"""The documentation shows commands, options, files and links that exist.

Every `qpipe ...` command line in README.md, docs/*.md and benchmarks/*.md names
a real command, and every `--option` on it appears in that command's `--help`;
`python -m pipeline...` names a module and `python benchmarks/X.py --option`
a script that takes that option; a code span that is a repository path
(`pipeline/...`, `tests/...`, `recipes/...`) or a dotted name
(`pipeline.core.files.atomic_path`) names something that exists; every
relative link points to an existing file and, with `#anchor`, to a heading in
it, and every page of docs/ can be reached from README.md. README.md stays a
front door (at most 220 lines), and the module listing at the end of
docs/architecture.md matches the tree.

`python tests/test_docs.py` rewrites the two generated blocks (the module
listing and the recipe table in docs/recipes.md) from the tree and the schema.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
RECIPES_DOC = ROOT / "docs" / "recipes.md"
MAX_README_LINES = 220
MODULES_START, MODULES_END = "<!-- modules:start -->\n", "<!-- modules:end -->"
RECIPES_START, RECIPES_END = "<!-- recipe-doc:start -->\n", "<!-- recipe-doc:end -->"

# Tokens that end one shell command inside a code line.
_COMMAND_END = {"|", "||", "&&", ";", ">", ">>", "#", "2>&1"}
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_REPO_PATH = re.compile(r"^(?:pipeline|tests|benchmarks|recipes|docs|\.github|\.ci)/[\w./-]*(?:::\w+)?$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


def _prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines) of a Markdown text; backslash-continued code lines are joined."""
    prose, code, fenced, pending = [], [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose.append(line)
        elif line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            code.append(pending + line)
            pending = ""
    return prose, code


def code_snippets(text: str) -> list[str]:
    """Every fenced code line and every inline code span of a Markdown text."""
    prose, code = _prose_and_code(text)
    spans = [m.group(1) for line in prose for m in re.finditer(r"`([^`]+)`", line)]
    return code + spans


def _commands(snippet: str, program: list[str]) -> list[tuple[list[str], list[str]]]:
    """(words after the program, options) for each time ``program`` starts a command in ``snippet``."""
    tokens = snippet.replace("$(", " ").replace(")", " ").split()
    found = []
    for i in range(len(tokens) - len(program) + 1):
        if tokens[i : i + len(program)] != program:
            continue
        words, options = [], []
        for tok in tokens[i + len(program) :]:
            if tok in _COMMAND_END or tok.startswith("#"):
                break
            if tok.startswith(("-", "[-")):
                options += _OPTION.findall(tok)
            elif not options and re.fullmatch(r"[a-z][a-z0-9-]*", tok):
                words.append(tok)
        found.append((words, options))
    return found


@functools.cache
def _qpipe_help(words: tuple[str, ...]) -> tuple[int, str]:
    from pipeline.cli.app import app

    res = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    return res.exit_code, res.output


@functools.cache
def _script_help(script: str) -> tuple[int, str]:
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout + res.stderr


def _subcommands(help_text: str) -> set[str]:
    if "Commands:" not in help_text:
        return set()
    block = help_text.split("Commands:", 1)[1]
    return {m.group(1) for m in re.finditer(r"^\s{2}([a-z][a-z0-9-]*)\s", block, re.M)}


def qpipe_problems(snippet: str) -> list[str]:
    """What is wrong with the qpipe commands in one code line or span (empty: nothing)."""
    problems = []
    for words, options in _commands(snippet, ["qpipe"]):
        path: list[str] = []
        unknown = False
        for w in words:  # descend while the word is a (sub)command; a leaf command's other words are arguments
            subcommands = _subcommands(_qpipe_help(tuple(path))[1])
            if w in subcommands:
                path.append(w)
                continue
            if not path or subcommands:
                problems.append(f"`qpipe {' '.join([*path, w])}`: no such command")
                unknown = True
            break
        if unknown:
            continue
        known = set(_OPTION.findall(_qpipe_help(tuple(path))[1]))
        shown = " ".join(["qpipe", *path])
        problems += [f"`{shown} {opt}`: not in `{shown} --help`" for opt in options if opt not in known]
    return problems


def script_problems(snippet: str) -> list[str]:
    """What is wrong with `python -m pipeline...` and `python benchmarks/X.py` commands in one snippet."""
    problems = []
    for m in re.finditer(r"\bpython3? -m (pipeline(?:\.\w+)*)", snippet):
        if importlib.util.find_spec(m.group(1)) is None:
            problems.append(f"`python -m {m.group(1)}`: no such module")
    tokens = snippet.split()
    for py, script in zip(tokens, tokens[1:]):
        if py not in ("python", "python3") or not re.fullmatch(r"benchmarks/\w+\.py", script):
            continue
        if not (ROOT / script).is_file():
            problems.append(f"`python {script}`: no such script")
            continue
        known = set(_OPTION.findall(_script_help(script)[1]))
        for _, options in _commands(snippet, [py, script]):
            problems += [f"`python {script} {o}`: not in its --help" for o in options if o not in known]
    return problems


def path_problems(snippet: str) -> list[str]:
    """A code span that is a single repository path must name something that exists."""
    if not _REPO_PATH.match(snippet):
        return []
    path = snippet.split("::")[0]
    return [] if (ROOT / path).exists() else [f"`{snippet}`: no such file or folder"]


def dotted_problems(snippet: str) -> list[str]:
    """A code span such as `pipeline.eval.speed.benchmark` must name a module, or a name in one."""
    if not re.fullmatch(r"pipeline(?:\.\w+)+", snippet):
        return []
    parts = snippet.split(".")
    for n in range(len(parts), 0, -1):
        module = ".".join(parts[:n])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj = importlib.import_module(module)
            for attr in parts[n:]:
                if not hasattr(obj, attr):
                    return [f"`{snippet}`: {module} has no {'.'.join(parts[n:])}"]
                obj = getattr(obj, attr)
            return []
    return [f"`{snippet}`: no such module"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose, _ = _prose_and_code(path.read_text())
    return {_slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


def link_problems(doc: Path) -> list[str]:
    """Every relative link of a Markdown file points to an existing file (and heading)."""
    problems = []
    name = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc
    prose, _ = _prose_and_code(doc.read_text())
    for line in prose:
        for target in _LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                problems.append(f"{name}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{name}: link to {target}: no such heading")
    return problems


def doc_problems(text: str) -> list[str]:
    problems = []
    for snippet in code_snippets(text):
        problems += qpipe_problems(snippet) + script_problems(snippet) + path_problems(snippet) + dotted_problems(snippet)
    return problems


# --- generated blocks ------------------------------------------------------------------------


def _layer_order() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in pyproject["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def module_listing() -> str:
    """A Markdown table of every module of the package, folders in layer order (highest first)."""
    order = _layer_order()
    pkg = ROOT / "pipeline"
    modules = [p for p in pkg.rglob("*.py") if p.name != "__init__.py" and "__pycache__" not in p.parts]

    def key(p: Path) -> tuple[int, str, str]:
        top = p.relative_to(pkg).parts[0].removesuffix(".py")
        return (order.index(top) if top in order else len(order), p.parent.as_posix(), p.name)

    rows = ["| folder | module | what it is |", "| --- | --- | --- |"]
    for p in sorted(modules, key=key):
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        first = doc.strip().split("\n")[0].strip().replace("|", "\\|")
        folder = p.parent.relative_to(ROOT).as_posix() + "/"
        rows.append(f"| `{folder}` | `{p.name}` | {first} |")
    return "\n".join(rows) + "\n"


def _block(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _replace_block(path: Path, start: str, end: str, body: str) -> None:
    text = path.read_text()
    head, rest = text.split(start, 1)
    path.write_text(head + start + body + end + rest.split(end, 1)[1])


# --- tests -----------------------------------------------------------------------------------


def test_every_qpipe_command_option_script_and_path_shown_in_the_docs_exists():
    problems = [f"{doc.relative_to(ROOT)}: {p}" for doc in doc_files() for p in doc_problems(doc.read_text())]
    assert not problems, "the docs show what does not exist:\n" + "\n".join(problems)


def test_the_docs_show_qpipe_commands_at_all():
    # Guards the checker itself: if parsing found nothing, the test above would pass vacuously.
    shown = {tuple(w) for doc in doc_files() for s in code_snippets(doc.read_text()) for w, _ in _commands(s, ["qpipe"])}
    assert {("run",), ("quantize",), ("manifest", "verify")} <= {w[:2] if w[0] == "manifest" else w[:1] for w in shown if w}


def test_the_checker_catches_a_made_up_option_command_script_path_and_link(tmp_path):
    text = "\n".join([
        "```bash",
        "qpipe run --recipe recipes/int8.yaml --no-such-option",
        "qpipe manifest verify DIR --allow-extra --also-made-up",
        "```",
        "`qpipe quantise --model m.onnx`, `qpipe quantize -m m.onnx --made-up-flag`",
        "`python -m pipeline.no_such_module cache-key`, `pipeline/no/such/file.py`",
        "`python benchmarks/cost.py --no-such-benchmark-option`, `pipeline.core.files.no_such_function`",
    ])
    problems = doc_problems(text)
    for bad in ["--no-such-option", "--also-made-up", "quantise", "--made-up-flag", "no_such_module", "pipeline/no/such/file.py", "--no-such-benchmark-option", "no_such_function"]:
        assert any(bad in p for p in problems), f"{bad!r} was not reported: {problems}"
    assert not any("--recipe" in p or "--allow-extra" in p or "-m`" in p for p in problems), problems
    doc = tmp_path / "x.md"
    doc.write_text("[a](missing.md) [b](x.md#nowhere) [c](x.md#a-heading) [d](https://example.org/x)\n\n## A heading\n")
    assert len(link_problems(doc)) == 2


def test_every_relative_link_in_the_docs_points_to_an_existing_file_and_heading():
    problems = [p for doc in doc_files() for p in link_problems(doc)]
    assert not problems, "\n".join(problems)


def test_readme_command_table_lists_every_qpipe_command():
    prose, _ = _prose_and_code(README.read_text())
    rows = [line for line in prose if line.startswith("| `qpipe ")]
    listed = {tuple(w[:2] if w[:1] == ["manifest"] else w[:1]) for row in rows for w, _ in _commands(row.split("`")[1], ["qpipe"])}
    commands = set()
    for name in _subcommands(_qpipe_help(())[1]):
        subs = _subcommands(_qpipe_help((name,))[1])
        commands |= {(name, sub) for sub in subs} if subs else {(name,)}
    missing = sorted(" ".join(c) for c in commands - listed)
    assert not missing, f"README.md's command table has no row for qpipe {missing}"


def test_readme_is_a_front_door_of_at_most_220_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


def _linked_docs(doc: Path) -> set[Path]:
    prose, _ = _prose_and_code(doc.read_text())
    targets = {t.partition("#")[0] for line in prose for t in _LINK.findall(line)}
    return {(doc.parent / t).resolve() for t in targets if t.endswith(".md") and not re.match(r"[a-z]+:", t)}


def test_every_document_in_docs_can_be_reached_from_the_readme():
    seen, todo = set(), [README.resolve()]
    while todo:
        doc = todo.pop()
        if doc not in seen and doc.exists():
            seen.add(doc)
            todo += _linked_docs(doc)
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in seen]
    assert not missing, f"no chain of links from README.md reaches docs/{missing}"


def test_architecture_module_listing_matches_the_tree():
    block = _block(ARCHITECTURE.read_text(), MODULES_START, MODULES_END)
    assert block == module_listing(), "docs/architecture.md's module listing is stale: run `python tests/test_docs.py`"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from pipeline.recipe import schema_markdown

    _replace_block(ARCHITECTURE, MODULES_START, MODULES_END, module_listing())
    _replace_block(RECIPES_DOC, RECIPES_START, RECIPES_END, schema_markdown())
    print(f"rewrote the generated blocks of {ARCHITECTURE.relative_to(ROOT)} and {RECIPES_DOC.relative_to(ROOT)}")
