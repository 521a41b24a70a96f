"""The load benchmark's servers: how each system's server is started, waited for and stopped.

A server is a subprocess on 127.0.0.1 and a free port, in its own process group (vLLM starts an
engine process of its own), its output sent to a log file. It is ready when ``GET /health``
answers 200; it is stopped with SIGTERM to the whole group, then SIGKILL after a grace period,
whatever happened (errors, Ctrl-C).

- flora: ``python -m flora serve`` with ``--batching continuous|one-adapter|static``;
- vLLM: its CPU build's OpenAI server from the ``.venv-vllm`` made by ``make vllm-env``, the same
  adapters as ``--lora-modules``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@dataclass(frozen=True)
class ServerSpec:
    """A server command line; ``{port}`` in it is replaced by a free port at start."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0


def flora_server(
    model: str, adapter_dir: Path, served_name: str, batching: str, max_num_seqs: int, max_loaded_adapters: int
) -> ServerSpec:
    command = (sys.executable, "-m", "flora", "serve", "--model", model, "--served-model-name", served_name,
               "--adapter-dir", str(adapter_dir), "--host", "127.0.0.1", "--port", "{port}",
               "--max-num-seqs", str(max_num_seqs), "--max-loaded-adapters", str(max_loaded_adapters),
               "--batching", batching, "--dtype", "float32")  # fmt: skip
    return ServerSpec(name=f"flora --batching {batching}", command=command)


def vllm_available() -> bool:
    """Whether ``make vllm-env`` completed (it leaves this stamp last)."""
    return (VLLM_PYTHON.parent.parent / ".installed").is_file()


def vllm_server(
    model_dir: Path, adapters: dict[str, Path], served_name: str, rank: int, max_num_seqs: int, max_loras: int
) -> ServerSpec:
    """vLLM's OpenAI server on CPU with the flags its CPU build needs and otherwise its defaults.

    ``--gpu-memory-utilization`` sizes the KV cache in RAM on CPU; prefix caching is off (the
    prompts are windows of one text: every system computes each prompt in full). vLLM's own CPU
    placement is kept (its worker on one core, the other core for its scheduler and HTTP server):
    measured here, it beats giving the worker both cores (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) and
    preloading Intel's OpenMP runtime (see docs/serving.md).
    """
    command = (str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", "{port}",
               "--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
               "--max-lora-rank", str(rank), "--max-loras", str(max_loras), "--max-cpu-loras", str(max_loras),
               "--max-num-seqs", str(max_num_seqs), "--dtype", "float32", "--enforce-eager",
               "--gpu-memory-utilization", "0.2", "--max-model-len", "2048", "--no-enable-prefix-caching",
               "--disable-uvicorn-access-log")  # fmt: skip
    return ServerSpec(name="vllm", command=command)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``with Server(spec, log) as url:`` a started, healthy server; stopped on leaving the block."""

    def __init__(self, spec: ServerSpec, log_path: Path):
        self.spec = spec
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> str:
        port = free_port()
        command = [part.replace("{port}", str(port)) for part in self.spec.command]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | self.spec.env, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        try:
            self._wait_healthy(url)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        return url

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_healthy(self, url: str) -> None:
        deadline = time.perf_counter() + self.spec.startup_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"{self.spec.name} not healthy after {self.spec.startup_timeout_s:.0f} s; see {self.log_path}"
        )

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the group, SIGKILL to whatever of it is left after ``grace_s``."""
        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:  # the whole group is gone
                break
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        self.process.wait()
