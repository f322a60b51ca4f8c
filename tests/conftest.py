import os
import socket

import pytest
import torch

# Tests are small; two threads match CI's 2-core machine and avoid oversubscription. Under pytest-xdist
# (`make test` runs one worker per core) each worker takes one thread, so the workers share the cores
# instead of fighting over them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
torch.set_num_threads(1 if _WORKERS > 1 else min(2, os.cpu_count() or 1))
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # tests set their own stores


@pytest.fixture
def smoke_cfg():
    from cf.config import load_config

    return load_config("smoke")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and no network: any download attempt fails the test loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError("cf tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path
