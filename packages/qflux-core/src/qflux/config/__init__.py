"""Config: the typed schema and its loading from YAML with ``--set`` overrides."""

from qflux.config.load import apply_overrides, load_config, parse_overrides
from qflux.config.schema import QfluxConfig

__all__ = ["QfluxConfig", "apply_overrides", "load_config", "parse_overrides"]
