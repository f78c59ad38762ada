import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; this must be set before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels run: the GPU if there is one, else the interpreter on the CPU."""
    if torch.cuda.is_available() and not INTERPRETED:
        return "cuda"
    if INTERPRETED:
        return "cpu"
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_default_dtype():
    """In-process vLLM engines set torch's default dtype to the model's and leave it so; later tests
    in the same process must not inherit it."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
