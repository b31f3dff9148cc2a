"""Test-wide settings: a shared on-disk cache and the SLURM cluster fixture."""
import os
from pathlib import Path

# Generated datasets and the pretrained small CLIP are cached by config hash; tests share one cache
# (CI's .ci/run points EHIN_CACHE at the clone) so they are built once per machine, not per test.
os.environ.setdefault("EHIN_CACHE", str(Path(__file__).parent / ".cache" / "ehin"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.slurm_fixture"]


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two on the shared 2-core machine. A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
