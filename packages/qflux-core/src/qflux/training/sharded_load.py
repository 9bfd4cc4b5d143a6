"""``train.fsdp`` over several processes on a local diffusers folder: each process reads only its shards of the
frozen transformer, never the whole model.

Today's path (``qflux.run.models.training_models`` without this module) loads the whole base in every process
and ``qflux.training.sharding.shard_frozen_base`` cuts it afterwards, so every process peaks at the whole model
in host RAM. Here, in order:

1. **The trainer's own loader builds the model without weights.** ``Trainer.load_transformer`` runs as usual
   (its folder checks, its config overrides such as Qwen-Image-Edit-2511's ``zero_cond_t``, its variant checks,
   ``frozen``), but diffusers' ``ModelMixin.from_pretrained`` is replaced for that call by
   ``_weightless_from_pretrained``: the config is read and the class instantiated exactly as diffusers does it
   (``no_init_weights`` + ``accelerate.init_empty_weights`` under ``torch_dtype`` as the default dtype), so the
   parameters are on the meta device while buffers and tensors computed in ``__init__`` (rotary tables) are real
   and the same as a normal load's. The persistent buffers the file holds are then read whole (they are small).
2. **Stand-ins for the frozen weights.** Each meta parameter becomes a zero-stride tensor of its shape and
   load dtype on the training device (``torch.zeros(()).expand(shape)``: one element of memory), so that
   gradient checkpointing and the adapter attach exactly as on a loaded model: peft creates the adapter's
   layers on the CPU with torch's RNG in the same module order and with the same shapes as today (the values
   of the base weights do not enter, except for DoRA: step 5), then moves them to the base weight's device and
   dtype.
3. **Shard.** The stand-ins go back to the meta device (FSDP2 refuses zero-stride parameters) and
   ``shard_frozen_base`` (FSDP2 ``fully_shard`` per block and the root, the adapter as ignored parameters)
   shards them without memory; then each process allocates its (padded) local shards only: ``to_empty`` for
   the meta parameters alone, the adapter and the buffers untouched.
4. **Read the shards.** For every frozen parameter, the process's rows, taken from the sharded ``DTensor``'s
   own placement (``compute_local_shape_and_global_offset``), are read from the safetensors file with
   positioned reads (``Weights``: not mapped, so that untouched and already-copied pages never count in the
   process's RSS) straight into ``to_local()`` when the dtypes agree, else through one temporary slice cast like
   diffusers casts (``model.dtype``, ``_keep_in_fp32_modules`` in float32). A process therefore holds at most
   its shards plus one slice.
5. **DoRA** magnitudes are the row norms of the base weights: they are recomputed with peft's own
   ``get_weight_norm`` on each adapted weight gathered one at a time (a collective), in the dtypes peft used at
   attach time.

``builtin:`` tiny models (built by the trainer plugin's builder, not read from a folder), hub ids, one process,
and a folder whose weights are not plain safetensors keep today's path (whole load, then ``shard_frozen_base``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qflux.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from qflux.config.schema import QfluxConfig
    from qflux.run.models import Selection

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
# from_pretrained arguments that say how to load, not what to build (the rest are config overrides)
_LOADING_KWARGS = ("torch_dtype", "dtype", "subfolder", "revision", "use_safetensors", "variant", "low_cpu_mem_usage",
                   "local_files_only", "cache_dir", "token", "force_download", "proxies", "disable_mmap")


@dataclass
class ShardedLoad:
    """What ``load_sharded`` read on this process."""

    folder: Path  # the transformer's folder
    base_bytes: int = 0  # the frozen parameters' bytes in the model's dtypes (the whole base)
    file_bytes: int = 0  # the same parameters' bytes in the files (their stored dtypes)
    read_bytes: int = 0  # the bytes of the slices read from the files for them (this process's rows)
    largest_read: int = 0  # the largest temporary slice (a cast or a device copy): held beyond the shards
    buffer_bytes: int = 0  # persistent buffers read whole
    files: list[str] = field(default_factory=list)


def sharded_world(config: QfluxConfig) -> tuple[int, torch.device] | None:
    """(process count, device) when the sharded load applies: ``train.fsdp`` over more than one process on a
    local diffusers folder (``builtin:tiny`` and hub ids load whole, then shard)."""
    if not config.train.fsdp or config.model.quantize or config.model.offload_blocks:
        return None  # train.fsdp refuses both (check_fsdp, check_offload) where the whole load reports them
    from accelerate import PartialState

    from qflux.model_source import ModelSource

    state = PartialState()
    source = ModelSource.of(config.model)
    if state.num_processes < 2 or source.kind != "folder" or source.path is None:
        return None
    folder = source.path / "transformer"
    if not ((folder / WEIGHTS).is_file() or (folder / INDEX).is_file()):
        return None
    try:
        if "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
            return None  # pre-quantized weights: diffusers' loader (train.fsdp refuses them later anyway)
    except (OSError, ValueError):
        return None  # the loader reports a broken config with context
    return state.num_processes, state.device


def load_sharded(selection: Selection, config: QfluxConfig, device: torch.device
                 ) -> tuple[nn.Module, list[nn.Parameter], ShardedLoad]:
    """The frozen transformer sharded over the process group with only this process's rows read, gradient
    checkpointing on when asked, the adapter attached (initialised as on a whole load); returns it, the
    adapter's trainable parameters and what was read. Every process must call it (collectives)."""
    from qflux.training.sharding import shard_frozen_base

    calls: list[tuple[Path, torch.dtype | None]] = []
    with _weightless_from_pretrained(calls):
        transformer = selection.trainer.load_transformer(config.model)
    if len(calls) != 1:
        raise RuntimeError(f"{type(selection.trainer).__name__}.load_transformer called from_pretrained "
                           f"{len(calls)} times; the sharded load expects exactly one call")
    folder, dtype = calls[0]
    report = ShardedLoad(folder)
    with _open_weights(folder, report) as weights:
        slots = _stand_ins(transformer, weights, device, dtype, report)
        if config.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        params = selection.adapter.attach(transformer, selection.adapter_options(config))
        for slot in slots:  # FSDP shards meta parameters without allocating them (it refuses zero strides)
            slot.module._parameters[slot.attr] = nn.Parameter(
                torch.empty(slot.shape, dtype=slot.dtype, device="meta"), requires_grad=False)
        shard_frozen_base(transformer, params, device)
        _allocate_shards(transformer, device)
        _read_shards(slots, weights, report)
    _redo_dora(transformer)
    return transformer, params, report


# --------------------------------------------------------------------------- 1. the model without weights


@contextlib.contextmanager
def _weightless_from_pretrained(calls: list[tuple[Path, torch.dtype | None]]) -> Iterator[None]:
    """``ModelMixin.from_pretrained`` builds the model as diffusers does but reads no weights (parameters on
    the meta device); each call's weights folder and dtype go to ``calls``."""
    from diffusers import ModelMixin

    original = ModelMixin.__dict__["from_pretrained"]

    def weightless(cls: type, pretrained: Any, **kwargs: Any) -> Any:
        from accelerate import init_empty_weights
        from diffusers.models.modeling_utils import no_init_weights

        loading = {k: kwargs.pop(k) for k in _LOADING_KWARGS if k in kwargs}
        dtype = loading.get("torch_dtype") or loading.get("dtype")
        subfolder = loading.get("subfolder")
        if loading.get("variant"):  # other file names than the ones read here
            raise RuntimeError(f"the sharded load reads no weight variants (variant={loading['variant']!r})")
        folder = Path(pretrained) / subfolder if subfolder else Path(pretrained)
        if not folder.is_dir():
            raise UserError(f"model.pretrained '{pretrained}': cannot load {subfolder or 'the model'}: "
                            f"no folder {folder}")
        config, overrides = cls.load_config(pretrained, subfolder=subfolder, return_unused_kwargs=True, **kwargs)
        previous = torch.get_default_dtype()
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # what diffusers does (``_set_default_torch_dtype``)
        try:
            with no_init_weights(), init_empty_weights():
                model = cls.from_config(config, **overrides)
        finally:
            torch.set_default_dtype(previous)
        model.register_to_config(_name_or_path=str(pretrained))
        calls.append((folder, dtype))
        return model.eval()

    ModelMixin.from_pretrained = classmethod(weightless)
    try:
        yield
    finally:
        ModelMixin.from_pretrained = original


# --------------------------------------------------------------------------- the files


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class _Entry:
    file: Any  # the open file (unbuffered)
    start: int  # the tensor's first byte in the file
    dtype: torch.dtype
    shape: tuple[int, ...]


class Weights:
    """The tensors of a diffusers component folder's safetensors files (one file, or several with an index),
    read in rows with positioned reads.

    The format is a little-endian u64 header size, a JSON header (per tensor: dtype, shape, byte range in the
    data) and the row-major data; the header is all that is parsed. Why not ``safetensors.safe_open``: it maps
    the file, and every page a process touches through the mapping counts in its resident set until the file is
    closed (measured: reading half the rows of each tensor of a 202 MiB file added 160 MiB of file pages to the
    reader's RSS on top of the 101 MiB it kept); read into memory the process owns, only the rows it keeps count.
    """

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        index = folder / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = [WEIGHTS]
        self.files = files
        self.entries: dict[str, _Entry] = {}
        for name in files:
            handle = stack.enter_context(open(folder / name, "rb", buffering=0))  # noqa: SIM115 - closed by stack
            size = int.from_bytes(_read_exactly(handle, 0, 8), "little")
            if size > 100 * 2**20:
                raise ValueError(f"{name}: a header of {size} bytes is not a safetensors header")
            header = json.loads(_read_exactly(handle, 8, size))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype, shape, (begin, stop) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
                if stop - begin != _numel(shape) * dtype.itemsize:
                    raise ValueError(f"{name}: {key} holds {stop - begin} bytes for {info['dtype']} {list(shape)}")
                self.entries[key] = _Entry(handle, 8 + size + begin, dtype, shape)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, row: int = 0, rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``row`` to ``row + rows`` (dim 0; all of them when ``rows`` is None) of ``name`` in its stored
        dtype: into ``out`` when given (CPU, contiguous, that dtype and shape), else into a new tensor."""
        entry = self.entries[name]
        if rows is None:
            rows = entry.shape[0] if entry.shape else 1
        shape = (rows, *entry.shape[1:]) if entry.shape else ()
        if out is None:
            out = torch.empty(shape, dtype=entry.dtype)
        elif tuple(out.shape) != shape or out.dtype != entry.dtype or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"{name}: cannot read {shape} {entry.dtype} into {tuple(out.shape)} {out.dtype}")
        row_bytes = _numel(entry.shape[1:]) * entry.dtype.itemsize
        if out.numel():
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            _read_into(entry.file, entry.start + row * row_bytes, view)
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _read_into(handle: Any, offset: int, view: memoryview) -> None:
    done = 0
    handle.seek(offset)
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise ValueError(f"{handle.name}: the file ends before the tensor does")
        done += got


def _read_exactly(handle: Any, offset: int, size: int) -> bytes:
    buffer = bytearray(size)
    _read_into(handle, offset, memoryview(buffer))
    return bytes(buffer)


@contextlib.contextmanager
def _open_weights(folder: Path, report: ShardedLoad) -> Iterator[Weights]:
    with contextlib.ExitStack() as stack:
        try:
            weights = Weights(folder, stack)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"model.pretrained: cannot read the weights of {folder}: {err}") from err
        report.files = list(weights.files)
        yield weights


# --------------------------------------------------------------------------- 2. stand-ins


@dataclass
class _Slot:
    module: nn.Module
    attr: str
    name: str  # the key in the files
    via: torch.dtype  # the dtype diffusers casts the file's tensor to
    dtype: torch.dtype  # the parameter's dtype in the model (the trainer's loader may cast after diffusers)
    shape: torch.Size


def _kept_in_fp32(transformer: nn.Module, name: str) -> bool:
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or ()
    return any(m in name.split(".") for m in keep)


def _load_dtype(transformer: nn.Module, name: str, loaded: torch.dtype | None, current: torch.dtype) -> torch.dtype:
    """The dtype diffusers gives a floating tensor of the file (``load_model_dict_into_meta``): float32 inside
    ``_keep_in_fp32_modules``, else the ``torch_dtype`` of the call, else the model's tensor's own dtype."""
    return torch.float32 if _kept_in_fp32(transformer, name) else loaded or current


def _stand_ins(transformer: nn.Module, weights: Weights, device: torch.device, loaded: torch.dtype | None,
               report: ShardedLoad) -> list[_Slot]:
    """Replace each meta parameter with a zero-stride stand-in on ``device``, read the persistent buffers the
    file holds; return where each parameter's rows go. Missing or misshapen tensors are a ``UserError``."""
    params = dict(transformer.named_parameters())
    missing = [name for name in params if name not in weights]
    if missing:
        raise UserError(f"model.pretrained: {report.folder} lacks {len(missing)} weights of "
                        f"{type(transformer).__name__} (e.g. {missing[:3]})")
    slots = []
    modules = dict(transformer.named_modules())
    for name, param in params.items():
        owner, _, attr = name.rpartition(".")
        found = weights.entries[name]
        if found.shape != tuple(param.shape):
            raise UserError(f"model.pretrained: {name} in {report.folder} has shape {list(found.shape)}, "
                            f"the model expects {list(param.shape)}")
        if param.is_floating_point():
            via = _load_dtype(transformer, name, loaded, param.dtype)
            final = torch.float32 if _kept_in_fp32(transformer, name) else param.dtype
        else:
            via = final = param.dtype
        stand_in = torch.zeros((), dtype=final, device=device).expand(param.shape)
        modules[owner]._parameters[attr] = nn.Parameter(stand_in, requires_grad=False)
        report.base_bytes += param.numel() * final.itemsize
        report.file_bytes += param.numel() * found.dtype.itemsize
        slots.append(_Slot(modules[owner], attr, name, via, final, param.shape))
    for name, buffer in transformer.named_buffers():
        if name not in weights:
            continue  # a non-persistent buffer computed in __init__: already what a normal load has
        owner, _, attr = name.rpartition(".")
        tensor = weights.read(name)
        if tensor.is_floating_point():
            tensor = tensor.to(_load_dtype(transformer, name, loaded, buffer.dtype))
        modules[owner]._buffers[attr] = tensor.contiguous().to(buffer.device)
        report.buffer_bytes += tensor.numel() * tensor.element_size()
    return slots


# --------------------------------------------------------------------------- 4. the shards


def _allocate_shards(transformer: nn.Module, device: torch.device) -> None:
    """Allocate the local shards of the meta parameters on ``device``: ``to_empty`` for them alone (the
    adapter and the buffers keep their values); FSDP pads each local shard as it re-registers it."""

    def allocate(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(tensor, device=device) if tensor.is_meta else tensor

    transformer._apply(allocate)


def _read_shards(slots: list[_Slot], weights: Weights, report: ShardedLoad) -> None:
    """Copy this process's rows of every frozen parameter from the files into its local shard."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with torch.no_grad():
        for slot in slots:
            param = slot.module._parameters[slot.attr]
            if not isinstance(param, DTensor):
                raise RuntimeError(f"{slot.name} was not sharded")
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            if tuple(local.shape) != tuple(shape):
                raise RuntimeError(f"{slot.name}: local shard {tuple(local.shape)}, placement says {tuple(shape)}")
            if local.numel() == 0:
                continue
            if any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
                raise RuntimeError(f"{slot.name}: sharded on another dim than 0 ({param.placements})")
            stored = weights.entries[slot.name].dtype
            size = local.numel() * stored.itemsize
            report.read_bytes += size
            if stored == slot.via == slot.dtype and local.device.type == "cpu" and local.is_contiguous():
                weights.read(slot.name, offset[0], shape[0], out=local)  # straight into the shard
                continue
            rows = weights.read(slot.name, offset[0], shape[0])
            report.largest_read = max(report.largest_read, size)
            local.copy_(rows.to(slot.via).to(slot.dtype))
            del rows


# --------------------------------------------------------------------------- 5. DoRA


def _redo_dora(transformer: nn.Module) -> None:
    """peft's DoRA magnitude (``lora_magnitude_vector``) was computed from the zero stand-ins: compute it again
    from the loaded weight, gathered one layer at a time, with peft's ``get_weight_norm`` and the adapter
    matrices in the base weight's dtype (where peft computed it, after moving them there)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in transformer.modules():
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if not magnitudes:
                continue
            base = module.get_base_layer()
            weight = base.weight.full_tensor() if isinstance(base.weight, DTensor) else base.weight
            for name, dora in magnitudes.items():
                lora_a = module.lora_A[name].weight.to(weight.dtype)
                lora_b = module.lora_B[name].weight.to(weight.dtype)
                lora_weight = lora_b @ lora_a
                norm = dora.get_weight_norm(weight.to(lora_a.device), lora_weight, module.scaling[name])
                dora.weight.copy_(norm)
            del weight
