"""Shared test setup: seed every generator before each test, and the checkpoint fixtures in tests/fixtures."""
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"  # names and shapes of the public checkpoints, as JSON

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in the interpreter. triton.jit reads this variable when a kernel module is
# imported, so it is set here, before any test imports model.py or kernels/. On a GPU the kernels are compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def fixture_json():
    """Load a checkpoint-description fixture from tests/fixtures (names, shapes and counts of a public file)."""
    import json

    def load(name):
        return json.loads((FIXTURES / f"{name}.json").read_text())

    return load


@pytest.fixture
def spawn_ranks():
    """spawn_ranks(worker, *args, world=2, timeout=150) runs worker(rank, world, port, *args) in `world` spawned
    processes, which form a gloo group on a free localhost port; the test fails if they take longer than timeout."""

    def run(worker, *args, world=2, timeout=150):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.start_processes(worker, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"{world} gloo ranks running {worker.__name__} did not finish in {timeout} s")

    return run
