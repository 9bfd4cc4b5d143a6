"""Ctrl-C during training: a flag checked between optimizer steps, agreed on by every process."""

from __future__ import annotations

import signal
import threading

import torch


class InterruptFlag:
    """Turns the first Ctrl-C into a flag the loop checks between optimizer steps (so a checkpoint never mixes
    weights of one step with the position of another); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def agreed(self, accelerator) -> bool:
        """True on every rank as soon as any rank was interrupted (one tiny all-reduce per step when N > 1)."""
        if accelerator.num_processes == 1:
            return self.raised
        flag = torch.tensor([1.0 if self.raised else 0.0], device=accelerator.device)
        return float(accelerator.reduce(flag, reduction="sum")) > 0

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
