"""Command-line helpers for CI jobs and for checking a downloaded artifact, with the standard library only.

``python -m pipeline.cli.ci SUBCOMMAND ...``:

- ``cache-key RECIPE``: ``key=...``, the download cache key of a recipe's pinned inputs;
- ``github-outputs RUN_JSON``: ``directory=`` and ``artifact=`` lines for ``$GITHUB_OUTPUT`` from
  ``qpipe run --json`` output (nothing when the run stopped before it had a directory);
- ``matrix [--file F] [--recipes R] [--targets T]``: ``matrix=<json>`` and ``cells=N``, the build matrix;
- ``check-class [CLASS]``: exit 2 unless this CPU is of the ISA class a runner's target expects;
- ``index DIR... [--out DIR] [--check-same-int8] [--release-assets DEST]``: the code behind ``qpipe index``;
- ``manifest DIR [--allow-extra]``: the code behind ``qpipe manifest verify``.

``index`` and ``manifest`` import nothing outside the standard library, so they run where
qpipe's dependencies are not installed (a release job, a downloaded artifact); the other
subcommands import what they need when they run. Exit codes as the qpipe commands: 0 fine,
1 a difference found, 2 an error (one ``qpipe: error:`` line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.cli.ci", description="qpipe's CI and standalone helpers.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("cache-key", help="print key=<download cache key> for a recipe")
    k.add_argument("recipe")
    g = sub.add_parser("github-outputs", help="directory= and artifact= lines from `qpipe run --json` output")
    g.add_argument("run_json")
    m = sub.add_parser("matrix", help="print matrix=<json> and cells=N for $GITHUB_OUTPUT")
    m.add_argument("--file", default=None, help="the targets file (default: ci/targets.yml)")
    m.add_argument("--recipes", default="", help="space- or comma-separated recipe paths (empty: the file's)")
    m.add_argument("--targets", default="", help="space- or comma-separated target names (empty: the file's enabled ones)")
    c = sub.add_parser("check-class", help="fail unless this CPU is of the given ISA class (empty: only report it)")
    c.add_argument("expected", nargs="?", default="")
    i = sub.add_parser("index", help="index qpipe build directories (the code behind `qpipe index`)")
    i.add_argument("dirs", nargs="+", help="build directories or folders holding them")
    i.add_argument("--out", help="where index.json and index.md go (default: the first DIR)")
    i.add_argument("--check-same-int8", action="store_true", help="exit 1 when builds of one recipe report different int8 bytes")
    i.add_argument("--release-assets", metavar="DEST", help="copy each recipe's int8 model once and every build's reports here")
    v = sub.add_parser("manifest", help="re-hash a build directory against its manifest (the code behind `qpipe manifest verify`)")
    v.add_argument("dir")
    v.add_argument("--allow-extra", action="store_true", help="do not count files that the manifest does not list")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _COMMANDS[args.command](args)
    except UserError as e:
        print(f"qpipe: error: {e}", file=sys.stderr)
        return 2


def _cache_key(args: argparse.Namespace) -> int:
    from pipeline.build.run import download_cache_key
    from pipeline.recipe import load_recipe

    print("key=" + download_cache_key(load_recipe(args.recipe)))
    return 0


def _github_outputs(args: argparse.Namespace) -> int:
    try:
        data = json.loads(Path(args.run_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("directory"):
        d = Path(data["directory"])
        print(f"directory={d}")
        print(f"artifact={data.get('recipe', d.parent.name)}-{d.name}")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from pipeline.build.targets import DEFAULT_FILE, load_targets, matrix

    mx = matrix(load_targets(args.file or str(DEFAULT_FILE)), args.recipes, args.targets)
    print("matrix=" + json.dumps(mx, separators=(",", ":")))
    print(f"cells={len(mx['include'])}")
    return 0


def _check_class(args: argparse.Namespace) -> int:
    from pipeline.build.targets import check_class

    print(check_class(args.expected))
    return 0


def _index(args: argparse.Namespace) -> int:
    from pipeline.build.index import find_builds, release_assets, run_index

    index, j, m, mismatches = run_index(args.dirs, args.out, check_same_int8=args.check_same_int8)
    if args.release_assets and not mismatches:
        release_assets(index, {name: d for d, name in find_builds(args.dirs)}, args.release_assets)
    print(f"wrote {j} and {m}: {len(index['builds'])} build(s)")
    for line in mismatches:
        print(f"qpipe: error: {line}", file=sys.stderr)
    return 1 if mismatches else 0


def _manifest(args: argparse.Namespace) -> int:
    from pipeline.build.manifest import verify_manifest

    check = verify_manifest(args.dir, allow_extra=args.allow_extra)
    for line in check.problems():
        print(line)
    print(f"{'OK' if check.ok else 'FAILED'}: {check.checked} files checked in {check.directory}")
    return 0 if check.ok else 1


_COMMANDS = {
    "cache-key": _cache_key,
    "github-outputs": _github_outputs,
    "matrix": _matrix,
    "check-class": _check_class,
    "index": _index,
    "manifest": _manifest,
}


if __name__ == "__main__":
    sys.exit(main())
