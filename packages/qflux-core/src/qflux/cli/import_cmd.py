"""``qflux import ai-toolkit JOB.yaml`` / ``qflux import musubi DATASET.toml [-- TRAINING ARGS]``.

Writes the equivalent qflux config (to ``--out`` or stdout) after validating it with the ordinary schema, and
lists on stderr every setting it could not carry over.
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from qflux.errors import ConfigError, UserError

app = typer.Typer(help="Write a qflux config from another trainer's configuration.", no_args_is_help=True)

OUT_HELP = "Write the config here (refused if the file exists); default: print it."


@app.command("ai-toolkit")
def ai_toolkit(
    job: Path = typer.Argument(..., help="ai-toolkit job file (config/*.yaml)."),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
) -> None:
    """Convert an ai-toolkit job (FLUX.1 Kontext or Qwen-Image-Edit LoRA) to a qflux config."""
    from qflux.config.load import read_yaml
    from qflux.importers.ai_toolkit import from_ai_toolkit

    job = job.expanduser()
    _emit(from_ai_toolkit(read_yaml(job), job), job, out)


@app.command("musubi", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def musubi(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="musubi-tuner dataset config (.toml)."),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
) -> None:
    """Convert a musubi-tuner dataset TOML plus the training script's arguments (after --) to a qflux config."""
    from qflux.importers.musubi import from_musubi, read_dataset_toml

    dataset = dataset.expanduser()
    _emit(from_musubi(read_dataset_toml(dataset), list(ctx.args), dataset), dataset, out)


def _emit(result, source: Path, out: Path | None) -> None:
    from qflux.config.load import validate

    try:
        validate(result.config, f"the config imported from {source}")
    except ConfigError as err:  # an importer bug or a value qflux refuses (e.g. a resolution not a multiple of 16)
        raise UserError(f"{err}\nfix the value in {source} or edit the imported config by hand") from err
    text = yaml.safe_dump(result.config, sort_keys=False, allow_unicode=True)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out = out.expanduser()
        if out.exists():
            raise UserError(f"--out {out} exists; choose another file name (nothing was written)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# imported from {source} by `qflux import`\n{text}", encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)
    if result.not_carried:
        typer.echo(f"not carried over ({len(result.not_carried)}):", err=True)
        for line in result.not_carried:
            typer.echo(f"  - {line}", err=True)
    else:
        typer.echo("every setting was carried over", err=True)
