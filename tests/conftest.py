import os

import pytest
import torch

# Tests are small; two threads match CI's 2-core machine and avoid oversubscription.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # tests set their own stores


@pytest.fixture
def smoke_cfg():
    from cf.config import load_config

    return load_config("smoke")
