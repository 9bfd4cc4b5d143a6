"""Registration, dispatch and the light plugin import."""

from __future__ import annotations

import subprocess
import sys

from qflux.plugins import build_registry


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
    assert edit.info.pipeline == "diffusers.QwenImageEditPipeline" and edit.info.max_controls == 1
    assert plus.info.pipeline == z.info.pipeline == "diffusers.QwenImageEditPlusPipeline"
    assert plus.info.max_controls == z.info.max_controls == 3
    assert (edit.info.default_model, plus.info.default_model, z.info.default_model) == (
        "Qwen/Qwen-Image-Edit",
        "Qwen/Qwen-Image-Edit-2509",
        "Qwen/Qwen-Image-Edit-2511",
    )
    record = next(r for r in registry.plugins if r.name == "qwen")
    assert record.kind == "trainer"
    assert record.hooks == ["qflux_register_trainers"]  # the stages are methods of the registered trainers
    for name in record.trainers:
        trainer = registry.trainer(name)
        assert all(trainer.implements(stage) for stage in ("load_transformer", "load_encoders", "encode", "predict",
                                                            "sample", "scheduler_config"))


