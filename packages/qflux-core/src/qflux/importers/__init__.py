"""Turn a peer trainer's configuration into a qflux config (``qflux import ai-toolkit|musubi``).

Each importer reads the other tool's files as data (never runs them) and returns an ``ImportResult``: the qflux
config as a plain dict, validated by the ordinary schema before it is written, and one line for every setting
that could not be carried over, so that nothing is dropped without a word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImportResult:
    """A qflux config (nested dict, only the keys the source set) and what was left behind."""

    config: dict[str, Any] = field(default_factory=dict)
    not_carried: list[str] = field(default_factory=list)  # "setting: why" per setting left out or approximated

    def set(self, dotted: str, value: Any) -> None:
        """``set("train.lr", 1e-4)`` creates the sections on the way."""
        node = self.config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def skip(self, setting: str, why: str) -> None:
        self.not_carried.append(f"{setting}: {why}")


# The LoRA-producing optimizers both tools name, and what qflux's train.optimizer calls them.
OPTIMIZERS = {
    "adamw": "adamw",
    "adam": "adamw",
    "adamw8bit": "adamw8bit",
    "adam8bit": "adamw8bit",
    "prodigy": "prodigyopt.Prodigy",
}


def optimizer_name(raw: str, result: ImportResult, setting: str) -> str | None:
    """qflux's name for an optimizer of another tool (case and dots ignored), None when there is none."""
    key = raw.strip().lower().replace("_", "").replace("bitsandbytes.optim.", "").replace("torch.optim.", "")
    name = OPTIMIZERS.get(key)
    if name is None:
        result.skip(f"{setting}={raw}", "no qflux equivalent; train.optimizer takes adamw, adamw8bit or an import "
                                        "path of a torch.optim.Optimizer class (kept: adamw)")
    elif "." in name:
        result.skip(f"{setting}={raw}", f"mapped to train.optimizer: {name} (needs `pip install prodigyopt`)")
    return name


def square_budget(width: int, height: int) -> int:
    """The side of a square with about ``width * height`` pixels, a multiple of 16 (qflux's int resolution)."""
    side = (width * height) ** 0.5
    return max(16, int(round(side / 16)) * 16)
