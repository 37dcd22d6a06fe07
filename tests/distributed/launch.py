"""Running real multi-process launches from a test: CPU settings, a free port, a hard timeout.

A launch runs in a session of its own, so when it outlives its timeout the launcher and every
worker it started are killed together and the test fails saying so, instead of stalling the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_ZERO3 = "configs/cpu_zero3.yaml"
ENV = {
    "OMP_NUM_THREADS": "1",  # 2 processes on 2 cores: one thread each
    "DS_ACCELERATOR": "cpu",
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The pipeline launches stages with the `accelerate` command: this environment's.
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}


@dataclass
class Finished:
    returncode: int
    output: str  # stdout and stderr, interleaved
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], timeout: float) -> Finished:
    """Run `command` from the repository root; kill its whole process group at `timeout`."""
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=os.environ | ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(
            f"did not finish within {timeout:.0f} s (a hang?):\n$ {' '.join(command)}\n{output[-4000:]}"
        )
    return Finished(proc.returncode, output, time.monotonic() - start)


def launch(*args: str, timeout: float = 240) -> Finished:
    """`accelerate launch --config_file configs/cpu_zero3.yaml --num_processes 2 ARGS...`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_ZERO3]
    command += ["--num_processes", "2", "--main_process_port", str(free_port()), *args]
    return run(command, timeout)


def succeeded(result: Finished) -> Finished:
    assert result.returncode == 0, result.output[-6000:]
    return result
