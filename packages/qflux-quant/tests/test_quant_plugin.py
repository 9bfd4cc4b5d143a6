"""The qflux-quant plugin: registration, a light import, layer selection and the errors a user can cause."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from quant_tiny import (
    METHODS,
    model_config,
    quantize_on_cpu,  # noqa: F401 - autouse fixture
    tiny_flux,
)

from qflux.errors import ConfigError, PluginError, UserError
from qflux.plugins import build_registry
from qflux_quant import plugin
from qflux_quant.quantize import quantize_transformer, quantized_methods, select_linears


def _registry():
    return build_registry(extra_plugins=[("quant", plugin)], load_entry_points=False)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_plugin_import_is_light():
    code = (
        "import sys, qflux_quant.plugin; "
        "heavy = [m for m in ('torch', 'bitsandbytes', 'diffusers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_registers_the_four_quantizers():
    registry = _registry()
    assert set(registry.quantizers) == set(METHODS)
    assert registry.quantizer("nf4").info.requires == ("bitsandbytes",)
    assert registry.quantizer("fp8").info.requires == ()
    record = next(p for p in registry.plugins if p.name == "quant")
    assert record.kind == "quantizer" and record.hooks == ["qflux_register_quantizers"]
    with pytest.raises(PluginError, match="installed: fp4, fp8, int8, nf4"):
        registry.quantizer("gptq")


def test_installed_entry_point_is_found():
    registry = build_registry()
    assert registry.provider["quantizer:nf4"] == "qflux-quant"
    assert not [b for b in registry.broken if b.name == "quant"]


def test_quantize_returns_the_quantized_transformer():
    registry = _registry()
    model = tiny_flux()
    out = registry.quantizer("fp8").quantize(model, model_config("fp8"))
    # the default skip list is empty: every Linear in the blocks and the two input projections
    assert out is model and quantized_methods(out) == {"fp8": 22}
    assert not any(p.requires_grad for p in out.parameters())  # frozen


def test_layer_selection_skips_patterns_and_keeps_embeddings_final_norm_and_projection():
    model = tiny_flux()
    chosen, report = select_linears(model, ["norm", "embed", "proj_out"])
    names = [n for n, _ in chosen]
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.0.proj_mlp" in names
    assert not any(p in n for n in names for p in ("norm", "embed", "proj_out"))
    assert report.skipped["transformer_blocks.0.norm1.linear"] == "norm"  # substrings: the modulation too
    assert report.skipped["single_transformer_blocks.0.proj_out"] == "proj_out"
    assert report.skipped["context_embedder"] == "embed"  # the input projections obey the patterns too
    assert "proj_out" in report.always_kept

    # with no pattern the blocks and the input projections are quantized entirely; the embeddings, the final
    # norm's modulation and the final projection stay as they were
    chosen, report = select_linears(model, [])
    names = {n for n, _ in chosen}
    assert {"transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.proj_out"} <= names
    assert {"x_embedder", "context_embedder"} <= names
    assert len(names) == 22 and not report.skipped  # 30 linear layers, 8 of them always kept
    assert set(report.always_kept) == {
        "proj_out", "norm_out.linear",
        *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
          for i in (1, 2)),
    }
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names - {
        "x_embedder", "context_embedder"})

    # a user who wants the input projections in full precision names them
    chosen, report = select_linears(model, ["x_embedder", "context_embedder"])
    assert len(chosen) == 20 and set(report.skipped) == {"x_embedder", "context_embedder"}

    chosen, report = select_linears(model, ["attn."])
    assert not any("attn." in n for n, _ in chosen) and len(report.skipped) == 11  # 8 joint + 3 single


def test_skip_list_that_leaves_nothing_is_a_config_error():
    model = tiny_flux()
    before = _weights(model)
    with pytest.raises(ConfigError, match="model.quantize_skip"):
        quantize_transformer(model, "fp8", model_config("fp8", quantize_skip=["blocks", "embedder"]))
    assert quantized_methods(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_missing_bitsandbytes_says_what_to_install_before_any_work(method, monkeypatch):
    model = tiny_flux()
    before = _weights(model)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    config = model_config(method)
    quantizer = _registry().quantizer(method)
    with pytest.raises(UserError, match="pip install bitsandbytes") as err:
        quantizer.check(config)  # what preflight calls (tests/test_user_mistakes.py: before any encoding)
    assert err.value.exit_code == 2
    # and quantize raises before touching a layer
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        quantizer.quantize(model, config)
    assert quantized_methods(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp8_needs_no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    model, _ = quantize_transformer(tiny_flux(), "fp8", model_config("fp8"))
    assert quantized_methods(model) == {"fp8": 22}


def test_fp8_on_a_torch_without_float8_says_so(monkeypatch):
    model = tiny_flux()
    monkeypatch.delattr(torch, "float8_e4m3fn")
    quantizer = _registry().quantizer("fp8")
    with pytest.raises(UserError, match="fp8 needs a torch with float8"):
        quantizer.check(model_config("fp8"))
    with pytest.raises(UserError, match="choose nf4, fp4 or int8"):
        quantizer.quantize(model, model_config("fp8"))
    monkeypatch.undo()
    assert quantized_methods(model) == {}


def test_check_passes_when_supported():
    assert _registry().quantizer("nf4").check(model_config("nf4")) is None


def test_already_quantized_by_another_method_is_a_user_error():
    model, _ = quantize_transformer(tiny_flux(), "fp8", model_config("fp8"))
    with pytest.raises(UserError, match=r"already quantized as fp8 \(22 layers\); set model.quantize: fp8"):
        quantize_transformer(model, "nf4", model_config("nf4"))


def test_already_quantized_by_the_same_method_is_a_no_op():
    model, _ = quantize_transformer(tiny_flux(), "nf4", model_config("nf4"))
    before = _weights(model)
    again, report = quantize_transformer(model, "nf4", model_config("nf4"))
    assert again is model and report.was_prequantized and report.already_quantized == 22
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_quantize_device_policy(monkeypatch):
    from qflux_quant.quantize import quantize_device

    weight = torch.zeros(2, 2)
    assert quantize_device(weight) == torch.device("cpu")  # the autouse fixture forces cpu
    monkeypatch.delenv("QFLUX_QUANTIZE_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert quantize_device(weight) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert quantize_device(weight) == torch.device("cuda", 1)  # CPU-loaded layers go to the training GPU
    monkeypatch.setenv("QFLUX_QUANTIZE_DEVICE", "cpu")
    assert quantize_device(weight) == torch.device("cpu")
