"""``qflux plan FILE [--trainer NAME] [--set k=v ...] [--json]``: a run's predicted peak memory, before loading."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qflux.cli.options import config_argument, config_option, pick_config

SET_HELP = "Override a config key, e.g. --set data.resolution=768 (value parsed as YAML). Repeatable."


def plan(
    file: Path | None = config_argument(),
    config_file: Path | None = config_option(),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (accelerator_gib, host_gib, parts)."),
    device: str = typer.Option("auto", "--device", help="Plan for: auto (this machine), cuda (an accelerator), "
                                                        "cpu (host RAM only)."),
    references: int = typer.Option(1, "--references", min=0, help="Control images per training sample."),
    processes: int = typer.Option(1, "--processes", min=1, help="Processes of the run (train.fsdp shards the base)."),
    budget_gib: float | None = typer.Option(None, "--budget-gib", help="Say whether the peak fits this many GiB, "
                                                                      "and which settings would."),
) -> None:
    """Predict the run's peak accelerator memory and peak host RAM, broken down by phase and part (weights,
    adapter + optimizer state, activations, offloaded blocks, encoders, VAE decode), without loading weights."""
    from qflux.config import load_config
    from qflux.errors import UserError
    from qflux.plan.estimate import GiB, gather
    from qflux.plan.estimate import plan as make_plan
    from qflux.plan.fit import describe, fitting_settings, smallest_offload
    from qflux.plugins import build_registry
    from qflux.run.preflight import check_config

    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device}: use auto, cuda or cpu")
    file = pick_config(file, config_file, "plan")
    config = load_config(file, set_, trainer)
    registry = build_registry()
    check_config(config, registry)
    if device == "auto":
        import torch

        accelerator = torch.accelerator.is_available()
    else:
        accelerator = device == "cuda"
    inputs = gather(config, registry, references=references)
    offload = None
    if config.model.offload_blocks == "auto" and accelerator and budget_gib is not None:
        offload = smallest_offload(config, inputs, int(budget_gib * GiB), accelerator)
    result = make_plan(config, inputs, accelerator, offload_blocks=offload, world_size=processes)
    verdict = None
    if budget_gib is not None:
        where = "accelerator" if accelerator else "host"
        peak = result.accelerator_bytes if accelerator else result.host_bytes
        fits = peak <= budget_gib * GiB
        verdict = {"budget_gib": budget_gib, "fits": fits}
        if not fits:
            regather = lambda c: gather(c, registry, references=references, libraries=inputs.libraries)  # noqa: E731
            verdict["fitting_settings"] = describe(fitting_settings(config, inputs, int(budget_gib * GiB),
                                                                    accelerator, where, regather))
    if as_json:
        out = result.as_json()
        if verdict is not None:
            out["budget"] = verdict
        typer.echo(json.dumps(out, indent=2))
        return
    render(result, verdict)


def render(result, verdict: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from qflux.plan.estimate import GiB

    console = Console(soft_wrap=True, highlight=False)
    table = Table(title="qflux plan", show_lines=False)
    for col in ("phase", "where", "part", "GiB"):
        table.add_column(col, justify="right" if col == "GiB" else "left")
    shown: set[tuple[str, str, int]] = set()
    for p in result.parts:
        phases = [q.phase for q in result.parts if (q.name, q.where, q.bytes) == (p.name, p.where, p.bytes)]
        if (p.name, p.where, p.bytes) in shown:
            continue  # the same part in several phases (libraries, weights): one row
        shown.add((p.name, p.where, p.bytes))
        table.add_row(", ".join(phases), p.where, p.name, f"{p.bytes / GiB:.3f}")
    console.print(table)
    totals = "  ".join(f"{ph} {result.phase_total(ph, 'any') / GiB:.2f}" for ph in result.phases())
    console.print(f"phase totals (GiB, all places): {totals}")
    for where in (("accelerator", "host") if result.accelerator else ("host",)):
        phase, value = result.peak(where)
        console.print(f"peak {where}: {value / GiB:.2f} GiB (phase {phase})")
    for note in result.notes:
        console.print(f"note: {note}")
    if verdict is not None:
        console.print(f"fits {verdict['budget_gib']} GiB: {'yes' if verdict['fits'] else 'no'}"
                      + (f"; settings that fit: {verdict['fitting_settings']}" if not verdict["fits"] else ""))
