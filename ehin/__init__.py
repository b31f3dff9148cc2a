"""EHIN: Early-aware Hierarchical Interaction Network for weakly-supervised referring segmentation."""
import os

# Must run before anything imports torchvision (open_clip does): see the module's docstring.
from ehin import _torchvision_compat  # noqa: F401

# Nothing here may wait on a model hub that cannot be reached (issue: foundation).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
