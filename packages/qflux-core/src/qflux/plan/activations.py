"""The activation model: what a training step keeps for backward, per repeated block, from the tokens it
runs on, the blocks' width, the activation dtype and the trainer's measured coefficients
(``MemoryProfile.activations``; see ``qflux.plan.probe``).

- without gradient checkpointing every block keeps ``k x tokens x width x element size`` per sample until
  its backward runs, so the whole stack is held at the end of the forward;
- with it, a block keeps only its input (coefficient 1: ``tokens x width``, measured as such), and backward
  recomputes one block at a time, which then holds its full ``k``.

On top of what is kept, backward needs a working set: the gradients flowing between blocks and the block
being differentiated (``BACKWARD_BLOCKS`` blocks' worth, calibrated by benchmarks/plan_accuracy.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qflux.types import MemoryProfile

UNCALIBRATED = 36.0  # a block class no profile names: the largest coefficient measured so far, rounded up
CHECKPOINTED = 1.0  # a checkpointed block keeps its input: tokens x width (measured: SavedBytesProbe)
BACKWARD_BLOCKS = 1.0  # backward's working set, in blocks' full activations
SAMPLING_BLOCKS = 0.5  # an inference forward (no grad) holds about half a block's activations at its peak
# On the CPU the process's resident set, not the live tensors, is what runs out: glibc keeps the step's freed
# blocks (sizes differ, so they fragment) and the weights, memory-mapped from safetensors, are paged in during
# the first forward. Measured (benchmarks/plan_accuracy.py, a 100 M-parameter FLUX at 256 and 512 px): the RSS
# grows over the first step by ~2.7x the stack's saved bytes without checkpointing and ~1.26x with it.
CPU_RETAINED = 2.7
CPU_RETAINED_CHECKPOINTED = 1.26


@dataclass(frozen=True)
class Tokens:
    """Tokens of one training sample: the noisy target, the references (all together) and the prompt."""

    target: int
    references: int
    text: int

    @property
    def total(self) -> int:
        return self.target + self.references + self.text


def coefficients(profile: MemoryProfile | None, classes: Sequence[str], half: bool = False) -> tuple[list[float], list[str]]:
    """Each block's coefficient (``half``: a half-precision base under a float32 adapter, ``MemoryProfile.half``
    where the profile has them), and the classes the profile does not know (they get ``UNCALIBRATED``)."""
    known = dict((profile.half or profile.activations) if half else profile.activations) if profile else {}
    missing = sorted({c for c in classes if c not in known})
    return [known.get(c, UNCALIBRATED) for c in classes], missing


def kept_bytes(ks: Sequence[float], tokens: int, width: int, element: int, batch: int, checkpointing: bool) -> int:
    """Bytes the blocks keep for backward at the end of the forward pass."""
    unit = tokens * width * element * batch
    if checkpointing:
        return int(CHECKPOINTED * unit * len(ks))
    return int(sum(ks) * unit)


def backward_bytes(ks: Sequence[float], tokens: int, width: int, element: int, batch: int, checkpointing: bool) -> int:
    """Backward's working set on top of what is kept (with checkpointing: one block recomputed as well)."""
    unit = tokens * width * element * batch
    largest = max(ks, default=0.0)
    return int((BACKWARD_BLOCKS + (1.0 if checkpointing else 0.0)) * largest * unit)


def sampling_bytes(ks: Sequence[float], tokens: int, width: int, element: int) -> int:
    """The peak of one denoising forward without gradients (one image)."""
    return int(SAMPLING_BLOCKS * max(ks, default=0.0) * tokens * width * element)


def cpu_step_bytes(ks: Sequence[float], tokens: int, width: int, element: int, batch: int, checkpointing: bool) -> int:
    """Host RAM a training step adds on a machine without an accelerator (see ``CPU_RETAINED``)."""
    stack = sum(ks) * tokens * width * element * batch
    return int(stack * (CPU_RETAINED_CHECKPOINTED if checkpointing else CPU_RETAINED))
