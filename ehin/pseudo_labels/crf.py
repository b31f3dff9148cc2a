"""Dense-CRF labels from a response map (METHOD §6.2; IRNet's `cam_to_ir_label`, as TRIS uses it).

A map normalised by its maximum is thresholded twice: at the foreground threshold (0.3) and at the
background threshold (0.1). Each binary seed map is refined by a dense CRF (pydensecrf DenseCRF2D:
unary from labels with gt_prob 0.7; Gaussian sxy 3 compat 3; bilateral sxy 50 srgb 5 compat 10;
10 mean-field iterations). The two refined maps are combined as IRNet's conf_fg / conf_bg:

- foreground (1): the CRF of the high-threshold seeds keeps the pixel as foreground — confident,
  because even the strict seed grows there;
- background (0): the CRF of the low-threshold seeds calls the pixel background — confident, because
  even the generous seed does not reach it;
- ignore (255): everything else (the band the two thresholds disagree on).

Only numpy and pydensecrf are imported here so that multiprocessing workers start fast.
"""
from __future__ import annotations

import numpy as np

FG, BG, IGNORE = 1, 0, 255

# METHOD §6.2 (IRNet's imutils.crf_inference_label, run once per seed map): fixed pairwise terms.
GAUSSIAN_SXY, GAUSSIAN_COMPAT = 3, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 50, 5, 10


def crf_inference_labels(image: np.ndarray, label_maps: list[np.ndarray], n_labels: int = 2, *,
                         gt_prob: float = 0.7, iterations: int = 10) -> list[np.ndarray]:
    """Refine hard label maps of one image with a dense CRF each; image uint8 [H,W,3], each map int [H,W]
    -> int [H,W].

    The maps share one DenseCRF2D: its pairwise terms depend on the image alone, and building their
    permutohedral lattices took about half of a CRF's time at 128 px on one CPU core (session 46; a ref's
    labels then took about three quarters of their time before).
    Mean-field inference starts from the unary set last and never changes the pairwise terms, so each
    map's result is bitwise what a CRF of its own gives (tests/test_pseudo_labels.py checks it).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = image.shape[:2]
    if any(lab.shape != (h, w) for lab in label_maps):
        raise ValueError(f"image {image.shape[:2]} and labels {[lab.shape for lab in label_maps]} differ in size")
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    d.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB,
                           rgbim=np.array(image, dtype=np.uint8, order="C"),  # a writable copy: pydensecrf
                           compat=BILATERAL_COMPAT)                          # refuses read-only buffers
    out = []
    for labels in label_maps:
        # zero_unsure=False: label 0 is background, a real class, not "unknown" (IRNet does the same).
        unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
        d.setUnaryEnergy(np.ascontiguousarray(unary))
        q = d.inference(iterations)
        out.append(np.argmax(np.asarray(q).reshape(n_labels, h, w), axis=0))
    return out


def crf_label(image: np.ndarray, norm_map: np.ndarray, *, fg_threshold: float = 0.3,
              bg_threshold: float = 0.1, gt_prob: float = 0.7, iterations: int = 10) -> np.ndarray:
    """uint8 [H,W] with 1 = foreground, 0 = background, 255 = ignore (module docstring).

    `norm_map` is the response map at the image's size, already divided by its maximum (in [0, 1]).
    """
    if not bg_threshold <= fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} must not exceed fg_threshold {fg_threshold}")
    fg_seed = (norm_map > fg_threshold).astype(np.int64)
    bg_seed = (norm_map > bg_threshold).astype(np.int64)  # 1 = "not surely background"
    fg_conf, bg_conf = crf_inference_labels(image, [fg_seed, bg_seed], gt_prob=gt_prob, iterations=iterations)
    out = np.full(norm_map.shape, IGNORE, dtype=np.uint8)
    # IRNet: conf = fg_conf; conf[fg_conf == 0] = 255; conf[bg_conf + fg_conf == 0] = 0
    out[fg_conf == 1] = FG
    out[(fg_conf == 0) & (bg_conf == 0)] = BG
    return out


def crf_label_job(args: tuple) -> np.ndarray:
    """Pool worker: (image, norm_map, kwargs) -> crf_label(...). Module-level so it pickles."""
    image, norm_map, kwargs = args
    return crf_label(image, norm_map, **kwargs)
