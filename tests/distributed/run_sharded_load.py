"""Launched by test_fsdp_sharded_load.py through ``accelerate launch``: ``run_rank.py``'s run (train, dump the LoRA
and the seen samples) with the sharded load watched:

- every read of ``qflux.training.sharded_load.Weights`` is counted: bytes in all, bytes read straight into the
  shards, and the most bytes alive at once in the temporary tensors it returns (freed ones subtracted through
  ``weakref.finalize``);
- when the adapter is attached, the bytes of the frozen base's storages (stand-ins: nothing);
- right after the load: this process's local shard bytes, then the whole state gathered (``full_tensor``, a
  collective in the same order on every process) compared, tensor by tensor, with a normal whole load of the
  same folder (``load_base``, gradient checkpointing, the adapter attached from the same RNG state): frozen
  weights, adapter weights, buffers, plain tensors of the modules (rotary tables) and the RNG state after.

usage: run_sharded_load.py CONFIG OUT_DIR [WHOLE_CONFIG WHOLE_OUT_DIR]

``WHOLE_...``: then, in the same processes, a ``train.fsdp`` run the way it went before the sharded load (every
process loads the whole base, ``shard_frozen_base`` cuts it), for the comparison (one launch: half the start-up).
"""

import json
import os
import sys
import weakref
from pathlib import Path

import torch
from run_rank import main  # tests/distributed is the script's folder

import qflux.training.sharded_load as sharded_load

RANK = int(os.environ.get("RANK", "0"))
OUT = Path(sys.argv[2])
watch = {"read": 0, "reads": 0, "into_shards": 0, "alive": 0, "peak_alive": 0, "counting": True,
         "frozen_at_attach": None}


def _freed(size: int) -> None:
    watch["alive"] -= size


_read = sharded_load.Weights.read


def _counted_read(self, name, row=0, rows=None, out=None):
    tensor = _read(self, name, row, rows, out)
    if watch["counting"]:
        size = tensor.numel() * tensor.element_size()
        watch["read"] += size
        watch["reads"] += 1
        if out is None:  # a new tensor: alive until it is freed
            watch["alive"] += size
            watch["peak_alive"] = max(watch["peak_alive"], watch["alive"])
            weakref.finalize(tensor, _freed, size)
        else:
            watch["into_shards"] += size
    return tensor


sharded_load.Weights.read = _counted_read


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_meta:
            continue
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _watch_attach(selection) -> None:
    inner = selection.adapter.attach

    def attach(transformer, options):
        watch["frozen_at_attach"] = _storage_bytes(transformer.parameters())
        return inner(transformer, options)

    selection.adapter.attach = attach  # an instance attribute, deleted after the load


_load_sharded = sharded_load.load_sharded


def load_and_compare(selection, config, device):
    from qflux.run.models import load_base

    _watch_attach(selection)
    before = torch.random.get_rng_state()
    transformer, params, report = _load_sharded(selection, config, device)
    watch["counting"] = False
    after = torch.random.get_rng_state()
    del selection.adapter.attach  # the instance attribute: the class's method again
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    result = {"report": {k: v for k, v in vars(report).items() if k != "folder"},
              "local_shard_bytes": _storage_bytes(frozen), "adapter_params": len(params),
              "all_sharded": all(hasattr(p, "to_local") for p in frozen)}
    with torch.no_grad():
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for n, p in transformer.named_parameters()}
    buffers = {n: b.clone() for n, b in transformer.named_buffers()}
    attrs = {f"{m}.{k}": v.clone() for m, module in transformer.named_modules()
             for k, v in vars(module).items() if isinstance(v, torch.Tensor)}

    torch.random.set_rng_state(before)
    reference = load_base(selection, config)  # the whole load of today, as without train.fsdp
    if config.model.gradient_checkpointing:
        reference.enable_gradient_checkpointing()
    reference_params = selection.adapter.attach(reference, selection.adapter_options(config))
    result["rng_equal"] = torch.equal(torch.random.get_rng_state(), after)
    torch.random.set_rng_state(after)
    ref_state = dict(reference.named_parameters())
    ref_attrs = {f"{m}.{k}": v for m, module in reference.named_modules()
                 for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
    ref_buffers = dict(reference.named_buffers())

    def differing(mine, theirs):
        return sorted(set(mine) ^ set(theirs)) + [k for k in mine if k in theirs and not (
            mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape
            and torch.equal(mine[k].detach(), theirs[k].detach()))]

    result["params"] = len(ref_state)
    result["params_differing"] = differing(state, ref_state)
    result["buffers"], result["buffers_differing"] = len(ref_buffers), differing(buffers, ref_buffers)
    result["attrs"], result["attrs_differing"] = len(ref_attrs), differing(attrs, ref_attrs)
    result["adapter_order_equal"] = [tuple(p.shape) for p in reference_params] == [tuple(p.shape) for p in params]
    result["grad_checkpointing"] = bool(getattr(transformer, "gradient_checkpointing", False))
    result["dtypes"] = sorted({str(p.dtype) for p in frozen})
    del reference, ref_state, ref_attrs, ref_buffers, state, buffers, attrs
    (OUT / f"load-rank{RANK}.json").write_text(json.dumps({**result, **{k: v for k, v in watch.items()
                                                                            if k != "counting"}}))
    return transformer, params, report


sharded_load.load_sharded = load_and_compare

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    main()
    if len(sys.argv) > 4:  # the same run the way it went before: every process loads the whole base, then shards it
        sharded_load.sharded_world = lambda config: None
        sys.argv[1:] = sys.argv[3:5]
        main()
