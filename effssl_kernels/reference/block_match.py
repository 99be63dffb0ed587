"""Plain-PyTorch block_match: one vectorised pass per displacement (SEMANTICS.md section 1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def candidate_order(radius: int, dy_range: Optional[tuple[int, int]] = None,
                    dx_range: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
    """All (dy, dx) in [-r, r]^2 in search order: smallest |dy|+|dx|, then dy, then dx.

    Among exact ties of the mse, the first candidate in this order wins (every backend agrees).
    ``dy_range`` / ``dx_range`` (inclusive) keep only that box, in the same order: the caller
    drops candidates that can never land inside ``b`` before building the list.
    """
    r = radius
    ylo, yhi = (-r, r) if dy_range is None else (max(-r, dy_range[0]), min(r, dy_range[1]))
    xlo, xhi = (-r, r) if dx_range is None else (max(-r, dx_range[0]), min(r, dx_range[1]))
    ds = [(dy, dx) for dy in range(ylo, yhi + 1) for dx in range(xlo, xhi + 1)]
    return sorted(ds, key=lambda d: (abs(d[0]) + abs(d[1]), d[0], d[1]))


def _default_reachable(B: int, H: int, W: int, Hb: int, Wb: int):
    """(dy_range, dx_range) outside which no grid block's candidate lies inside ``b``, so the list
    of a radius far beyond the image stays image-sized (decided in Python: no host sync)."""
    return (-(Hb - 1) * B, H - B), (-(Wb - 1) * B, W - B)


def _lex_less(s: Tensor, dy: Tensor, dx: Tensor, s2: Tensor, dy2: Tensor, dx2: Tensor) -> Tensor:
    """(s, dy, dx) < (s2, dy2, dx2) lexicographically: candidate_order's key, elementwise."""
    return (s < s2) | ((s == s2) & ((dy < dy2) | ((dy == dy2) & (dx < dx2))))


def _key(mse: Tensor) -> Tensor:
    """The argmin key of an mse: NaN as -1, so a NaN beats every number."""
    return torch.where(torch.isnan(mse), torch.full_like(mse, -1.0), mse)


def _by_position(a_blk: Tensor, b32: Tensor, cy: Tensor, cx: Tensor, B: int, r: int):
    """best mse and (dy, dx) per block by a pass per position of ``b`` (not per displacement).

    For a radius beyond the image with given centres: the candidates inside ``b`` are at most
    (H-B+1)(W-B+1) positions, while the displacements spanned by far-apart centres (e.g.
    crop_centers' -2^30 for a degenerate box next to normal centres) can be billions. Ties go
    to the smallest candidate_order key, as the per-displacement loop's first-found does.
    """
    N, C, H, W = b32.shape
    Hb, Wb = cy.shape[1:]
    dev = b32.device
    best = torch.full((N, Hb, Wb), float("inf"), device=dev)
    found = torch.zeros((N, Hb, Wb), dtype=torch.bool, device=dev)
    bdy = torch.zeros((N, Hb, Wb), dtype=torch.int64, device=dev)
    bdx = torch.zeros_like(bdy)
    for y0 in range(H - B + 1):
        dy = y0 - cy
        for x0 in range(W - B + 1):
            dx = x0 - cx
            cand = b32[:, :, y0 : y0 + B, x0 : x0 + B][:, :, None, None]  # [N, C, 1, 1, B, B]
            mse = (a_blk - cand).square().mean(dim=(1, 4, 5))
            key, best_key = _key(mse), _key(best)
            s, bs = dy.abs() + dx.abs(), bdy.abs() + bdx.abs()
            tie = found & (key == best_key) & _lex_less(s, dy, dx, bs, bdy, bdx)
            better = (dy.abs() <= r) & (dx.abs() <= r) & ((key < best_key) | tie)
            best = torch.where(better, mse, best)
            found = found | better
            bdy = torch.where(better, dy, bdy)
            bdx = torch.where(better, dx, bdx)
    return best, torch.stack([bdy, bdx], -1).int()


def block_match_reference(
    a: Tensor,
    b: Tensor,
    block_size: int,
    search_radius: int,
    data_range: float = 1.0,
    centers: Optional[Tensor] = None,
    flip: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Reference of ``effssl_kernels.block_match``; arguments are assumed valid.

    a, b: [N, C, H, W]; centers: int [N, Hb, Wb, 2] (y, x) or None; flip: bool [N] or None.
    Returns psnr float32 [N, Hb, Wb] and offset int32 [N, Hb, Wb, 2]. The mse is the direct
    float32 mean of (a - b)^2; a NaN mse beats every number (so NaN input gives NaN psnr).
    """
    N, C, H, W = a.shape
    B, r = block_size, search_radius
    Hb, Wb = H // B, W // B
    dev = a.device
    a32 = a.float()
    b32 = b.float()
    if flip is not None:
        b32 = torch.where(flip.view(N, 1, 1, 1).to(dev), b32.flip(-1), b32)
    if centers is None:
        gy = torch.arange(Hb, device=dev) * B
        gx = torch.arange(Wb, device=dev) * B
        cy = gy.view(1, Hb, 1).expand(N, Hb, Wb)
        cx = gx.view(1, 1, Wb).expand(N, Hb, Wb)
    else:
        cy = centers[..., 0].to(device=dev, dtype=torch.int64)
        cx = centers[..., 1].to(device=dev, dtype=torch.int64)

    if N * Hb * Wb == 0:  # nothing to search (the reshapes below cannot infer -1 from 0 elements)
        return (torch.full((N, Hb, Wb), float("-inf"), device=dev),
                torch.zeros((N, Hb, Wb, 2), dtype=torch.int32, device=dev))
    # The blocks of a, [N, C, Hb, Wb, B, B].
    a_blk = a32[:, :, : Hb * B, : Wb * B].reshape(N, C, Hb, B, Wb, B).permute(0, 1, 2, 4, 3, 5)
    if centers is not None and r > max(H, W):
        best, best_d = _by_position(a_blk, b32, cy, cx, B, r)
    else:
        best, best_d = _by_displacement(a_blk, b32, cy, cx, B, r, grid=centers is None)
    # mse 0 -> +inf dB; no candidate (mse stays +inf) -> -inf dB. A tensor numerator: torch
    # computes scalar / tensor as scalar * reciprocal, which overflows for mse < 2.9e-39 (a
    # data_range of 1e-18 has real blocks there) and reported them identical.
    return 10.0 * torch.log10(torch.full_like(best, data_range * data_range) / best), best_d


def _by_displacement(a_blk: Tensor, b32: Tensor, cy: Tensor, cx: Tensor, B: int, r: int, grid: bool):
    """best mse and (dy, dx) per block by one vectorised pass per displacement, in
    candidate_order (the first found wins a tie). ``grid``: the default centres, whose
    displacements that land no block inside ``b`` are skipped in Python."""
    N, C, H, W = b32.shape
    Hb, Wb = cy.shape[1:]
    dev = b32.device
    b_flat = b32.reshape(N, C, H * W)
    ar = torch.arange(B, device=dev)
    best = torch.full((N, Hb, Wb), float("inf"), device=dev)
    best_d = torch.zeros((N, Hb, Wb, 2), dtype=torch.int32, device=dev)
    order = candidate_order(r, *(_default_reachable(B, H, W, Hb, Wb) if grid else (None, None)))
    dyx = torch.tensor(order, dtype=torch.int32).to(dev)  # one copy (a CUDA sync), not one per candidate
    for k, (dy, dx) in enumerate(order):
        y0 = cy + dy
        x0 = cx + dx
        if grid and not (any_block_inside(dy, B, Hb, H) and any_block_inside(dx, B, Wb, W)):
            continue  # decided in Python: no host sync, and torch.compile(fullgraph=True) traces it
        valid = (y0 >= 0) & (y0 <= H - B) & (x0 >= 0) & (x0 <= W - B)
        rows = (y0.clamp(0, H - B)[..., None] + ar)  # [N, Hb, Wb, B]
        cols = (x0.clamp(0, W - B)[..., None] + ar)
        idx = rows[..., :, None] * W + cols[..., None, :]  # [N, Hb, Wb, B, B]
        idx = idx.reshape(N, 1, -1).expand(N, C, -1)
        cand = b_flat.gather(2, idx).reshape(N, C, Hb, Wb, B, B)
        mse = (a_blk - cand).square().mean(dim=(1, 4, 5))  # float32 [N, Hb, Wb]
        better = valid & (_key(mse) < _key(best))
        best = torch.where(better, mse, best)
        best_d = torch.where(better[..., None], dyx[k], best_d)
    return best, best_d


def any_block_inside(d: int, B: int, nb: int, size: int) -> bool:
    """Whether some block ``i`` in ``[0, nb)`` displaced by ``d`` lies inside: ``0 <= i*B + d <= size - B``."""
    return any(0 <= i * B + d <= size - B for i in range(nb))
