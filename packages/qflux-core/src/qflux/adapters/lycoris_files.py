"""LoKr / LoHa files and peft plumbing: the adapter on the frozen transformer (peft's ``LoKrConfig`` /
``LoHaConfig`` through diffusers' ``add_adapter``), its checkpoints, its export and merging a file into a base.

Three forms of the same weights:

- **checkpoint** (``state_dict``): peft's tensors under ``<module>.<factor>`` (``lokr_w1``, ``lokr_w2_a``, ...,
  ``hada_w1_a``, ...), header ``qflux.adapter_layout: peft`` plus the options; peft's scale ``alpha / rank``
  applies to every module.
- **export** (LyCORIS key naming): ``lycoris_<module with "." -> "_">.<factor>`` and one ``.alpha`` tensor per
  module, header ``qflux.adapter_layout: lycoris``. ComfyUI maps ``lycoris_<diffusers module>`` for Flux (FLUX.1
  Kontext, FLUX.2) and Qwen-Image (``comfy/lora.py`` ``model_lora_keys_unet``) and applies, at strength 1
  (``comfy/weight_adapter/lokr.py`` / ``loha.py``): LoKr ``kron(w1, w2) * alpha / dim``, where ``dim`` is the rank
  of a decomposed factor (``w2_b``'s rows, else ``w1_b``'s) and the scale is 1.0 when neither factor is decomposed;
  LoHa ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``. peft applies ``alpha / rank`` in all cases, so a LoKr
  module whose two factors are both full matrices gets that scale baked into ``lokr_w1`` and records
  ``alpha = rank`` (LyCORIS' own convention for full factors); every other module keeps its tensors and records
  the trained alpha. The file then gives peft's weight change in ComfyUI.
- **merged** (``merge_file``): ``qflux sample`` adds each module's weight change, computed from the file by the
  rule above, into the base weights (a checkpoint is first put into the export's form).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from qflux.errors import ConfigError, UserError

ADAPTER = "default"  # peft's adapter name
PREFIX = "lycoris_"  # LyCORIS' (and SimpleTuner's) key prefix, followed by the module name with "." -> "_"
KIND_KEY = "qflux.adapter"  # safetensors header: the adapter kind (lokr / loha)
OPTIONS_KEY = "qflux.adapter_options"  # safetensors header: its options as JSON
LAYOUT_KEY = "qflux.adapter_layout"  # safetensors header: "peft" (a checkpoint) or "lycoris" (the export)
PARTS = {"lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
         "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
NAMES = {"lokr": "LoKr", "loha": "LoHa"}
_LORA_KEY = re.compile(r".*\.(lora_[AB]\.weight|lora_(up|down)\.weight|lora_magnitude_vector)$")


def peft_config(kind: str, options: Any):
    """peft's ``LoKrConfig`` / ``LoHaConfig`` of ``model.adapter_options``."""
    common = dict(r=options.rank, alpha=options.alpha, target_modules=list(options.targets),
                  rank_dropout=options.rank_dropout, module_dropout=options.module_dropout)
    if kind == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(**common, decompose_factor=options.decompose_factor, decompose_both=options.decompose_both,
                          rank_dropout_scale=options.rank_dropout_scale,
                          init_weights=True if options.init == "default" else "lycoris")
    from peft import LoHaConfig

    return LoHaConfig(**common, init_weights=True)


def _targeted(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(options: Any, module_names: list[str] | None) -> None:
    """``ConfigError`` for a target no module of the transformer matches (when its module names are known)."""
    from qflux.adapters.lora_files import missing_targets

    if module_names is None:
        return
    missing = missing_targets(list(options.targets), module_names)
    if missing:
        raise ConfigError(f"model.adapter_options.targets: no module named {', '.join(repr(t) for t in missing)} "
                          "in the transformer")


def attach(transformer: torch.nn.Module, kind: str, options: Any) -> list[torch.nn.Parameter]:
    """Freeze the base, add peft's LoKr / LoHa on the targeted Linear layers, keep its parameters in float32;
    returns the trainable ones."""
    from qflux.adapters.lora_files import missing_targets, targets_message

    transformer.requires_grad_(False)
    targets = list(options.targets)
    missing = missing_targets(targets, [name for name, _ in transformer.named_modules()])
    if missing:
        raise ConfigError(targets_message(missing, transformer, key="model.adapter_options.targets"))
    for name, module in transformer.named_modules():
        if _targeted(name, targets) and type(module) is not torch.nn.Linear:
            what = ("a quantized Linear layer (model.quantize): set model.quantize: null, or use model.adapter: lora"
                    if isinstance(module, torch.nn.Linear) else "not a Linear layer: target Linear layers only")
            raise ConfigError(f"model.adapter_options.targets: {name} is a {type(module).__name__}, {what} "
                              f"({NAMES[kind]} trains on full-precision torch Linear layers)")
    transformer.add_adapter(peft_config(kind, options), adapter_name=ADAPTER)
    params = list(adapter_parameters(transformer, kind).values())
    for p in params:  # trains in float32 on top of a bf16 base, like the LoRA
        p.data = p.data.float()
    return params


def adapter_parameters(transformer: torch.nn.Module, kind: str) -> dict[str, torch.nn.Parameter]:
    """``<module>.<factor>`` -> peft's parameter (``<module>.<factor>.default``), in ``named_parameters`` order."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in transformer.named_parameters():
        holder, _, adapter = name.rpartition(".")
        module, _, part = holder.rpartition(".")
        if adapter == ADAPTER and part in PARTS[kind]:
            out[f"{module}.{part}"] = param
    return out


def state_dict(transformer: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors (``<module>.<factor>``) on CPU: copies, which training does not move."""
    return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in adapter_parameters(transformer, kind).items()}


def load_state(transformer: torch.nn.Module, kind: str, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` (from ``state_dict``) back into the attached adapter exactly; every key, every shape."""
    params = adapter_parameters(transformer, kind)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise UserError(f"{NAMES[kind]} state does not fit this transformer: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    with torch.no_grad():
        for key, param in params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise UserError(f"{NAMES[kind]} state does not fit this transformer: {key} is "
                                f"{list(state[key].shape)}, the adapter's is {list(param.shape)}")
            param.copy_(state[key])


def _options_json(options: Any) -> str:
    return json.dumps(options.model_dump(mode="json"), sort_keys=True)


def checkpoint_metadata(kind: str, options: Any) -> dict[str, str]:
    """Header of a checkpoint's adapter file: the kind, the options (rank and alpha: the scale) and the layout."""
    return {KIND_KEY: kind, OPTIONS_KEY: _options_json(options), LAYOUT_KEY: "peft"}


def group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``<module>.<factor>`` tensors as module -> {factor: tensor}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.rpartition(".")
        groups.setdefault(module, {})[part] = tensor
    return groups


def _decomposed_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """ComfyUI's ``dim`` of a LoKr module: the rank of w2 when decomposed, else of w1 when decomposed, else None."""
    for b in ("lokr_w2_b", "lokr_w1_b", "hada_w1_b"):
        if b in parts:
            return int(parts[b].shape[0])
    return None


def to_lycoris(kind: str, groups: dict[str, dict[str, torch.Tensor]], rank: int,
               alpha: float) -> dict[str, dict[str, torch.Tensor]]:
    """peft's per-module factors (scale ``alpha / rank`` everywhere) in the form the LyCORIS / ComfyUI rule reads
    the same weight change from: an ``alpha`` tensor per module, and for a LoKr module without a decomposed factor
    (the rule's scale is then 1.0) the scale baked into ``lokr_w1`` and ``alpha = rank``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module, parts in groups.items():
        parts = dict(parts)
        dim = _decomposed_rank(parts)
        if dim is None:  # LoKr with w1 and w2 both full
            w1 = parts["lokr_w1"]
            parts["lokr_w1"] = (w1.float() * (alpha / rank)).to(w1.dtype).contiguous()
            parts["alpha"] = torch.tensor(float(rank))
        else:  # the rule's alpha / dim is peft's alpha / rank (dim is the rank peft gave the factor)
            parts["alpha"] = torch.tensor(float(alpha) * dim / rank)
        out[module] = parts
    return out


def lycoris_key(module: str, part: str) -> str:
    return f"{PREFIX}{module.replace('.', '_')}.{part}"


def export(transformer: torch.nn.Module, kind: str, options: Any, target: Path,
           extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the LyCORIS file ``target`` atomically (see the module docstring); ``extra_metadata`` entries go into
    its header next to the kind, the options and the layout."""
    from qflux.adapters.lora_files import write_export

    extra = dict(extra_metadata or {})
    clash = sorted(set(extra) & {"format", KIND_KEY, OPTIONS_KEY, LAYOUT_KEY})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if clash or bad:  # a caller's bug, not a user's mistake
        raise ValueError(f"extra_metadata: reserved keys {clash} or non-string entries {bad}")
    groups = to_lycoris(kind, group(state_dict(transformer, kind)), options.rank, options.alpha)
    tensors = {lycoris_key(module, part): tensor for module, parts in groups.items() for part, tensor in parts.items()}
    header = {"format": "pt", KIND_KEY: kind, OPTIONS_KEY: _options_json(options), LAYOUT_KEY: "lycoris", **extra}
    return write_export(tensors, header, target, NAMES[kind])


def weight_change(kind: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight change of one module from its factors and ``alpha`` by the LyCORIS / ComfyUI rule
    (module docstring); ``KeyError`` naming a missing factor."""
    def full(name: str) -> tuple[torch.Tensor, int | None]:
        if name in parts:
            return parts[name].float(), None
        a, b = parts[f"{name}_a"], parts[f"{name}_b"]
        return a.float() @ b.float(), int(b.shape[0])

    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    if kind == "lokr":
        (w1, dim1), (w2, dim2) = full("lokr_w1"), full("lokr_w2")
        dim = dim2 if dim2 is not None else dim1
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return torch.kron(w1, w2) * scale
    (m1, dim), (m2, _) = full("hada_w1"), full("hada_w2")
    return (m1 * m2) * (alpha / dim if alpha is not None else 1.0)


def _refuse(path: Path, message: str) -> UserError:
    return UserError(f"--lora {path}: {message}")


def file_deltas(transformer: torch.nn.Module, kind: str, path: Path) -> dict[str, torch.Tensor]:
    """Module name -> the weight change a LoKr / LoHa file (qflux's export or checkpoint, or another trainer's
    LyCORIS file with ``lycoris_`` / ``transformer.`` / bare diffusers module names) makes on ``transformer``.
    ``UserError`` unless every tensor lands on a Linear layer of the transformer with the right sizes."""
    from safetensors.torch import load_file

    from qflux.adapters.lora_files import _read_header

    shapes, header = _read_header(path)  # a missing or pickled file is refused before anything is read
    name, model = NAMES[kind], type(transformer).__name__
    if header.get(KIND_KEY) not in (None, kind):
        other = header[KIND_KEY]
        raise _refuse(path, f"it is a {NAMES.get(other, other)} file (qflux.adapter: {other}), not a {name} one: "
                            f"set model.adapter: {other}")
    lora = [k for k in shapes if _LORA_KEY.match(k)]
    if lora:
        raise _refuse(path, f"it holds LoRA tensors (e.g. {lora[0]}), not {name} ones: set model.adapter: lora")
    modules = dict(transformer.named_modules())
    by_key: dict[str, list[str]] = {}
    for module in modules:
        by_key.setdefault(PREFIX + module.replace(".", "_"), []).append(module)
    tensors = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    stray: list[str] = []
    for key, tensor in tensors.items():
        prefix, _, part = key.rpartition(".")
        if part not in PARTS[kind] and part != "alpha":
            other = next((k for k, parts in PARTS.items() if part in parts), None)
            if other is not None:
                raise _refuse(path, f"it holds {NAMES[other]} tensors (e.g. {key}), not {name} ones: set "
                                    f"model.adapter: {other}")
            stray.append(key)
            continue
        if prefix.startswith(PREFIX):
            found = by_key.get(prefix, [])
            if len(found) > 1:
                raise _refuse(path, f"{prefix} names {len(found)} modules of this {model} ({', '.join(found)})")
            module = found[0] if found else None
        else:
            module = prefix.removeprefix("transformer.")
            module = module if module in modules else None
        if module is None:
            unknown.append(prefix)
        else:
            groups.setdefault(module, {})[part] = tensor
    hint = f"use a {name} trained for this trainer's model family, or set trainer / model.pretrained to its model"
    if unknown:
        unknown = sorted(set(unknown))
        raise _refuse(path, f"it is not a {name} for this {model}: {len(unknown)} of its modules do not exist "
                            f"(e.g. {unknown[0]}); {hint}")
    if stray:
        raise _refuse(path, f"{len(stray)} of its {len(tensors)} tensors are no {name} factor of a Linear layer "
                            f"(e.g. {stray[0]}; {name} factors: {', '.join(PARTS[kind])}, alpha)")
    if not groups:
        raise _refuse(path, f"it holds no {name} tensors ({', '.join(PARTS[kind])}); {hint}")
    if header.get(LAYOUT_KEY) == "peft":  # a checkpoint: peft's scale alpha / rank, from the recorded options
        groups = to_lycoris(kind, groups, *_rank_alpha(path, kind, header))
    deltas: dict[str, torch.Tensor] = {}
    for module, parts in groups.items():
        layer = modules[module]
        if not isinstance(layer, torch.nn.Linear):
            raise _refuse(path, f"{module} is a {type(layer).__name__}, not a Linear layer; {hint}")
        try:
            delta = weight_change(kind, parts)
        except KeyError as err:
            raise _refuse(path, f"the {name} of {module} lacks its {err.args[0]}") from err
        if tuple(delta.shape) != (layer.out_features, layer.in_features):
            raise _refuse(path, f"the {name} of {module} is {list(delta.shape)}, the layer's weight "
                                f"[{layer.out_features}, {layer.in_features}]; {hint}")
        if type(layer) is not torch.nn.Linear or not layer.weight.dtype.is_floating_point:
            raise _refuse(path, f"{module} is a {type(layer).__name__}: qflux merges a {name} into full-precision "
                                "weights only; set model.quantize: null to sample with it")
        deltas[module] = delta
    return deltas


def _rank_alpha(path: Path, kind: str, header: dict[str, str]) -> tuple[int, float]:
    try:
        options = json.loads(header[OPTIONS_KEY])
        return int(options["rank"]), float(options["alpha"])
    except (KeyError, ValueError, TypeError) as err:
        raise _refuse(path, f"a {NAMES[kind]} checkpoint whose header records no rank / alpha ({OPTIONS_KEY}); "
                            "sample the run's exported file instead") from err


def merge_file(transformer: torch.nn.Module, kind: str, path: Path) -> None:
    """Add the weight change of a LoKr / LoHa file into the base weights of ``transformer`` (``qflux sample``);
    nothing changes when the file is refused (``file_deltas``)."""
    deltas = file_deltas(transformer, kind, path)
    with torch.no_grad():
        for module, delta in deltas.items():
            weight = transformer.get_submodule(module).weight
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
