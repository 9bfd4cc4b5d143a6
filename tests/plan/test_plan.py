"""``qflux plan`` (``qflux.plan``): every figure it predicts is checked against the real thing at small scale.

- the activation coefficients each trainer declares (``MemoryProfile``) equal what autograd keeps in a real step
  of its ``builtin:tiny`` model (``SavedBytesProbe``), and the planned tokens equal the tokens the blocks saw;
- the planned weight bytes equal the loaded transformer's bytes, unquantized and quantized (nf4, int8, fp8:
  against the quantized model's own storage, ``qflux_quant.memory.weight_bytes``);
- the planned adapter parameters equal the attached adapter's (LoRA, LoKr);
- the smallest offload count that fits is the smallest: one block fewer does not fit;
- the CLI: ``--json`` keys, a budget that does not fit names settings, and ``qflux train`` refuses a run that
  cannot fit this machine with exit 2, one line, nothing written.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from qflux.config import load_config
from qflux.plan.estimate import GiB, gather, plan
from qflux.plan.fit import smallest_offload
from qflux.plan.probe import SavedBytesProbe
from qflux.plugins import build_registry
from qflux.testing import probed_step, tiny_config, write_config

TRAINERS = {"kontext": "qflux_kontext", "qwen-edit-plus": "qflux_qwen", "flux2-klein": "qflux_flux2",
            "qwen-image-2.1": "qflux_qwen"}


def _config(tmp: Path, trainer: str, **model):
    tmp.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp / "c.yaml", tiny_config(
        tmp, trainer, train={"max_steps": 1, "save_every": 0, "batch_size": 1},
        data={"num_samples": 4, "holdout": 0, "resolution": 64},
        model={"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 4, "alpha": 4}, **model})))


def _probed_step(tmp: Path, trainer: str, **model) -> tuple[SavedBytesProbe, object]:
    config = _config(tmp, trainer, **model)
    return probed_step(config, trainer), config


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_declared_activation_coefficients_match_a_real_step(tmp_path, trainer):
    pytest.importorskip(TRAINERS[trainer])
    probe, config = _probed_step(tmp_path, trainer)
    registry = build_registry()
    declared = dict(registry.trainer(trainer).info.memory.activations)
    measured = probe.coefficients()
    assert set(measured) == set(declared)
    for cls, value in measured.items():
        assert declared[cls] == pytest.approx(value, rel=0.08), cls
    if trainer != "qwen-edit-plus":  # a Qwen prompt's length is the text's own; the others pad to a fixed one
        inputs = gather(config.model_copy(update={"model": config.model.model_copy(
            update={"max_sequence_length": probe.records[-1].tokens - _image_tokens(inputs_of(config, registry))})}),
            registry)
        assert inputs.tokens.total == statistics.mode(r.tokens for r in probe.records)


@pytest.mark.parametrize("trainer", ["kontext", "qwen-edit-plus"])
def test_half_precision_coefficients_match_a_bf16_step_under_a_float32_adapter(tmp_path, trainer):
    """Real runs train a bf16 base under a float32 LoRA: peft keeps a float32 copy of each adapted layer's input,
    so the coefficients per bf16 byte are ~1.6x the float32 ones (declared apart: ``MemoryProfile.half``).
    At 256 px, where image tokens dominate the prompt's as in real runs."""
    pytest.importorskip(TRAINERS[trainer])
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, trainer, train={"max_steps": 1, "save_every": 0, "batch_size": 1},
        data={"num_samples": 2, "holdout": 0, "resolution": 256},
        model={"pretrained": "builtin:tiny", "dtype": "bfloat16", "lora": {"rank": 4, "alpha": 4}})))
    probe = probed_step(config, trainer)
    declared = dict(build_registry().trainer(trainer).info.memory.half)
    for cls, value in probe.coefficients().items():
        assert declared[cls] == pytest.approx(value, rel=0.08), cls
    assert gather(config, build_registry()).ks[0] == declared[gather(config, build_registry()).weights.block_classes[0]]


def inputs_of(config, registry):
    return gather(config, registry)


def _image_tokens(inputs) -> int:
    return inputs.tokens.target + inputs.tokens.references


def test_checkpointed_blocks_keep_only_their_input(tmp_path):
    pytest.importorskip("qflux_kontext")
    plain, _ = _probed_step(tmp_path / "a", "kontext")
    ckpt, _ = _probed_step(tmp_path / "b", "kontext", gradient_checkpointing=True)
    assert all(r.saved_bytes == 0 for r in ckpt.records)  # nothing inside a checkpointed block is kept
    unit = sum(r.tokens * r.width * r.element_size * r.batch for r in plain.records)
    assert ckpt.outside - plain.outside == pytest.approx(unit, rel=0.05)  # only each block's input


def test_planned_weights_equal_the_loaded_transformer(tmp_path):
    pytest.importorskip("qflux_kontext")
    registry = build_registry()
    config = _config(tmp_path, "kontext")
    loaded = registry.trainer("kontext").load_transformer(config.model)
    real = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()])
    assert gather(config, registry).weights.total == real


@pytest.mark.parametrize("method", ["nf4", "int8", "fp8"])
def test_planned_quantized_weights_equal_the_quantized_storage(tmp_path, method):
    pytest.importorskip("qflux_quant")
    if method != "fp8":
        pytest.importorskip("bitsandbytes")
    from qflux_quant.memory import weight_bytes

    registry = build_registry()
    config = _config(tmp_path, "kontext", quantize=method, dtype="bfloat16")
    quantized = registry.quantizer(method).quantize(registry.trainer("kontext").load_transformer(config.model),
                                                    config.model)
    assert gather(config, registry).weights.total == weight_bytes(quantized)


@pytest.mark.parametrize("adapter", [{}, {"adapter": "lokr", "adapter_options": {"rank": 4}}])
def test_planned_adapter_parameters_equal_the_attached_ones(tmp_path, adapter):
    pytest.importorskip("qflux_kontext")
    registry = build_registry()
    config = _config(tmp_path, "kontext", **adapter)
    model = registry.trainer("kontext").load_transformer(config.model)
    chosen = registry.adapter(config.model.adapter)
    attached = sum(p.numel() for p in chosen.attach(model, chosen.options_of(config.model)))
    assert gather(config, registry).adapter_params == attached > 0


def test_smallest_offload_is_the_smallest_that_fits(tmp_path):
    pytest.importorskip("qflux_kontext")
    registry = build_registry()
    config = _config(tmp_path, "kontext")
    from diffusers import FluxTransformer2DModel

    from qflux_kontext.tiny import TRANSFORMER_CONFIG

    with torch.device("meta"):  # deeper than builtin:tiny: offloading all but the three in flight must pay
        deep = FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, num_layers=4, num_single_layers=8))
    inputs = gather(config, registry, transformer=deep, libraries=0)
    count = len(inputs.weights.blocks)
    full = plan(config, inputs, True).accelerator_bytes
    least = plan(config, inputs, True, offload_blocks=count).accelerator_bytes
    assert least < full  # all blocks away, three in flight: less than none away
    budget = (least + full) // 2
    n = smallest_offload(config, inputs, budget, True)
    assert n is not None and 0 < n <= count
    assert plan(config, inputs, True, offload_blocks=n).accelerator_bytes <= budget
    assert plan(config, inputs, True, offload_blocks=n - 1).accelerator_bytes > budget
    resident = plan(config, inputs, True, offload_blocks=n)
    offloaded = sum(p.bytes for p in resident.parts if p.where == "host" and p.name.startswith("offloaded"))
    assert offloaded == 2 * sum(inputs.weights.blocks[:n])  # the same blocks in train and validate phases


def test_plan_json_and_a_budget_that_does_not_fit(tmp_path, run_qflux):
    pytest.importorskip("qflux_kontext")
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, "kontext"))
    out = run_qflux("plan", str(path), "--json", "--device", "cuda", "--budget-gib", "0.0001", plugins=None)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"accelerator_gib", "host_gib", "parts"} <= set(data)
    assert data["accelerator_gib"] > 0 and data["host_gib"] > 0  # host: the libraries at least
    assert {p["phase"] for p in data["parts"]} >= {"load", "train"}
    assert data["budget"]["fits"] is False and data["budget"]["fitting_settings"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_train_refuses_a_run_that_cannot_fit_this_machine(tmp_path, run_qflux):
    pytest.importorskip("qflux_kontext")
    config = tiny_config(tmp_path, "kontext", data={"resolution": 16384, "num_samples": 2, "holdout": 0})
    path = write_config(tmp_path / "c.yaml", config)
    out = run_qflux("train", str(path), plugins=None)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "GiB at its peak" in lines[0] and "settings that fit" in lines[0], out.stderr
    assert not (tmp_path / "run").exists()


def test_plan_gib_is_bytes(tmp_path):
    """The JSON's GiB figures are the parts' bytes / 2**30 (a unit slip would pass every other check)."""
    pytest.importorskip("qflux_kontext")
    registry = build_registry()
    config = _config(tmp_path, "kontext")
    result = plan(config, gather(config, registry), False)
    assert result.host_gib == round(result.host_bytes / GiB, 3)
    assert result.host_bytes == max(result.phase_total(ph, "host") for ph in result.phases())
    assert result.accelerator_bytes is None


def test_preflight_on_a_gpu_resolves_offload_auto_and_refuses_what_cannot_fit(tmp_path, monkeypatch):
    """``qflux.plan.check.check_memory`` as it runs on a machine with an accelerator (its availability and free
    memory stood in for): ``offload_blocks: auto`` becomes the smallest count whose plan fits; a device too small
    even with every block offloaded is a ``DoesNotFit`` that names what would fit."""
    pytest.importorskip("qflux_kontext")
    from diffusers import FluxTransformer2DModel

    import qflux.run.lora_targets as lora_targets
    from qflux.plan import check
    from qflux.plan.estimate import RUNTIME_RESERVE
    from qflux_kontext.tiny import TRANSFORMER_CONFIG

    def deep(config, trainer):  # deeper than builtin:tiny, so that offloading pays (see the test above)
        with torch.device("meta"):
            return FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, num_layers=4, num_single_layers=8))

    monkeypatch.setattr(lora_targets, "meta_transformer", deep)
    registry = build_registry()
    config = _config(tmp_path, "kontext", offload_blocks="auto")
    inputs = gather(config, registry)
    count = len(inputs.weights.blocks)
    none_away = plan(config, inputs, True, offload_blocks=0).accelerator_bytes
    all_away = plan(config, inputs, True, offload_blocks=count).accelerator_bytes
    assert all_away < none_away
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(check, "free_accelerator_bytes", lambda: RUNTIME_RESERVE + (all_away + none_away) // 2)
    check.check_memory(config, registry)
    expected = smallest_offload(config, inputs, (all_away + none_away) // 2, True)
    assert config.model.offload_blocks == expected and expected > 0

    small = _config(tmp_path / "small", "kontext", offload_blocks="auto")
    monkeypatch.setattr(check, "free_accelerator_bytes", lambda: RUNTIME_RESERVE + all_away // 2)
    with pytest.raises(check.DoesNotFit, match="more than the accelerator .* settings that fit"):
        check.check_memory(small, registry)
