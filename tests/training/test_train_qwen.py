"""End to end on the tiny Qwen-Image-Edit trainers (qwen-edit, qwen-edit-plus = 2509, qwen-edit-2511):

- the exported LoRA loads with the matching diffusers pipeline's ``load_lora_weights`` and reproduces the
  trained model (transformer outputs within 1e-5, and the same sampled image for the same seed);
- batches larger than one whose samples differ in target size and control count (0, 1, 2) train: each batch
  holds one target grid, a batch of several control layouts makes one forward per layout (each forward of
  one layout), every sample is seen, a sample's prediction inside its padded batch equals its prediction
  alone, and a sample without control trains as text-to-image;
- validation sampling during training with true CFG and a negative prompt writes the grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import qflux
from qflux.adapters.lora_files import attach_lora, load_lora_state
from qflux.config import load_config
from qflux.plugins import build_registry
from qflux.run.train import train
from qflux.testing import single_torch_thread, spied_registry, tiny_config, write_config
from qflux.training.validation import LABEL_HEIGHT
from qflux.types import Batch, ModelBundle, NoisyInput, PromptEmbeds, SampleRequest


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box they lose a lot."""
    with single_torch_thread():
        yield


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


# --------------------------------------------------------------------------- the LoRA in diffusers


@pytest.mark.parametrize("name", ["qwen-edit", "qwen-edit-plus", "qwen-edit-2511"])
def test_exported_lora_loads_in_pipeline_and_reproduces_trained_model(name, tmp_path, make_config):
    import diffusers

    from qflux_qwen.predict import forward
    from qflux_qwen.tiny import save_tiny
    from qflux_qwen.variants import VARIANTS

    variant = VARIANTS[name]
    # alpha != rank: the pipeline must pick the scale (alpha / rank) up from the file's adapter metadata
    lora = {"rank": 4, "alpha": 8, "targets": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                "add_v_proj", "to_add_out", "img_mlp.net.2", "txt_mlp.net.2"]}
    config = make_config(name, model={"lora": lora}, data={"num_samples": 4, "holdout": 0},
                         train={"max_steps": 3, "save_every": 0, "lr": 5e-3})
    result = train(config)
    exported = load_file(str(result.lora_path))
    assert exported and all(k.startswith("transformer.") and ".lora_" in k for k in exported)

    # the trained model, rebuilt the way qflux holds it: base + the LoRA tensors of the run
    registry = build_registry()
    trainer = registry.trainer(name)
    ours = trainer.load_transformer(config.model)
    attach_lora(ours, config.model.lora)
    load_lora_state(ours, result.lora)  # the unbaked tensors (the export has alpha / rank baked into lora_B)
    ours.eval()

    pipe = getattr(diffusers, variant.pipeline_class_name).from_pretrained(
        str(save_tiny(tmp_path / "tiny", name)), torch_dtype=torch.float32)
    assert bool(pipe.transformer.config.zero_cond_t) == variant.zero_cond_t

    # transformer outputs on the same inputs: a batch of 2 (second prompt right-padded), 1 or 2 controls
    g = torch.Generator().manual_seed(0)
    grid, control_grids = (2, 3), [(2, 2)] + ([(1, 3)] if variant.multi_image else [])
    latents = torch.randn(2, 6, 64, generator=g)
    controls = [torch.randn(2, h * w, 64, generator=g) for h, w in control_grids]
    prompt = torch.randn(2, 9, 64, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    sigmas = torch.tensor([0.3, 0.8])
    # and the image sampled through Trainer.sample (the pipeline's denoising loop, true CFG) for the same seed
    encoders = trainer.load_encoders(config.model)
    request = SampleRequest(prompt="make the red circle blue",
                            controls=[noise_image(32, 32, 1)] + ([noise_image(48, 32, 2)] if variant.multi_image else []),
                            height=32, width=48, steps=3, seed=5, true_cfg=2.0, negative_prompt="blurry")

    def sample_with(transformer) -> np.ndarray:
        bundle = ModelBundle(trainer, config.model, transformer, encoders)
        image = bundle.trainer.sample(bundle, request)
        assert image.size == (48, 32)
        return np.asarray(image, dtype=np.int16)

    with torch.no_grad():
        base = forward(pipe.transformer, latents, sigmas, prompt, mask, controls, grid, control_grids)
        image_base = sample_with(pipe.transformer)
        pipe.load_lora_weights(str(result.lora_path))
        theirs = forward(pipe.transformer, latents, sigmas, prompt, mask, controls, grid, control_grids)
        mine = forward(ours, latents, sigmas, prompt, mask, controls, grid, control_grids)
    assert (mine - theirs).abs().max() <= 1e-5
    assert (base - theirs).abs().max() > 1e-3  # the LoRA changed the model
    image_theirs, image_ours = sample_with(pipe.transformer), sample_with(ours)
    assert np.abs(image_ours - image_theirs).max() <= 1  # the same image, up to uint8 rounding
    assert np.abs(image_base - image_theirs).max() > 2  # which the LoRA changed


# --------------------------------------------------------------------------- mixed batches


# stem -> (target (w, h), control sizes (w, h), prompt): targets go to the buckets 32x32 and 32 wide x 48 high
MIXED = {
    "one_a": ((32, 32), [(32, 32)], "make it red"),
    "one_b": ((40, 40), [(32, 32)], "turn the big square into a small blue circle on the left"),
    "two_a": ((32, 32), [(32, 32), (64, 32)], "put the circle of picture 2 into picture 1"),
    "two_b": ((32, 32), [(32, 32), (64, 32)], "swap"),
    "tall_a": ((64, 96), [(32, 48)], "move the green triangle down"),
    "tall_b": ((32, 48), [(32, 48)], "make the background white and the square much larger than before"),
    "t2i_a": ((32, 32), [], "a red circle"),
    "t2i_b": ((32, 32), [], "a yellow triangle under a purple square on a grey background"),
    "odd": ((32, 48), [(32, 48), (32, 32)], "add a second shape"),  # a second control layout in the tall bucket
}
# the token grids (h/16, w/16) these give: target, then each control (a 64x32 control_1 at the target's
# 32x32 area keeps its aspect: 48x16)
SIGNATURES = {
    "one_a": ((2, 2), ((2, 2),)), "one_b": ((2, 2), ((2, 2),)),
    "two_a": ((2, 2), ((2, 2), (1, 3))), "two_b": ((2, 2), ((2, 2), (1, 3))),
    "tall_a": ((3, 2), ((3, 2),)), "tall_b": ((3, 2), ((3, 2),)),
    "t2i_a": ((2, 2), ()), "t2i_b": ((2, 2), ()),
    "odd": ((3, 2), ((3, 2), (2, 2))),
}


def make_mixed_folder(root: Path, stems: list[str]) -> Path:
    """The qflux folder layout: training_images/<stem>.png + .txt, control_images/<stem>.png, <stem>_control_1.png."""
    (root / "training_images").mkdir(parents=True)
    (root / "control_images").mkdir()
    for i, stem in enumerate(stems):
        size, controls, prompt = MIXED[stem]
        noise_image(*size, seed=10 * i).save(root / "training_images" / f"{stem}.png")
        (root / "training_images" / f"{stem}.txt").write_text(prompt)
        for j, control in enumerate(controls):
            name = stem if j == 0 else f"{stem}_control_{j}"
            noise_image(*control, seed=10 * i + j + 1).save(root / "control_images" / f"{name}.png")
    return root


def _one(batch: Batch, noisy: NoisyInput, i: int) -> tuple[Batch, NoisyInput]:
    """Sample ``i`` of a batch as a batch of one, its prompt without the padding."""
    mask = batch.prompt.mask
    n = int(mask[i].sum()) if mask is not None else batch.prompt.hidden.shape[1]
    alone = Batch(keys=[batch.keys[i]], latents=batch.latents[i : i + 1], grid=batch.grid,
                  prompt=PromptEmbeds(hidden=batch.prompt.hidden[i : i + 1, :n],
                                      mask=None if mask is None else mask[i : i + 1, :n]),
                  controls=[c[i : i + 1] for c in batch.controls], control_grids=list(batch.control_grids),
                  mask=None if batch.mask is None else batch.mask[i : i + 1])
    return alone, NoisyInput(latents=noisy.latents[i : i + 1], sigmas=noisy.sigmas.reshape(-1)[i : i + 1],
                             target=noisy.target[i : i + 1])


class BatchSpy:
    """Records every forward's batch (one control layout) and checks that each sample's prediction in the
    (padded) batch equals its prediction alone."""

    def __init__(self, variant) -> None:
        self.variant = variant
        self.batches: list[dict] = []
        self.max_diff = 0.0

    def predict(self, inner, transformer, batch, noisy, model):
        from qflux_qwen.predict import predict

        result = inner(transformer, batch, noisy, model)
        prediction = result.detach()
        assert torch.isfinite(prediction).all()
        self.batches.append({"keys": list(batch.keys), "signature": (batch.grid, tuple(batch.control_grids)),
                             "controls": len(batch.controls),
                             "padded": batch.prompt.mask is not None and not bool(batch.prompt.mask.all())})
        if batch.size > 1:
            with torch.no_grad():
                for i in range(batch.size):
                    alone = predict(self.variant, transformer, *_one(batch, noisy, i))
                    self.max_diff = max(self.max_diff, float((alone[0] - prediction[i]).abs().max()))
        return result


class StepSpy:
    """Records the whole batch of every training step: the loss hook sees it once per step, mixed or not
    (returns None: the default loss computes it)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    @qflux.hookimpl
    def qflux_loss(self, prediction, noisy, batch, loss):
        assert prediction.shape == batch.latents.shape
        layouts = [tuple(g) for g in batch.sample_control_grids] if batch.mixed else [tuple(batch.control_grids)]
        self.steps.append({"keys": list(batch.keys), "grid": batch.grid, "layouts": set(layouts)})
        return None


@pytest.mark.parametrize("name", ["qwen-edit-plus", "qwen-edit"])
def test_batches_mix_sizes_control_counts_and_text_to_image(name, tmp_path):
    from qflux_qwen.variants import VARIANTS

    variant = VARIANTS[name]
    stems = [s for s in MIXED if len(MIXED[s][1]) <= variant.max_controls]
    data = make_mixed_folder(tmp_path / "data", stems)
    buckets = sorted({SIGNATURES[s][0] for s in stems})
    bucket_sizes = [sum(SIGNATURES[s][0] == grid for s in stems) for grid in buckets]
    expected_steps = sum(-(-n // 2) for n in bucket_sizes)  # batches of 2 per target grid, one epoch
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, name,
        data={"path": str(data), "resolution": [[16 * h, 16 * w] for h, w in buckets], "holdout": 0},
        train={"max_steps": expected_steps, "batch_size": 2, "save_every": 0, "lr": 1e-3})))
    spy, steps = BatchSpy(variant), StepSpy()
    result = train(config, registry=spied_registry(spy, extra_plugins=[("steps", steps)]))

    assert result.steps == expected_steps and result.lora_path.is_file()
    assert all(np.isfinite(result.losses))
    assert len(steps.steps) == expected_steps
    for s in steps.steps:  # one target grid per batch, the one its samples have; control layouts may differ
        assert {SIGNATURES[k][0] for k in s["keys"]} == {s["grid"]}, s
        assert s["layouts"] == {SIGNATURES[k][1] for k in s["keys"]}, s
        assert len(s["keys"]) == len(set(s["keys"])), s
    for grid, n in zip(buckets, bucket_sizes):  # full batches of 2, an odd bucket's last sample alone
        assert sorted(len(s["keys"]) for s in steps.steps if s["grid"] == grid) == [1] * (n % 2) + [2] * (n // 2)
    assert sorted(k for s in steps.steps for k in s["keys"]) == sorted(stems)  # every sample once in the epoch
    assert len(spy.batches) == sum(len(s["layouts"]) for s in steps.steps)  # one forward per layout of a step
    assert any(len(s["layouts"]) > 1 for s in steps.steps)  # (seed 0) some batch mixes control layouts
    for b in spy.batches:  # each forward holds one layout: the one its samples have
        assert {SIGNATURES[k] for k in b["keys"]} == {b["signature"]}, b
    assert {b["signature"][0] for b in spy.batches} == {(2, 2), (3, 2)}
    assert {b["controls"] for b in spy.batches} == ({0, 1, 2} if variant.multi_image else {0, 1})
    t2i = [k for b in spy.batches if b["controls"] == 0 for k in b["keys"]]
    assert sorted(t2i) == ["t2i_a", "t2i_b"]  # trained as text-to-image
    assert any(b["padded"] for b in spy.batches)  # prompts of different length were padded ...
    assert spy.max_diff <= 1e-5  # ... and padding changes no sample's prediction


# --------------------------------------------------------------------------- validation sampling


class SampleSpy:
    def __init__(self) -> None:
        self.requests: list[SampleRequest] = []

    def sample(self, inner, bundle, request, **encoded):
        self.requests.append(request)
        image = inner(bundle, request, **encoded)
        assert image is not None
        return image


def test_validation_sampling_with_true_cfg_and_negative_prompt_writes_grids(tmp_path):
    controls = [tmp_path / "c0.png", tmp_path / "c1.png"]
    noise_image(32, 32, 1).save(controls[0])
    noise_image(48, 32, 2).save(controls[1])
    validation = {"every": 2, "steps": 2, "true_cfg": 4.0, "from_holdout": 1,
                  "samples": [{"control": [str(c) for c in controls], "prompt": "put picture 2 into picture 1",
                               "negative_prompt": "blurry, low quality"}]}
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, "qwen-edit-plus", data={"num_samples": 4, "holdout": 1}, validation=validation,
        train={"max_steps": 2, "save_every": 0})))
    spy = SampleSpy()
    result = train(config, registry=spied_registry(spy))

    run = tmp_path / "run"
    assert result.lora_path.is_file()
    for step in (0, 2):
        grid = Image.open(run / "samples" / f"step-{step:06d}.png")
        row = 256 + 2 * LABEL_HEIGHT  # tiles plus the label bands above and below them
        assert grid.height == 2 * row + 4  # one row per case: the configured sample, the held-out one
    assert len(spy.requests) == 4  # 2 cases x (step 0, step 2)
    configured = [r for r in spy.requests if r.prompt == "put picture 2 into picture 1"]
    assert len(configured) == 2
    for r in configured:
        assert r.true_cfg == 4.0 and r.negative_prompt == "blurry, low quality" and len(r.controls) == 2
        assert (r.width, r.height) == (32, 32) and r.steps == 2
