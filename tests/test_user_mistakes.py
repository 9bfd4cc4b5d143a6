"""Every user mistake of docs/errors.md gets exit code 2, one message naming the key or file and the fix, no
traceback, and leaves nothing behind; inputs that are merely unusual train fine.

Each row of the table in docs/errors.md is one test here (``test_docs_table_matches_the_tests`` keeps the two in
step). The CLI runs in a subprocess, as a user runs it; most rows fail before any model loads. "Leaves nothing
behind" is checked strictly: the test folder's files (names, sizes, modification times) are the same before
and after the command.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_fork_server import run_qflux_process
from PIL import Image

from qflux.testing import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
PLUGINS = "kontext,quant"


# --------------------------------------------------------------------------- helpers


def image(path: Path, size: tuple[int, int] = (48, 32), mode: str = "RGB", colour=(200, 40, 40), **save) -> Path:
    """A two-colour image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.paste((20, 60, 220), (size[0] // 2, 0, size[0], size[1]))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save)
    return path


def folder(root: Path, samples: dict[str, dict]) -> Path:
    """A folder dataset: ``{stem: {"prompt": str | None, "size": (w, h), "controls": n, "mask": (w, h)}}``."""
    (root / "training_images").mkdir(parents=True, exist_ok=True)
    for stem, parts in samples.items():
        image(root / "training_images" / f"{stem}.png", parts.get("size", (48, 32)))
        if parts.get("prompt", f"edit {stem}") is not None:
            (root / "training_images" / f"{stem}.txt").write_text(parts.get("prompt", f"edit {stem}"))
        for i in range(parts.get("controls", 1)):
            image(root / "control_images" / f"{stem}{'' if i == 0 else f'_control_{i}'}.png", (48, 32), colour=(9, 160, 60))
        if "mask" in parts:
            image(root / "control_images" / f"{stem}_mask.png", parts["mask"], mode="L")
    return root


def good_folder(root: Path, n: int = 3) -> Path:
    return folder(root, {f"s{i}": {} for i in range(n)})


def config(tmp: Path, name: str = "c.yaml", **sections) -> Path:
    """A tiny kontext config under ``tmp`` (output and cache inside it); ``sections`` update it."""
    base = tiny_config(tmp, "kontext", **sections)
    return write_config(tmp / name, base)


def data_config(tmp: Path, data_path: Path, **sections) -> Path:
    return config(tmp, data={"path": str(data_path), "resolution": 32, "holdout": 0}, **sections)


def train_args(path: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(path), *extra]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path -> (size, mtime_ns) (folders: size -1)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (-1 if path.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 240,
            preexec_fn=None, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """``python -m qflux ARGS`` with the kontext and quant plugins, no colours, a wide terminal."""
    full = {k: v for k, v in os.environ.items() if k not in ("QFLUX_LOAD_PLUGINS", "PYTHONPATH")}
    full.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", QFLUX_LOAD_PLUGINS=PLUGINS, **(env or {}))
    return run_qflux_process(args, cwd, full, timeout, preexec_fn, prefix)


def assert_one_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback anywhere, one ``error:`` message holding every fragment."""
    both = result.stdout + result.stderr
    assert result.returncode == 2, (result.returncode, both[-3000:])
    assert "Traceback" not in both, both[-3000:]
    message = result.stderr[result.stderr.index("error: "):] if "error: " in result.stderr else ""
    assert message and both.count("error: ") == 1, both[-3000:]
    flat = " ".join(message.split())
    for fragment in fragments:
        assert " ".join(fragment.split()) in flat, f"{fragment!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- shared model folders


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory) -> Path:
    from qflux_kontext.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "kontext-tiny")


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    tiny = pytest.importorskip("qflux_qwen.tiny")
    return tiny.save_tiny(tmp_path_factory.mktemp("models") / "qwen-tiny")


# --------------------------------------------------------------------------- the rows
# Each case builds its files under ``tmp`` and returns (CLI args, fragments the message must hold).

Case = Callable[..., tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


@case("config-file-missing")
def _(tmp):
    return train_args(tmp / "nope.yaml"), ["config file not found", "nope.yaml"]


@case("config-bad-yaml")
def _(tmp):
    path = tmp / "c.yaml"
    path.write_text("trainer: kontext\ntrain:\n  lr: [0.001\n")
    return train_args(path), [str(path), "invalid YAML (line 4"]


@case("config-unknown-key")
def _(tmp):
    path = config(tmp, model={"pretrained": "builtin:tiny", "lora": {"rnk": 4}})
    return train_args(path), ["unknown key 'model.lora.rnk'", "did you mean 'model.lora.rank'?"]


@case("config-key-in-wrong-section")
def _(tmp):
    path = config(tmp, model={"pretrained": "builtin:tiny", "lr": 1e-4})
    return train_args(path), ["unknown key 'model.lr'", "did you mean 'train.lr'?"]


@case("config-wrong-type")
def _(tmp):
    path = config(tmp, train={"max_steps": "lots"})
    return train_args(path), ["'train.max_steps'", "valid integer", "(got 'lots')"]


@case("config-bad-set")
def _(tmp):
    return train_args(config(tmp), "--set", "train.lr"), ["--set 'train.lr'", "expected KEY=VALUE"]


@case("config-resolution-not-multiple-of-16")
def _(tmp):
    return train_args(config(tmp), "--set", "data.resolution=500"), ["'data.resolution'", "multiples of 16",
                                                                     "500 is not, use 496 or 512"]


@case("config-key-of-another-tool")
def _(tmp):
    path = config(tmp, train={"steps": 10})
    return train_args(path), ["unknown key 'train.steps' (did you mean 'train.max_steps'?)"]


@case("config-resize-fixed-with-buckets")
def _(tmp):
    return train_args(config(tmp), "--set", "data.resize=fixed", "--set", "data.resolution=[[32, 32], [32, 48]]"), \
        ["data.resize: 'fixed' needs data.resolution as an int or [h, w], not a list of buckets"]


@case("unknown-trainer")
def _(tmp):
    return train_args(config(tmp), "--trainer", "kontxt"), ["unknown trainer 'kontxt'", "installed trainers: kontext",
                                                            "did you mean 'kontext'?"]


@case("trainer-not-installed")
def _(tmp):
    return train_args(config(tmp), "--trainer", "qwen-edit"), ["unknown trainer 'qwen-edit'", "pip install qflux-qwen"]


@case("unknown-quantizer")
def _(tmp):
    return train_args(config(tmp), "--set", "model.quantize=nf5"), ["unknown quantizer 'nf5' for model.quantize",
                                                                    "installed: fp4, fp8, int8, nf4"]


@case("unknown-adapter")
def _(tmp):
    return train_args(config(tmp), "--set", "model.adapter=boft"), ["unknown adapter 'boft' for model.adapter",
                                                                   "installed: loha, lokr, lora"]


@case("trainer-option-misspelt")
def _(tmp):
    return train_args(config(tmp), "--set", "model.options.guidence=2"), [
        "unknown key 'model.options.guidence'", "did you mean 'model.options.guidance'?"]


@case("accelerate-fsdp-mode")
def _(tmp):  # what `accelerate launch --use_fsdp` sets for the processes it starts
    return train_args(config(tmp)), ["accelerate's FSDP mode is not how qflux shards",
                                     "set train.fsdp: true"], ["env", "ACCELERATE_USE_FSDP=on"]


@case("fsdp-with-quantize")
def _(tmp):
    return train_args(config(tmp), "--set", "model.quantize=nf4", "--set", "train.fsdp=true"), [
        "train.fsdp cannot shard a quantized base (model.quantize: nf4)", "set train.fsdp: false (DDP)"]


@case("offload-blocks-beyond-the-model")
def _(tmp):
    return train_args(config(tmp), "--set", "model.offload_blocks=9"), [
        "model.offload_blocks: 9 is more than the 4 repeated blocks of this transformer; use at most 4 (or auto)"]


@case("offload-blocks-negative")
def _(tmp):
    return train_args(config(tmp), "--set", "model.offload_blocks=-2"), [
        "model.offload_blocks: -2 is negative; give a number of blocks (0 = off) or auto"]


@case("run-does-not-fit")
def _(tmp):
    # 16384 px: hundreds of GiB of activations for even the tiny model; refused before anything is loaded
    return train_args(config(tmp), "--set", "data.resolution=16384"), [
        "GiB at its peak (phase train; qflux plan shows the parts)", "settings that fit:"]


@case("offload-blocks-with-fsdp")
def _(tmp):
    return train_args(config(tmp), "--set", "model.offload_blocks=2", "--set", "train.fsdp=true"), [
        "model.offload_blocks cannot be combined with train.fsdp"]


@case("unknown-optimizer")
def _(tmp):
    return train_args(config(tmp), "--set", "train.optimizer=adamw_torch"), [
        "train.optimizer: unknown optimizer 'adamw_torch'", "did you mean 'adamw'?"]


@case("optimizer-import-path-broken")
def _(tmp):
    return train_args(config(tmp), "--set", "train.optimizer=lion_pytorch.Lion"), [
        "train.optimizer: cannot import 'lion_pytorch.Lion'", "install its package"]


@case("optimizer-extra-missing")
def _(tmp):  # prodigyopt hidden from the process: as where qflux-core[optim] is not installed
    hide = tmp / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['prodigyopt'] = None  # not installed\n")
    return train_args(config(tmp), "--set", "train.optimizer=prodigy"), [
        "train.optimizer: prodigy needs the package prodigyopt", "pip install 'qflux-core[optim]'"], [
        "env", f"PYTHONPATH={hide}", "PYTHONDONTWRITEBYTECODE=1"]


@case("bad-optimizer-args")
def _(tmp):
    return train_args(config(tmp), "--set", "train.optimizer_args={betas: [0.9, 2.0]}"), [
        "train.optimizer_args: adamw rejected the arguments", "beta"]


@case("unknown-scheduler")
def _(tmp):
    return train_args(config(tmp), "--set", "train.scheduler=cosin"), [
        "train.scheduler: unknown scheduler 'cosin'", "did you mean 'cosine'?"]


@case("data-path-missing")
def _(tmp):
    path = data_config(tmp, tmp / "my_pairs")
    return train_args(path), ["data.path", "my_pairs", "not found"]


@case("data-folder-without-training-images")
def _(tmp):
    (tmp / "pairs" / "images").mkdir(parents=True)
    return train_args(data_config(tmp, tmp / "pairs")), ["the folder has no training_images/ subfolder"]


@case("data-empty-folder")
def _(tmp):
    (tmp / "pairs" / "training_images").mkdir(parents=True)
    return train_args(data_config(tmp, tmp / "pairs")), ["pairs: no samples found", "add training_images/<stem>.png"]


@case("data-missing-prompt")
def _(tmp):
    root = folder(tmp / "pairs", {"a": {}, "b": {"prompt": None}, "c": {}})
    return train_args(data_config(tmp, root)), ["1 problem(s)", "b.txt", "missing prompt: add training_images/b.txt"]


@case("data-unreadable-image")
def _(tmp):
    root = good_folder(tmp / "pairs")
    (root / "training_images" / "s1.png").write_bytes(b"this is not a PNG")
    return train_args(data_config(tmp, root)), ["s1.png", "cannot read the target image", "re-export it"]


@case("data-truncated-image")
def _(tmp):
    root = good_folder(tmp / "pairs")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "JPEG", quality=95)
    (root / "control_images" / "s2.png").unlink()
    (root / "control_images" / "s2.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return train_args(data_config(tmp, root)), ["s2.jpg", "cannot read the control image", "truncated"]


@case("data-mask-size-mismatch")
def _(tmp):
    root = folder(tmp / "pairs", {"a": {}, "b": {"mask": (16, 16)}})
    return train_args(data_config(tmp, root)), ["b_mask.png", "mask is 16x16 but the target is 48x32",
                                                "make the mask the target's size"]


@case("data-control-count-mismatch")
def _(tmp):
    root = folder(tmp / "pairs", {"a": {"controls": 2}, "b": {"controls": 2}, "c": {"controls": 1}})
    return train_args(data_config(tmp, root)), ["c.png", "'c' has 1 control image(s) while 2 of 3 samples have 2",
                                                "add the missing control image(s)"]


@case("data-too-many-controls")
def _(tmp):
    root = folder(tmp / "pairs", {"a": {"controls": 4}, "b": {"controls": 4}})
    return train_args(data_config(tmp, root)), ["'a' has 4 control images but the trainer takes at most 3"]


@case("data-no-controls")
def _(tmp):  # ai-toolkit's controls/ next to training_images/: every pair would train as text-to-image
    root = folder(tmp / "pairs", {f"s{i}": {"controls": 0} for i in range(3)})
    for i in range(3):
        image(root / "controls" / f"s{i}.png")
    return train_args(data_config(tmp, root)), ["no sample has a control image", f"{root / 'controls'} holds 3 "
                                                "image(s) named like the targets and is not read",
                                                "rename it control_images/", "--allow-no-controls"]


@case("data-unread-folder")
def _(tmp):  # masks in their own folder inside the dataset: without data.mask_path they would be ignored
    root = good_folder(tmp / "pairs")
    for i in range(3):
        image(root / "masks" / f"s{i}.png", mode="L")
    return train_args(data_config(tmp, root)), [f"{root / 'masks'}: folder not read: 3 of its 3 image(s) are named "
                                                "like the targets", "masks: set data.mask_path to it",
                                                "otherwise move it out of the dataset folder"]


@case("data-control-path-missing")
def _(tmp):
    path = data_config(tmp, good_folder(tmp / "targets") / "training_images")
    return train_args(path, "--set", "data.control_path=ctrl"), ["data.control_path ctrl: not found"]


@case("data-control-path-with-training-images")
def _(tmp):
    root = good_folder(tmp / "pairs")
    return train_args(data_config(tmp, root), "--set", f"data.control_path={root / 'control_images'}"), [
        "holds training_images/: with data.control_path set, data.path is the folder of the target images itself",
        f"set data.path to {root / 'training_images'}"]


@case("data-control-path-with-manifest")
def _(tmp):
    image(tmp / "pairs" / "t.png")
    manifest = tmp / "pairs" / "train.jsonl"
    manifest.write_text('{"target": "t.png", "prompt": "edit"}\n')
    return train_args(data_config(tmp, manifest), "--set", "data.control_path=pairs"), [
        "data.control_path works with a folder data.path", "remove data.control_path"]


@case("data-numbered-and-plain-control")
def _(tmp):
    root = good_folder(tmp / "pairs")
    image(tmp / "ctrl" / "s0.png")
    image(tmp / "ctrl" / "s0_0.png")
    for stem in ("s1", "s2"):
        image(tmp / "ctrl" / f"{stem}.png")
    return train_args(data_config(tmp, root / "training_images"), "--set", f"data.control_path={tmp / 'ctrl'}"), [
        "'s0' has both a control named like the target and numbered ones in ctrl/ (s0.png, s0_0.png)"]


@case("data-mask-missing")
def _(tmp):
    root = folder(tmp / "pairs", {"a": {"mask": (48, 32)}, "b": {"mask": (48, 32)}, "c": {}})
    return train_args(data_config(tmp, root)), ["'c' has no mask while 2 of 3 samples have one"]


@case("data-mask-all-black")
def _(tmp):
    root = good_folder(tmp / "pairs")
    Image.new("L", (48, 32), 0).save(root / "control_images" / "s1_mask.png")
    return train_args(data_config(tmp, root)), ["s1_mask.png", "the mask is all black"]


@case("data-mask-zero-one")
def _(tmp):
    root = good_folder(tmp / "pairs")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[8:24, 10:30] = 1  # a 0/1 array saved as is: looks black
    Image.fromarray(mask).save(root / "control_images" / "s1_mask.png")
    return train_args(data_config(tmp, root)), ["s1_mask.png", "holds only the values 0 and 1, so it looks all black",
                                                "multiply it by 255"]


@case("data-extreme-aspect-ratio")
def _(tmp):
    root = folder(tmp / "pairs", {"a": {}, "b": {"size": (320, 32)}})
    return train_args(data_config(tmp, root)), ["b.png", "extreme aspect ratio 320x32", "raise data.max_aspect"]


@case("data-duplicate-stems")
def _(tmp):
    root = good_folder(tmp / "pairs")
    image(root / "training_images" / "s0.jpg")
    return train_args(data_config(tmp, root)), ["duplicate target image for 's0': s0.jpg, s0.png; keep only one"]


@case("data-unsupported-image-type")
def _(tmp):
    root = good_folder(tmp / "pairs")
    image(root / "training_images" / "s3.gif")
    (root / "training_images" / "s3.txt").write_text("edit")
    return train_args(data_config(tmp, root)), ["s3.gif", "unsupported image type '.gif'", "convert it to PNG"]


@case("data-manifest-path-escapes-root")
def _(tmp):
    image(tmp / "elsewhere" / "t.png")
    image(tmp / "pairs" / "t.png")
    image(tmp / "pairs" / "c.png")
    manifest = tmp / "pairs" / "train.csv"
    manifest.write_text("target,control,prompt\nt.png,c.png,edit\n../elsewhere/t.png,c.png,edit\n")
    return train_args(data_config(tmp, manifest)), ["train.csv line 3", "../elsewhere/t.png is outside the dataset "
                                                    "folder", "move it inside"]


@case("data-manifest-file-missing")
def _(tmp):
    image(tmp / "pairs" / "t.png")
    manifest = tmp / "pairs" / "train.jsonl"
    manifest.write_text('{"target": "t.png", "prompt": "a"}\n{"target": "gone.png", "prompt": "b"}\n')
    return train_args(data_config(tmp, manifest)), ["gone.png", "file not found (column 'target' of", "line 2"]


@case("validation-image-missing")
def _(tmp):
    path = config(tmp, validation={"every": 2, "steps": 2, "samples": [{"control": ["ctrl.png"], "prompt": "x"}]})
    return train_args(path), ["validation.samples[0].control[0]: image not found: ctrl.png"]


@case("model-folder-missing")
def _(tmp):
    path = config(tmp, model={"pretrained": "./models/flux-kontext"})
    return train_args(path), ["model.pretrained: folder ./models/flux-kontext does not exist"]


@case("model-folder-missing-component")
def _(tmp, kontext_folder):
    model = shutil.copytree(kontext_folder, tmp / "kontext")
    shutil.rmtree(model / "vae")
    path = config(tmp, model={"pretrained": str(model), "dtype": "float32"})
    return train_args(path), ["missing the component 'vae'", "model_index.json lists it", "re-download"]


@case("model-folder-of-another-family")
def _(tmp, kontext_folder):
    model = shutil.copytree(kontext_folder, tmp / "kontext")
    cfg = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "QwenImageTransformer2DModel"}))
    path = config(tmp, model={"pretrained": str(model), "dtype": "float32"})
    return train_args(path), ["is not a FluxKontextPipeline folder", "transformer/ holds QwenImageTransformer2DModel",
                              "the kontext trainer needs FluxTransformer2DModel"]


@case("model-qwen-folder-for-kontext")
def _(tmp, qwen_folder):
    path = config(tmp, model={"pretrained": str(qwen_folder), "dtype": "float32"})
    return train_args(path), ["is not a FluxKontextPipeline folder but a QwenImageEditPipeline folder",
                              "needs FluxTransformer2DModel", "--trainer"]


@case("lora-target-missing")
def _(tmp):
    # found before anything is encoded (the transformer built on the meta device): no cache entry is written
    path = config(tmp, model={"pretrained": "builtin:tiny", "dtype": "float32",
                              "lora": {"rank": 4, "alpha": 4, "targets": ["to_q", "to_qkv"]}},
                  data={"num_samples": 2, "holdout": 0})
    return train_args(path), ["model.lora.targets: no module named 'to_qkv' in FluxTransformer2DModel",
                                      "its linear layers are named", "to_out.0"]


@case("sample-lora-of-another-model")
def _(tmp):
    import torch
    from safetensors.torch import save_file

    image(tmp / "in.png", (32, 32))
    # keys as a Qwen-Image LoRA names them (modules FLUX.1 Kontext does not have)
    save_file({"transformer.transformer_blocks.0.img_mod.1.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.img_mod.1.lora_B.weight": torch.zeros(768, 4)}, tmp / "qwen.safetensors")
    return (["sample", "--config", str(config(tmp)), "--lora", str(tmp / "qwen.safetensors"), "--image",
             str(tmp / "in.png"), "--prompt", "make it blue", "--out", str(tmp / "out.png"), "--steps", "1"],
            ["qwen.safetensors is not a LoRA for this FluxTransformer2DModel", "transformer_blocks.0.img_mod.1",
             "use a LoRA trained for this trainer's model family"])


@case("sample-lora-does-not-land")
def _(tmp):
    import torch
    from safetensors.torch import save_file

    image(tmp / "in.png", (32, 32))
    # a Kontext LoRA whose to_k has lora_A but lost its lora_B: loading it would drop a tensor silently
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4),
               "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 128)}, tmp / "half.safetensors")
    return (["sample", "--config", str(config(tmp)), "--lora", str(tmp / "half.safetensors"), "--image",
             str(tmp / "in.png"), "--prompt", "make it blue", "--out", str(tmp / "out.png"), "--steps", "1"],
            ["half.safetensors: 1 of its 3 tensors would not land on this FluxTransformer2DModel",
             "to_k.lora_A.weight: its lora_A / lora_B partner is missing", "diffusers-format LoRAs of the transformer only"])


@case("sample-lora-not-safetensors")
def _(tmp):
    import torch

    image(tmp / "in.png", (32, 32))
    torch.save({"lora_A": torch.zeros(2, 2)}, tmp / "lora.ckpt")
    return (["sample", "--config", str(config(tmp)), "--lora", str(tmp / "lora.ckpt"), "--image", str(tmp / "in.png"),
             "--prompt", "make it blue", "--out", str(tmp / "out.png")],
            ["lora.ckpt: not a .safetensors file", "pickled .bin/.ckpt/.pt files are refused"])


@case("sample-bad-out-name")
def _(tmp):
    image(tmp / "in.png", (32, 32))
    return (["sample", "--config", str(config(tmp)), "--image", str(tmp / "in.png"), "--prompt", "x",
             "--out", str(tmp / "result")], ["--out", "unknown image type ''", "use a .png"])


@case("output-dir-holds-a-run")
def _(tmp):
    (tmp / "run" / "checkpoints" / "step-000003").mkdir(parents=True)
    return train_args(config(tmp)), ["already holds a run (found: checkpoints/ (step-000003))",
                                     "pass --resume to continue it", "choose another output.dir"]


@case("output-dir-holds-a-finished-run")
def _(tmp):  # a run finished with train.save_every: 0: no checkpoint, but its LoRA, metrics and config
    finished_run(tmp / "run")
    return train_args(config(tmp)), [
        "already holds a run (found: pytorch_lora_weights.safetensors, metrics.jsonl, config.yaml)",
        "it finished without checkpoints (train.save_every: 0), so --resume cannot continue it",
        "choose another output.dir"]


@case("output-dir-is-a-file")
def _(tmp):
    (tmp / "run").write_text("not a folder")
    return train_args(config(tmp)), ["output.dir:", "is a file, not a folder"]


@pytest.fixture
def run_lock():
    """``hold(folder)``: this test process holds the run lock of ``folder`` (as a live run does) until the end."""
    from qflux.run.lock import RunLock

    locks = []

    def hold(folder: Path) -> None:
        locks.append(RunLock(folder))
        locks[-1].acquire()

    yield hold
    for lock in locks:
        lock.release()


@case("output-dir-in-use")
def _(tmp, run_lock):  # another run holds output.dir: refused before the dataset is read, its lock file untouched
    import socket

    run_lock(tmp / "run")
    return train_args(config(tmp)), [f"output.dir {tmp / 'run'} is in use by another qflux run (pid {os.getpid()} on "
                                     f"host {socket.gethostname()}, started ",
                                     "wait for it or choose another output.dir"]


@case("output-dir-read-only")
def _(tmp):
    # a read-only bind mount in a user + mount namespace: refused even for root (chmod would not be)
    (tmp / "readonly").mkdir()
    if not _can_mount(tmp, f"mount --bind {tmp / 'readonly'} {tmp / 'readonly'}"):
        pytest.skip("no user + mount namespace here (unshare -r -m)")
    ro = tmp / "readonly"
    script = f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" || exit 99; exec "$@"'
    path = config(tmp, output={"dir": str(ro / "run")})
    return train_args(path), ["output.dir: cannot write to", "read-only file system or no permission",
                              "set output.dir to a writable folder"], ["unshare", "-r", "-m", "sh", "-c", script, "sh"]


@case("cache-dir-inside-a-file")
def _(tmp):
    (tmp / "store").write_text("a file")
    return train_args(config(tmp, cache={"dir": str(tmp / "store" / "cache")})), [
        "cache.dir: cannot create", "store is a file, not a folder"]


@case("resume-checkpoint-of-another-config")
def _(tmp):
    from qflux.config import load_config
    from qflux.run.train import config_fingerprint

    old = config(tmp, "old.yaml")
    write_checkpoint(tmp / "run", 3, config_fingerprint(load_config(old)))
    shutil.copy(old, tmp / "run" / "config.yaml")
    path = config(tmp, model={"pretrained": "builtin:tiny", "dtype": "float32", "lora": {"rank": 8, "alpha": 8}})
    return train_args(path, "--resume"), ["step-000003 was written with a different config",
                                          "model.lora.rank: 4 -> 8", "resume with the original config"]


@case("resume-from-not-a-checkpoint")
def _(tmp):
    (tmp / "somewhere").mkdir()
    return train_args(config(tmp), "--resume-from", str(tmp / "somewhere")), [
        "--resume-from", "not a usable checkpoint (missing or unreadable manifest)"]


@case("resume-and-resume-from")
def _(tmp):
    return train_args(config(tmp), "--resume", "--resume-from", str(tmp)), ["use either --resume or --resume-from"]


@case("config-file-given-twice")
def _(tmp):
    path = config(tmp)
    return ["train", str(path), "--config", "b.yaml"], [f"two config files given ({path} and --config b.yaml)",
                                                        "train takes one"]


@case("resume-nothing-to-resume")
def _(tmp):
    return train_args(config(tmp), "--resume"), [f"--resume: output.dir {tmp / 'run'} holds no run to continue",
                                                 "drop --resume to start a new run"]


@case("resume-finished-run-without-checkpoints")
def _(tmp):
    finished_run(tmp / "run")
    return train_args(config(tmp), "--resume"), ["holds a finished run without checkpoints",
                                                 "with train.save_every: 0 only the final LoRA is written",
                                                 "it cannot be continued"]


@case("resume-changed-optimizer-args")
def _(tmp):
    from qflux.config import load_config
    from qflux.run.train import config_fingerprint

    old = config(tmp, "old.yaml")
    write_checkpoint(tmp / "run", 4, config_fingerprint(load_config(old)))
    shutil.copy(old, tmp / "run" / "config.yaml")
    path = config(tmp, train={"max_steps": 8, "optimizer_args": {"betas": [0.8, 0.99]}})
    return train_args(path, "--resume"), ["--resume: train.optimizer_args: {} -> {'betas': [0.8, 0.99]} cannot "
                                          "change on resume", "resume with the old value"]


@case("resume-past-max-steps-unexported")
def _(tmp):
    from qflux.config import load_config
    from qflux.run.train import config_fingerprint

    path = config(tmp, train={"max_steps": 2})
    write_checkpoint(tmp / "run", 4, config_fingerprint(load_config(path)))
    return train_args(path, "--resume"), ["step-000004 is at step 4, past train.max_steps 2, and its LoRA was not "
                                          "exported", "set train.max_steps to 4"]


@case("launch-cpu-several-processes")
def _(tmp):  # the environment accelerate's simple launcher gives its one process (accelerate.utils.launch)
    launcher = ["env", "ACCELERATE_USE_CPU=True", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=29500"]
    return train_args(config(tmp)), ["accelerate launch was asked for several processes but started this one "
                                     "alone", "accelerate launch --multi_gpu --num_processes 2 -m qflux train"], \
        launcher


def finished_run(output_dir: Path) -> None:
    """The files a run finished with ``train.save_every: 0`` leaves (contents do not matter to the check)."""
    output_dir.mkdir(parents=True)
    for name in ("pytorch_lora_weights.safetensors", "metrics.jsonl", "config.yaml"):
        (output_dir / name).write_text("{}\n")


def write_checkpoint(output_dir: Path, step: int, fingerprint: str) -> Path:
    """A valid checkpoint folder (the format of qflux.training.checkpoint) whose state names ``fingerprint``."""
    import dataclasses
    import hashlib

    import torch
    from safetensors.torch import save

    from qflux.training import checkpoint as ckpt

    folder_ = ckpt.checkpoint_dir(output_dir, step)
    folder_.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}, "generator": torch.zeros(1)},
               buffer)
    position = {f.name: 0 for f in dataclasses.fields(ckpt.TrainingPosition)}
    position.update(step=step, config_fingerprint=fingerprint)
    payloads = {ckpt.LORA: save({"a.lora_A.weight": torch.zeros(1, 1)}), ckpt.TRAINING: buffer.getvalue(),
                ckpt.STATE: json.dumps(position).encode()}
    manifest = {}
    for name, data in payloads.items():
        (folder_ / name).write_bytes(data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder_ / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(folder_) is None
    return folder_


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_exits_2_with_one_message_and_leaves_nothing(name: str, tmp_path: Path, request) -> None:
    fn = CASES[name]
    fixtures = [request.getfixturevalue(a) for a in list(inspect.signature(fn).parameters)[1:]]
    args, fragments, *prefix = fn(tmp_path, *fixtures)
    before = snapshot(tmp_path)
    result = run_cli(args, cwd=tmp_path, prefix=prefix[0] if prefix else ())
    assert_one_user_error(result, *fragments)
    assert snapshot(tmp_path) == before, "the failed command created or changed files"


# --------------------------------------------------------------------------- a full disk while saving

DISK_FULL = "disk-full-while-saving"


def _can_mount(tmp: Path, command: str) -> bool:
    """Whether ``command`` (a mount) works in a user + mount namespace here (it changes nothing outside)."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", command], capture_output=True).returncode == 0


def _can_mount_tmpfs(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    ok = _can_mount(tmp, f"mount -t tmpfs -o size=64k tmpfs {probe}")
    probe.rmdir()
    return ok


def test_disk_full_while_saving_a_checkpoint(tmp_path: Path) -> None:
    """output.dir on a 320 KiB tmpfs (a user + mount namespace; without one, a 100 KB file size limit): the
    first checkpoint fits, the second does not. Exit 2 naming the checkpoint and the reason, the first
    checkpoint intact, nothing of the second left behind."""
    from qflux.training import checkpoint as ckpt

    run = tmp_path / "run"
    run.mkdir()
    path = config(tmp_path, data={"num_samples": 4, "holdout": 0}, train={"max_steps": 2, "save_every": 1})
    args = [str(a) for a in train_args(path)]
    snap = tmp_path / "snapshot"
    if _can_mount_tmpfs(tmp_path):
        script = (f'mount -t tmpfs -o size=320k tmpfs "{run}" || exit 99; "$@"; rc=$?; '
                  f'cp -a "{run}/." "{snap}/"; exit $rc')
        snap.mkdir()
        result = run_cli(args, cwd=tmp_path, prefix=["unshare", "-r", "-m", "sh", "-c", script, "sh"])
        reason, kept = "No space left on device", True
    else:
        import resource

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

        result = run_cli(args, cwd=tmp_path, preexec_fn=limit)
        snap, reason, kept = run, "File too large", False
    message = assert_one_user_error(result, "cannot write checkpoint", reason)
    steps = sorted(p.name for p in (snap / "checkpoints").iterdir())
    if kept:
        assert "checkpoints/step-000002" in message and "latest good checkpoint is" in message
        assert steps == ["step-000001"] and ckpt.verify(snap / "checkpoints" / "step-000001") is None
        assert "continue from it with --resume" in message
    else:
        assert steps == [] and "no checkpoint was written yet" in message
    assert not (snap / "pytorch_lora_weights.safetensors").exists()


def test_lora_export_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    """The final LoRA export under a 20 kB file size limit: a UserError naming the file and the way out, and no
    temporary export folder or partial file left behind."""
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from qflux.config.schema import LoraConfig\n"
        "from qflux.plugins import build_registry\n"
        "from qflux.adapters.lora_files import attach_lora, export_lora\n"
        "from qflux_kontext.tiny import tiny_transformer\n"
        "t, lora = tiny_transformer(), LoraConfig(rank=4, alpha=4)\n"
        "attach_lora(t, lora)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "try:\n"
        "    export_lora(t, build_registry().trainer('kontext').info.pipeline, lora, Path(sys.argv[1]))\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=240, env={**os.environ, "QFLUX_LOAD_PLUGINS": "kontext"})
    assert out.stdout.startswith("UserError cannot write the LoRA"), out.stdout + out.stderr[-2000:]
    assert "File too large" in out.stdout and "--resume" in out.stdout
    assert list((tmp_path / "run").iterdir()) == []


def test_cache_entry_that_cannot_be_written_is_a_user_error(tmp_path: Path) -> None:
    import torch

    from qflux.cache.store import EmbeddingCache
    from qflux.errors import UserError
    from qflux.types import EncodedSample, PromptEmbeds

    cache = EmbeddingCache(tmp_path / "cache")
    cache.root.mkdir()
    (cache.root / "entries").write_text("a file where the entries folder should be")
    sample = EncodedSample(key="a", latents=torch.zeros(4, 8), grid=(2, 2), prompt=PromptEmbeds(hidden=torch.zeros(3, 8)))
    with pytest.raises(UserError, match="cache.dir: cannot write the cache entry .*set cache.enabled: false"):
        cache.put("ab" * 20, sample)
    assert len(cache) == 0 and not (cache.root / "index.jsonl").exists()


DISK_FULL_CACHE = "disk-full-while-caching"
DISK_FULL_EXPORT = "disk-full-while-exporting"


def _on_tmpfs(folder: Path, snapshot: Path, size: str, before: str = "") -> list[str]:
    """The ``prefix`` of ``run_cli`` that runs the command with ``folder`` on a tmpfs of ``size`` (a user + mount
    namespace; ``before``: shell commands run first, on the mounted folder) and copies the folder's contents to
    ``snapshot`` afterwards (the tmpfs ends with the namespace)."""
    snapshot.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "{folder}" || exit 99; {before} "$@"; rc=$?; '
              f'rm -f "{folder}/filler"; cp -a "{folder}/." "{snapshot}/"; exit $rc')
    return ["unshare", "-r", "-m", "sh", "-c", script, "sh"]


def test_disk_full_while_caching(tmp_path: Path) -> None:
    """`qflux cache` with cache.dir on a 40 KiB tmpfs: the first entries fit, a later one does not. Exit 2, one
    line naming the entry and saying the disk is full; the entries written before stay valid, no temporary file
    is left."""
    from qflux.cache.store import EmbeddingCache

    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("no user + mount namespace here (unshare -r -m)")
    cache, snap = tmp_path / "cache", tmp_path / "snapshot"
    cache.mkdir()
    path = config(tmp_path, data={"num_samples": 8, "holdout": 0})
    result = run_cli(["cache", "--config", str(path)], cwd=tmp_path, prefix=_on_tmpfs(cache, snap, "40k"))
    message = assert_one_user_error(result, f"cache.dir: cannot write the cache entry {cache}",
                                    "(No space left on device): the disk is full",
                                    "set cache.dir to a disk with room, or set cache.enabled: false")
    assert len(message.strip().splitlines()) == 1
    kept = EmbeddingCache(snap)
    assert 1 <= len(kept) < 8 and kept.verify() == []
    assert [p for p in snap.rglob(".*")] == []


def test_disk_full_while_exporting(tmp_path: Path) -> None:
    """The final LoRA export onto a full disk: a run killed after its last checkpoint (step 2), before its
    export, holds the LoRA of its earlier run (step 1); `--resume` only writes the LoRA, onto a tmpfs with 16 KiB
    left. Exit 2, one line naming the LoRA and saying the disk is full; the previous LoRA is intact."""
    from qflux.config import load_config
    from qflux.run.train import train

    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("no user + mount namespace here (unshare -r -m)")
    src, run, snap = tmp_path / "src", tmp_path / "run", tmp_path / "snapshot"
    prepared = config(tmp_path, "prepare.yaml", output={"dir": str(src)}, data={"num_samples": 4, "holdout": 0},
                      train={"max_steps": 1, "save_every": 1})
    train(load_config(prepared))
    step_1 = (src / "pytorch_lora_weights.safetensors").read_bytes()
    train(load_config(config(tmp_path, "prepare.yaml", output={"dir": str(src)}, data={"num_samples": 4, "holdout": 0},
                             train={"max_steps": 2, "save_every": 1})), resume=True)
    (src / "pytorch_lora_weights.safetensors").write_bytes(step_1)  # as if killed before the export of step 2
    run.mkdir()
    path = config(tmp_path, data={"num_samples": 4, "holdout": 0}, train={"max_steps": 2, "save_every": 1})
    fill = (f'cp -a "{src}/." "{run}/"; dd if=/dev/zero of="{run}/filler" bs=4k 2>/dev/null; '
            f'truncate -s -16k "{run}/filler";')
    result = run_cli(train_args(path, "--resume"), cwd=tmp_path, prefix=_on_tmpfs(run, snap, "1m", fill))
    message = assert_one_user_error(result, f"cannot write the LoRA {run / 'pytorch_lora_weights.safetensors'}: "
                                    "No space left on device; the disk is full",
                                    "then run the same command with --resume")
    assert len(message.strip().splitlines()) == 1
    assert (snap / "pytorch_lora_weights.safetensors").read_bytes() == step_1
    assert [p.name for p in snap.iterdir() if p.name.startswith(".export-")] == []


# --------------------------------------------------------------------------- unusual inputs just work


def test_unusual_inputs_train(tmp_path: Path) -> None:
    """RGBA, palette, grayscale, 16-bit, EXIF-rotated, JPEG / WebP, upper-case extensions, unicode prompts (one
    with a BOM and CRLF), a mask: `qflux data check` says ok and a 2-step training run writes the LoRA."""
    root = tmp_path / "pairs"
    t, c = root / "training_images", root / "control_images"
    image(t / "rgba.png", (40, 32), mode="RGBA")
    image(c / "rgba.png", (40, 32), mode="P")
    (t / "rgba.txt").write_text("把红色的圆变成蓝色 ✨ — café", encoding="utf-8")
    image(t / "gray.JPG", (32, 40), mode="L")
    sixteen = Image.fromarray(np.arange(32 * 32, dtype="uint16").reshape(32, 32) * 60)
    assert sixteen.mode.startswith("I;16")
    sixteen.save(c / "gray.png")
    (t / "gray.txt").write_bytes("\ufeffmake it Ωmega\r\n".encode("utf-8"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored 48x32, shown 32x48
    image(t / "rotated.jpeg", (48, 32), exif=exif)
    image(c / "rotated.WEBP", (32, 48))
    image(c / "rotated_mask.png", (32, 48), mode="L")
    (t / "rotated.txt").write_text("emoji prompt 🎨🖌️", encoding="utf-8")
    image(t / "webp.WebP", (32, 32), mode="RGBA")
    image(c / "webp.jpg", (32, 32), mode="L")
    (t / "webp.txt").write_text("日本語のプロンプト", encoding="utf-8")
    path = data_config(tmp_path, root, train={"max_steps": 2, "save_every": 0, "batch_size": 1})
    check = run_cli(["data", "check", "--config", str(path)], cwd=tmp_path)
    assert check.returncode == 0 and "4 samples ok" in check.stdout, check.stdout + check.stderr
    result = run_cli(train_args(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


# --------------------------------------------------------------------------- the docs


def test_docs_table_matches_the_tests() -> None:
    """docs/errors.md has one table row per test here, and every row's first cell is a test id."""
    text = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    assert len(rows) == len(set(rows)), "duplicate rows"
    assert set(rows) == set(CASES) | {DISK_FULL, DISK_FULL_CACHE, DISK_FULL_EXPORT}
    assert len(rows) >= 25
