"""Every kill point is safe (issue 20): a SIGKILL at any point of a write leaves the previous file or the new one,
never a partial one, and nothing that is later read as valid.

The CLI runs in a subprocess with ``QFLUX_PAUSE_AT`` set (``qflux.killpoints``): it stops at exactly the listed
points of its writes. One ``qflux train --resume`` (a finished 2-step run resumed to step 3, with an empty
cache) passes every point of a run in order: at each, the test copies the run folder and the cache as they
are (the process is stopped, so the copy is exactly what a SIGKILL there leaves) and lets it go on; at the
last point it SIGKILLs it. ``qflux sample`` is SIGKILLed at its point. One start-up per command instead of one
per point keeps this file fast (each CLI start imports diffusers: about 10 s of CPU here).

Then, per point, the folder is checked and the next command (run in this process: the code of the CLI's,
without another start-up) must succeed on what the kill left:

- a cache entry (``cache-entry-before-rename``, ``cache-entry-before-index``): no entry is read as valid and
  the cache's verification finds nothing wrong; building the cache again encodes the interrupted sample;
- a checkpoint (``checkpoint-before-rename``) and the final export (``export-temp-open``: the temporary file
  just created; ``export-before-rename``: complete, not renamed): the previous
  ``pytorch_lora_weights.safetensors`` is untouched and loads; ``--resume`` completes the run, its export is
  the last checkpoint's, and no temporary file is left;
- ``qflux sample`` (``sample-before-rename``): ``--out`` still holds the previous image.

``grid-before-rename`` (a validation grid) goes through the same atomic image write as ``qflux sample``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from qflux.config import load_config
from qflux.layout import LORA_FILE
from qflux.testing import tiny_config, write_config

RUN_POINTS = ["cache-entry-before-rename", "cache-entry-before-index", "checkpoint-before-rename",
              "export-temp-open", "export-before-rename"]  # in the order one run reaches them
POINTS = [*RUN_POINTS, "sample-before-rename"]


def config_file(folder: Path, cache: Path, run: Path, **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(folder, data={"num_samples": 4, "holdout": 0}, cache={"dir": str(cache)},
                         output={"dir": str(run)}, train={"max_steps": 2, "save_every": 2, **train})
    return write_config(folder / "c.yaml", config)


def stop_at(points: list[str], args: list[str], tmp: Path, at_each) -> None:
    """Run ``python -m qflux ARGS`` with ``QFLUX_PAUSE_AT`` = ``points``: call ``at_each(point)`` while it is
    stopped at each, let it go on, and SIGKILL it at the last one."""
    marker = tmp / "paused"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QFLUX_LOAD_PLUGINS="kontext", QFLUX_PAUSE_AT=",".join(points), QFLUX_PAUSE_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-m", "qflux", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        for point in points:
            deadline = time.monotonic() + 240
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"qflux {args[0]} ended (exit {proc.returncode}) before it reached {point}:\n"
                                f"{proc.stderr.read()[-3000:]}")
                assert time.monotonic() < deadline, f"qflux {args[0]} did not reach {point} in time"
                time.sleep(0.02)
            assert marker.read_text() == point, f"reached {marker.read_text()} before {point}"
            at_each(point)
            if point != points[-1]:
                marker.unlink()  # go on to the next point
    finally:
        proc.kill()  # SIGKILL: no handler, no clean-up runs
        proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished 2-step run (its LoRA and the checkpoint of step 2) and its filled cache."""
    from qflux.run.train import train

    tmp = tmp_path_factory.mktemp("base")
    train(load_config(config_file(tmp, tmp / "cache", tmp / "run")))
    return tmp


@pytest.fixture(scope="module")
def killed(tmp_path_factory, base: Path) -> dict[str, Path]:
    """Point -> a folder holding ``run/`` and ``cache/`` as a kill at that point leaves them."""
    tmp = tmp_path_factory.mktemp("killed")
    run, cache = tmp / "run", tmp / "cache"
    shutil.copytree(base / "run", run)
    config = config_file(tmp, cache, run, max_steps=3)
    left: dict[str, Path] = {}

    def copy(point: str) -> None:
        if point == RUN_POINTS[-1]:
            left[point] = tmp  # killed here: the folders themselves
            return
        left[point] = tmp / "at" / point
        shutil.copytree(run, left[point] / "run")
        if cache.is_dir():
            shutil.copytree(cache, left[point] / "cache")

    stop_at(RUN_POINTS, ["train", "--config", str(config), "--resume"], tmp, copy)
    return left


def temps(folder: Path) -> list[str]:
    """The temporary files and folders of the atomic writes of a run (dot-names)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.startswith((".export-", ".step-")))


def check_cache(point: str, folder: Path) -> None:
    """Killed at the first entry: nothing is read as valid; the next build encodes that sample again."""
    from qflux.cache.store import EmbeddingCache
    from qflux.plugins import build_registry
    from qflux.run.cache import build_cache
    from qflux.run.preflight import check_cache_run

    cache_dir = folder / "cache"
    files = [p for p in (cache_dir / "entries").rglob("*") if p.is_file()]
    complete = [p for p in files if not p.name.startswith(".")]
    if point == "cache-entry-before-rename":  # only the temporary file: nothing under the entry's name
        assert len(files) == 1 and complete == [], files
        key = files[0].name[1:].split("-")[0]
    else:  # the entry's file is in place, the index does not list it
        assert len(complete) == 1, files
        key = complete[0].stem
    cache = EmbeddingCache(cache_dir)
    assert len(cache) == 0 and cache.verify() == []
    assert cache.get(key) is None  # not read as valid

    cfg, registry = load_config(config_file(folder, cache_dir, folder / "run")), build_registry()
    report = build_cache(cfg, registry, records=check_cache_run(cfg, registry))
    assert report.encoded == report.samples == 4  # the interrupted sample is encoded again
    cache = EmbeddingCache(cache_dir)
    assert len(cache) == 4 and cache.verify() == [] and cache.get(key) is not None


def check_run(point: str, folder: Path, base: Path) -> None:
    """The previous LoRA is untouched and loads; the next --resume finishes the run on what was left."""
    from qflux.run.train import train
    from qflux.training import checkpoint as ckpt
    from qflux.training.run_folder import exported_from

    run = folder / "run"
    previous = (base / "run" / LORA_FILE).read_bytes()
    assert (run / LORA_FILE).read_bytes() == previous, "the previous LoRA was changed"
    load_file(str(run / LORA_FILE))
    saved = ckpt.list_checkpoints(run)
    assert all(ckpt.verify(p) is None for p in saved)
    left = temps(run)
    if point == "checkpoint-before-rename":
        assert [p.name for p in saved] == ["step-000002"]
        assert [t for t in left if t.startswith("checkpoints/.step-000003-")], left  # it was mid-save
    else:  # the checkpoint of step 3 is complete, its export was interrupted
        assert [p.name for p in saved] == ["step-000002", "step-000003"]
        assert [t for t in left if t.startswith(".export-")], left

    train(load_config(config_file(folder, base / "cache", run, max_steps=3)), resume=True)
    assert exported_from(run, ckpt.checkpoint_dir(run, 3)) and (run / LORA_FILE).read_bytes() != previous
    assert temps(run) == [], "a temporary file of the killed write was left behind"


def check_sample(tmp: Path, base: Path) -> None:
    """``qflux sample`` killed between its image's temporary file and the rename: ``--out`` is the old image."""
    control, out = tmp / "in.png", tmp / "out.png"
    Image.new("RGB", (32, 32), (220, 20, 20)).save(control)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(out)  # the image of an earlier `qflux sample`
    previous = out.read_bytes()
    config = config_file(tmp, tmp / "cache", tmp / "run")
    stop_at(["sample-before-rename"], ["sample", "--config", str(config), "--lora", str(base / "run" / LORA_FILE),
                                       "--image", str(control), "--prompt", "make it blue", "--out", str(out),
                                       "--steps", "1"], tmp, lambda point: None)
    assert out.read_bytes() == previous
    left = [p for p in tmp.iterdir() if p.name.startswith(".out-")]
    assert len(left) == 1 and left[0].suffix == ".png"  # the complete new image, never at --out half-written


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_point_leaves_nothing_half_written(point: str, tmp_path: Path, request) -> None:
    base = request.getfixturevalue("base")
    if point == "sample-before-rename":
        check_sample(tmp_path, base)
        return
    folder = request.getfixturevalue("killed")[point]
    if point.startswith("cache-"):
        check_cache(point, folder)
    else:
        check_run(point, folder, base)
