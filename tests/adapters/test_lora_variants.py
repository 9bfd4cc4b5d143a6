"""DoRA (``model.lora.dora``) and rsLoRA (``model.lora.rslora``): options of the ``lora`` adapter, on the tiny
Kontext and Qwen trainers.

Per (option, trainer), one real run of 3 steps and its resume from step 2 (``adapter_runs``):

- the state dict holds lora_A / lora_B (and, with DoRA, a ``lora_magnitude_vector`` per module) and round-trips;
- the resumed run is bitwise the uninterrupted one;
- the export loads with the trainer's pipeline ``load_lora_weights``, and ``fuse_lora`` changes each weight by
  the trained model's merged change (peft's merge, in float64) within 1e-5 relative; ``qflux sample``'s
  ``load_lora_file`` applies the same change from the export and from the checkpoint.

Rank 4, alpha 3: peft's scale is 0.75 (alpha / rank) or 1.5 (rsLoRA, alpha / sqrt(rank)), so a file whose scale
is applied twice, not at all or by the wrong rule is off by far more than the tolerance.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from adapter_runs import TRAINERS, base, merged_deltas, relative, train_and_resume
from safetensors.torch import load_file, save_file

from qflux.adapters.lora_files import attach_lora, export_lora, load_lora_file, load_lora_state, lora_state_dict
from qflux.config.schema import LoraConfig
from qflux.errors import UserError
from qflux.plugins import build_registry

VARIANTS = {"dora": {"rank": 4, "alpha": 3.0, "dora": True}, "rslora": {"rank": 4, "alpha": 3.0, "rslora": True}}


@pytest.fixture(scope="module", params=[(v, t) for v in VARIANTS for t in TRAINERS], ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tmp_path_factory, cache):
    variant, trainer = request.param
    return train_and_resume(tmp_path_factory.mktemp(f"{variant}-{trainer}"), trainer, {"lora": VARIANTS[variant]},
                            cache)


def trained_model(run) -> torch.nn.Module:
    transformer = base(run.trainer)
    attach_lora(transformer, run.config.model.lora)
    load_lora_state(transformer, run.full.lora)
    return transformer


def pipeline_fused_deltas(trainer: str, path) -> dict[str, torch.Tensor]:
    """What diffusers does with the file: the trainer's pipeline class (its transformer only) ``load_lora_weights``
    then ``fuse_lora``; module name -> fused weight minus the base weight (float64)."""
    from qflux.adapters.lora_files import pipeline_class

    transformer = base(trainer)
    before = {n: m.weight.detach().double().clone() for n, m in transformer.named_modules()
              if isinstance(m, torch.nn.Linear)}
    cls = pipeline_class(build_registry().trainer(trainer).info.pipeline)
    names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "transformer")]
    pipe = cls(transformer=transformer, **{n: None for n in names})
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    out = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "get_base_layer") and name in before:
            out[name] = module.get_base_layer().weight.detach().double() - before[name]
    return out


def test_the_state_dict_holds_the_variant_and_round_trips(run):
    lora, state = run.config.model.lora, run.full.lora
    modules = {k.split(".lora_")[0] for k in state}
    assert state and len(modules) >= 8
    magnitudes = {k for k in state if k.endswith(".lora_magnitude_vector")}
    assert magnitudes == ({f"{m}.lora_magnitude_vector" for m in modules} if lora.dora else set())
    model = trained_model(run)
    again = lora_state_dict(model)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    scaling = {m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")}
    assert scaling == {1.5 if lora.rslora else 0.75}  # alpha / sqrt(rank) with rsLoRA, else alpha / rank
    saved = load_file(str(run.checkpoint))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_resume_is_bitwise_the_uninterrupted_run(run):
    from adapter_runs import assert_bitwise_resume

    assert_bitwise_resume(run)


def test_load_lora_weights_and_fuse_lora_give_the_trained_weight_change(run):
    trained = merged_deltas(trained_model(run))
    fused = pipeline_fused_deltas(run.trainer, run.export)
    assert set(fused) == set(trained)
    worst = max(relative(fused[m], d) for m, d in trained.items())
    assert worst <= 1e-5, f"diffusers' fused change differs from training: relative error {worst:.3g}"
    if run.config.model.lora.dora:  # the magnitude matters: the same file without it fuses something else
        plain = {k: v for k, v in load_file(str(run.export)).items() if "magnitude" not in k}
        save_file(plain, str(run.export.with_name("plain.safetensors")))
        wrong = pipeline_fused_deltas(run.trainer, run.export.with_name("plain.safetensors"))
        assert max(relative(wrong[m], d) for m, d in trained.items()) > 1e-2


def test_qflux_sample_applies_the_trained_weight_change(run):
    trained = merged_deltas(trained_model(run))
    for path in (run.export, run.checkpoint):
        transformer = base(run.trainer)
        load_lora_file(transformer, path)
        applied = merged_deltas(transformer)
        assert set(applied) == set(trained)
        worst = max(relative(applied[m], d) for m, d in trained.items())
        assert worst <= 1e-5, f"{path.name}: relative error {worst:.3g}"


# --------------------------------------------------------------------------- without training


@pytest.mark.parametrize("lora", [LoraConfig(rank=4, alpha=3.0, rslora=True), LoraConfig(rank=4, alpha=3.0, dora=True),
                                  LoraConfig(rank=8, alpha=5.0, dora=True, rslora=True)],
                         ids=["rslora", "dora", "both"])
def test_every_combination_loads_with_the_peft_change_in_both_pipelines_and_qflux_sample(lora, tmp_path):
    for trainer in TRAINERS:
        transformer = base(trainer)
        attach_lora(transformer, lora)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif "magnitude" in name:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        live = merged_deltas(transformer)
        path = export_lora(transformer, build_registry().trainer(trainer).info.pipeline, lora, tmp_path / trainer)
        fused = pipeline_fused_deltas(trainer, path)
        worst = max(relative(fused[m], d) for m, d in live.items())
        assert worst <= 1e-5, f"{trainer}: relative error {worst:.3g}"
        sampled = base(trainer)  # and qflux sample's load_lora_file
        load_lora_file(sampled, path)
        applied = merged_deltas(sampled)
        worst = max(relative(applied[m], d) for m, d in live.items())
        assert worst <= 1e-5, f"{trainer}, load_lora_file: relative error {worst:.3g}"


def test_a_dora_magnitude_on_some_modules_only_is_refused(tmp_path):
    transformer = base("kontext")
    attach_lora(transformer, LoraConfig(rank=4, dora=True))
    state = {f"transformer.{k}": v for k, v in lora_state_dict(transformer).items()}
    first = next(k for k in state if k.endswith(".lora_magnitude_vector"))
    partial = {k: v for k, v in state.items() if not k.endswith(".lora_magnitude_vector") or k == first}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    wrong = {**state, first: torch.ones(3)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    modules = len({k.split(".lora_")[0] for k in state})
    for name, message in (("partial", f"a DoRA magnitude, but {modules - 1} of the file's {modules} modules have none"),
                          ("wrong", "has shape [3] but the module has 128 output features")):
        fresh = base("kontext")
        with pytest.raises(UserError, match=re.escape(message)) as err:
            load_lora_file(fresh, tmp_path / f"{name}.safetensors")
        assert "\n" not in str(err.value)
        assert not any(hasattr(m, "lora_A") for m in fresh.modules())
