"""Stage-1 model: bilateral prompt (Eq. 4-7), HIPM (Eq. 8-13), EHIN (Eq. 3, D5, D6), ECLM (early maps,
L_CL: Eq. 15, ehin/model/eclm.py), frozen scorer (Eq. 16)."""
from ehin.model.bilateral_prompt import BilateralPrompt
from ehin.model.ehin import EHIN, build_model
from ehin.model.hipm import HIPM
from ehin.model.scorer import FrozenScorer

__all__ = ["BilateralPrompt", "EHIN", "FrozenScorer", "HIPM", "build_model"]
