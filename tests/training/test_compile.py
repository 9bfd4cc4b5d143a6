"""``train.compile``: regional compilation compiles once per block type (not per block), trains the same
numbers as eager with LoRA and gradient checkpointing, and falls back to eager with a message."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from qflux.config.schema import QfluxConfig, TrainConfig
from qflux.errors import ConfigError
from qflux.testing import single_torch_thread, tiny_config
from qflux.training import compile as regional


def _flux(double: int, single: int) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _graphs_captured(model: FluxTransformer2DModel) -> int:
    """Forward + backward through ``model`` compiled by ``compile_blocks`` with a backend that counts the graphs
    dynamo hands it (each one a compilation)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    report = regional.compile_blocks(model, torch.device("cpu"), lambda _: None, backend=counting)
    assert report.compiled and report.block_types == ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    out = model(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), guidance=None).sample
    out.sum().backward()
    return len(graphs)


def test_compilations_do_not_grow_with_the_block_count():
    with single_torch_thread():
        few, many = _graphs_captured(_flux(2, 2)), _graphs_captured(_flux(4, 5))
    # per-block compilation would give 4 and 9; one graph per type (plus one recompile of the single block for
    # the concatenated stream's strides) gives 3 for both
    assert few == many <= 4


def _train(tmp_path, **train):
    from qflux.run.train import train as run_train

    config = tiny_config(tmp_path, train={"max_steps": 2, "batch_size": 2, "lr": 1e-3, "save_every": 0, **train},
                         data={"holdout": 0})
    config["model"]["gradient_checkpointing"] = True
    with single_torch_thread():
        return run_train(QfluxConfig.model_validate(config))


def test_compiled_training_equals_eager_with_lora_and_checkpointing(tmp_path, capsys):
    torch._dynamo.reset()
    eager = _train(tmp_path / "eager")
    compiled = _train(tmp_path / "compiled", compile=True, compile_backend="aot_eager")
    assert "blocks compiled regionally with aot_eager" in capsys.readouterr().err
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5, abs=1e-6)
    assert eager.lora.keys() == compiled.lora.keys()
    for name, tensor in eager.lora.items():
        torch.testing.assert_close(compiled.lora[name], tensor, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in compiled.lora.values())


def test_falls_back_to_eager_with_the_reason(monkeypatch):
    messages: list[str] = []
    monkeypatch.setattr(regional.shutil, "which", lambda name: None)
    model = _flux(1, 1)
    report = regional.compile_blocks(model, torch.device("cpu"), messages.append)
    assert not report.compiled and "C++ compiler" in report.reason
    assert messages == [f"train.compile: {report.reason}; training eagerly (uncompiled)"]
    assert not any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
                   for m in model.modules())


def test_a_model_without_repeated_blocks_trains_eagerly():
    messages: list[str] = []
    report = regional.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.device("cpu"), messages.append)
    assert not report.compiled and "_repeated_blocks" in messages[0]


def test_an_unknown_backend_is_a_config_error_naming_the_key():
    regional.check_compile(TrainConfig(compile_backend="aot_eager"))
    with pytest.raises(ConfigError, match=r"train.compile_backend: .*'aot_eagr'.*did you mean 'aot_eager'"):
        regional.check_compile(TrainConfig(compile_backend="aot_eagr"))
