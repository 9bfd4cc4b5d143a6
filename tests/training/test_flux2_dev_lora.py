"""A flux2-dev LoRA trained by qflux loads with ``Flux2Pipeline.load_lora_weights`` and reproduces the trained
model (its guidance embedding included), and differs from the base."""

from __future__ import annotations

import pytest
import torch

from qflux.adapters.lora_files import attach_lora, load_lora_state
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import single_torch_thread


@pytest.fixture(autouse=True)
def one_thread():
    with single_torch_thread():
        yield


def test_dev_lora_loads_in_flux2pipeline_and_reproduces_the_trained_model(tmp_path):
    import diffusers
    from test_train_flux2 import _config, make_folder  # tests/training is on sys.path

    from qflux_flux2.predict import forward
    from qflux_flux2.tiny import save_tiny

    data = make_folder(tmp_path / "data", {"a": 1, "b": 2, "c": 0})
    config = _config(tmp_path, "flux2-dev", data, train={"max_steps": 3, "save_every": 0})
    result = train(config)
    trainer = build_registry().trainer("flux2-dev")
    ours = trainer.load_transformer(config.model)
    attach_lora(ours, config.model.lora)
    load_lora_state(ours, result.lora)
    ours.eval()
    pipe = diffusers.Flux2Pipeline.from_pretrained(str(save_tiny(tmp_path / "tiny", "flux2-dev")),
                                                   torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    call = dict(latents=torch.randn(2, 16, 128, generator=g), sigmas=torch.tensor([0.3, 0.7]),
                prompt=torch.randn(2, 10, 48, generator=g), controls=[torch.randn(2, 20, 128, generator=g)],
                grid=(4, 4), control_grids=[(4, 5)], guidance=1.0)
    with torch.no_grad():
        base = forward(pipe.transformer, **call)
        pipe.load_lora_weights(str(result.lora_path))
        theirs = forward(pipe.transformer, **call)
        mine = forward(ours, **call)
    assert (mine - theirs).abs().max() <= 1e-5
    assert (base - theirs).abs().max() > 1e-3
