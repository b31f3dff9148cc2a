"""The pseudo-label pipeline (METHOD §6): maps + PRMS -> CRF -> IRNet boundaries -> random walk.

Work happens in chunks of refs (sorted by ref id) inside a work folder, so that a killed run goes on
where it stopped and writes the same file:

    <work>/manifest.json        what the chunks were made from (a changed input refuses to mix)
    <work>/crf/NNNNN.npz        phase A: PRMS choice, the chosen map, CRF labels, quality counts
    <work>/irnet.pt             phase B: boundary-head weights after each finished epoch
    <work>/rw/NNNNN.npz         phase C: random-walk labels, quality counts
    <out>                       merged at the end (written atomically)

Every file is written to a temporary name and renamed; a phase skips the chunks that exist. Zip
members carry a fixed timestamp, so the bytes depend on the inputs alone.

The output file (one per dataset split) is an .npz keyed by ref id: pycocotools RLE strings of the
foreground and of the ignore region at the stage-2 training resolution (data.image_size), the PRMS
sentence choice, and a JSON `meta` with the settings and the pseudo-label quality per step
(IoU / overall IoU against the GT masks, which nothing but this report reads).

Steps that are switched off: no CRF -> IRNet learns from the thresholded map itself (fg > 0.3,
bg < 0.1, ignore between: the CRF's seeds without the CRF); no random walk -> the last enabled step's
labels are the pseudo-labels; neither -> the map thresholded at pseudo.map_threshold (default 0: the
stage-1 foreground of METHOD §5).

Measured at smoke size (synth-refcoco+, 300 scenes / 987 train refs, 64 px, clip-tiny, stage 1 at
val IoU 11.3 / PointM 36.0): pseudo-label IoU vs GT maps 12.5 -> +CRF 40.7 -> +random walk 9.9
(38 s for all steps on one CPU thread). With IRNet's radii (10 and 5 stride-4 cells) on a 16×16
grid the walk spreads over the background (46 % of pixels foreground); a head trained on GT labels
did no better, and fewer walk steps or a smaller radius only approach the one-step result (~26 on
a 300-ref sample). Stage 2 (15 epochs) reached val IoU 8.6 / PointM 35.6 on the walk's labels and
34.2 / 57.9 on the CRF labels (`--no-random-walk`). At 320 px (an 80×80 grid) the radii mean what
they mean in IRNet; the small profiles may prefer `pseudo.random_walk: false`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ehin.checkpoint import weights_digest
from ehin.cli import UserError
from ehin.pseudo_labels.crf import BG, FG, IGNORE, crf_label_job

FORMAT_VERSION = 1
STEPS = ("maps", "crf", "rw")
CRF_DRAIN_S = 120  # the longest run_pipeline waits for the CRF in flight when it stops early (a chunk takes seconds)


class Interrupted(RuntimeError):
    """Raised by `stop_after` (tests simulate a killed run with it)."""


# ---- inputs -----------------------------------------------------------------------------------------

@dataclass
class RefItem:
    ref_id: int
    image_id: int
    image: np.ndarray                 # uint8 [S,S,3] at the stage-2 training resolution
    sentences: list[str]
    sent_ids: list[int]
    gt: np.ndarray | None = None      # bool [H0,W0]: only the quality report reads it


class RefSource(Protocol):
    """Refs in a fixed order: `len`, `item(i) -> RefItem`, `image(i) -> uint8 [S,S,3]`, `gt(i)`."""

    image_size: int

    def __len__(self) -> int: ...
    def item(self, i: int) -> RefItem: ...
    def image(self, i: int) -> np.ndarray: ...
    def gt(self, i: int) -> np.ndarray | None: ...


class MapProvider(Protocol):
    """Stage-1 maps and PRMS: `maps(images01 [n,3,S,S], sentences) -> [n,h,w] >= 0` and
    `select(images01 [R,3,S,S], norm_maps list[[n_r,h,w]], sentences list[list[str]]) -> list[int]`."""

    def maps(self, images01: torch.Tensor, sentences: Sequence[str]) -> torch.Tensor: ...
    def select(self, images01: torch.Tensor, norm_maps: list[torch.Tensor], sentences: list[list[str]]) -> list[int]: ...


class ReferSource:
    """The refs of one split of a `ReferDataset`, sorted by ref id."""

    def __init__(self, refer, split: str, image_size: int, with_gt: bool = True):
        self.refer = refer
        self.split = split
        self.image_size = int(image_size)
        self.with_gt = with_gt
        self.refs = sorted(refer.refs(split), key=lambda r: int(r["ref_id"]))
        if not self.refs:
            raise ValueError(f"{refer!r}: split '{split}' has no refs")
        from ehin.data.datasets import CACHE_BYTES

        # IRNet reads every image once per epoch: keep them when the split is small (synthetic data)
        n_images = len({r["image_id"] for r in self.refs})
        self._cache: dict[int, np.ndarray] | None = {} if 3 * n_images * self.image_size**2 <= CACHE_BYTES else None

    def __len__(self) -> int:
        return len(self.refs)

    def image(self, i: int) -> np.ndarray:
        from ehin.data.datasets import resize_image_uint8  # the datasets' resize (PIL bilinear, METHOD §1)

        image_id = self.refs[i]["image_id"]
        if self._cache is not None and image_id in self._cache:
            return self._cache[image_id]
        img = resize_image_uint8(self.refer.load_image(image_id), self.image_size)
        if self._cache is not None:
            self._cache[image_id] = img
        return img

    def gt(self, i: int) -> np.ndarray | None:
        return self.refer.ann_mask(self.refs[i]["ann_id"]) if self.with_gt else None

    def item(self, i: int) -> RefItem:
        ref = self.refs[i]
        return RefItem(
            ref_id=int(ref["ref_id"]), image_id=int(ref["image_id"]), image=self.image(i),
            sentences=[self.refer.sentence(s) for s in ref["sentences"]],
            sent_ids=[int(s["sent_id"]) for s in ref["sentences"]],
            gt=self.gt(i),
        )


class ModelMaps:
    """MapProvider from a stage-1 model (`predict` -> raw R_ii) and a FrozenScorer (PRMS)."""

    def __init__(self, model, scorer, device: torch.device, batch_size: int = 32):
        self.model = model.eval()
        self.scorer = scorer.eval() if scorer is not None else None
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def maps(self, images01: torch.Tensor, sentences: Sequence[str]) -> torch.Tensor:
        tokens = self.model.backbone.tokenize(list(sentences))
        out = []
        for s in range(0, len(sentences), self.batch_size):
            out.append(self.model.predict(images01[s:s + self.batch_size].to(self.device),
                                          tokens[s:s + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def select(self, images01: torch.Tensor, norm_maps: list[torch.Tensor], sentences: list[list[str]]) -> list[int]:
        from ehin.pseudo_labels.prms import select_many

        if self.scorer is None:
            return [0] * len(norm_maps)
        # tokens=None: the scorer tokenises with its own tokenizer (it may be another CLIP).
        feats = [self.scorer.encode_texts(None, s) for s in sentences]
        return select_many(images01.to(self.device), [m.to(self.device) for m in norm_maps], feats,
                           self.scorer.score_masked, batch_size=self.batch_size)


# ---- small helpers ----------------------------------------------------------------------------------

def to_tensor01(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H,W,3] images -> float [B,3,H,W] in [0,1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[n,h,w] -> [n,size,size] bilinear (align_corners False, as the metrics upsample)."""
    return F.interpolate(maps.float()[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map by its maximum; an all-zero (or all-negative) map becomes all zero.
    Applied after `upsample`, this is METHOD §3.6's order (upsample, then ReLU) up to S."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)
    return maps.clamp_min(0) / peak[:, None, None]


def resize_nearest(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    if label.shape == tuple(shape):
        return label
    return cv2.resize(label, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def overlap(label: np.ndarray, gt: np.ndarray | None) -> tuple[int, int]:
    """(|P∩G|, |P∪G|) of the foreground of a label at S×S against the GT at its original size."""
    if gt is None:
        return 0, 0
    fg = resize_nearest((label == FG).astype(np.uint8), gt.shape).astype(bool)
    return int((fg & gt).sum()), int((fg | gt).sum())


def seed_label(norm_map: np.ndarray, fg_threshold: float, bg_threshold: float) -> np.ndarray:
    """The CRF's seeds without the CRF: fg > fg_threshold, bg <= bg_threshold, ignore between."""
    out = np.full(norm_map.shape, IGNORE, np.uint8)
    out[norm_map > fg_threshold] = FG
    out[norm_map <= bg_threshold] = BG
    return out


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps (same inputs -> same bytes), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def rle_pack(masks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """bool masks -> (concatenated pycocotools RLE bytes as uint8, offsets int64 [N+1])."""
    from pycocotools import mask as mask_utils

    blobs = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in masks]
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8)
    return data.copy(), offsets


def rle_unpack(data: np.ndarray, offsets: np.ndarray, i: int, size: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = data[offsets[i]:offsets[i + 1]].tobytes()
    return mask_utils.decode({"size": [size, size], "counts": counts}).astype(bool)


# ---- the output file --------------------------------------------------------------------------------

class PseudoLabels:
    """A merged pseudo-label file: `label(ref_id) -> uint8 [S,S]` with 0 bg, 1 fg, 255 ignore."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"pseudo-label file not found: {self.path}")
        try:
            z = load_npz(self.path)
            self.meta: dict = json.loads(str(z["meta"]))
        except Exception as e:
            raise UserError(f"{self.path} is not a pseudo-label file ({type(e).__name__}: {e})") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{self.path}: pseudo-label format {self.meta.get('format')} != {FORMAT_VERSION}")
        self.ref_ids = z["ref_ids"]
        self.sent_ids = z["sent_ids"]
        self._z = z
        self.image_size = int(self.meta["image_size"])
        self._index = {int(r): i for i, r in enumerate(self.ref_ids)}

    def __len__(self) -> int:
        return len(self.ref_ids)

    def __contains__(self, ref_id: int) -> bool:
        return int(ref_id) in self._index

    def label(self, ref_id: int) -> np.ndarray:
        i = self._index[int(ref_id)]
        z, s = self._z, self.image_size
        out = rle_unpack(z["fg_rle"], z["fg_offsets"], i, s).astype(np.uint8)
        out[rle_unpack(z["ignore_rle"], z["ignore_offsets"], i, s)] = IGNORE
        return out


def load_pseudo_labels(path: str | Path) -> PseudoLabels:
    return PseudoLabels(path)


def write_pseudo_labels(path: Path, ref_ids: Sequence[int], sent_ids: Sequence[int], labels: Sequence[np.ndarray],
                        meta: dict) -> None:
    fg_rle, fg_off = rle_pack(lab == FG for lab in labels)
    ig_rle, ig_off = rle_pack(lab == IGNORE for lab in labels)
    save_npz(path, {
        "ref_ids": np.asarray(ref_ids, np.int64), "sent_ids": np.asarray(sent_ids, np.int64),
        "fg_rle": fg_rle, "fg_offsets": fg_off, "ignore_rle": ig_rle, "ignore_offsets": ig_off,
        "meta": np.asarray(json.dumps({"format": FORMAT_VERSION, **meta}, sort_keys=True)),
    })


# ---- the pipeline -----------------------------------------------------------------------------------

@dataclass
class Settings:
    """The `pseudo` config section, resolved, and the run's seed: built by `from_config` from a loaded
    config, so its defaults are base.yaml's (no second copy here)."""

    crf: bool
    random_walk: bool
    prms: bool
    map_threshold: float
    fg_threshold: float
    bg_threshold: float
    crf_gt_prob: float
    crf_iterations: int
    rw_threshold: float
    rw_radius: int
    rw_beta: float
    rw_exp_times: int
    irnet_radius: int
    irnet_epochs: int
    irnet_batch_size: int
    irnet_lr: float
    irnet_weight_decay: float
    chunk_size: int
    workers: int
    seed: int  # train.seed

    @classmethod
    def from_config(cls, cfg: dict, **overrides: Any) -> "Settings":
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in cfg.get("pseudo", {}).items() if k in known}
        values["seed"] = int(cfg.get("train", {}).get("seed", 0))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def identity(self) -> dict:
        """What the chunk files depend on (not workers: the CRF runs per ref, order kept)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "workers"}


def _phase_a_maps(items: list[RefItem], provider: MapProvider, st: Settings, size: int) -> dict:
    """The model's part of a chunk of refs: maps of every sentence, PRMS's choice, the chosen maps normalised."""
    images01 = to_tensor01([it.image for it in items])
    flat_imgs = torch.cat([images01[r:r + 1].expand(len(it.sentences), -1, -1, -1) for r, it in enumerate(items)])
    flat_sents = [s for it in items for s in it.sentences]
    all_maps = provider.maps(flat_imgs, flat_sents)  # [Σn, h, w], raw R_ii (no ReLU yet)
    per_ref, start = [], 0
    for it in items:
        per_ref.append(all_maps[start:start + len(it.sentences)])
        start += len(it.sentences)
    if st.prms:
        # PRMS masks with the maps as evaluation sees them at S: upsample, then ReLU (METHOD §3.6)
        choice = provider.select(images01, [max_normalise(upsample(m, size)) for m in per_ref],
                                 [it.sentences for it in items])
    else:
        choice = [0] * len(items)
    chosen = torch.stack([m[c] for m, c in zip(per_ref, choice)])  # [R, h, w]
    norm = max_normalise(upsample(chosen, size)).numpy()  # METHOD §3.6/§6.2: upsample, ReLU, divide by max
    return {"choice": choice, "chosen": chosen, "norm": norm}


def _crf_jobs(items: list[RefItem], norm: np.ndarray, st: Settings) -> list[tuple]:
    kw = dict(fg_threshold=st.fg_threshold, bg_threshold=st.bg_threshold, gt_prob=st.crf_gt_prob,
              iterations=st.crf_iterations)
    return [(it.image, m, kw) for it, m in zip(items, norm)]


def _phase_a_record(items: list[RefItem], part: dict, crf_lab: list[np.ndarray] | None,
                    st: Settings) -> dict[str, np.ndarray]:
    """A chunk's file: PRMS's choice, the chosen maps, both labels (the CRF's, or the seeds' without it), and
    the quality counts."""
    choice, norm = part["choice"], part["norm"]
    maps_lab = [np.where(m > st.map_threshold, FG, BG).astype(np.uint8) for m in norm]
    if crf_lab is None:
        crf_lab = [seed_label(m, st.fg_threshold, st.bg_threshold) for m in norm]
    counts = np.array([[*overlap(a, it.gt), *overlap(b, it.gt)] for a, b, it in zip(maps_lab, crf_lab, items)],
                      np.int64).reshape(len(items), 4)
    return {
        "ref_ids": np.array([it.ref_id for it in items], np.int64),
        "sent_ids": np.array([it.sent_ids[c] for it, c in zip(items, choice)], np.int64),
        "maps": part["chosen"].numpy().astype(np.float32),
        "maps_label": np.stack(maps_lab),
        "crf_label": np.stack(crf_lab).astype(np.uint8),
        "counts": counts,  # maps inter, union, crf inter, union
        "has_gt": np.array([it.gt is not None for it in items]),
    }


def _rw_labels(head, images01: torch.Tensor, maps: torch.Tensor, st: Settings, size: int,
               device: torch.device) -> list[np.ndarray]:
    """Random-walk pseudo-labels (METHOD §6.4) for a batch: images01 [B,3,S,S], raw maps [B,h,w]."""
    from ehin.pseudo_labels.irnet import STRIDE
    from ehin.pseudo_labels.random_walk import random_walk

    boundary = head.boundary(images01.to(device))  # [B,1,S/4,S/4]
    grid = size // STRIDE
    x = max_normalise(upsample(maps.to(device), grid))  # IRNet walks the max-normalised stride-4 CAM
    with torch.no_grad():
        rw = random_walk(x, boundary, radius=st.rw_radius, beta=st.rw_beta, exp_times=st.rw_exp_times)
    rw = max_normalise(upsample(rw, size)).cpu().numpy()  # upsample, normalise (IRNet: rw_up / max)
    return [np.where(r > st.rw_threshold, FG, BG).astype(np.uint8) for r in rw]


def _quality(counts: np.ndarray, has_gt: np.ndarray) -> dict[str, float] | None:
    """IoU (mean over refs) and overall IoU (Σ∩ / Σ∪) in percent, from [n, 2] counts."""
    c = counts[has_gt]
    if len(c) == 0:
        return None
    union = np.maximum(c[:, 1], 1)
    return {"iou": round(float(100 * np.mean(c[:, 0] / union)), 3),
            "overall_iou": round(float(100 * c[:, 0].sum() / max(1, c[:, 1].sum())), 3), "n": int(len(c))}


def _label_stats(labels: Sequence[np.ndarray]) -> dict[str, float]:
    stack = np.stack(labels)
    return {"fg_fraction": round(float((stack == FG).mean()), 4),
            "ignore_fraction": round(float((stack == IGNORE).mean()), 4)}


def run_pipeline(source: RefSource, provider: MapProvider, trunk: torch.nn.Module | None, st: Settings, *,
                 out: str | Path, work_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 meta: dict | None = None, identity: dict | None = None, num_workers: int = 0,
                 stop_after: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) every step into `work_dir` and merge into `out`; returns the file's meta.

    trunk: the frozen CLIP backbone the IRNet head sits on (needed when st.random_walk).
    identity: JSON-able description of the inputs (stage-1 weights digest, dataset, split); a work
    folder made from other inputs is refused instead of being mixed in.
    stop_after: raise Interrupted after this many units of work (chunks, IRNet epochs) in this call.
    """
    from tqdm import tqdm

    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    size = int(source.image_size)
    n = len(source)
    manifest = {"format": FORMAT_VERSION, "settings": st.identity(), "image_size": size, "n_refs": n,
                "inputs": identity or {}}
    mpath = work / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old != json.loads(json.dumps(manifest)):
            raise UserError(f"{work} holds pseudo-label work made from other inputs or settings; "
                            f"delete it or choose another --work-dir")
    else:
        tmp = mpath.with_name("manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, mpath)

    budget = [stop_after]

    def tick() -> None:
        if budget[0] is not None:
            budget[0] -= 1
            if budget[0] <= 0:
                raise Interrupted(f"stopped after {stop_after} unit(s) of work (resumable)")

    chunks = [list(range(s, min(n, s + st.chunk_size))) for s in range(0, n, st.chunk_size)]
    timings: dict[str, float] = {}

    # ---- phase A: maps, PRMS, CRF ------------------------------------------------------------------
    t0 = time.time()
    todo = [c for c in range(len(chunks)) if not (work / "crf" / f"{c:05d}.npz").exists()]
    pool = None
    submitted = None  # the pool's last AsyncResult: what is in flight when a finish below raises
    interrupted = False
    try:
        if todo and st.crf and st.workers > 1:
            import multiprocessing as mp

            # fork where there is one (as torch's DataLoader workers): the workers run only numpy and
            # pydensecrf, never torch, and spawn would re-import torch in each (seconds per worker)
            methods = mp.get_all_start_methods()
            pool = mp.get_context("fork" if "fork" in methods else "spawn").Pool(st.workers)
        bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc="maps+crf", unit="ref", disable=not progress)
        # With a pool, the model makes a chunk's maps while the pool runs the CRF of the chunk before (the
        # model's part would otherwise leave the CRF processes idle: session 44, 14 processes on 16 cores kept
        # a load of 9); each chunk's file is written as its CRF ends, in order, so a kill resumes as before.
        pending = None  # (chunk, items, maps part, the pool's AsyncResult)

        def finish(c: int, items: list[RefItem], part: dict, crf_lab: list[np.ndarray] | None) -> None:
            save_npz(work / "crf" / f"{c:05d}.npz", _phase_a_record(items, part, crf_lab, st))
            bar.update(len(items))
            tick()

        def finish_pending() -> None:  # the chunk whose CRF the pool is running, once it ends
            if pending is not None:
                c, items, part, crf = pending
                finish(c, items, part, crf.get())

        for c in todo:
            items = [source.item(i) for i in chunks[c]]
            part = _phase_a_maps(items, provider, st, size)
            if pool is None:  # no CRF (the seeds are the labels), or the CRF in this process
                crf_lab = [crf_label_job(j) for j in _crf_jobs(items, part["norm"], st)] if st.crf else None
                finish(c, items, part, crf_lab)
                continue
            crf = submitted = pool.map_async(crf_label_job, _crf_jobs(items, part["norm"], st))
            finish_pending()
            pending = (c, items, part, crf)
        finish_pending()
        bar.close()
    except KeyboardInterrupt:  # Ctrl-C reaches the process group: the workers got it too, and send nothing
        interrupted = True
        raise
    finally:
        # Not Pool.terminate() here: it kills workers as they are, and one killed while writing its result holds the
        # result queue's lock, on which the pool's task thread, and so terminate, then waits forever (1 in 4 runs
        # of the cut in tests/test_pseudo_labels.py on 2 busy cores). The CRF in flight ends (seconds), then the
        # workers leave on close; unless a worker died with it (a SIGTERM to the group), whose result never comes.
        if pool is not None:
            drained = False
            try:
                if submitted is not None and not interrupted:
                    submitted.wait(CRF_DRAIN_S)
                drained = not interrupted and (submitted is None or submitted.ready())
            finally:  # also when a signal ends the wait
                if drained:
                    pool.close()
                else:
                    pool.terminate()
                pool.join()
    timings["maps_crf_s"] = round(time.time() - t0, 2)
    part_a = [load_npz(work / "crf" / f"{c:05d}.npz") for c in range(len(chunks))]

    # ---- phase B: IRNet boundary head ----------------------------------------------------------------
    head = None
    irnet_history: list[dict] = []
    if st.random_walk:
        t0 = time.time()
        head, irnet_history = _train_irnet(source, trunk, part_a, st, work, device, size, num_workers, tick, progress)
        timings["irnet_s"] = round(time.time() - t0, 2)

        # ---- phase C: random walk ----------------------------------------------------------------------
        t0 = time.time()
        todo = [c for c in range(len(chunks)) if not (work / "rw" / f"{c:05d}.npz").exists()]
        bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc="random walk", unit="ref", disable=not progress)
        batch = max(1, st.irnet_batch_size)
        for c in todo:
            a = part_a[c]
            labels: list[np.ndarray] = []
            for s in range(0, len(chunks[c]), batch):
                idx = chunks[c][s:s + batch]
                images01 = to_tensor01([source.image(i) for i in idx])
                labels += _rw_labels(head, images01, torch.from_numpy(a["maps"][s:s + batch]), st, size, device)
            gts = [source.gt(i) for i in chunks[c]] if a["has_gt"].any() else [None] * len(labels)
            counts = np.array([overlap(lab, gt) for lab, gt in zip(labels, gts)],
                              np.int64).reshape(len(labels), 2)
            save_npz(work / "rw" / f"{c:05d}.npz", {"ref_ids": a["ref_ids"], "label": np.stack(labels), "counts": counts})
            bar.update(len(chunks[c]))
            tick()
        bar.close()
        timings["random_walk_s"] = round(time.time() - t0, 2)

    # ---- merge ---------------------------------------------------------------------------------------
    ref_ids = np.concatenate([a["ref_ids"] for a in part_a])
    sent_ids = np.concatenate([a["sent_ids"] for a in part_a])
    has_gt = np.concatenate([a["has_gt"] for a in part_a])
    counts_a = np.concatenate([a["counts"] for a in part_a])
    quality: dict[str, Any] = {"maps": _quality(counts_a[:, :2], has_gt)}
    quality["crf" if st.crf else "seeds"] = _quality(counts_a[:, 2:], has_gt)
    if st.random_walk:
        part_c = [load_npz(work / "rw" / f"{c:05d}.npz") for c in range(len(chunks))]
        final = [lab for p in part_c for lab in p["label"]]
        quality["rw"] = _quality(np.concatenate([p["counts"] for p in part_c]), has_gt)
    elif st.crf:
        final = [lab for a in part_a for lab in a["crf_label"]]
    else:
        final = [lab for a in part_a for lab in a["maps_label"]]
    final_step = "rw" if st.random_walk else ("crf" if st.crf else "maps")
    quality["final"] = final_step
    result_meta = {**(meta or {}), "image_size": size, "n_refs": int(n), "settings": st.identity(),
                   "steps": {"prms": st.prms, "crf": st.crf, "random_walk": st.random_walk},
                   "quality": quality, "label_stats": _label_stats(final), "irnet_history": irnet_history}
    write_pseudo_labels(out, ref_ids, sent_ids, final, result_meta)
    # timings are not part of the file (its bytes must not depend on how long a run took)
    return {**result_meta, "timings": timings, "out": str(out), "work_dir": str(work)}


class _IrnetData(torch.utils.data.Dataset):
    """(image01 [3,S,S], label uint8 [S/4,S/4]) per ref for the boundary head."""

    def __init__(self, source: RefSource, labels4: np.ndarray):
        self.source = source
        self.labels4 = labels4

    def __len__(self) -> int:
        return len(self.labels4)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(self.source.image(i).copy()).permute(2, 0, 1).float().div(255)
        return img, torch.from_numpy(self.labels4[i])


def _train_irnet(source, trunk, part_a, st: Settings, work: Path, device, size, num_workers, tick, progress):
    from ehin.pseudo_labels.irnet import BoundaryHead, reduce_label, train_boundary_head

    if trunk is None:
        raise ValueError("the random walk needs a trunk for the IRNet boundary head")
    labels4 = np.stack([reduce_label(lab) for a in part_a for lab in a["crf_label"]])
    torch.manual_seed(st.seed)  # the head's initial weights depend on the seed alone
    head = BoundaryHead(trunk, size).to(device)
    ckpt = work / "irnet.pt"
    start, opt_state, history = 0, None, []
    if ckpt.exists():
        from ehin.checkpoint import load as load_checkpoint

        state = load_checkpoint(ckpt, map_location=device)  # weights only: the work folder is the user's
        head.load_head_state_dict(state["head"])
        start, opt_state, history = state["epoch"] + 1, state["optimizer"], state["history"]
    if start < st.irnet_epochs:
        data = _IrnetData(source, labels4)

        def batches(order: list[int], batch_size: int):
            return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=order, num_workers=num_workers)

        def on_epoch(entry: dict, head_state: dict, opt: dict) -> None:
            from ehin.checkpoint import save_atomic

            history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()})
            save_atomic({"head": head_state, "optimizer": opt, "epoch": entry["epoch"] - 1, "history": history}, ckpt)
            tick()

        train_boundary_head(
            head, len(data), batches, epochs=st.irnet_epochs, batch_size=st.irnet_batch_size, lr=st.irnet_lr,
            weight_decay=st.irnet_weight_decay, radius=st.irnet_radius, seed=st.seed, device=device,
            start_epoch=start, optimizer_state=opt_state, on_epoch=on_epoch, progress=progress)
    head.eval()
    return head, history


# ---- from a stage-1 checkpoint ----------------------------------------------------------------------

def split_digest(refer, split: str) -> str:
    """Fingerprint of a split's refs (ids, images, annotations, sentences, image sizes): stage 2 checks
    it, so that pseudo-labels keyed by ref id are never applied to another dataset that happens to
    reuse the ids (a synthetic dataset regenerated at another size, say)."""
    h = hashlib.sha1()
    for ref in sorted(refer.refs(split), key=lambda r: int(r["ref_id"])):
        info = refer.image_info(ref["image_id"])
        sents = [refer.sentence(s) for s in ref["sentences"]]
        h.update(json.dumps([int(ref["ref_id"]), int(ref["image_id"]), int(ref["ann_id"]), sents,
                             int(info["height"]), int(info["width"])]).encode())
    return h.hexdigest()[:16]


def generate(checkpoint: str | Path, out: str | Path, *, split: str | None = None, crf: bool | None = None,
             random_walk: bool | None = None, workers: int | None = None, work_dir: str | Path | None = None,
             device: str | None = None, overrides: dict | None = None, stop_after: int | None = None,
             progress: bool = True) -> dict:
    """Pseudo-labels for one split (default: data.train_split) from a stage-1 checkpoint."""
    from ehin.checkpoint import load_stage1
    from ehin.config import config_hash, merge
    from ehin.model.scorer import build_frozen_scorer
    from ehin.distributed import resolve_device
    from ehin.train_stage1 import prepare

    model, cfg = load_stage1(checkpoint)
    if overrides:
        cfg = merge(cfg, overrides)
    dev = torch.device(device) if device else resolve_device(cfg)
    if cfg["train"].get("threads"):
        torch.set_num_threads(int(cfg["train"]["threads"]))
    split = split or cfg["data"]["train_split"]
    st = Settings.from_config(cfg, crf=crf, random_walk=random_walk, workers=workers)
    refer = prepare(cfg)
    source = ReferSource(refer, split, cfg["data"]["image_size"])
    model = model.to(dev).eval()
    # PRMS uses the stage-1 config's scorer, built even when that run had L_CL and L_BG off.
    scorer = build_frozen_scorer(cfg).to(dev) if st.prms else None
    identity = {"stage1_weights": weights_digest(model), "stage1_config": config_hash(cfg),
                "dataset": cfg["data"]["dataset"], "split_by": cfg["data"]["split_by"], "split": split,
                "split_digest": split_digest(refer, split)}
    meta = {"dataset": cfg["data"]["dataset"], "split_by": cfg["data"]["split_by"], "split": split,
            "stage1_checkpoint": str(checkpoint), **identity}
    return run_pipeline(source, ModelMaps(model, scorer, dev, cfg["eval"]["batch_size"]), model.backbone, st,
                        out=out, work_dir=work_dir, device=dev, meta=meta, identity=identity,
                        num_workers=cfg["data"]["num_workers"], stop_after=stop_after, progress=progress)


