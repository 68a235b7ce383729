"""`qpipe index`: one table of what passed where, from finished build directories.

Every directory under the given paths that holds a ``manifest.json`` is a
build (symlinks such as ``latest`` are not followed, so a build is counted
once). Each build is one row: recipe x target, where the target is the label
the build was measured under (``$QPIPE_TARGET``, a CI runner label) or else
the CPU's ISA class. The row holds fp32 and int8 accuracy per data set, the
int8 speedups with their IQRs (over the user's model as given, which the gate
reads, and over the fastest fp32 qpipe makes), the CPU model and ISA class, the speed threshold the
gate applied and why, the verdict, and the int8 model's sha256.

The int8 bytes do not depend on the CPU that quantized them (the recipe's
quantization settings are explicit), so every build of one recipe must
report the same int8 sha256; the index says per recipe whether they do, and
:func:`int8_mismatches` names the builds that differ.

``index.json`` and ``index.md`` depend only on the builds (no timestamps, rows
sorted by recipe, target and directory), so two runs over the same builds
write the same bytes. A manifest that cannot be read is an error (exit 2):
an index that silently skipped a build would misstate what passed.

Only the standard library and qpipe's small helpers are imported, so the
release job runs ``python3 -m pipeline.cli.ci index`` without installing qpipe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from pipeline.build.manifest import MANIFEST_NAME, read_manifest
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_text, sha256_file

INDEX_FORMAT = 1
INDEX_JSON = "index.json"
INDEX_MD = "index.md"
INT8_NAME = "int8.onnx"


# --- finding and reading builds -------------------------------------------------------


def find_builds(roots: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """(build directory, its name for the index) under each root; each real directory once."""
    found: dict[Path, tuple[Path, str]] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError(f"not a directory: {root} (give build directories or the folders that hold them)")
        label = root.resolve().name or str(root)
        if (root / MANIFEST_NAME).is_file():
            found.setdefault(root.resolve(), (root, label))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if MANIFEST_NAME in filenames and here != root:
                found.setdefault(here.resolve(), (here, f"{label}/{here.relative_to(root).as_posix()}"))
                dirnames[:] = []  # a build's own sub-folders hold no other build
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found.values(), key=lambda t: t[1])


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _read_report(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _speedup(value: float | None, iqr: list[float | None] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr and None not in iqr else "")


def build_row(directory: Path, name: str) -> dict[str, Any]:
    """One build's row; a UserError when its manifest is missing or invalid."""
    m = read_manifest(directory)
    report = _read_report(directory)
    env = m.get("environment") if isinstance(m.get("environment"), dict) else {}
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
    isa = cpu.get("isa_class") if isinstance(cpu.get("isa_class"), dict) else {}
    gate = m.get("gate") if isinstance(m.get("gate"), dict) else {}
    rule = gate.get("cpu_class") if isinstance(gate.get("cpu_class"), dict) else {}
    speed = ((m.get("execution") or {}).get("speed") or {}) if isinstance(m.get("execution"), dict) else {}
    recipe = m.get("name")
    if not isinstance(recipe, str) or not recipe:
        raise UserError(f"invalid {directory / MANIFEST_NAME}: no recipe name")

    accuracy: dict[str, Any] = {}
    for ds_name, ds in sorted((m.get("accuracy") or {}).items()):
        if not isinstance(ds, dict):
            continue  # the "unit" entry
        accuracy[ds_name] = {
            "fp32": _num((ds.get("fp32") or {}).get("accuracy")),
            "int8": _num((ds.get("int8") or {}).get("accuracy")),
            "drop": _num(ds.get("accuracy_drop")),
            "pairs": ds.get("pairs"),
            "subset": bool(ds.get("subset")),
        }
    speedup = _num(speed.get("speedup", report.get("speedup")))
    iqr = speed.get("speedup_iqr", report.get("speedup_iqr"))
    fastest = _num(speed.get("speedup_fastest_fp32", report.get("speedup_fastest_fp32")))
    fastest_iqr = speed.get("speedup_fastest_fp32_iqr", report.get("speedup_fastest_fp32_iqr"))
    int8_sha = ((m.get("stages") or {}).get("quantize") or {}).get("outputs", {}).get(INT8_NAME) or (
        (m.get("files") or {}).get(INT8_NAME) or {}
    ).get("sha256")
    detected = isa.get("detected") or rule.get("detected")
    target = env.get("target") or detected or "unknown-cpu"
    return {
        "recipe": recipe,
        "target": target,
        "directory": name,
        "inputs_id": (m.get("inputs") or {}).get("id"),
        "recipe_sha256": (m.get("recipe") or {}).get("sha256"),
        "cpu": {
            "model": cpu.get("model"),
            "isa_class": detected,
            "isa_evidence": isa.get("flags"),
            "isa_source": isa.get("source"),
            "threads": speed.get("threads"),
        },
        "accuracy": accuracy,
        "speedup": speedup,
        "speedup_iqr": [_num(v) for v in iqr] if isinstance(iqr, list) and len(iqr) == 2 else None,
        "speedup_fastest_fp32": fastest,
        "speedup_fastest_fp32_iqr": [_num(v) for v in fastest_iqr] if isinstance(fastest_iqr, list) and len(fastest_iqr) == 2 else None,
        "gate": {
            "passed": bool(gate.get("passed")),
            "max_accuracy_drop": _num(gate.get("max_accuracy_drop")),
            "min_speedup": _num(gate.get("min_speedup")),
            "threshold_class": rule.get("threshold_class"),
            "threshold_why": rule.get("why"),
            "reasons": list(gate.get("reasons") or []),
        },
        "verdict": "passed" if gate.get("passed") else "failed",
        "int8_sha256": int8_sha,
        "int8_file": (directory / INT8_NAME).is_file(),
    }


def build_index(roots: Iterable[str | os.PathLike[str]]) -> dict[str, Any]:
    """The index of every build under ``roots``; a UserError when there is none or a manifest is invalid."""
    roots = list(roots)
    builds = find_builds(roots)
    if not builds:
        raise UserError(f"no build directory ({MANIFEST_NAME}) under {', '.join(map(str, roots))}")
    rows = sorted((build_row(d, name) for d, name in builds), key=lambda r: (r["recipe"], r["target"], r["directory"]))
    recipes: dict[str, Any] = {}
    for r in rows:
        g = recipes.setdefault(r["recipe"], {"builds": 0, "passed": 0, "targets": [], "int8_sha256": {}})
        g["builds"] += 1
        g["passed"] += r["verdict"] == "passed"
        g["targets"].append(r["target"])
        g["int8_sha256"].setdefault(r["int8_sha256"] or "unknown", []).append(_cell(r))
    for g in recipes.values():
        g["same_int8"] = len(g["int8_sha256"]) == 1 and "unknown" not in g["int8_sha256"]
    return {
        "index_format": INDEX_FORMAT,
        "builds": rows,
        "recipes": recipes,
        "passed": all(r["verdict"] == "passed" for r in rows),
    }


def _cell(row: dict[str, Any]) -> str:
    return f"{row['target']} ({row['directory']})"


def int8_mismatches(index: dict[str, Any]) -> list[str]:
    """One line per recipe whose builds report different int8 bytes, naming the builds of each sha256."""
    out = []
    for name, g in index["recipes"].items():
        if g["same_int8"]:
            continue
        parts = [f"{sha[:12] if sha != 'unknown' else 'no int8 sha256'} on {', '.join(cells)}" for sha, cells in g["int8_sha256"].items()]
        out.append(f"{name}: the int8.onnx bytes differ between builds: " + "; ".join(parts))
    return out


# --- writing -------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(index: dict[str, Any]) -> str:
    rows = index["builds"]
    failed = [r for r in rows if r["verdict"] != "passed"]
    out = [
        "# qpipe build index",
        "",
        f"{len(rows)} build(s) of {len(index['recipes'])} recipe(s); "
        + ("every gate passed." if not failed else f"{len(failed)} gate(s) FAILED."),
        "",
        "| recipe | target | CPU | ISA class | data set | fp32 % | int8 % | drop | speedup (IQR) over model as given "
        "| speedup (IQR) over fastest fp32 | min speedup (class) | verdict | int8 sha256 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = r["accuracy"]
        names = "<br>".join(_md(k) + (f" (first {v['pairs']} pairs)" if v["subset"] else "") for k, v in acc.items()) or "-"
        fp32 = "<br>".join(_pct(v["fp32"]) for v in acc.values()) or "-"
        int8 = "<br>".join(_pct(v["int8"]) for v in acc.values()) or "-"
        drop = "<br>".join(_pct(v["drop"]) for v in acc.values()) or "-"
        speed = _speedup(r["speedup"], r["speedup_iqr"])
        fastest = _speedup(r.get("speedup_fastest_fp32"), r.get("speedup_fastest_fp32_iqr"))
        g = r["gate"]
        limit = "-" if g["min_speedup"] is None else f"{g['min_speedup']:.2f}x" + (f" ({g['threshold_class']})" if g["threshold_class"] else "")
        sha = f"`{r['int8_sha256'][:12]}`" if r["int8_sha256"] else "-"
        verdict = "passed" if r["verdict"] == "passed" else "**FAILED**"
        out.append(
            f"| {_md(r['recipe'])} | {_md(r['target'])} | {_md(r['cpu']['model'] or '-')} | {_md(r['cpu']['isa_class'] or 'none')} "
            f"| {names} | {fp32} | {int8} | {drop} | {speed} | {fastest} | {limit} | {verdict} | {sha} |"
        )
    out += ["", "## int8 bytes per recipe", ""]
    for name, g in index["recipes"].items():
        if g["same_int8"]:
            (sha,) = g["int8_sha256"]
            out.append(f"- {_md(name)}: the same int8.onnx on all {g['builds']} build(s), sha256 `{sha}`")
        else:
            out.append(f"- {_md(name)}: **the int8.onnx bytes differ**:")
            out += [f"  - `{sha}`: {', '.join(map(_md, cells))}" for sha, cells in g["int8_sha256"].items()]
    if failed:
        out += ["", "## Failed gates", ""]
        for r in failed:
            reasons = r["gate"]["reasons"] or ["gate failed"]
            out += [f"- {_md(r['recipe'])} on {_md(r['target'])}: {_md(reason)}" for reason in reasons]
    thresholds = [r for r in rows if r["gate"]["threshold_why"]]
    if thresholds:
        out += ["", "## Speed threshold per build", ""]
        out += [f"- {_md(r['recipe'])} on {_md(r['target'])}: {_md(r['gate']['threshold_why'])}" for r in thresholds]
    return "\n".join(out) + "\n"


def write_index(index: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
    j, m = out / INDEX_JSON, out / INDEX_MD
    atomic_write_text(j, json.dumps(index, indent=2, sort_keys=True) + "\n")
    atomic_write_text(m, render_markdown(index))
    return j, m


def default_out(roots: list[Path]) -> Path:
    """Where the index goes without --out: the first folder given (its parent when that folder is a build)."""
    first = Path(roots[0])
    return first.parent if (first / MANIFEST_NAME).is_file() else first


# --- release assets ----------------------------------------------------------------


def release_assets(index: dict[str, Any], builds: dict[str, Path], dest: str | os.PathLike[str]) -> list[Path]:
    """Copy into ``dest`` each recipe's int8 model once and every build's reports, under unique flat names.

    ``builds`` maps an index row's ``directory`` to the build directory on
    disk. Only builds whose gate passed and that carry their int8 model are
    used; a model whose bytes differ from the manifest's sha256 is an error.
    """
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def copy(src: Path, name: str) -> None:
        if src.is_file():
            shutil.copyfile(src, out / name)
            written.append(out / name)

    models: set[str] = set()
    for r in index["builds"]:
        if r["verdict"] != "passed":
            continue
        d = builds[r["directory"]]
        stem, tag = _safe(r["recipe"]), f"{_safe(r['recipe'])}--{_safe(r['target'])}"
        if r["recipe"] not in models and (d / INT8_NAME).is_file():
            if sha256_file(d / INT8_NAME) != r["int8_sha256"]:
                raise UserError(f"{d / INT8_NAME}: its sha256 is not the one the manifest records; not released")
            copy(d / INT8_NAME, f"{stem}.int8.onnx")
            copy(d / "MODEL_CARD.md", f"{stem}.MODEL_CARD.md")
            copy(d / "recipe.yaml", f"{stem}.recipe.yaml")
            models.add(r["recipe"])
        for f in ("report.md", "report.json", MANIFEST_NAME):
            copy(d / f, f"{tag}.{f}")
    missing = sorted({r["recipe"] for r in index["builds"] if r["verdict"] == "passed"} - models)
    if missing:
        raise UserError(f"no passing build with its int8.onnx for recipe(s) {', '.join(missing)}: nothing to release for them")
    return written


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --- command line --------------------------------------------------------------------


def run_index(
    roots: list[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None, *, check_same_int8: bool = False
) -> tuple[dict[str, Any], Path, Path, list[str]]:
    """Index ``roots``, write index.json and index.md; also the int8 mismatches (empty when none or not asked)."""
    paths = [Path(r) for r in roots]
    index = build_index(paths)
    j, m = write_index(index, out if out is not None else default_out(paths))
    return index, j, m, int8_mismatches(index) if check_same_int8 else []
