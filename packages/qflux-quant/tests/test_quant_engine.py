"""The full engine with a quantized base: ``train(config)`` on builtin:tiny FLUX.1 Kontext, one run per backend."""

from __future__ import annotations

import pytest
import torch
import yaml
from quant_tiny import METHODS
from safetensors.torch import load_file

pytest.importorskip("qflux_kontext")

from qflux.config import load_config  # noqa: E402
from qflux.run.train import train  # noqa: E402


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One embedding cache for the four runs: quantization does not change what the encoders produce."""
    return tmp_path_factory.mktemp("quant-cache")


def _config(tmp_path, cache, method: str):
    config = {
        "trainer": "kontext",
        "model": {"pretrained": "builtin:tiny", "dtype": "float32", "quantize": method,
                  "lora": {"rank": 4, "alpha": 4}},
        "data": {"path": "builtin:shapes", "resolution": 32, "num_samples": 8, "holdout": 2,
                 "control_resolution": "target"},  # tiny models: not the pipeline's ~1 MP controls
        "cache": {"enabled": True, "dir": str(cache)},
        # one batch holds every training sample and sigma is pinned near 0.5 (logit-normal, tiny std): the
        # steps differ only in their noise draw, so the loss curve shows the LoRA learning
        "train": {"max_steps": 6, "batch_size": 6, "lr": 1e-2, "save_every": 0, "seed": 0, "logit_std": 0.001},
        "validation": {"every": 0},
        "output": {"dir": str(tmp_path / f"run-{method}")},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_six_step_training_with_a_quantized_base_lowers_the_loss(tmp_path, shared_cache, method):
    result = train(_config(tmp_path, shared_cache, method))
    assert result.steps == 6 and len(result.losses) == 6
    assert result.losses[-1] < result.losses[0], result.losses
    assert result.val_loss_end < result.val_loss_start  # same held-out batches and sigmas before and after
    lora = load_file(str(result.lora_path))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
