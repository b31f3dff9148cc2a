"""EHIN: Early-aware Hierarchical Interaction Network for weakly-supervised referring segmentation."""
import os

# Portable numerics (EHIN_PORTABLE_NUMERICS=1) must be chosen before torch runs a kernel.
from ehin import numerics as _numerics  # noqa: E402

_numerics.apply_env()

# Must run before anything imports torchvision (open_clip does): see the module's docstring.
from ehin import _torchvision_compat  # noqa: F401

# Nothing here may wait on a model hub that cannot be reached (issue: foundation).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_numerics.apply_torch()

__version__ = "0.1.0"
