"""Path affinities from a boundary map, and the random walk that propagates a response map (METHOD §6.3-6.4).

IRNet's PathIndex on the boundary map's own grid (stride 4 of the image), written with unfolded
windows instead of IRNet's flattened index tables (same pairs, same paths):

- Search offsets (IRNet `get_search_paths_dst`): every d = (dy, dx) in the lower half-plane
  (dy > 0, or dy = 0 and dx > 0) with dy² + dx² < r². The other half follows by symmetry
  (a_ij = a_ji), so every pair within radius r is covered once.
- The path of an offset (IRNet `get_search_paths_dst`): the grid points of the bounding box of i
  and j that lie closer than one pixel to the straight line through them, both ends included.
- Affinity a_ij = 1 − max_{k on the path} B(k). Outside the image B counts as 1 (IRNet pads the edge
  map with 1), so a pair whose partner lies outside has affinity 0 and drops out.

Random walk (IRNet `propagate_to_edge` / `to_transition_matrix`): A = a^β with self-affinity 1,
T = A column-normalised (Σ_i T_ij = 1), x ← x · T applied 2^exp_times times to x = map · (1 − B).
Because T is column-normalised, one step sets x_j to the A^β-weighted mean of x over j's
neighbourhood. IRNet squares the dense (HW × HW) matrix exp_times times; `random_walk` applies
the same local step 2^exp_times times with unfold instead (memory O(HW·r²), not O(HW²)), which is
the same product — `dense_transition` is kept as the reference the tests compare against.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def search_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Half-plane offsets (dy, dx) with dy² + dx² < radius² (IRNet's search directions)."""
    out = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return tuple(out)


@lru_cache(maxsize=None)
def path_points(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The grid points of the path from (0, 0) to (dy, dx): IRNet's rule, every point of the bounding
    box whose distance to the line through both ends is below 1 pixel (both ends included)."""
    length_sq = dy * dy + dx * dx
    if length_sq == 0:
        return ((0, 0),)
    pts = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if (dy * x - dx * y) ** 2 / length_sq < 1:
                pts.append((y, x))
    return tuple(sorted(pts, key=lambda p: (abs(p[0]) + abs(p[1]), p)))


@lru_cache(maxsize=None)
def _path_table(radius: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Paths as indices into a (radius × (2·radius − 1)) window whose element (a, b) is the offset
    (a, b − radius + 1): ([(offset ids [D_L], paths [D_L, L]) per path length L], ends [D]).
    Grouping by length (as IRNet's PathIndex does) avoids padding short paths to the longest."""
    width = 2 * radius - 1
    offsets = search_offsets(radius)
    by_length: dict[int, list[int]] = {}
    for k, (dy, dx) in enumerate(offsets):
        by_length.setdefault(len(path_points(dy, dx)), []).append(k)
    groups = []
    for length in sorted(by_length):
        ids = by_length[length]
        table = [[py * width + px + radius - 1 for py, px in path_points(*offsets[k])] for k in ids]
        groups.append((torch.tensor(ids), torch.tensor(table)))
    ends = torch.tensor([dy * width + dx + radius - 1 for dy, dx in offsets])
    return groups, ends


def _half_windows(x: torch.Tensor, radius: int, pad_value: float) -> torch.Tensor:
    """[N,1,H,W] -> [N, radius·(2·radius − 1), H·W]: every pixel's lower-half-plane window."""
    r = radius
    padded = F.pad(x, (r - 1, r - 1, 0, r - 1), value=pad_value)
    return F.unfold(padded, (r, 2 * r - 1))


def path_affinity(boundary: torch.Tensor, radius: int, max_elements: int = 2**26) -> torch.Tensor:
    """Boundary [N,1,H,W] in [0,1] -> affinities [N, D, H, W] for the D = len(search_offsets(radius))
    pairs (p, p + d_k); 1 − max boundary on the path, 0 where p + d_k is outside the image.
    At most `max_elements` path values are gathered at once (memory bound on large grids)."""
    n, _, h, w = boundary.shape
    windows = _half_windows(boundary, radius, 1.0)  # outside = boundary (IRNet pads the edge map with 1)
    groups, ends = _path_table(radius)
    worst, order = [], []
    for ids, paths in groups:
        paths = paths.to(boundary.device)
        length = paths.shape[1]
        step = max(1, max_elements // max(1, n * length * h * w))
        for s in range(0, len(ids), step):
            part = paths[s:s + step]
            worst.append(windows[:, part.reshape(-1)].view(n, part.shape[0], length, h * w).amax(2))
        order.append(ids)
    inverse = torch.argsort(torch.cat(order)).to(boundary.device)  # back to search_offsets order
    return 1.0 - torch.cat(worst, 1)[:, inverse].view(n, len(ends), h, w)


def pair_labels(labels: torch.Tensor, radius: int, ignore: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label map [N,H,W] (0 bg, k >= 1 foreground region k, 255 ignore) -> (bg_pos, fg_pos, neg)
    float [N, D, H, W] masks over the same pairs as `path_affinity` (IRNet's `extract_aff_lab_func`:
    same label -> positive, bg or fg; different labels -> negative); ignore pixels and pairs leaving
    the image are in none of them."""
    n, h, w = labels.shape
    lab = labels.float()[:, None]
    _, ends = _path_table(radius)
    dst = _half_windows(lab, radius, float(ignore))[:, ends.to(labels.device)].view(n, len(ends), h, w)
    src = lab.expand(-1, len(ends), -1, -1)
    valid = (src != ignore) & (dst != ignore)
    same = src == dst
    return ((valid & same & (src == 0)).float(), (valid & same & (src > 0)).float(), (valid & ~same).float())


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, float]]:
    """IRNet's semantic affinity loss: (½ (bg_pos + fg_pos) + neg) / 2 with −log a for same-label
    pairs and −log(1 − a) for different-label pairs, each averaged over its own pairs."""
    pos_l = -torch.log(aff + eps)
    neg_l = -torch.log(1.0 + eps - aff)
    bg = (bg_pos * pos_l).sum() / (bg_pos.sum() + eps)
    fg = (fg_pos * pos_l).sum() / (fg_pos.sum() + eps)
    ng = (neg * neg_l).sum() / (neg.sum() + eps)
    total = ((bg + fg) / 2 + ng) / 2
    return total, {"bg_pos": float(bg.detach()), "fg_pos": float(fg.detach()), "neg": float(ng.detach())}


def window_weights(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """A^β over each pixel's full (2r−1)×(2r−1) window: [N, (2r−1)², H, W]; row k is the neighbour at
    offset (k // (2r−1) − r + 1, k % (2r−1) − r + 1) (F.unfold's order); self weight 1, offsets
    outside the disk or the image 0."""
    n, _, h, w = boundary.shape
    r = radius - 1  # offsets reach |d| < radius, so the window half-size is radius − 1
    size = 2 * r + 1
    half = path_affinity(boundary, radius)  # [N, D, H, W], pair (p, p + d)
    weights = boundary.new_zeros(n, size * size, h, w)
    weights[:, r * size + r] = 1.0  # self-affinity (IRNet's affinity_sparse2dense adds the identity)
    for k, (dy, dx) in enumerate(search_offsets(radius)):
        a = half[:, k]
        weights[:, (r + dy) * size + (r + dx)] = a
        # the pair seen from the other end: pixel q = p + d looks back at p with the same affinity
        weights[:, (r - dy) * size + (r - dx)] = _shift_back(a, dy, dx)
    return weights.clamp_min(0).pow(beta)


def _shift_back(a: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[q] = a[q − d] (zero where q − d is outside): the pair (q − d, q) seen from q."""
    h, w = a.shape[-2:]
    padded = F.pad(a, (abs(dx), abs(dx), dy, 0))  # dy >= 0 for half-plane offsets
    return padded[..., :h, abs(dx) - dx:abs(dx) - dx + w]


def random_walk(x: torch.Tensor, boundary: torch.Tensor, *, radius: int = 5, beta: float = 10.0,
                exp_times: int = 8) -> torch.Tensor:
    """Propagate maps x [N,H,W] over the boundary's affinities for 2^exp_times steps -> [N,H,W]."""
    n, h, w = x.shape
    r = radius - 1
    size = 2 * r + 1
    weights = window_weights(boundary, radius, beta).reshape(n, size * size, h * w)
    weights = weights / weights.sum(1, keepdim=True)  # column-normalised transition (Σ_i T_ij = 1)
    state = (x * (1.0 - boundary[:, 0])).unsqueeze(1)  # IRNet: x * (1 − edge)
    for _ in range(2 ** exp_times):
        patches = F.unfold(state, size, padding=r)  # [N, size², HW]: x at every neighbour of j
        state = (patches * weights).sum(1).view(n, 1, h, w)
    return state[:, 0]


def dense_transition(boundary: torch.Tensor, *, radius: int = 5, beta: float = 10.0,
                     exp_times: int = 8) -> torch.Tensor:
    """IRNet's dense T^(2^exp_times) for ONE boundary map [1,1,H,W] -> [HW, HW] (reference; O(HW²))."""
    _, _, h, w = boundary.shape
    r = radius - 1
    size = 2 * r + 1
    weights = window_weights(boundary, radius, beta)[0]  # [size², H, W]: A_ij^β for j, i = j + off
    aff = boundary.new_zeros(h * w, h * w)
    for k in range(size * size):
        oy, ox = divmod(k, size)
        oy, ox = oy - r, ox - r
        for j in range(h * w):
            jy, jx = divmod(j, w)
            iy, ix = jy + oy, jx + ox
            if 0 <= iy < h and 0 <= ix < w:
                aff[iy * w + ix, j] = weights[k, jy, jx]
    trans = aff / aff.sum(0, keepdim=True)
    for _ in range(exp_times):
        trans = trans @ trans
    return trans
