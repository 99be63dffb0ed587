import os

# The Triton interpreter must be chosen before torch/triton are imported. On a machine without an
# NVIDIA device, run Triton kernels on the CPU through it; on a GPU machine, on the GPU.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
