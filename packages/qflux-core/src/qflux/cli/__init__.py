"""The ``qflux`` command line (Typer)."""
