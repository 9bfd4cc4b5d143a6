"""``qflux cache`` and ``train --cache`` encode on the training device (issue 13 section 5): the encoders are
moved to the device the training loop would use before the first sample is encoded.

A device spy: the device resolution answers a marker device, and the encoders' ``to`` records where it is
asked to go (without moving, so the tiny encoders still run on the CPU).
"""

from __future__ import annotations

import torch

from qflux.config import load_config
from qflux.run.cache import build_cache
from qflux.testing import spied_registry, tiny_config, write_config
from qflux.training import encoding

MARKER = torch.device("meta")  # no real device is "meta": only the resolution below can have produced it


class DeviceSpy:
    """Wraps the encoders ``Trainer.load_encoders`` returns so that ``to(device)`` is recorded, in order with
    the encode calls."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def load_encoders(self, inner, model):
        encoders = inner(model)

        def to(device):
            self.events.append(torch.device(device))
            return encoders

        encoders.to = to  # the instance attribute shadows the dataclass method
        self.events.append("loaded")
        return encoders

    def encode(self, inner, encoders, samples, model, empty_prompt):
        self.events.append("encode")
        return inner(encoders, samples, model, empty_prompt)


def test_cache_build_moves_the_encoders_to_the_training_device_before_encoding(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding, "training_device", lambda: MARKER)
    config = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, "kontext", data={"path": "builtin:shapes", "resolution": 32, "num_samples": 2, "holdout": 0})))
    spy = DeviceSpy()
    report = build_cache(config, spied_registry(spy))
    assert report.encoded == 2 and report.encoders_loaded
    assert spy.events[:2] == ["loaded", MARKER], f"the encoders were not moved to the training device: {spy.events}"
    assert "encode" in spy.events[2:]


def test_the_training_device_is_the_one_the_training_loop_uses():
    """Without an accelerator both are the CPU; with one, both are accelerate's device for this process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # as train() does: no other test's settings
    expected = Accelerator(cpu=not torch.accelerator.is_available()).device
    assert encoding.training_device() == expected
