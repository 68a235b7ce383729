"""What every qpipe command shares: the error-to-exit-code mapping, common options, recipe loading, output."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pipeline.core.errors import GateFailed, UserError

DEFAULT_CACHE = Path("calibration") / "downloads"

RecipeOpt = Annotated[
    Optional[Path],
    typer.Option("--recipe", "-r", help="YAML build recipe (see `qpipe recipe-doc`); without it, every option has its default."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def error_line(message: str) -> None:
    typer.echo(f"qpipe: error: {message}", err=True)


def stage_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map stage exceptions to exit codes: UserError -> 2, GateFailed -> 1, interrupt -> 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            error_line(str(e))
            raise typer.Exit(code=2) from None
        except GateFailed as e:
            for reason in e.reasons:
                typer.echo(f"qpipe: gate failed: {reason}", err=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            error_line("interrupted; nothing was left under a final name")
            raise typer.Exit(code=130) from None
        except MemoryError:
            error_line("out of memory")
            raise typer.Exit(code=2) from None
        except OSError as e:
            # Disk full, permission denied and the like are the user's environment, not a bug.
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            error_line(f"{e.strerror or e}{where}")
            raise typer.Exit(code=2) from None

    return wrapper


def recipe_with(path: Path | None, **overrides: Any):
    from pipeline.recipe import default_recipe, load_recipe, with_overrides

    recipe = load_recipe(path) if path is not None else default_recipe()
    return with_overrides(recipe, overrides) if any(v is not None for v in overrides.values()) else recipe


def progress_bars(quiet: bool):
    from pipeline.core.progress import RichProgress

    return RichProgress(enabled=not quiet)


def emit(result: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


# --- stages -------------------------------------------------------------------
