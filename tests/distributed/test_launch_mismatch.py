"""``accelerate launch --cpu --num_processes 2 -m qflux train`` starts ONE process (accelerate's simple launcher
runs N processes only under mpirun); before this check that process trained alone and exited 0. Now it stops
with the working command (``--multi_gpu``, which qflux runs on CPU with gloo) before it writes anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qflux.errors import UserError
from qflux.testing import tiny_config, write_config
from qflux.training.launch import check_world_size, requested_processes

ACCELERATE = Path(sys.executable).with_name("accelerate")
# what accelerate's simple launcher sets for `--cpu --num_processes 2` (accelerate.utils.launch)
SIMPLE_LAUNCHER_ENV = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def flat(text: str) -> str:
    return " ".join(text.split())


def test_accelerate_launch_cpu_with_two_processes_is_refused(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 2, "save_every": 0}))
    env = {**os.environ, "QFLUX_LOAD_PLUGINS": "kontext", "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run([str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qflux", "train",
                           "--config", str(config)], capture_output=True, text=True, timeout=400, env=env)
    said = flat(proc.stderr)
    assert proc.returncode != 0, said[-3000:]  # qflux exits 2; accelerate's launcher reports that as 1
    assert "error: accelerate launch was asked for 2 processes but started this one alone" in said, said[-3000:]
    assert "accelerate launch --multi_gpu --num_processes 2 -m qflux train" in said
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_the_launcher_environment_alone_exits_2(tmp_path):
    """The same environment without accelerate as the parent (the count is then not known): exit 2."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": 2, "save_every": 0}))
    env = {**os.environ, **SIMPLE_LAUNCHER_ENV, "QFLUX_LOAD_PLUGINS": "kontext", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "qflux", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "asked for several processes but started this one alone" in flat(proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("environ, processes, launcher", [
    ({}, 1, None),  # python -m qflux train
    ({"ACCELERATE_USE_CPU": "True"}, 1, None),  # accelerate launch --cpu (one process: no MASTER_ADDR)
    ({**SIMPLE_LAUNCHER_ENV, "WORLD_SIZE": "2"}, 2, None),  # torchrun (--multi_gpu)
    ({**SIMPLE_LAUNCHER_ENV, "PMI_SIZE": "2"}, 2, None),  # mpirun (--mpirun_hostfile)
    (SIMPLE_LAUNCHER_ENV, 1, ["python", "accelerate", "launch", "--num_processes", "1", "x.py"]),  # MASTER_ADDR
])                                                                                                 # from a cluster
def test_working_launches_pass(environ, processes, launcher):
    check_world_size(processes, environ, launcher or [])


def test_the_requested_count_comes_from_the_launcher_command_line():
    assert requested_processes(["accelerate", "launch", "--cpu", "--num_processes", "4", "-m", "qflux"]) == 4
    assert requested_processes(["accelerate", "launch", "--num-processes=3", "x.py"]) == 3
    assert requested_processes(["accelerate", "launch", "--config_file", "c.yaml", "x.py"]) is None
    assert requested_processes(["bash"]) is None
    with pytest.raises(UserError, match="asked for 4 processes .* --multi_gpu --num_processes 4"):
        check_world_size(1, SIMPLE_LAUNCHER_ENV, ["accelerate", "launch", "--cpu", "--num_processes", "4", "x.py"])
