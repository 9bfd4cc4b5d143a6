"""``qflux import ai-toolkit|musubi``: a peer's configuration becomes a valid qflux config, and every setting that
could not be carried over is named (real-shaped example configs in tests/fixtures/peers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qflux.config.load import validate
from qflux.errors import ConfigError
from qflux.importers.ai_toolkit import from_ai_toolkit
from qflux.importers.musubi import from_musubi, read_dataset_toml

PEERS = Path(__file__).resolve().parent / "fixtures" / "peers"


def _job(name: str) -> dict:
    return yaml.safe_load((PEERS / name).read_text())


def test_ai_toolkit_kontext_job_maps_every_training_setting():
    result = from_ai_toolkit(_job("ai-toolkit-kontext.yaml"), PEERS / "ai-toolkit-kontext.yaml")
    config = validate(result.config, "import")
    assert config.trainer == "kontext"
    assert config.model.pretrained == "black-forest-labs/FLUX.1-Kontext-dev"
    assert (config.model.lora.rank, config.model.lora.alpha) == (32, 16.0)
    assert config.model.quantize == "fp8"  # ai-toolkit's default qtype qfloat8 is a float8 weight format
    assert config.model.dtype == "bfloat16" and config.model.gradient_checkpointing
    assert config.data.path == "/data/pairs/targets" and config.data.control_path == "/data/pairs/controls"
    assert config.data.resolution == 768 and config.data.caption_dropout == 0.05
    assert (config.train.max_steps, config.train.lr, config.train.optimizer) == (3000, 1e-4, "adamw8bit")
    assert (config.train.save_every, config.train.keep_checkpoints) == (250, 4)
    assert config.output.dir == "output/kontext_smile_v1"
    assert (config.validation.every, config.validation.steps, config.model.options) == (250, 20, {"sample_guidance": 4.0})
    assert [(s.prompt, s.control) for s in config.validation.samples] == [
        ("make the person smile", ["/data/val/person1.jpg"]), ("give the person an afro", ["/data/val/person2.jpg"])]
    notes = "\n".join(result.not_carried)
    for setting in ("trigger_word", "timestep_type=weighted", "resolution=[512, 768]", "save.dtype",
                    "sample.width/height", "save.push_to_hub", "shuffle_tokens", "control size"):
        assert setting in notes, setting


def test_ai_toolkit_two_control_folders_become_a_control_path_list():
    result = from_ai_toolkit(_job("ai-toolkit-qwen-edit-plus.yaml"), PEERS / "ai-toolkit-qwen-edit-plus.yaml")
    config = validate(result.config, "import")
    assert config.trainer == "qwen-edit-plus"
    assert list(config.data.control_path) == ["/data/control_a", "/data/control_b"]
    assert config.train.grad_accum == 2
    assert config.validation.true_cfg == 3.0  # Qwen's guidance_scale is true CFG, not a guidance embedding
    sample = config.validation.samples[0]
    assert sample.control == ["/data/val/person.jpg", "/data/val/jacket.jpg"] and sample.negative_prompt == "blurry"
    notes = "\n".join(result.not_carried)
    assert "model.qtype=uint3" in notes and "model.quantize_te" in notes


def test_ai_toolkit_refuses_a_model_it_cannot_train(tmp_path):
    job = _job("ai-toolkit-kontext.yaml")
    job["config"]["process"][0]["model"]["arch"] = "wan21"
    with pytest.raises(ConfigError, match="wan21 has no qflux trainer"):
        from_ai_toolkit(job, tmp_path / "job.yaml")


def _kontext_job(network: dict | None = None, **train) -> dict:
    job = _job("ai-toolkit-kontext.yaml")
    process = job["config"]["process"][0]
    if network is not None:
        process["network"] = network
    process["train"].update(train)
    return job


def _lokr_factors(options: dict) -> tuple[dict, float]:
    """The factors peft's LoKr gives a tiny FLUX's ``to_q`` (32 -> 32) with the imported options, and its scale."""
    from diffusers import FluxTransformer2DModel

    from qflux.adapters import lycoris_files
    from qflux.adapters.lycoris import LokrOptions

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=0,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    lycoris_files.attach(model, "lokr", LokrOptions.model_validate(options))
    state = lycoris_files.state_dict(model, "lokr")
    prefix = "transformer_blocks.0.attn.to_q."
    return ({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
            model.transformer_blocks[0].attn.to_q.scaling["default"])


def test_ai_toolkit_full_rank_lokr_becomes_qflux_lokr_with_full_factors():
    # ai-toolkit's README LoKr: full rank, factor 8 (its quantized base is left out: qflux's LoKr needs full precision)
    network = {"type": "lokr", "lokr_full_rank": True, "lokr_factor": 8, "linear": 16, "linear_alpha": 16}
    result = from_ai_toolkit(_kontext_job(network), PEERS / "ai-toolkit-kontext.yaml")
    config = validate(result.config, "import")
    assert config.model.adapter == "lokr" and config.model.quantize is None
    assert config.model.adapter_options == {"init": "lycoris", "rank": 9_999_999_999, "alpha": 9_999_999_999.0,
                                            "decompose_factor": 8}
    notes = "\n".join(result.not_carried)
    assert "model.quantize=fp8" in notes and "network.type" not in notes and "network.lokr" not in notes
    # ai-toolkit's LokrModule on a 32 -> 32 Linear with factor 8: sides 32 = 8 x 4, w1 (8, 8) and w2 (4, 4), both
    # full matrices, w2 at zero, scale 1
    factors, scale = _lokr_factors(config.model.adapter_options)
    assert {k: tuple(v.shape) for k, v in factors.items()} == {"lokr_w1": (8, 8), "lokr_w2": (4, 4)}
    assert not factors["lokr_w2"].any() and factors["lokr_w1"].any() and scale == 1.0


def test_ai_toolkit_lokr_rank_alpha_and_factor():
    network = {"type": "lokr", "linear": 2, "linear_alpha": 1, "lokr_factor": -1, "conv": 4}
    result = from_ai_toolkit(_kontext_job(network), PEERS / "ai-toolkit-kontext.yaml")
    config = validate(result.config, "import")
    assert config.model.adapter_options == {"init": "lycoris", "rank": 2, "alpha": 1.0, "decompose_factor": -1}
    notes = "\n".join(result.not_carried)
    assert "network.conv:" in notes and "network.linear_alpha=1" in notes  # full factors: ai-toolkit's scale is 1
    # near the square root: 32 = 4 x 8; w2 (8 x 8) decomposed at rank 2 (2 < 8 / 2), scale alpha / rank
    factors, scale = _lokr_factors(config.model.adapter_options)
    assert {k: tuple(v.shape) for k, v in factors.items()} == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2),
                                                               "lokr_w2_b": (2, 8)}
    assert not factors["lokr_w2_b"].any() and scale == 0.5


def test_ai_toolkit_prodigy_runs_at_ai_toolkits_lr_and_eps():
    pytest.importorskip("prodigyopt")
    from qflux.training.optim import build_optimizer

    job = _kontext_job(optimizer="prodigy", optimizer_params={"weight_decay": 0.01, "d_coef": 2})
    result = from_ai_toolkit(job, PEERS / "ai-toolkit-kontext.yaml")
    config = validate(result.config, "import")
    assert (config.train.optimizer, config.train.lr, config.train.weight_decay) == ("prodigy", 1.0, 0.01)
    assert config.train.optimizer_args == {"eps": 1e-6, "d_coef": 2}
    assert "train.lr=1e-4: ai-toolkit runs Prodigy at lr 1.0" in "\n".join(result.not_carried)
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config.train).param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"], group["d_coef"]) == (1.0, 1e-6, 0.01, 2)
    # no optimizer_params: Prodigy's own weight decay (0), not qflux's default
    plain = validate(from_ai_toolkit(_kontext_job(optimizer="Prodigy", lr=0.5), PEERS / "x.yaml").config, "import")
    assert (plain.train.optimizer, plain.train.lr, plain.train.weight_decay) == ("prodigy", 0.5, 0.0)


def test_ai_toolkit_adafactor_is_transformers_with_a_fixed_lr():
    from qflux.training.optim import build_optimizer

    result = from_ai_toolkit(_kontext_job(optimizer="adafactor", optimizer_params={"weight_decay": 0.01}),
                             PEERS / "ai-toolkit-kontext.yaml")
    config = validate(result.config, "import")
    assert config.train.optimizer == "transformers.optimization.Adafactor"
    assert config.train.optimizer_args == {"scale_parameter": False, "relative_step": False, "warmup_init": False,
                                           "weight_decay": 0.01}
    assert "train.optimizer=adafactor: imported as" in "\n".join(result.not_carried)
    param = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer = build_optimizer([param], config.train)
    param.grad = torch.ones(4, 4)
    optimizer.step()  # ai-toolkit's update: the RMS-normalised gradient times lr, from zero weights too
    torch.testing.assert_close(param.detach(), torch.full((4, 4), -1e-4))


def test_ai_toolkit_optimizers_without_an_equivalent_stay_reported():
    result = from_ai_toolkit(_kontext_job(optimizer="prodigy8bit", optimizer_params={"d_coef": 2}), PEERS / "x.yaml")
    config = validate(result.config, "import")
    assert config.train.optimizer == "adamw" and config.train.optimizer_args == {}
    notes = "\n".join(result.not_carried)
    assert "train.optimizer=prodigy8bit: no qflux equivalent" in notes
    assert "train.optimizer_params: the optimizer was not imported" in notes
    adamw = from_ai_toolkit(_kontext_job(optimizer="adamw", optimizer_params={"weight_decay": 0.05,
                                                                              "betas": [0.9, 0.99]}), PEERS / "x.yaml")
    config = validate(adamw.config, "import")
    assert (config.train.weight_decay, config.train.optimizer_args) == (0.05, {"betas": [0.9, 0.99]})


def test_musubi_dataset_and_arguments(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    for i in range(10):
        (targets / f"{i}.png").write_bytes(b"")  # only counted, to turn epochs into steps
    toml = read_dataset_toml(PEERS / "musubi-dataset.toml")
    toml["datasets"][0]["image_directory"] = str(targets)
    args = ("src/musubi_tuner/qwen_image_train_network.py --dit /m/dit.safetensors --vae /m/vae.safetensors "
            "--text_encoder /m/qwen_2.5_vl_7b.safetensors --model_version edit-2511 --dataset_config d.toml "
            "--sdpa --mixed_precision bf16 --timestep_sampling shift --weighting_scheme none "
            "--discrete_flow_shift 2.2 --optimizer_type adamw8bit --learning_rate 5e-5 --gradient_checkpointing "
            "--network_module networks.lora_qwen_image --network_dim 16 --max_train_epochs 4 "
            "--save_every_n_epochs 1 --seed 42 --output_dir /runs --output_name edit-lora --blocks_to_swap 16")
    result = from_musubi(toml, [args], PEERS / "musubi-dataset.toml")
    config = validate(result.config, "import")
    assert config.trainer == "qwen-edit-2511"
    assert config.data.path == str(targets) and config.data.control_path == "/data/edit/controls"
    assert config.data.resolution == 1024 and config.data.control_resolution == 1024
    assert (config.train.timestep_sampling, config.train.shift) == ("shift", 2.2)
    assert (config.train.lr, config.train.seed, config.model.lora.rank) == (5e-5, 42, 16)
    assert config.train.max_steps == 40  # 4 epochs x 10 images at batch 1
    assert config.output.dir == "/runs/edit-lora"
    notes = "\n".join(result.not_carried)
    for setting in ("--dit", "--blocks_to_swap", "--save_every_n_epochs", "cache_directory"):
        assert setting in notes, setting
    assert "--sdpa" not in notes  # kernel choices are not settings of the run


def test_musubi_without_a_model_version_says_how_to_pass_the_arguments():
    with pytest.raises(ConfigError, match="--model_version"):
        from_musubi(read_dataset_toml(PEERS / "musubi-dataset.toml"), [], PEERS / "musubi-dataset.toml")


def test_cli_writes_a_config_that_config_check_accepts(run_qflux, tmp_path):
    from PIL import Image

    # the example's paths, moved under tmp_path so that `config check` finds the validation images
    job = tmp_path / "job.yaml"
    job.write_text((PEERS / "ai-toolkit-kontext.yaml").read_text().replace("/data/", f"{tmp_path}/data/"))
    for name in ("person1.jpg", "person2.jpg"):
        (tmp_path / "data" / "val").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), "gray").save(tmp_path / "data" / "val" / name)
    out = tmp_path / "imported.yaml"
    done = run_qflux("import", "ai-toolkit", job, "--out", out, plugins=None)
    assert done.returncode == 0, done.stderr
    assert "not carried over" in done.stderr and "trigger_word" in done.stderr
    check = run_qflux("config", "check", out, plugins=None)
    assert check.returncode == 0, check.stderr
    again = run_qflux("import", "ai-toolkit", job, "--out", out, plugins=None)
    assert again.returncode == 2 and "exists" in again.stderr


def test_cli_musubi_takes_the_training_arguments_after_a_double_dash(run_qflux):
    done = run_qflux("import", "musubi", PEERS / "musubi-dataset.toml", "--", "--model_version", "edit-2509",
                     "--network_dim", "8", plugins=None)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert config["trainer"] == "qwen-edit-plus" and config["model"]["lora"]["rank"] == 8


def test_cli_bad_file_is_one_line_exit_2(run_qflux, tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("just: a mapping\n")
    done = run_qflux("import", "ai-toolkit", bad, plugins=None)
    assert done.returncode == 2 and "not an ai-toolkit job file" in done.stderr
    assert "Traceback" not in done.stderr
