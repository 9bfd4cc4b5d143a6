"""Outputs get the umask's normal modes (issue 14 item 7).

Before: the exported LoRA was 0600 and checkpoint folders 0700 under umask 022 (``mkstemp`` / ``mkdtemp``
modes kept through the atomic rename), so ComfyUI or a colleague under another uid could not read them.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch

from qflux.adapters.lora_files import attach_lora, checkpoint_lora_metadata, export_lora, lora_state_dict
from qflux.config.schema import LoraConfig
from qflux.plugins import build_registry
from qflux.training import checkpoint as ckpt


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_lora_export_and_checkpoints_follow_the_umask(mask, file_mode, dir_mode, tmp_path):
    from qflux_kontext.tiny import tiny_transformer

    lora = LoraConfig(rank=2, alpha=4)
    transformer = tiny_transformer()
    attach_lora(transformer, lora)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with umask(mask):
        run = tmp_path / "run"
        exported = export_lora(transformer, build_registry().trainer("kontext").info.pipeline, lora, run)
        position = ckpt.TrainingPosition(step=1, epoch=0, batch_in_epoch=1, config_fingerprint="f")
        saved = ckpt.save_checkpoint(run, position, lora_state_dict(transformer), optimizer, scheduler, keep=2,
                                     lora_metadata=checkpoint_lora_metadata(lora))
    assert oct(mode(exported)) == oct(file_mode)
    assert oct(mode(saved)) == oct(dir_mode) and oct(mode(saved.parent)) == oct(dir_mode)
    assert {p.name: oct(mode(p)) for p in saved.iterdir()} == {p.name: oct(file_mode) for p in saved.iterdir()}
