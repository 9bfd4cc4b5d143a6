"""Replace the linear layers of a frozen transformer by quantized ones (bitsandbytes nf4 / fp4 / int8, fp8).

Which layers: every ``nn.Linear`` inside the repeated transformer blocks (the elements of an ``nn.ModuleList``,
e.g. ``transformer_blocks.3.attn.to_q``) and the input projections of the image and text streams
(``INPUT_PROJECTIONS``: FLUX's ``x_embedder`` / ``context_embedder``, Qwen-Image's ``img_in`` / ``txt_in``;
BFL's own FLUX code calls them ``img_in`` / ``txt_in`` too), minus the layers whose qualified name contains a
``model.quantize_skip`` substring. The other layers outside the blocks always stay in ``model.dtype``: the
timestep / guidance / pooled-text embeddings (``time_text_embed``), the final norm's modulation (``norm_out``)
and the final projection (``proj_out``). Those are the layers most sensitive to rounding (they condition every
block or write the prediction itself) and a fraction of a percent of a full-size model. The input projections
are plain Linear layers over the latents and the text encoder's features; diffusers' bitsandbytes integration
quantizes them too, and keeping them would leave e.g. 3.8 % of a 100M-parameter Kontext-shaped model (whose
``context_embedder`` is 4096 wide) in bf16. ``quantize_skip: [x_embedder, context_embedder]`` keeps them.

The default skip list is empty; patterns are substrings, so e.g. ``[norm, proj_out]`` would also keep FLUX's
AdaLN modulation linears (``norm1.linear``...) and its single blocks' ``proj_out``: about 40 % of FLUX's weights
(see the README).

Compute dtype is ``model.dtype``. Every new parameter is frozen. Each layer is quantized on (and left on) the
device ``quantize_device`` picks: the current CUDA device when there is one, so a transformer loaded in bf16
on CPU is quantized layer by layer onto the GPU without ever holding its full-precision weights there. The
result takes a peft LoRA through
``transformer.add_adapter(LoraConfig(...))``: peft wraps bitsandbytes layers natively and ``Float8Linear``
because it is an ``nn.Linear``.

A transformer that already holds quantized layers of the requested method (a pre-quantized checkpoint loaded
by ``from_pretrained``) is returned as it is; one quantized by another method is a ``UserError``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qflux.plugin_api import ConfigError, UserError, torch_dtype
from qflux_quant.fp8 import FP8_DTYPE, Float8Linear
from qflux_quant.methods import METHODS, MIN_BITSANDBYTES

if TYPE_CHECKING:  # pragma: no cover
    from qflux.plugin_api import ModelConfig

log = logging.getLogger(__name__)

INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (BitsAndBytesConfig's default llm_int8_threshold)
WARN_KEPT_FRACTION = 0.25  # warn when quantize_skip keeps more than this share of the linear weights
# top-level Linear layers projecting the latents / text features into the model width (FLUX, Qwen-Image)
INPUT_PROJECTIONS = frozenset({"x_embedder", "context_embedder", "img_in", "txt_in"})
DEVICE_ENV = "QFLUX_QUANTIZE_DEVICE"  # forces the device layers are quantized on (see ``quantize_device``)


@dataclass
class QuantizeReport:
    """What ``quantize_transformer`` did (also logged)."""

    method: str
    quantized: list[str] = field(default_factory=list)  # qualified names of the replaced layers
    skipped: dict[str, str] = field(default_factory=dict)  # name -> matching quantize_skip pattern
    always_kept: list[str] = field(default_factory=list)  # embeddings, final norm and projection: never quantized
    already_quantized: int = 0  # layers found quantized with ``method`` (pre-quantized checkpoint)
    quantized_params: int = 0
    kept_params: int = 0  # parameters of the linear layers kept in full precision

    @property
    def was_prequantized(self) -> bool:
        return self.already_quantized > 0 and not self.quantized


# --------------------------------------------------------------------------- checks


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def import_bitsandbytes(method: str) -> Any:
    """``import bitsandbytes`` or a ``UserError`` that says what to install."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UserError(
            f"model.quantize: {method} needs the bitsandbytes library, which is not installed ({err}): "
            "pip install bitsandbytes"
        ) from err
    except Exception as err:  # noqa: BLE001 - e.g. a broken CUDA setup raises at import time
        raise UserError(
            f"model.quantize: {method}: bitsandbytes is installed but fails to import "
            f"({type(err).__name__}: {err}); reinstall it: pip install -U bitsandbytes"
        ) from err
    version = getattr(bnb, "__version__", "0")
    if _version_tuple(version) < _version_tuple(MIN_BITSANDBYTES):
        raise UserError(
            f"model.quantize: {method} needs bitsandbytes >= {MIN_BITSANDBYTES}, found {version}: "
            f"pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'"
        )
    return bnb


def check_supported(method: str, model: ModelConfig) -> None:
    """Raise a ``UserError`` for a method that cannot run here or with this config. Cheap; touches no model.

    Called by preflight (``MethodQuantizer.check``), before anything is encoded or loaded, and again before quantizing.
    """
    info = METHODS[method]
    if info.backend == "bitsandbytes":
        import_bitsandbytes(method)
    elif method == "fp8":
        if getattr(torch, "float8_e4m3fn", None) is None:
            raise UserError(
                f"model.quantize: fp8 needs a torch with float8 dtypes (>= 2.1); this torch {torch.__version__} "
                "has none: upgrade torch or choose nf4, fp4 or int8"
            )
        try:
            dtype = torch_dtype(model)
            torch.ones(2, dtype=dtype).to(FP8_DTYPE).to(dtype)
        except Exception as err:  # noqa: BLE001
            raise UserError(
                f"model.quantize: fp8: this torch {torch.__version__} cannot convert float8_e4m3fn to "
                f"{model.dtype} ({type(err).__name__}: {err}); choose nf4, fp4 or int8"
            ) from err


# --------------------------------------------------------------------------- inspection


def layer_method(module: nn.Module) -> str | None:
    """The quantization method of one layer (``nf4`` / ``fp4`` / ``int8`` / ``fp8``), None if it is not quantized.

    Never imports bitsandbytes: if it was not imported, no bitsandbytes layer can exist.
    """
    if isinstance(module, Float8Linear):
        return "fp8"
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return str(getattr(module.weight, "quant_type", None) or "fp4")
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def quantized_methods(transformer: nn.Module) -> dict[str, int]:
    """``{method: number of layers}`` of the quantized layers already in ``transformer``."""
    found: dict[str, int] = {}
    for module in transformer.modules():
        method = layer_method(module)
        if method is not None:
            found[method] = found.get(method, 0) + 1
    return found


def _block_prefixes(transformer: nn.Module) -> list[str]:
    return [name + "." for name, m in transformer.named_modules() if name and isinstance(m, nn.ModuleList)]


def is_quantizable(name: str, block_prefixes: list[str]) -> bool:
    """Whether the Linear layer ``name`` may be quantized at all: inside a block, or an input projection."""
    return name in INPUT_PROJECTIONS or any(name.startswith(prefix) for prefix in block_prefixes)


def select_linears(transformer: nn.Module, skip: list[str]) -> tuple[list[tuple[str, nn.Linear]], QuantizeReport]:
    """The layers to quantize, and a report listing the ones kept (by pattern, or always)."""
    report = QuantizeReport(method="")
    blocks = _block_prefixes(transformer)
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear) or layer_method(module) is not None:
            continue
        pattern = next((p for p in skip if p and p in name), None)
        if not is_quantizable(name, blocks):
            report.always_kept.append(name)
        elif pattern is not None:
            report.skipped[name] = pattern
        else:
            chosen.append((name, module))
            continue
        report.kept_params += module.weight.numel()
    return chosen, report


# --------------------------------------------------------------------------- conversion


def _bnb_4bit(linear: nn.Linear, quant_type: str, dtype: torch.dtype, bnb: Any, device: torch.device) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=True, quant_type=quant_type,
                              quant_storage=torch.uint8, device="meta")
    weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, compress_statistics=True,
                               quant_type=quant_type, quant_storage=torch.uint8, module=layer)
    layer.weight = weight._quantize(device)
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first eval forward without grad; a training
    # forward on the repacked weight then fails (bnb 0.50). Training needs the plain layout.
    layer.support_avx512bf16_for_cpu = False
    return layer


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on every int8 matmul of a
    non-float16 input: once per layer per step. Said once by ``quantize_transformer`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_INT8_FILTER = _DropInt8CastWarning()


def _quiet_int8_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_FILTER not in logger.filters:
        logger.addFilter(_INT8_FILTER)


def _bnb_int8(linear: nn.Linear, dtype: torch.dtype, bnb: Any, device: torch.device) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    weight = bnb.nn.Int8Params(linear.weight.detach(), requires_grad=False, has_fp16_weights=False)
    layer.weight = weight._quantize(device)
    return layer


def quantize_device(weight: torch.Tensor) -> torch.device:
    """Where a layer is quantized and then lives: ``QFLUX_QUANTIZE_DEVICE`` if set (e.g. ``cpu``); else the current
    CUDA device for a CPU-resident layer when CUDA is available (a loader hands over the bf16 transformer on CPU:
    quantizing layer by layer onto the GPU is fast and never holds the full-precision model there); else the
    layer's own device. The training loop moves the remaining (full-precision) layers to the device afterwards.
    """
    forced = os.environ.get(DEVICE_ENV, "").strip()
    if forced:
        return torch.device(forced)
    if weight.device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return weight.device


def quantize_linear(linear: nn.Linear, method: str, dtype: torch.dtype, device: torch.device | None = None) -> nn.Module:
    """A frozen quantized copy of ``linear`` on ``device`` (default: its own device); ``dtype`` is the compute
    dtype and the bias dtype."""
    device = torch.device(device) if device is not None else linear.weight.device
    if method == "fp8":
        source = linear if linear.weight.device == device else _moved(linear, device)
        layer: nn.Module = Float8Linear.from_linear(source, compute_dtype=dtype)
    else:
        bnb = import_bitsandbytes(method)
        if method == "int8":
            layer = _bnb_int8(linear, dtype, bnb, device)
        else:
            layer = _bnb_4bit(linear, method, dtype, bnb, device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)
    layer.train(linear.training)
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def _moved(linear: nn.Linear, device: torch.device) -> nn.Linear:
    moved = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    moved.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
    if linear.bias is not None:
        moved.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return moved


def _make_training_safe(transformer: nn.Module) -> None:
    for module in transformer.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_transformer(transformer: nn.Module, method: str, model: ModelConfig) -> tuple[nn.Module, QuantizeReport]:
    """Quantize ``transformer`` in place with ``method``; returns it and a report. See the module docstring."""
    if method not in METHODS:
        raise UserError(f"model.quantize: unknown method {method!r} (qflux-quant provides {', '.join(METHODS)})")
    check_supported(method, model)

    existing = quantized_methods(transformer)
    if existing:
        if set(existing) != {method}:
            found = ", ".join(f"{m} ({n} layers)" for m, n in sorted(existing.items()))
            only = next(iter(existing)) if len(existing) == 1 else None
            hint = f"set model.quantize: {only} (or null)" if only else "load an unquantized checkpoint"
            raise UserError(
                f"model.quantize: {method}, but the transformer loaded from '{model.pretrained}' is already "
                f"quantized as {found}; {hint} to train on it as it is"
            )
        _make_training_safe(transformer)
        if method == "int8":
            _quiet_int8_cast_warning()
        log.info("transformer is already quantized as %s (%d layers): nothing to do", method, existing[method])
        return transformer, QuantizeReport(method=method, already_quantized=existing[method])

    chosen, report = select_linears(transformer, list(model.quantize_skip))
    report.method = method
    if not chosen:
        raise ConfigError(
            f"model.quantize_skip: the patterns {list(model.quantize_skip)} leave no linear layer of "
            f"{type(transformer).__name__} to quantize with {method}; shorten the list"
        )
    dtype = torch_dtype(model)
    if method == "int8":
        _quiet_int8_cast_warning()
        if dtype != torch.float16:
            log.info("int8: bitsandbytes casts %s activations to float16 for the int8 matmul (values beyond "
                     "+-65504 overflow there)", model.dtype)
    for i in range(len(chosen)):
        name, linear = chosen[i]
        chosen[i] = None  # type: ignore[call-overload] - drop the list's reference too
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        report.quantized_params += linear.weight.numel()
        setattr(parent, child, quantize_linear(linear, method, dtype, quantize_device(linear.weight)))
        report.quantized.append(name)
        del linear  # the full-precision weight is freed layer by layer

    total = report.quantized_params + report.kept_params
    log.info("%s: quantized %d linear layers (%.1f%% of linear weights), kept %d in %s",
             method, len(report.quantized), 100.0 * report.quantized_params / max(total, 1),
             len(report.skipped) + len(report.always_kept), model.dtype)
    by_pattern = sum(transformer.get_submodule(n).weight.numel() for n in report.skipped)
    if by_pattern > WARN_KEPT_FRACTION * total:
        counts: dict[str, int] = {}
        for n, p in report.skipped.items():
            counts[p] = counts.get(p, 0) + transformer.get_submodule(n).weight.numel()
        detail = ", ".join(f"'{p}': {100.0 * c / total:.0f}%" for p, c in sorted(counts.items(), key=lambda kv: -kv[1]))
        log.warning("model.quantize_skip keeps %.0f%% of the linear weights in %s (%s); remove patterns to save "
                    "more memory", 100.0 * by_pattern / total, model.dtype, detail)
    return transformer, report
