"""The plugin API: everything a qflux plugin may import from the core, in one module (docs/plugin-api.md).

A plugin imports from ``qflux`` (``hookimpl``) and from here, nothing else of ``qflux``: the other modules are
the core's own and may change in any release; the names below change only with a note in the changelog
(``tests/test_plugin_api.py`` fails when a plugin under ``packages/`` imports another core module).

- registration: ``hookimpl``, the base classes ``Trainer`` (``Unsupported``), ``Quantizer`` and ``Adapter``
  (``state_digest``, ``STATE_DIGEST``), the run-callback events, ``TrainerInfo``,
  ``QuantizerInfo``, ``ConditionSizing``, ``MemoryProfile``;
- the data that crosses into a trainer: ``EditSample``, ``EncodedSample``, ``PromptEmbeds``, ``Batch``,
  ``NoisyInput``, ``ModelBundle``, ``SampleRequest``, ``Grid``, and the config models ``ModelConfig`` and
  ``QfluxConfig``;
- errors the CLI reports in one line: ``UserError`` (exit 2) and its kinds ``ConfigError``, ``DataError``,
  ``PluginError``;
- where the weights come from (``model.pretrained``, ``model.dtype``): ``ModelSource``, ``TINY_ID``,
  ``is_tiny``, ``resolve_source``, ``torch_dtype``;
- model helpers (``qflux.modeling``): ``device_of``, ``unwrap``, ``compute_dtype``, ``eval_mode``, ``frozen``,
  ``guarded_load``, the folder check ``check_model`` with its table types ``ModelFamily`` and ``Component``,
  ``read_component_config``, and the sampling schedule ``flow_match_timesteps``;
- the loss's token-space mask: ``mask_to_tokens``.

Importing this module stays light (no torch, numpy or pydantic): ``qflux plugins list`` imports every plugin
module. ``mask_to_tokens`` (torch) and the config models (pydantic) load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qflux.adapters.base import STATE_DIGEST, Adapter, state_digest
from qflux.errors import ConfigError, DataError, PluginError, UserError
from qflux.events import CheckpointEvent, EvalEvent, ExportEvent, StartEvent, StepEvent, ValidationEvent
from qflux.hookspecs import hookimpl
from qflux.model_source import TINY_ID, ModelSource, is_tiny, resolve_source, torch_dtype
from qflux.modeling import (
    Component,
    ModelFamily,
    check_model,
    compute_dtype,
    device_of,
    eval_mode,
    flow_match_timesteps,
    frozen,
    guarded_load,
    read_component_config,
    unwrap,
)
from qflux.quantizer import Quantizer
from qflux.trainer import Trainer, Unsupported
from qflux.types import (
    Batch,
    ConditionSizing,
    EditSample,
    EncodedSample,
    Grid,
    MemoryProfile,
    ModelBundle,
    NoisyInput,
    PromptEmbeds,
    QuantizerInfo,
    SampleRequest,
    TrainerInfo,
)

if TYPE_CHECKING:  # pragma: no cover
    from qflux.config.schema import ModelConfig, QfluxConfig
    from qflux.loss import mask_to_tokens

# names whose modules are heavy (torch, pydantic): imported on first access
_LAZY = {
    "mask_to_tokens": "qflux.loss",
    "ModelConfig": "qflux.config.schema",
    "QfluxConfig": "qflux.config.schema",
}

__all__ = [
    # registration
    "hookimpl",
    "Trainer",
    "Unsupported",
    "Quantizer",
    "Adapter",
    "STATE_DIGEST",
    "state_digest",
    "TrainerInfo",
    "QuantizerInfo",
    "ConditionSizing",
    "MemoryProfile",
    # data
    "EditSample",
    "EncodedSample",
    "PromptEmbeds",
    "Batch",
    "NoisyInput",
    "ModelBundle",
    "SampleRequest",
    "Grid",
    "ModelConfig",
    "QfluxConfig",
    # run callbacks (qflux_on_step, ...)
    "StartEvent",
    "StepEvent",
    "ValidationEvent",
    "CheckpointEvent",
    "ExportEvent",
    "EvalEvent",
    # errors
    "UserError",
    "ConfigError",
    "DataError",
    "PluginError",
    # model source
    "ModelSource",
    "TINY_ID",
    "is_tiny",
    "resolve_source",
    "torch_dtype",
    # model helpers
    "device_of",
    "unwrap",
    "compute_dtype",
    "eval_mode",
    "frozen",
    "guarded_load",
    "Component",
    "ModelFamily",
    "check_model",
    "read_component_config",
    "flow_match_timesteps",
    # loss
    "mask_to_tokens",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qflux.plugin_api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
