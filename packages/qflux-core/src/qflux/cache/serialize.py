"""``EncodedSample`` <-> flat safetensors tensors + a small JSON header (grids, key, subset keys)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from qflux.types import EncodedSample, PromptEmbeds

FORMAT = "qflux.encoded/1"


def _prompt_tensors(prefix: str, p: PromptEmbeds | None) -> dict[str, torch.Tensor]:
    if p is None:
        return {}
    out = {f"{prefix}.hidden": p.hidden}
    if p.mask is not None:
        out[f"{prefix}.mask"] = p.mask
    if p.pooled is not None:
        out[f"{prefix}.pooled"] = p.pooled
    if p.image_slots is not None:
        out[f"{prefix}.image_slots"] = p.image_slots
    return out


def _prompt_from(prefix: str, t: dict[str, torch.Tensor]) -> PromptEmbeds | None:
    if f"{prefix}.hidden" not in t:
        return None
    return PromptEmbeds(hidden=t[f"{prefix}.hidden"], mask=t.get(f"{prefix}.mask"), pooled=t.get(f"{prefix}.pooled"),
                        image_slots=t.get(f"{prefix}.image_slots"))


def _subset_tensors(name: str, prompts: dict[str, PromptEmbeds] | None) -> dict[str, torch.Tensor]:
    """``EncodedSample.subset_prompts``-like dicts: the j-th subset (in the header's order) as ``name.j.*``;
    its key ("0,2", "") lives in the header, never in a tensor name."""
    out: dict[str, torch.Tensor] = {}
    for j, p in enumerate((prompts or {}).values()):
        out.update(_prompt_tensors(f"{name}.{j}", p))
    return out


def _subsets_from(name: str, header: dict, t: dict[str, torch.Tensor]) -> dict[str, PromptEmbeds] | None:
    """The dict stored by ``_subset_tensors``; None when the entry has none (every entry written before it)."""
    if name not in header:
        return None
    out = {}
    for j, key in enumerate(header[name]):
        prompt = _prompt_from(f"{name}.{j}", t)
        if prompt is None:
            raise KeyError(f"{name}.{j}.hidden")  # an undecodable entry: the store re-encodes it
        out[key] = prompt
    return out


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of each tensor whose memory an earlier one already uses: safetensors refuses shared memory, and a
    trainer may well hand the same encoding for two prompts (a subset prompt equal to another)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        out[name] = tensor.clone() if where in seen and tensor.numel() else tensor
        seen.add(where)
    return out


def to_bytes(sample: EncodedSample) -> bytes:
    tensors = {"latents": sample.latents, **_prompt_tensors("prompt", sample.prompt),
               **_prompt_tensors("empty_prompt", sample.empty_prompt),
               **_subset_tensors("subset_prompts", sample.subset_prompts),
               **_subset_tensors("subset_empty_prompts", sample.subset_empty_prompts)}
    for i, c in enumerate(sample.controls):
        tensors[f"control.{i}"] = c
    if sample.mask is not None:
        tensors["mask"] = sample.mask
    header = {"key": sample.key, "grid": list(sample.grid), "control_grids": [list(g) for g in sample.control_grids]}
    for name, prompts in (("subset_prompts", sample.subset_prompts),
                          ("subset_empty_prompts", sample.subset_empty_prompts)):
        if prompts is not None:
            header[name] = list(prompts)
    tensors = _unshared({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    return save_bytes(tensors, metadata={"format": FORMAT, "qflux": json.dumps(header)})


def from_bytes(data: bytes, metadata: dict[str, str]) -> EncodedSample:
    """Rebuild a sample; ``metadata`` is the safetensors header metadata of the same bytes."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"unknown entry format {metadata.get('format')!r}")
    header = json.loads(metadata["qflux"])
    t = load_bytes(data)
    n_controls = len(header["control_grids"])
    return EncodedSample(
        key=header["key"],
        latents=t["latents"],
        grid=tuple(header["grid"]),
        prompt=_prompt_from("prompt", t),
        controls=[t[f"control.{i}"] for i in range(n_controls)],
        control_grids=[tuple(g) for g in header["control_grids"]],
        mask=t.get("mask"),
        empty_prompt=_prompt_from("empty_prompt", t),
        subset_prompts=_subsets_from("subset_prompts", header, t),
        subset_empty_prompts=_subsets_from("subset_empty_prompts", header, t),
    )


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, then JSON)."""
    if len(data) < 8:
        raise ValueError("truncated entry")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("truncated entry")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def signature_from_metadata(metadata: dict[str, str]) -> tuple:
    """The batching signature ``(grid, control_grids)`` stored in an entry's header."""
    header = json.loads(metadata["qflux"])
    return tuple(header["grid"]), tuple(tuple(g) for g in header["control_grids"])
