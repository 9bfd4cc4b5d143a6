"""``qflux plugins list [--json]``."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.console import Console
from rich.table import Table

from qflux.plugins import TRAINER_ALIASES, aliases_of, build_registry

app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)


@app.command("list")
def list_plugins(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """List every plugin found through the ``qflux`` entry points, and those that failed to load."""
    registry = build_registry()
    if as_json:
        payload = {
            "plugins": [
                {**asdict(p), "kind": p.kind, "provides": p.trainers + p.quantizers + p.adapters} for p in registry.plugins
            ],
            "broken": [asdict(b) for b in registry.broken],
            "trainers": sorted(registry.trainers),
            "quantizers": sorted(registry.quantizers),
            "adapters": sorted(registry.adapters),
            "aliases": {a: t for a, t in sorted(TRAINER_ALIASES.items()) if t in registry.trainers},
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    console = Console(highlight=False)
    if not registry.plugins:
        console.print("No plugins installed. Add a trainer with: pip install qflux-kontext (or qflux-qwen)")
    else:
        table = Table(title="qflux plugins")
        for col in ("name", "package", "version", "kind", "provides", "hooks"):
            table.add_column(col)
        for p in registry.plugins:
            provides = [t + "".join(f" (alias {a})" for a in aliases_of(t)) for t in p.trainers] + p.quantizers + p.adapters
            table.add_row(p.name, p.package, p.version, p.kind, ", ".join(provides) or "-",
                          ", ".join(h.removeprefix("qflux_") for h in p.hooks))
        console.print(table)
    adapters = Table(title="adapters (model.adapter)")
    for col in ("name", "package", "description"):
        adapters.add_column(col)
    for name in sorted(registry.adapters):
        adapters.add_row(name, registry.provider.get(f"adapter:{name}", "-"), registry.adapters[name].description)
    console.print(adapters)
    for b in registry.broken:
        console.print(f"[red]broken plugin[/] {b.name} ({b.package}): {b.error}", markup=True)
