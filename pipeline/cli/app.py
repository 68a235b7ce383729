"""The qpipe command line: the Typer app and its commands, grouped by module.

Each command parses options, calls one function of a lower layer, prints its
typed result and sets the exit code: 0 success, 1 a failed gate, 2 a usage or
input error (one line on stderr, never a traceback), 130 interrupted. Lower
layers are imported inside the commands so that `qpipe --help` stays fast.
"""

from __future__ import annotations

import signal
from typing import Any

import typer

from pipeline.cli import analyse, build, photos, stages

app = typer.Typer(
    name="qpipe",
    help="Turn an ArcFace-style ONNX face model into a verified int8 artifact: "
    "download, convert, quantize, verify; `qpipe run` chains them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help texts cite recipe keys as [recipe a.b]; rich markup would eat the brackets.
    rich_markup_mode=None,
)
manifest_app = typer.Typer(help="Check an artifact directory against its manifest.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")

app.command()(stages.download)
app.command()(stages.convert)
app.command("synth-model")(stages.synth_model)
app.command()(stages.quantize)
app.command()(stages.verify)
app.command()(build.run)
app.command()(build.index)
app.command()(analyse.diagnose)
manifest_app.command("verify")(build.manifest_verify)
app.command()(photos.embed)
app.command()(photos.compare)
app.command("pack-bin")(photos.pack_bin)
app.command("recipe-doc")(build.recipe_doc)


def _sigterm(signum: int, frame: Any) -> None:
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so atomic writes clean up their temporary files.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    app()


if __name__ == "__main__":
    main()
