"""``train.compile`` under DDP: two CPU processes (gloo) through ``accelerate launch`` compile the transformer's
blocks (before ``accelerator.prepare`` wraps it), keep the ranks' LoRA identical, and train the same numbers as an
eager DDP run with LoRA and gradient checkpointing.

This file is also the script each launched process runs (``test_compile_ddp.py OUT_DIR CONFIG...``): it trains
each config, then dumps this rank's LoRA, losses, what ``compile_blocks`` reported and how many graphs dynamo
compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qflux.testing import tiny_config, write_config

SCRIPT = Path(__file__)
ACCELERATE = Path(sys.executable).with_name("accelerate")
COMPILED = "blocks compiled regionally with aot_eager"
EAGER_FALLBACK = "training eagerly (uncompiled)"


def launch(out: Path, *configs: Path) -> str:
    """Two gloo processes running this file; returns their console output (only rank 0 prints)."""
    # as tests/distributed/test_multiprocess.py's launch, but the output is kept (it says whether the blocks
    # compiled), and one launch trains several configs in turn: one start-up instead of one per run
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(SCRIPT), str(out), *map(str, configs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def settings(tmp: Path, name: str) -> dict:
    # 4 training samples = 2 global batches of 2 (one per process); no held-out loss, which would compile the
    # blocks once more (without gradients) for nothing this test checks; one cache (train.compile is not in its
    # key): the second run skips encoding
    return tiny_config(tmp / name, data={"num_samples": 4, "holdout": 0}, model={"gradient_checkpointing": True},
                       cache={"dir": str(tmp / "cache")},
                       train={"max_steps": 2, "batch_size": 1, "save_every": 0, "lr": 5e-3,
                              "compile": name == "compiled", "compile_backend": "aot_eager"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile-ddp")
    # eager first: the graphs dynamo counts during the compiled run are then that run's
    configs = [write_config(tmp / f"{name}.yaml", settings(tmp, name)) for name in ("eager", "compiled")]
    return tmp, launch(tmp / "out", *configs)


def dumped(tmp: Path, name: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    return (json.loads((tmp / "out" / f"{name}-rank{rank}.json").read_text()),
            load_file(str(tmp / "out" / f"{name}-lora-rank{rank}.safetensors")))


def test_every_process_compiles_the_blocks(runs):
    tmp, console = runs
    assert COMPILED in console and EAGER_FALLBACK not in console
    for rank in (0, 1):
        info, _ = dumped(tmp, "compiled", rank)
        assert info["world"] == 2 and info["steps"] == 2
        assert info["compile"]["compiled"] and info["compile"]["blocks"] > 0, info["compile"]
        assert info["graphs"] > 0  # dynamo captured the blocks' graphs: the forwards ran compiled, not eagerly
        eager, _ = dumped(tmp, "eager", rank)
        assert eager["compile"] is None and eager["graphs"] == 0


def test_compiled_ranks_stay_identical_and_the_run_exports(runs):
    tmp, _ = runs
    a, b = dumped(tmp, "compiled", 0)[1], dumped(tmp, "compiled", 1)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    assert (tmp / "compiled" / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_compiled_ddp_trains_the_same_numbers_as_eager_ddp(runs):
    tmp, _ = runs
    for rank in (0, 1):
        (compiled, lora), (eager, reference) = dumped(tmp, "compiled", rank), dumped(tmp, "eager", rank)
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-6)
        assert lora.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(lora[name], tensor, rtol=1e-4, atol=1e-6)


def main() -> None:
    """One launched process: train each config in turn with ``compile_blocks`` recorded, dumping what this rank
    saw after each (``<config stem>-rank<N>.json``, ``<config stem>-lora-rank<N>.safetensors``)."""
    from torch._dynamo.utils import counters

    from qflux.config import load_config
    from qflux.run.train import train
    from qflux.training import compile as regional

    out, rank = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    original = regional.compile_blocks

    def recorded(*args, **kwargs):
        reports.append(original(*args, **kwargs))
        return reports[-1]

    regional.compile_blocks = recorded  # train imports it from the module when train.compile is on
    for path in map(Path, sys.argv[2:]):
        reports.clear()
        graphs = counters["stats"]["unique_graphs"]
        result = train(load_config(path))
        save_file(result.lora, str(out / f"{path.stem}-lora-rank{rank}.safetensors"))
        (out / f"{path.stem}-rank{rank}.json").write_text(json.dumps({
            "world": int(os.environ.get("WORLD_SIZE", "1")), "steps": result.steps, "losses": result.losses,
            "compile": dataclasses.asdict(reports[0]) if reports else None,
            "graphs": counters["stats"]["unique_graphs"] - graphs}))


if __name__ == "__main__":
    main()
