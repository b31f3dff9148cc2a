"""Stage 2 (paper §3.5, METHOD §7): a segmentation network trained on the pseudo-labels."""
from ehin.stage2.losses import EMATeacher, Stage2Loss, consistency, masked_bce, masked_dice
from ehin.stage2.model import PixelWordAttention, Stage2Net, build_stage2, load_stage2

__all__ = ["EMATeacher", "PixelWordAttention", "Stage2Loss", "Stage2Net", "build_stage2", "consistency",
           "load_stage2", "masked_bce", "masked_dice"]
