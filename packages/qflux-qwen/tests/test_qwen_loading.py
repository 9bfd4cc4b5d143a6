"""Loading from a diffusers folder: same outputs as builtin:tiny; clear UserErrors for bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qflux.errors import UserError


def test_folder_loads_identical_to_builtin(plus_folder, variants, encoders, transformers_, model_config, image):
    from qflux.types import EditSample
    from qflux_qwen.encoding import encode_samples
    from qflux_qwen.loading import load_encoders, load_transformer

    variant = variants["qwen-edit-plus"]
    model = model_config(pretrained=str(plus_folder))
    transformer = load_transformer(variant, model)
    built = transformers_["qwen-edit-plus"].state_dict()
    loaded = transformer.state_dict()
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)
    assert not any(p.requires_grad for p in transformer.parameters()) and not transformer.training

    folder_encoders = load_encoders(variant, model)
    sample = EditSample(key="s", prompt="make the circle red", target=image(32, 32, 0), controls=[image(32, 48, 1)])
    a = encode_samples(variant, encoders, [sample], model_config(), empty_prompt=False)[0]
    b = encode_samples(variant, folder_encoders, [sample], model, empty_prompt=False)[0]
    assert torch.equal(a.latents, b.latents) and torch.equal(a.controls[0], b.controls[0])
    assert torch.equal(a.prompt.hidden, b.prompt.hidden) and torch.equal(a.prompt.mask, b.prompt.mask)


def test_dtype_and_2511_zero_cond_t_from_folder(plus_folder, variants, model_config):
    from qflux_qwen.loading import load_transformer

    model = model_config(pretrained=str(plus_folder), dtype="bfloat16")
    plus = load_transformer(variants["qwen-edit-plus"], model)
    z = load_transformer(variants["qwen-edit-2511"], model)
    assert all(p.dtype == torch.bfloat16 for p in z.parameters())
    assert not plus.zero_cond_t and z.zero_cond_t and z.config.zero_cond_t
    assert all(block.zero_cond_t for block in z.transformer_blocks)


def test_wrong_family_folder(tmp_path, variants, model_config):
    from qflux_qwen.loading import load_encoders, load_transformer

    folder = tmp_path / "flux"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    model = model_config(pretrained=str(folder))
    for load in (load_transformer, load_encoders):
        with pytest.raises(UserError) as err:
            load(variants["qwen-edit"], model)
        assert str(folder) in str(err.value) and "FluxKontextPipeline" in str(err.value)


def test_component_of_another_model(plus_folder, tmp_path, variants, model_config):
    from qflux_qwen.loading import load_transformer

    folder = tmp_path / "mixed"
    shutil.copytree(plus_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(UserError) as err:
        load_transformer(variants["qwen-edit-plus"], model_config(pretrained=str(folder)))
    assert str(folder) in str(err.value) and "FluxTransformer2DModel" in str(err.value)


@pytest.mark.parametrize("component", ["processor", "text_encoder", "vae"])
def test_missing_component(plus_folder, tmp_path, variants, model_config, component):
    from qflux_qwen.loading import load_encoders

    folder = tmp_path / "partial"
    shutil.copytree(plus_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(folder / component)
    with pytest.raises(UserError) as err:
        load_encoders(variants["qwen-edit-plus"], model_config(pretrained=str(folder)))
    assert str(folder) in str(err.value) and f"'{component}'" in str(err.value)


def test_missing_weights_and_transformer(plus_folder, tmp_path, variants, model_config):
    from qflux_qwen.loading import load_transformer

    folder = tmp_path / "noweights"
    shutil.copytree(plus_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError) as err:
        load_transformer(variants["qwen-edit-plus"], model_config(pretrained=str(folder)))
    assert str(folder) in str(err.value) and "transformer" in str(err.value)
    shutil.rmtree(folder / "transformer")
    with pytest.raises(UserError, match="missing the component 'transformer'"):
        load_transformer(variants["qwen-edit-plus"], model_config(pretrained=str(folder)))


@pytest.mark.parametrize("pretrained", ["./no/such/folder", "builtin:huge", "not a model id"])
def test_bad_sources(variants, model_config, pretrained):
    from qflux_qwen.loading import load_transformer

    with pytest.raises(UserError, match="model.pretrained"):
        load_transformer(variants["qwen-edit"], model_config(pretrained=pretrained))
