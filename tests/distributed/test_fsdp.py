"""``train.fsdp`` with two CPU processes (gloo) through ``accelerate launch``: the frozen base is sharded (each
process holds half of it), the LoRA stays replicated and identical, the result equals DDP's, and validation
(an odd number of held-out samples, sampling) keeps every process in step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import launch, seen  # tests/distributed is on sys.path (rootdir-less test folders)

from qflux.testing import tiny_config, write_config


def settings(tmp, fsdp: bool) -> dict:
    # 11 samples, 3 held out (3 on 2 processes: one pads its validation loss) -> 8 training samples = 4 steps
    return dict(data={"num_samples": 11, "holdout": 3},
                model={"pretrained": "builtin:tiny", "gradient_checkpointing": True},
                train={"max_steps": 4, "batch_size": 1, "save_every": 2, "lr": 5e-3, "fsdp": fsdp},
                validation={"every": 2, "steps": 2, "from_holdout": 3})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        tmp = tmp_path_factory.mktemp(name)
        config = write_config(tmp / "c.yaml", tiny_config(tmp, **settings(tmp, fsdp)))
        launch(config, tmp / "out", 2)
        out[name] = tmp
    return out


def test_each_process_holds_half_of_the_frozen_base_and_all_of_the_lora(runs):
    for rank in (0, 1):
        info = seen(runs["fsdp"] / "out", rank)
        assert info["world"] == 2 and info["base_sharded"] > 0
        assert info["base_local"] == pytest.approx(info["base_total"] / 2, rel=0.02)  # odd sizes round up
        assert info["lora"] > 0 and info["lora_sharded"] == 0
    ddp = seen(runs["ddp"] / "out", 0)
    assert ddp["base_sharded"] == 0 and ddp["base_local"] == ddp["base_total"]


def test_fsdp_run_keeps_ranks_identical_and_equals_ddp(runs):
    a = load_file(str(runs["fsdp"] / "out" / "lora-rank0.safetensors"))
    b = load_file(str(runs["fsdp"] / "out" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ddp = load_file(str(runs["ddp"] / "out" / "lora-rank0.safetensors"))
    assert ddp.keys() == a.keys()
    for k in a:  # 4 AdamW steps of ~5e-3: the same training up to all-reduce order
        assert torch.allclose(a[k], ddp[k], rtol=0, atol=1e-4), k
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    fsdp_info, ddp_info = seen(runs["fsdp"] / "out", 0), seen(runs["ddp"] / "out", 0)
    assert fsdp_info["val_end"] == pytest.approx(ddp_info["val_end"], rel=1e-4)
    assert fsdp_info["val_end"] != pytest.approx(fsdp_info["val_start"], rel=1e-3)


def test_fsdp_processes_run_the_same_forwards_and_write_everything(runs):
    r0, r1 = seen(runs["fsdp"] / "out", 0), seen(runs["fsdp"] / "out", 1)
    assert r0["forwards"] == r1["forwards"] > 0  # every forward is a collective
    keys0 = [k for batch in r0["batches"] for k in batch]
    keys1 = [k for batch in r1["batches"] for k in batch]
    assert len(keys0) == len(keys1) == 4 and not set(keys0) & set(keys1)
    run = runs["fsdp"] / "run"
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert {p.name for p in (run / "samples").glob("*.png")} >= {"step-000000.png", "step-000002.png",
                                                                  "step-000004.png"}
    assert (run / "checkpoints" / "step-000004").is_dir()


def test_fsdp_qwen_edit_run_with_bf16_accumulation_and_true_cfg_keeps_ranks_in_step(tmp_path):
    # 5 training samples, 2 processes x batch 2 = global batches of 4 and 1 (the second process runs a
    # placeholder), 2 micro-batches per optimizer step, bf16 autocast (validation too), and true CFG in
    # sampling: every sampling step runs the transformer twice
    config = write_config(tmp_path / "q.yaml", tiny_config(
        tmp_path, trainer="qwen-edit", data={"num_samples": 8, "holdout": 3},
        train={"max_steps": 2, "batch_size": 2, "grad_accum": 2, "mixed_precision": "bf16", "save_every": 0,
               "lr": 5e-3, "fsdp": True},
        validation={"every": 1, "steps": 2, "from_holdout": 3, "true_cfg": 4.0}))
    launch(config, tmp_path / "out", 2)
    a = load_file(str(tmp_path / "out" / "lora-rank0.safetensors"))
    b = load_file(str(tmp_path / "out" / "lora-rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    r0, r1 = seen(tmp_path / "out", 0), seen(tmp_path / "out", 1)
    assert r0["base_local"] == pytest.approx(r0["base_total"] / 2, rel=0.02) and r0["lora_sharded"] == 0
    assert r0["forwards"] == r1["forwards"]
    keys0 = [k for batch in r0["batches"] for k in batch]
    keys1 = [k for batch in r1["batches"] for k in batch]
    # per epoch: process 0 runs 2 + 1 samples, process 1 runs 2 + a placeholder (process 0's lone sample again)
    assert (len(keys0), len(keys1)) == (6, 6)
    assert len(set(keys0[:3]) | set(keys1[:3])) == 5 and len(set(keys0[:3]) & set(keys1[:3])) == 1
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
