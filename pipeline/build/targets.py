"""The CI build matrix: recipes x targets from ``ci/targets.yml``.

``python -m pipeline.cli.ci matrix [--recipes "A B"] [--targets "x,y"]``
prints ``matrix=<json>`` for ``$GITHUB_OUTPUT``: one cell per recipe and
target, each with the runner labels to ask for, the ISA class its CPU must be
in, and whether its gate blocks the release. ``check-class CLASS`` fails
(exit 2) when this machine's CPU is not of the class its target names, so a
runner under the wrong label cannot gate a model against another class's
speed threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.environment import ISA_CLASSES, detect_cpu_class
from pipeline.core.errors import UserError

DEFAULT_FILE = Path("ci") / "targets.yml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TARGET_KEYS = {"name", "runs-on", "isa_class", "required", "enabled"}


@dataclass(frozen=True)
class Target:
    name: str
    runs_on: tuple[str, ...]
    isa_class: str | None
    required: bool
    enabled: bool


@dataclass(frozen=True)
class Targets:
    recipes: tuple[str, ...]
    targets: tuple[Target, ...]


def _split(text: str | None) -> list[str]:
    return [t for t in re.split(r"[\s,]+", text or "") if t]


def load_targets(path: str | Path = DEFAULT_FILE) -> Targets:
    """Read and check the matrix file; a UserError naming the entry that is wrong."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML in {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - {"recipes", "targets"}:
        raise UserError(f"{p}: expected a mapping with the keys `recipes` and `targets`")
    recipes = data.get("recipes") or []
    if not isinstance(recipes, list) or not all(isinstance(r, str) and r for r in recipes):
        raise UserError(f"{p}: recipes must be a list of recipe paths")
    targets: list[Target] = []
    for i, t in enumerate(data.get("targets") or []):
        where = f"{p}: targets[{i}]"
        if not isinstance(t, dict):
            raise UserError(f"{where}: expected a mapping")
        unknown = sorted(set(t) - _TARGET_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(_TARGET_KEYS))})")
        name = t.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{where}: name must be letters, digits, - and _ (got {name!r})")
        runs_on = t.get("runs-on")
        runs_on = [runs_on] if isinstance(runs_on, str) else runs_on
        if not isinstance(runs_on, list) or not runs_on or not all(isinstance(x, str) and x for x in runs_on):
            raise UserError(f"{where} ({name}): runs-on must be a runner label or a list of them")
        isa = t.get("isa_class")
        if isa is not None and isa not in ISA_CLASSES:
            raise UserError(f"{where} ({name}): isa_class {isa!r} is not one of {', '.join(ISA_CLASSES)} (or null)")
        flags = {k: t.get(k, d) for k, d in (("required", True), ("enabled", True))}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise UserError(f"{where} ({name}): {k} must be true or false")
        if any(x.name == name for x in targets):
            raise UserError(f"{where}: a second target named {name!r}")
        targets.append(Target(name, tuple(runs_on), isa, flags["required"], flags["enabled"]))
    if not targets:
        raise UserError(f"{p}: no targets")
    return Targets(tuple(recipes), tuple(targets))


def recipe_id(path: str) -> str:
    """A recipe's name in artifact names: its file name without the extension."""
    stem = Path(path).name.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def matrix(config: Targets, recipes: str | None = None, targets: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """GitHub's ``strategy.matrix`` value: ``{"include": [cell, ...]}``.

    ``recipes``/``targets``: a manual run's choice (space- or comma-separated;
    empty: the file's recipes and its enabled targets). A target named here
    runs even when the file leaves it disabled.
    """
    root = Path.cwd() if root is None else root
    chosen_recipes = _split(recipes) or list(config.recipes)
    if not chosen_recipes:
        raise UserError("no recipe to build: list some under `recipes` in the targets file or give them to the run")
    by_name = {t.name: t for t in config.targets}
    names = _split(targets)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UserError(f"unknown target {unknown[0]!r}: the targets file has {', '.join(by_name)}")
    chosen = [by_name[n] for n in dict.fromkeys(names)] if names else [t for t in config.targets if t.enabled]
    if not chosen:
        raise UserError("no enabled target: enable one in the targets file or name one in the run's `targets` input")
    ids: dict[str, str] = {}
    cells = []
    for r in dict.fromkeys(chosen_recipes):
        if not (root / r).is_file():
            raise UserError(f"recipe not found: {r}")
        rid = recipe_id(r)
        if ids.setdefault(rid, r) != r:
            raise UserError(f"recipes {ids[rid]} and {r} would share the artifact name {rid!r}: rename one")
        for t in chosen:
            cells.append(
                {
                    "recipe": r, "recipe_id": rid, "target": t.name, "runs_on": list(t.runs_on),
                    "isa_class": t.isa_class or "", "required": t.required, "cell": f"{rid}--{t.name}",
                }
            )
    return {"include": cells}


def check_class(expected: str) -> str:
    """A line naming this CPU's class; a UserError when ``expected`` is set and is not it."""
    cpu = detect_cpu_class()
    seen = f"CPU class {cpu.detected or 'none'} ({cpu.evidence()})"
    if expected and cpu.detected != expected:
        raise UserError(f"this runner's target expects ISA class {expected}, but its {seen}: fix the runner's labels or the target's isa_class")
    return seen
