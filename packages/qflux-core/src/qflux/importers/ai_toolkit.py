"""ai-toolkit job files (``job: extension`` / ``config.process[0]`` of ``type: sd_trainer``) -> qflux config.

What maps (ai-toolkit key -> qflux key): ``model.arch`` -> ``trainer``, ``model.name_or_path`` ->
``model.pretrained``, ``model.quantize``/``qtype`` -> ``model.quantize``, ``network.linear``/``linear_alpha`` ->
``model.lora.rank``/``alpha`` (``network.type: lokr`` with ``lokr_factor`` / ``lokr_full_rank``: ``model.adapter:
lokr`` and its ``model.adapter_options``), the first dataset's ``folder_path`` / ``control_path`` (+
``control_path2``, ...) / ``mask_path`` / ``caption_dropout_rate`` / ``resolution`` -> ``data.*``, ``train.*``
(steps, batch size, accumulation, lr, optimizer and ``optimizer_params``, scheduler, warm-up, gradient
checkpointing, dtype, timestep type), ``save.*`` -> checkpoint cadence, ``sample.*`` -> ``validation.*``,
``training_folder``/``name`` -> ``output.dir``. Everything else is listed as not carried over.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qflux.errors import ConfigError
from qflux.importers import ImportResult, optimizer_name

# ai-toolkit's model.arch -> qflux trainer
ARCHS = {
    "flux_kontext": "kontext",
    "qwen_image_edit": "qwen-edit",
    "qwen_image_edit_plus": "qwen-edit-plus",
    "qwen_image_edit_plus2509": "qwen-edit-plus",
    "qwen_image_edit_plus_2509": "qwen-edit-plus",
    "qwen_image_edit_plus2511": "qwen-edit-2511",
    "qwen_image_edit_plus_2511": "qwen-edit-2511",
    "qwen_image_edit_2511": "qwen-edit-2511",
}
# ai-toolkit's optimum-quanto qtype -> the qflux quantizer closest to it
QTYPES = {"qfloat8": "fp8", "float8": "fp8", "qint8": "int8", "int8": "int8", "uint4": "nf4", "qint4": "nf4"}
TIMESTEP_TYPES = {"sigmoid": "sigmoid", "linear": "uniform", "lognorm_blend": "logit_normal"}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
# settings that have no effect on what qflux trains (device placement, logging, UI) and need no note
IGNORED = {"device", "performance_log_every", "type", "noise_scheduler", "train_unet", "sampler", "walk_seed",
           "cache_latents_to_disk", "cache_latents", "cache_text_embeddings", "caption_ext", "low_vram"}
_CTRL_IMG = re.compile(r"\s--ctrl_img(\d*)\s+(\S+)")
# network.lokr_full_rank: ai-toolkit sets the rank and alpha to this. A rank of at least half the larger Kronecker
# factor makes both factors full matrices (LyCORIS' rule, which peft follows), and alpha = rank keeps the scale at
# 1, as ai-toolkit's full factors have it
FULL_RANK = 9_999_999_999
# ai-toolkit's adafactor is transformers' Adafactor (its own copy) with a fixed, external lr. qflux's `adafactor` is
# torch.optim.Adafactor on torch >= 2.5, whose step also scales with the weights' RMS and 1/sqrt(step) (a LoRA's
# zero-initialised factor would hardly move at lr 1e-4), so the import names transformers' class and its switches
ADAFACTOR = "transformers.optimization.Adafactor"
ADAFACTOR_ARGS = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def from_ai_toolkit(job: Any, source: Path) -> ImportResult:
    """The qflux config equivalent to an ai-toolkit job file read from ``source``."""
    process = _process(job, source)
    result = ImportResult()
    _model(process.get("model") or {}, result)
    _network(process.get("network") or {}, result)
    _lokr_base(result)
    _datasets(process.get("datasets") or [], result)
    _train(process.get("train") or {}, result)
    _save(process.get("save") or {}, result)
    _sample(process.get("sample") or {}, result)
    name = (job.get("config") or {}).get("name") or "ai-toolkit-import"
    result.set("output.dir", str(Path(process.get("training_folder") or "output") / str(name)))
    if process.get("trigger_word"):
        result.skip("trigger_word", "qflux does not edit captions: write the trigger word into the .txt files")
    for key in sorted(set(process) - {"model", "network", "datasets", "train", "save", "sample", "training_folder",
                                      "trigger_word"} - IGNORED):
        result.skip(key, "no qflux equivalent")
    return result


def _process(job: Any, source: Path) -> dict[str, Any]:
    if not isinstance(job, dict) or not isinstance(job.get("config"), dict):
        raise ConfigError(f"{source}: not an ai-toolkit job file (expected `job: extension` and a `config:` section)")
    processes = job["config"].get("process") or []
    trainers = [p for p in processes if isinstance(p, dict) and str(p.get("type", "")).endswith("trainer")]
    if not trainers:
        raise ConfigError(f"{source}: config.process has no trainer process (type: sd_trainer)")
    return trainers[0]


def _model(model: dict[str, Any], result: ImportResult) -> None:
    arch = str(model.get("arch") or "")
    if not arch and model.get("is_flux"):
        arch = "flux"
    trainer = ARCHS.get(arch)
    if trainer is None:
        known = ", ".join(sorted(ARCHS))
        raise ConfigError(f"model.arch: {arch or '(none)'} has no qflux trainer; qflux trains the edit models "
                          f"({known})")
    result.set("trainer", trainer)
    if model.get("name_or_path"):
        result.set("model.pretrained", str(model["name_or_path"]))
    if model.get("quantize"):
        qtype = str(model.get("qtype") or "qfloat8").split("|")[0].lower()
        method = QTYPES.get(qtype, "nf4")
        result.set("model.quantize", method)
        if qtype not in ("qfloat8", "float8", "qint8", "int8"):
            result.skip(f"model.qtype={qtype}", f"approximated by model.quantize: {method} (bitsandbytes NF4)")
    if model.get("quantize_te") or model.get("qtype_te"):
        result.skip("model.quantize_te", "qflux encodes the dataset once and frees the text encoders before "
                                         "training; they are never beside the transformer")
    for key in sorted(set(model) - {"arch", "name_or_path", "quantize", "qtype", "quantize_te", "qtype_te",
                                    "low_vram", "is_flux"}):
        result.skip(f"model.{key}", "no qflux equivalent")


def _network(network: dict[str, Any], result: ImportResult) -> None:
    kind = str(network.get("type") or "lora").lower()
    if kind == "lokr":
        _lokr(network, result)
        return
    if kind != "lora":
        result.skip(f"network.type={kind}", "qflux imports ai-toolkit's lora and lokr networks (imported as a LoRA of "
                                            "the same rank)")
    if "linear" in network:
        result.set("model.lora.rank", int(network["linear"]))
    if "linear_alpha" in network:
        result.set("model.lora.alpha", float(network["linear_alpha"]))
    for key in sorted(set(network) - {"type", "linear", "linear_alpha"}):
        result.skip(f"network.{key}", "no qflux equivalent (model.lora.targets names the layers to adapt)")


def _lokr(network: dict[str, Any], result: ImportResult) -> None:
    """ai-toolkit's LoKr (LyCORIS' ``LokrModule``) as qflux's (peft's): the same factorization of each side by
    ``lokr_factor``, the same initialisation (w2 starts at zero: ``init: lycoris``), the rank and alpha of
    ``linear`` / ``linear_alpha``, or both factors full with ``lokr_full_rank`` (which overrides them, as in
    ai-toolkit)."""
    result.set("model.adapter", "lokr")
    options: dict[str, Any] = {"init": "lycoris"}
    if network.get("lokr_full_rank"):
        options.update(rank=FULL_RANK, alpha=float(FULL_RANK))
    else:
        if "linear" in network:
            options["rank"] = int(network["linear"])
        if "linear_alpha" in network:
            options["alpha"] = float(network["linear_alpha"])
        if "rank" in options and options.get("alpha", options["rank"]) != options["rank"]:
            result.skip(f"network.linear_alpha={network['linear_alpha']}",
                        "ai-toolkit scales a layer whose two Kronecker factors are both full matrices (rank >= half "
                        "the larger factor) by 1 whatever the alpha; qflux scales every layer by alpha / rank")
    factor = int(network.get("lokr_factor", -1))
    if factor == -1 or factor >= 1:
        options["decompose_factor"] = factor
    else:
        result.skip(f"network.lokr_factor={factor}", "qflux's decompose_factor is -1 (near the square root) or >= 1")
    result.set("model.adapter_options", options)
    for key in sorted(set(network) - {"type", "linear", "linear_alpha", "lokr_full_rank", "lokr_factor"}):
        result.skip(f"network.{key}", "no qflux equivalent (model.adapter_options.targets names the layers to adapt)")


def _lokr_base(result: ImportResult) -> None:
    """qflux's LoKr wraps full-precision Linear layers only (``model.adapter: lokr`` refuses ``model.quantize``):
    the adapter is what the job trains, so the quantization is the setting left out."""
    quantize = result.get("model.quantize")
    if result.get("model.adapter") == "lokr" and quantize:
        del result.config["model"]["quantize"]
        result.skip(f"model.quantize={quantize}", "qflux's LoKr trains on a full-precision transformer (more memory "
                                                  "than ai-toolkit's quantized base)")


def _control_paths(dataset: dict[str, Any]) -> list[str]:
    """``control_path`` (a string or a list), then ``control_path2``/``control_path_2``... in number order."""
    first = dataset.get("control_path")
    paths = list(first) if isinstance(first, list) else [first] if first else []
    numbered = []
    for key, value in dataset.items():
        match = re.fullmatch(r"control_path_?(\d+)", key)
        if match and value:
            numbered.append((int(match[1]), str(value)))
    return [str(p) for p in paths] + [p for _, p in sorted(numbered)]


def _datasets(datasets: list[Any], result: ImportResult) -> None:
    if not datasets:
        result.skip("datasets", "none given: set data.path")
        return
    dataset = datasets[0]
    if len(datasets) > 1:
        result.skip("datasets[1:]", f"{len(datasets) - 1} more dataset(s): a qflux config reads one dataset")
    if dataset.get("folder_path"):
        result.set("data.path", str(dataset["folder_path"]))
    controls = _control_paths(dataset)
    if controls:
        result.set("data.control_path", controls[0] if len(controls) == 1 else controls)
        result.skip("control size", "ai-toolkit resizes controls to the target's size; qflux feeds them at the size "
                                    "the model's pipeline uses at inference (~1 MP); set data.control_resolution: "
                                    "target to keep ai-toolkit's (cheaper) behaviour")
    if dataset.get("mask_path"):
        result.set("data.mask_path", str(dataset["mask_path"]))
    if "caption_dropout_rate" in dataset:
        result.set("data.caption_dropout", float(dataset["caption_dropout_rate"]))
    caption_ext = str(dataset.get("caption_ext") or "txt").lstrip(".")
    if caption_ext != "txt":
        result.skip(f"caption_ext={caption_ext}", "qflux reads captions from <stem>.txt files")
    resolution = dataset.get("resolution")
    if resolution is not None:
        sizes = [int(r) for r in (resolution if isinstance(resolution, list) else [resolution])]
        side = max(sizes)
        result.set("data.resolution", side)  # an int: aspect kept at side^2 pixels, as ai-toolkit's buckets do
        if len(sizes) > 1:
            result.skip(f"resolution={sizes}", f"ai-toolkit trains every image at each resolution; qflux uses one "
                                               f"pixel budget (kept: {side})")
    handled = {"folder_path", "control_path", "mask_path", "caption_dropout_rate", "caption_ext", "resolution"}
    for key in sorted(set(dataset) - handled - IGNORED):
        if re.fullmatch(r"control_path_?\d+", key):
            continue
        result.skip(f"datasets[0].{key}", "no qflux equivalent")


def _train(train: dict[str, Any], result: ImportResult) -> None:
    simple = {"steps": "train.max_steps", "batch_size": "train.batch_size", "lr": "train.lr",
              "gradient_accumulation_steps": "train.grad_accum", "gradient_accumulation": "train.grad_accum",
              "lr_scheduler": "train.scheduler", "lr_warmup_steps": "train.warmup_steps",
              "max_grad_norm": "train.max_grad_norm", "seed": "train.seed"}
    for key, target in simple.items():
        if key in train:
            value = train[key]
            result.set(target, float(value) if key in ("lr", "max_grad_norm") else value)
    if "optimizer" in train:
        _optimizer(train, result)
    if train.get("gradient_checkpointing"):
        result.set("model.gradient_checkpointing", True)
    if "dtype" in train:
        dtype = DTYPES.get(str(train["dtype"]).lower())
        if dtype:
            result.set("model.dtype", dtype)
        else:
            result.skip(f"train.dtype={train['dtype']}", "qflux's model.dtype is float32, bfloat16 or float16")
    if "timestep_type" in train:
        kind = str(train["timestep_type"])
        if kind in TIMESTEP_TYPES:
            result.set("train.timestep_sampling", TIMESTEP_TYPES[kind])
        else:
            result.skip(f"train.timestep_type={kind}", "no qflux equivalent (kept qflux's default logit_normal; "
                                                       "see train.timestep_sampling in docs/config.md)")
    if train.get("train_text_encoder"):
        result.skip("train.train_text_encoder", "qflux trains the transformer's LoRA only")
    if (train.get("ema_config") or {}).get("use_ema"):
        result.skip("train.ema_config", "EMA is not in qflux yet")
    handled = set(simple) | {"optimizer", "optimizer_params", "gradient_checkpointing", "dtype", "timestep_type",
                             "train_text_encoder", "ema_config"}
    for key in sorted(set(train) - handled - IGNORED):
        result.skip(f"train.{key}", "no qflux equivalent")


def _optimizer(train: dict[str, Any], result: ImportResult) -> None:
    """``train.optimizer`` (+ ``optimizer_params``) as qflux builds the same optimizer: ai-toolkit's
    ``get_optimizer`` rules for the ones qflux has by name, the shared table for the rest."""
    raw, params = str(train["optimizer"]), dict(train.get("optimizer_params") or {})
    kind = raw.strip().lower()
    if kind == "prodigy":
        _prodigy(train, params, result)
    elif kind == "adafactor":
        result.set("train.optimizer", ADAFACTOR)
        result.set("train.optimizer_args", {**ADAFACTOR_ARGS, **params})  # an import path: every argument here
        result.skip(f"train.optimizer={raw}", f"imported as train.optimizer: {ADAFACTOR} (ai-toolkit's update, lr "
                                              "as given); qflux's adafactor is torch's, which scales each step by the "
                                              "weights' RMS and 1/sqrt(step)")
    else:
        name = None
        if kind.startswith("prodigy"):  # prodigy8bit: ai-toolkit's own 8-bit state
            result.skip(f"train.optimizer={raw}", "no qflux equivalent (ai-toolkit's own optimizer); train.optimizer: "
                                                  "prodigy is the same update with float32 state (kept: adamw)")
        else:
            name = optimizer_name(raw, result, "train.optimizer")
        if name:
            result.set("train.optimizer", name)
            _optimizer_params(params, result, by_name="." not in name)
        elif params:
            result.skip("train.optimizer_params", "the optimizer was not imported")


def _prodigy(train: dict[str, Any], params: dict[str, Any], result: ImportResult) -> None:
    """ai-toolkit runs Prodigy at lr 1.0 when ``lr`` is below 0.1 (Prodigy finds its step size; lr scales it) and
    with eps 1e-6; qflux's ``prodigy`` takes train.lr, train.weight_decay and optimizer_args as given."""
    result.set("train.optimizer", "prodigy")
    lr = float(train.get("lr", 1e-6))  # ai-toolkit's default lr
    if lr < 0.1:
        result.set("train.lr", 1.0)
        result.skip(f"train.lr={train.get('lr', 1e-6)}", "ai-toolkit runs Prodigy at lr 1.0 when lr < 0.1: "
                                                         "imported as train.lr: 1.0")
    _optimizer_params({"eps": 1e-6, "weight_decay": 0.0, **params}, result)


def _optimizer_params(params: dict[str, Any], result: ImportResult, by_name: bool = True) -> None:
    """ai-toolkit's ``optimizer_params`` as ``train.optimizer_args``, but ``weight_decay`` for an optimizer qflux
    builds by name: that is ``train.weight_decay``, which qflux passes itself (an import path gets lr only)."""
    if by_name and "weight_decay" in params:
        result.set("train.weight_decay", float(params.pop("weight_decay")))
    if params:
        result.set("train.optimizer_args", params)


def _save(save: dict[str, Any], result: ImportResult) -> None:
    if "save_every" in save:
        result.set("train.save_every", int(save["save_every"]))
    if "max_step_saves_to_keep" in save:
        result.set("train.keep_checkpoints", int(save["max_step_saves_to_keep"]))
    if "dtype" in save:
        result.skip(f"save.dtype={save['dtype']}", "qflux writes the LoRA in the dtype it trained it in (float32)")
    for key in sorted(set(save) - {"save_every", "max_step_saves_to_keep", "dtype"}):
        result.skip(f"save.{key}", "no qflux equivalent")


def _sample(sample: dict[str, Any], result: ImportResult) -> None:
    if not sample:
        return
    if "sample_every" in sample:
        result.set("validation.every", int(sample["sample_every"]))
    if "sample_steps" in sample:
        result.set("validation.steps", int(sample["sample_steps"]))
    if "seed" in sample:
        result.set("validation.seed", int(sample["seed"]))
    if "guidance_scale" in sample:
        # Kontext's guidance is the distilled guidance embedding; the Qwen models use true CFG
        key = "model.options.sample_guidance" if result.get("trainer") == "kontext" else "validation.true_cfg"
        result.set(key, float(sample["guidance_scale"]))
    negative = str(sample.get("neg") or "")
    cases = []
    for prompt in sample.get("prompts") or []:
        text = f" {prompt}"
        controls = [path for _, path in sorted(_CTRL_IMG.findall(text), key=lambda m: int(m[0] or 1))]
        cases.append({"prompt": _CTRL_IMG.sub("", text).strip(), "control": controls})
    for case in sample.get("samples") or []:
        controls = [str(case[k]) for k in sorted(case, key=_ctrl_order) if k.startswith("ctrl_img") and case[k]]
        cases.append({"prompt": str(case.get("prompt", "")), "control": controls})
    for case in cases:
        if negative:
            case["negative_prompt"] = negative
    if cases:
        result.set("validation.samples", cases)
    if "width" in sample or "height" in sample:
        result.skip("sample.width/height", "qflux renders validation samples at the size the LoRA trains at")
    handled = {"sample_every", "sample_steps", "seed", "guidance_scale", "neg", "prompts", "samples", "width",
               "height"}
    for key in sorted(set(sample) - handled - IGNORED):
        result.skip(f"sample.{key}", "no qflux equivalent")


def _ctrl_order(key: str) -> int:
    digits = key.removeprefix("ctrl_img")
    return int(digits) if digits.isdigit() else 1
