"""flux2-klein / flux2-dev on a quantized base (qflux-quant): every backend trains the tiny model, with gradient
checkpointing, and the LoRA it writes is finite float32."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("qflux_quant")

from qflux.config import load_config  # noqa: E402
from qflux.run.train import train  # noqa: E402


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("flux2-quant-cache")


# the backends themselves are tested in qflux-quant on every method; here: one 4-bit and one 8-bit per trainer shape
@pytest.mark.parametrize("trainer, method", [("flux2-klein", "nf4"), ("flux2-klein", "fp8"), ("flux2-dev", "int8")])
def test_training_on_a_quantized_base(tmp_path, shared_cache, trainer, method):
    config = {
        "trainer": trainer,
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "quantize": method, "max_sequence_length": 32,
                  "gradient_checkpointing": True,
                  "lora": {"rank": 4, "alpha": 4, "targets": ["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]}},
        "data": {"path": "builtin:shapes", "resolution": 64, "num_samples": 6, "holdout": 2,
                 "control_resolution": "target", "reference_dropout": 0.5},
        "cache": {"enabled": True, "dir": str(shared_cache)},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "save_every": 0, "seed": 0},
        "validation": {"every": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train(load_config(path))
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    lora = load_file(str(result.lora_path))
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any("single_transformer_blocks" in k for k in lora)
