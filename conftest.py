"""Test-wide settings: a shared on-disk cache and the SLURM cluster fixture."""
import os
from pathlib import Path

# Generated datasets and the pretrained small CLIP are cached by config hash; tests share one cache
# (CI's .ci/run points EHIN_CACHE at the clone) so they are built once per machine, not per test.
os.environ.setdefault("EHIN_CACHE", str(Path(__file__).parent / ".cache" / "ehin"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.slurm_fixture"]
