"""Pre-quantized checkpoints: a transformer saved by diffusers with a bitsandbytes quantization config loads
through the ordinary ``from_pretrained`` path, and ``Quantizer.quantize`` leaves it as it is.

CPU note: diffusers 0.42 refuses bitsandbytes without an accelerator although bitsandbytes 0.50 runs on CPU:
``BnB4BitDiffusersQuantizer.validate_environment`` (and the 8-bit one) raise "No GPU found. A GPU is needed for
quantization." and ``update_device_map`` calls ``torch.cuda.current_device()`` when no ``device_map`` is given.
The ``bnb_on_cpu`` fixture lifts exactly these two checks for the test (which runs on CPU); everything
else (quantize on load, ``save_pretrained``, reading the packed weights and quant states back) is diffusers' own.
"""

from __future__ import annotations

import json

import pytest
import torch
from quant_tiny import (
    add_lora,
    flux_inputs,
    model_config,
    quantize_on_cpu,  # noqa: F401 - autouse fixture
    tiny_flux,
    train_steps,
)

from qflux.errors import UserError
from qflux.plugins import build_registry
from qflux_quant import plugin
from qflux_quant.quantize import quantized_methods

CASES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture
def bnb_on_cpu(monkeypatch):
    """Load on CPU (the inputs are CPU tensors), also where a GPU is present."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    for cls in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(cls, "validate_environment", lambda self, *a, **k: None)
        monkeypatch.setattr(cls, "update_device_map", lambda self, device_map: device_map or {"": "cpu"})


def _prequantized_folder(tmp_path, method: str):
    """A diffusers folder whose transformer/ was quantized on load by bitsandbytes and saved with its config."""
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    full = tiny_flux()
    full.save_pretrained(tmp_path / "full")
    quantized = FluxTransformer2DModel.from_pretrained(
        tmp_path / "full", quantization_config=BitsAndBytesConfig(**CASES[method]), torch_dtype=torch.float32
    )
    assert quantized_methods(quantized) == {method: 30}  # diffusers quantizes every linear layer
    quantized.save_pretrained(tmp_path / "ckpt" / "transformer")
    return full, tmp_path / "ckpt"


@pytest.mark.parametrize("method", list(CASES))
def test_prequantized_checkpoint_loads_and_quantize_is_a_no_op(tmp_path, bnb_on_cpu, method):
    from diffusers import FluxTransformer2DModel

    full, folder = _prequantized_folder(tmp_path, method)
    saved = json.loads((folder / "transformer" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes"

    loaded = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
    assert quantized_methods(loaded) == {method: 30}
    before = {k: v.clone() for k, v in loaded.state_dict().items()}

    registry = build_registry(extra_plugins=[("quant", plugin)], load_entry_points=False)
    out = registry.quantizer(method).quantize(loaded, model_config(method))
    assert out is loaded
    after = loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    inputs = flux_inputs()
    with torch.no_grad():
        ref, got = full(**inputs)[0], loaded(**inputs)[0]
    assert float((got - ref).norm() / ref.norm()) < 0.3  # every layer, embedders included, is quantized

    add_lora(loaded)
    losses, _ = train_steps(loaded, inputs, steps=4)
    assert losses[-1] < losses[0]

    other = "fp8" if method != "fp8" else "nf4"
    with pytest.raises(UserError, match=f"already quantized as {method}"):
        plugin.QUANTIZERS[other].quantize(loaded, model_config(other))


def test_prequantized_checkpoint_through_the_kontext_loader(tmp_path, bnb_on_cpu):
    loading = pytest.importorskip("qflux_kontext.loading")
    _, folder = _prequantized_folder(tmp_path, "nf4")
    config = model_config("nf4", pretrained=str(folder))
    transformer = loading.load_transformer(config)
    assert quantized_methods(transformer) == {"nf4": 30}
    assert plugin.QUANTIZERS["nf4"].quantize(transformer, config) is transformer
