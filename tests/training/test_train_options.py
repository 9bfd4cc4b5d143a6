"""Engine options on short tiny-Kontext runs: optimizers, LR warmup, gradient checkpointing, mixed precision,
timestep schemes. Each run is 2-3 optimizer steps at 32 px."""

from __future__ import annotations

import json

import pytest
import torch


def changed(result) -> bool:
    """LoRA B starts at zero (gaussian init): any non-zero B means the optimizer stepped."""
    return any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in result.lora.items())


@pytest.mark.parametrize(("optimizer", "args"), [
    ("adamw", {}),
    ("adamw8bit", {}),
    ("torch.optim.SGD", {"momentum": 0.9}),
])
def test_optimizers_train(make_config, optimizer, args):
    from qflux.run.train import train

    result = train(make_config(train={"max_steps": 2, "save_every": 0, "optimizer": optimizer,
                                      "optimizer_args": args, "lr": 1e-2}))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert changed(result)


def test_warmup_schedule_is_logged_per_optimizer_step(make_config, tmp_path):
    from qflux.run.train import train

    train(make_config(train={"max_steps": 3, "save_every": 0, "scheduler": "linear", "warmup_steps": 2,
                             "lr": 1e-3, "grad_accum": 2}))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # linear warmup over 2 steps then linear decay to 0 at step 3: lr after steps 1, 2, 3
    assert lrs == pytest.approx([5e-4, 1e-3, 0.0])


def test_gradient_checkpointing_gives_the_same_lora(make_config):
    from qflux.run.train import train

    plain = train(make_config(train={"max_steps": 2, "save_every": 0}))
    checkpointed = train(make_config(model={"gradient_checkpointing": True}, train={"max_steps": 2, "save_every": 0},
                                     output={"dir": str(make_config().output.dir) + "-gc"}))
    for k in plain.lora:
        assert torch.allclose(plain.lora[k], checkpointed.lora[k], atol=1e-6), k


@pytest.mark.parametrize("scheme", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_timestep_schemes_train(make_config, scheme):
    from qflux.run.train import train

    result = train(make_config(train={"max_steps": 2, "save_every": 0, "timestep_sampling": scheme}))
    assert result.steps == 2 and changed(result)


def test_bf16_mixed_precision_trains_with_float32_lora(make_config):
    from qflux.run.train import train

    result = train(make_config(train={"max_steps": 2, "save_every": 0, "mixed_precision": "bf16"}))
    assert result.steps == 2 and changed(result)
    assert all(v.dtype == torch.float32 for v in result.lora.values())
