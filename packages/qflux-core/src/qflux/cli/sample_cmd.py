"""``qflux sample --config FILE --lora PATH --image IMG [--image IMG2 ...] --prompt TEXT --out OUT.png``."""

from __future__ import annotations

from pathlib import Path

import typer

from qflux.cli.config_cmd import SET_HELP
from qflux.cli.options import config_argument, config_option, path_option, pick_config
from qflux.config import load_config
from qflux.data.resize import MULTIPLE, default_size
from qflux.errors import UserError

SIZE_HELP = ("Output {side} in pixels (rounded down to a multiple of 16). Default: planned as in training, from "
             "the sizes the --lora file records, else the config's data section; with only one of --width/--height "
             "the other keeps the planned aspect.")


def output_size(planned: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """``planned`` (w, h), or the --width/--height given (multiples of 16; one alone keeps the aspect)."""
    if width is None and height is None:
        return planned
    if width is None:
        width = round(height * planned[0] / planned[1])
    elif height is None:
        height = round(width * planned[1] / planned[0])
    return max(MULTIPLE, width // MULTIPLE * MULTIPLE), max(MULTIPLE, height // MULTIPLE * MULTIPLE)


def sample(
    file: Path | None = config_argument(),
    config: Path | None = config_option("YAML config of the model (its trainer and model section; or FILE)."),
    lora: Path | None = path_option("--lora", help="LoRA file (pytorch_lora_weights.safetensors)."),
    image: list[Path] = path_option("--image", help="Control image; repeat for multi-image models.", default=[]),
    prompt: str = typer.Option(..., "--prompt", help="Edit instruction."),
    out: Path = path_option("--out", help="Where to write the PNG.", default=...),
    steps: int = typer.Option(28, "--steps", min=1),
    seed: int = typer.Option(0, "--seed"),
    guidance: float | None = typer.Option(None, "--guidance", help="Distilled guidance of a guidance-distilled "
                                          "model (Kontext); default: the trainer's (model.options)."),
    true_cfg: float = typer.Option(1.0, "--true-cfg", help="> 1 enables true CFG with --negative-prompt."),
    negative_prompt: str = typer.Option("", "--negative-prompt"),
    trainer: str | None = typer.Option(None, "--trainer", help="Override the config's trainer."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    width: int | None = typer.Option(None, "--width", min=16, help=SIZE_HELP.format(side="width")),
    height: int | None = typer.Option(None, "--height", min=16, help=SIZE_HELP.format(side="height")),
) -> None:
    """Edit IMG with the base model plus a LoRA and write the result to OUT.

    Sizes are planned as in training: from the sizes the --lora file was trained with (its
    qflux.training_sizes metadata) when it records them, else from the config's data section. The output
    gets the size a target of IMG's size trained at (no image: data.resolution), the control the size
    training fed it (by default the trainer's pipeline rule); --width/--height set the output size."""
    from PIL import Image

    from qflux.data import load_sample
    from qflux.data.records import FileImage, SampleRecord
    from qflux.plugins import build_registry
    from qflux.run.models import Selection
    from qflux.run.preflight import check_capabilities, check_model_source, check_plugins, check_writable
    from qflux.types import SampleRequest

    cfg = load_config(pick_config(file, config, "sample"), set_, trainer)
    registry = build_registry()
    check_plugins(cfg, registry)
    selection = Selection.of(cfg, registry)
    info = selection.trainer.info
    check_capabilities(cfg, selection.trainer, "qflux sample")
    if selection.quantizer is not None:
        selection.quantizer.check(cfg.model)
    for path in image:
        if not path.is_file():
            raise UserError(f"--image: file not found: {path}")
    if len(image) > info.max_controls:
        raise UserError(f"trainer '{info.name}' takes at most {info.max_controls} control image(s), got {len(image)}")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise UserError(f"--out {out}: unknown image type '{out.suffix}'; use a .png, .jpg or .webp file name")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'edit.png'}")
    check_writable(out.parent, "--out")
    from qflux.adapters.lora_files import lora_file_shapes

    if lora is not None:
        lora_file_shapes(lora)  # a missing or non-safetensors file fails before any model loads
    check_model_source(cfg, info.pipeline, info.name)
    refs = tuple(FileImage(p) for p in image)
    record = SampleRecord(key="sample", prompt=prompt, target=refs[0] if refs else None, controls=refs)
    data, sizes_from = cfg.data, "the config's data section"
    if lora is not None:
        from qflux.adapters.lora_files import read_lora_metadata
        from qflux.data.trained_sizes import trained_data

        if (trained := trained_data(cfg.data, read_lora_metadata(lora), f"--lora {lora}")) is not None:
            data, sizes_from = trained, f"the sizes {lora.name} was trained with"
    request_sample = load_sample(record, data, info.condition_sizing)
    planned = request_sample.target.size if request_sample.target is not None else default_size(data)
    width, height = output_size(planned, width, height)
    if (width, height) != planned:
        sizes_from = "--width/--height"

    request = SampleRequest(prompt=prompt, controls=request_sample.controls, height=height, width=width, steps=steps,
                            seed=seed, guidance=guidance, true_cfg=true_cfg, negative_prompt=negative_prompt,
                            vl_controls=request_sample.vl_controls)
    result = render(selection, cfg, lora, request)
    from qflux.training.validation import save_image

    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(result, out, "sample-before-rename")  # a temporary file renamed over --out: never a partial image
    if result.size != (width, height):  # a model whose sides need a coarser multiple (Qwen-Image 2.1: 32) floors them
        sizes_from += f", floored by the {selection.trainer.name} trainer from {width}x{height}"
    width, height = result.size
    typer.echo(f"wrote {out} ({width}x{height}, size from {sizes_from})")


def render(selection, cfg, lora: Path | None, request):
    """The image of ``request``. Encoders never beside the transformer: a trainer with ``Trainer.encode_request``
    encodes the request first, keeps only ``Trainer.decoder``'s part of the encoders (the VAE;
    ``validation.vae_tiling``) and frees the rest, then loads the transformer (quantized, ``lora`` applied),
    denoises and decodes. A trainer without it: the transformer, then the encoders, then ``Trainer.sample``."""
    from qflux.run.models import inference_bundle, load_base
    from qflux.types import ModelBundle

    trainer = selection.trainer
    if not trainer.implements("encode_request"):
        return trainer.sample(inference_bundle(selection, cfg, lora), request)
    encoders = trainer.load_encoders(cfg.model)
    encoded = trainer.encode_request(encoders, request, cfg.model)
    decoder = trainer.decoder(encoders, cfg.validation.vae_tiling)
    del encoders  # the text encoders are freed before the transformer loads
    transformer = load_base(selection, cfg)
    if lora is not None:
        selection.adapter.load_file(transformer, lora)
    bundle = ModelBundle(trainer=trainer, model=cfg.model, transformer=transformer, encoders=decoder)
    return trainer.sample(bundle, request, encoded=encoded)
