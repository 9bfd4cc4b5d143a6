"""``model.offload_blocks`` (``qflux.training.offload``) on the CPU path: host and device are both the CPU, but
the host copy and the device copy are separate allocations and every fetch / release hook runs.

- training is numerically identical with and without offloading (same losses, same adapter, bit for bit):
  tiny Kontext (all blocks; 2 of 4 with gradient checkpointing) and tiny Qwen (checkpointing), through the cache;
- nf4 / int8 / fp8 bases: the same loss and LoRA gradients on one forward + backward, and their quantized
  storage (bitsandbytes' absmax, int8 row scales, float8 scales) leaves the device with the block;
- the probe: the bytes the transformer holds drop by exactly the offloaded blocks' frozen bytes, at most two
  offloaded blocks are resident in the forward pass and three in the backward pass, none between steps.

Released storage is poisoned (0xFF bytes) before it is freed, so a fetch that skipped its copy cannot read
the old bytes back from the allocator and pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qflux.config import load_config
from qflux.config.schema import LoraConfig, ModelConfig
from qflux.errors import ConfigError
from qflux.testing import single_torch_thread, tiny_config, write_config
from qflux.training import offload as off


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(off.BlockOffloader, "poison", True)


def _train(tmp: Path, trainer: str, cache: Path, **model) -> tuple[object, off.BlockOffloader | None]:
    from qflux.run.train import train

    tmp.mkdir(parents=True)
    made: list[off.BlockOffloader] = []
    original = off.apply_offload

    def spy(transformer, model_config, device=None):
        made.append(original(transformer, model_config, device))
        return made[-1]

    config = tiny_config(tmp, trainer, train={"max_steps": 2, "save_every": 0}, cache={"enabled": True, "dir": str(cache)},
                         data={"num_samples": 4, "holdout": 0},
                         model={"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 4, "alpha": 4}, **model})
    off.apply_offload = spy
    try:
        with single_torch_thread():
            result = train(load_config(write_config(tmp / "c.yaml", config)))
    finally:
        off.apply_offload = original
    return result, made[0] if made else None


RUNS = {
    "kontext": [{}, {"offload_blocks": "auto"}, {"offload_blocks": 2, "gradient_checkpointing": True}],
    "qwen-edit": [{}, {"offload_blocks": "auto", "gradient_checkpointing": True}],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per trainer: the 2-step run without offloading, then the offloaded ones (sharing one cache folder, so
    the later runs train from the cache)."""
    out = {}
    for trainer, variants in RUNS.items():
        pytest.importorskip({"kontext": "qflux_kontext", "qwen-edit": "qflux_qwen"}[trainer])
        root = tmp_path_factory.mktemp(f"offload-{trainer}")
        out[trainer] = [_train(root / str(i), trainer, root / "cache", **v) for i, v in enumerate(variants)]
        shutil.rmtree(root, ignore_errors=True)
    return out


@pytest.mark.parametrize("trainer", list(RUNS))
def test_offloaded_training_is_identical(runs, trainer):
    (plain, none), *offloaded = runs[trainer]
    assert none is None and len(plain.losses) == 2
    for (result, offloader), variant in zip(offloaded, RUNS[trainer][1:], strict=True):
        assert offloader is not None, variant
        assert offloader.counters["fetches"] > 0 and offloader.counters["releases"] > 0
        assert result.losses == plain.losses, variant
        assert result.lora.keys() == plain.lora.keys()
        for key, value in plain.lora.items():
            assert torch.equal(result.lora[key], value), (variant, key)
        assert offloader.resident_offloaded_bytes() == 0  # nothing left on the device after the run
        want = len(off.repeated_blocks(offloader.transformer)) if variant["offload_blocks"] == "auto" else variant["offload_blocks"]
        assert offloader.report.offloaded == want


# --------------------------------------------------------------------------- one forward + backward


def _kontext_model(quantize: str | None = None):
    qflux_kontext = pytest.importorskip("qflux_kontext.tiny")
    from qflux.adapters.lora_files import attach_lora

    transformer = qflux_kontext.tiny_transformer().float()
    if quantize:
        quant = pytest.importorskip("qflux_quant.quantize")
        if quantize != "fp8":
            pytest.importorskip("bitsandbytes")
        transformer, _ = quant.quantize_transformer(transformer, quantize, ModelConfig(dtype="float32", quantize=quantize))
    params = attach_lora(transformer, LoraConfig(rank=4, alpha=4))
    return transformer, params


def _inputs():
    g = torch.Generator().manual_seed(0)
    img, txt = 8, 5
    return dict(hidden_states=torch.randn(2, img, 64, generator=g), encoder_hidden_states=torch.randn(2, txt, 64, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3), guidance=torch.tensor([1.0, 1.0]))


def _step(transformer, params):
    for p in params:
        p.grad = None
    loss = transformer(**_inputs(), return_dict=False)[0].square().mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params]


def _frozen_bytes(module) -> int:
    return sum(b for b in off.resident_bytes_frozen(module).values())


@pytest.mark.parametrize("quantize", [None, "nf4", "int8", "fp8"])
def test_one_step_identical_and_bytes_leave_the_device(quantize):
    with single_torch_thread():
        transformer, params = _kontext_model(quantize)
        for p in params:  # a non-zero LoRA, so its gradients depend on the base weights everywhere
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        transformer.enable_gradient_checkpointing() if quantize == "nf4" else None
        want_loss, want_grads = _step(transformer, params)
        blocks = off.repeated_blocks(transformer)
        n = 3
        expected = sum(_frozen_bytes(m) for _, m in blocks[:n])
        before = off.resident_bytes(transformer)["cpu"]
        offloader = off.BlockOffloader(transformer, n, torch.device("cpu"))
        after = off.resident_bytes(transformer)["cpu"]
        assert before - after == expected == offloader.report.offloaded_bytes > 0
        assert sum(s.host.untyped_storage().nbytes() for b in offloader.blocks for s in b.slots) == expected
        if quantize in ("nf4", "int8"):  # the side storage travels too: more than the parameters' bytes
            param_bytes = sum(p.numel() * p.element_size() for _, m in blocks[:n] for p in m.parameters() if not p.requires_grad)
            assert expected > param_bytes
        assert all(p.untyped_storage().nbytes() > 0 for p in params)  # the adapter stays on the device

        seen = {"forward": 0, "backward": 0}

        def count(phase):
            resident = sum(1 for b in offloader.blocks if b.offloaded and b.resident)
            seen[phase] = max(seen[phase], resident)

        for _, m in blocks:
            m.register_forward_pre_hook(lambda *a: count("backward" if off.BlockOffloader._in_backward() else "forward"))
        enter = offloader._backward_enter
        offloader._backward_enter = lambda block: (enter(block), count("backward"))
        for _ in range(2):
            loss, grads = _step(transformer, params)
            assert loss == want_loss
            for got, want in zip(grads, want_grads, strict=True):
                assert torch.equal(got, want)
            assert offloader.resident_offloaded_bytes() == 0 and off.resident_bytes(transformer)["cpu"] == after
        assert 1 <= seen["forward"] <= 2 and 1 <= seen["backward"] <= 3, seen
        with torch.no_grad():  # validation / sampling: the same hooks, nothing left resident
            transformer(**_inputs(), return_dict=False)
        assert offloader.resident_offloaded_bytes() == 0
        offloader.close()
        assert off.resident_bytes(transformer)["cpu"] == before


def test_a_released_weight_is_never_used_silently():
    """A layer of a block the offloader released raises (its storage is empty), it does not compute with stale data."""
    transformer, params = _kontext_model()
    offloader = off.BlockOffloader(transformer, 1, torch.device("cpu"))
    block = offloader.blocks[0].module
    layer = block.norm1.linear
    x = torch.randn(2, layer.in_features)
    with pytest.raises(RuntimeError, match="setStorage|not allocated"):
        layer(x)
    offloader.close()
    assert torch.isfinite(layer(x)).all()


# --------------------------------------------------------------------------- preflight


def test_preflight_refusals(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "kontext", model={"offload_blocks": 3})))

    class Quantizer:
        name = "custom"

    with pytest.raises(ConfigError, match="the quantizer 'custom' does not support block offloading"):
        off.check_offload(config, Quantizer(), lambda: 4)
    Quantizer.offloadable = True
    off.check_offload(config, Quantizer(), lambda: 4)
    with pytest.raises(ConfigError, match="3 is more than the 2 repeated blocks"):
        off.check_offload(config, None, lambda: 2)
    off.check_offload(config, None, lambda: None)  # unknown block count (a hub id): checked at load
    config.train.compile = True
    with pytest.raises(ConfigError, match="cannot be combined with train.compile"):
        off.check_offload(config, None, lambda: 4)
