"""Registration, dispatch and the light plugin import."""

from __future__ import annotations

import subprocess
import sys

from qflux.plugins import build_registry
from qflux.types import TrainerInfo


def test_plugin_import_does_not_import_torch():
    code = (
        "import sys, qflux_qwen, qflux_qwen.plugin\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registers_three_trainers():
    from qflux_qwen import plugin

    registry = build_registry(extra_plugins=[("qwen", plugin)], load_entry_points=False)
    assert {"qwen-edit", "qwen-edit-plus", "qwen-edit-2511"} <= set(registry.trainers)
    edit, plus, z = (registry.trainer(n) for n in ("qwen-edit", "qwen-edit-plus", "qwen-edit-2511"))
    assert edit.pipeline == "diffusers.QwenImageEditPipeline" and edit.max_controls == 1
    assert plus.pipeline == z.pipeline == "diffusers.QwenImageEditPlusPipeline"
    assert plus.max_controls == z.max_controls == 3
    assert (edit.default_model, plus.default_model, z.default_model) == (
        "Qwen/Qwen-Image-Edit",
        "Qwen/Qwen-Image-Edit-2509",
        "Qwen/Qwen-Image-Edit-2511",
    )
    record = next(r for r in registry.plugins if r.name == "qwen")
    assert record.kind == "trainer"
    assert {"qflux_load_transformer", "qflux_load_encoders", "qflux_encode", "qflux_predict", "qflux_sample"} <= set(
        record.hooks
    )


def test_other_trainers_get_none(model_config):
    from qflux.types import ModelBundle, SampleRequest
    from qflux_qwen import plugin

    other = TrainerInfo(name="kontext", family="flux-kontext", description="", pipeline="diffusers.FluxKontextPipeline")
    model = model_config()
    assert plugin.qflux_load_transformer(trainer=other, model=model) is None
    assert plugin.qflux_load_encoders(trainer=other, model=model) is None
    assert plugin.qflux_encode(trainer=other, encoders=None, samples=[], model=model, empty_prompt=False) is None
    assert plugin.qflux_predict(trainer=other, transformer=None, batch=None, noisy=None, model=model) is None
    bundle = ModelBundle(trainer=other, model=model, transformer=None)
    assert plugin.qflux_sample(bundle=bundle, request=SampleRequest(prompt="x")) is None
