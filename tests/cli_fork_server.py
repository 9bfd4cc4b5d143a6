"""A pre-warmed launcher of ``python -m qflux`` processes for the CLI tests.

A ``qflux`` process spends ~12 of its ~13 s importing torch, diffusers, transformers and peft; the CLI tests
start ~200 of them. This server imports those once, then for each request forks a child that runs the CLI
exactly as ``python -m qflux ARGS`` does (``runpy`` of the ``qflux`` package as ``__main__``), in its own
process: its own working directory, environment, file descriptors 1 and 2 and exit status. Only the
interpreter start and the imports are shared; each child begins from the same state the imports left.

What a fork cannot reproduce stays on a plain subprocess (``CliServer.can_serve``): a different ``PYTHONPATH``
or ``sitecustomize`` (import-time behaviour), a ``preexec_fn``, a wrapper command.

Protocol (one JSON object per line): request ``{"argv", "cwd", "env", "timeout", "out", "err"}`` -> reply
``{"returncode"}``, with stdout/stderr written to the files ``out``/``err``. Run as a script: the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# environment variables that libraries read when imported (a fork inherits the server's imports, so these must be
# the server's); OMP_NUM_THREADS is not among them: the child sets torch's thread count from it
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "TORCH", "PYTORCH", "CUDA", "MKL",
                        "PYTHON", "HOME", "XDG_", "TOKENIZERS", "ACCELERATE", "BITSANDBYTES", "LD_")

WARM_IMPORTS = (
    "torch", "diffusers", "diffusers.models.transformers", "diffusers.models.autoencoders", "transformers", "peft",
    "accelerate", "safetensors.torch", "qflux.cli.main", "qflux.run.train", "qflux.run.preflight",
)


def _serve() -> None:
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    for name in ("FluxTransformer2DModel", "AutoencoderKL", "FluxKontextPipeline", "QwenImageTransformer2DModel"):
        getattr(importlib.import_module("diffusers"), name, None)  # diffusers' lazy attributes: import them now
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: becomes `python -m qflux ARGV`
            _child(request)
        deadline = time.monotonic() + request["timeout"]
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.02)
        sys.stdout.write(json.dumps({"returncode": status}) + "\n")
        sys.stdout.flush()


def _child(request: dict) -> None:
    import runpy

    code = 1
    try:
        os.setsid()  # its own process group, like a fresh subprocess (Ctrl-C of the test run is not its)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's stdin, /dev/null as subprocess.run gives
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        if "OMP_NUM_THREADS" in request["env"]:  # what the OpenMP runtime would have read at start-up
            import torch

            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        sys.argv = ["python -m qflux", *request["argv"]]
        code = 0
        try:
            runpy.run_module("qflux", run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if exit_.code is not None and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, status 1
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


class CliServer:
    """The client side: one server per test process, started on first use."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="qflux-cli-"))

    @staticmethod
    def server_env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in ("QFLUX_LOAD_PLUGINS", "PYTHONPATH")}

    @classmethod
    def can_serve(cls, env: dict[str, str], preexec_fn=None, prefix=()) -> bool:
        """Whether a fork of the server behaves as ``python -m qflux`` would with ``env``: the libraries read
        these variables when they are imported (huggingface_hub's HF_HUB_OFFLINE and cache paths, ...)."""
        if preexec_fn is not None or prefix or env.get("PYTHONPATH"):
            return False
        base = cls.server_env()
        read_at_import = [k for k in {*env, *base} if k.startswith(IMPORT_TIME_PREFIXES)]
        return all(env.get(k) == base.get(k) for k in read_at_import)

    def _start(self) -> subprocess.Popen:
        env = self.server_env()
        proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            out, err = self._dir / "out", self._dir / "err"
            request = {"argv": list(argv), "cwd": str(cwd), "env": env, "timeout": timeout, "out": str(out),
                       "err": str(err)}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            reply = json.loads(self._proc.stdout.readline())
            args = [sys.executable, "-m", "qflux", *argv]
            if reply["returncode"] == "timeout":
                raise subprocess.TimeoutExpired(args, timeout)
            return subprocess.CompletedProcess(args, reply["returncode"], out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        import shutil

        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)


_server: CliServer | None = None


def run_qflux_process(args: list, cwd: Path, env: dict[str, str], timeout: float = 240, preexec_fn=None,
                      prefix: list[str] | tuple = ()) -> subprocess.CompletedProcess:
    """``python -m qflux ARGS`` in its own process, as ``subprocess.run(..., capture_output=True, text=True)``
    returns it: forked from the warm server when nothing import-time differs, else a plain subprocess
    (``QFLUX_TEST_FORK=0``: always a plain one)."""
    global _server
    args = [str(a) for a in args]
    if os.environ.get("QFLUX_TEST_FORK", "1") != "0" and CliServer.can_serve(env, preexec_fn, prefix):
        if _server is None:
            import atexit

            _server = CliServer()
            atexit.register(_server.close)
        return _server.run(args, Path(cwd), env, timeout)
    return subprocess.run([*prefix, sys.executable, "-m", "qflux", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


if __name__ == "__main__":
    _serve()
