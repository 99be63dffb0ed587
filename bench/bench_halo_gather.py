"""halo_gather: the halo exchange of packed tiles, our kernel against the plain-PyTorch path.

Cases: the tiled layers of a ResNet-50 at 224 px with block 32, keep 0.5 (a 3x3 conv's one-pixel
halo): layer1 (8x8 tiles, C=64), layer2 (4x4, C=128), layer3 (2x2, C=256); batch 256 in bfloat16
on a GPU, 8 in float32 on a CPU. Modes: forward, and forward+backward (grad of the tiles).
Providers:

- ours: the C++ kernel on a CPU, Triton on a GPU (backward: a gather over the inverse table);
- index_select (reference): ``reference.halo_gather.halo_gather_reference``, one
  ``index_select`` of pixel rows from a channels-last buffer (its backward is a scatter-add);
- torch.compile of the reference;
- copy: a plain copy of the output's bytes, the bandwidth yardstick.

GB/s counts the least traffic: forward reads the tiles and writes the haloed tiles (plus the
table); backward reads the haloed gradient and writes the tiles' gradient (plus the inverse
table). ``pct_copy_bw`` is GB/s over the copy's.

    python -m bench.bench_halo_gather [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations


import torch

from effssl_kernels.masks import BlockMask
from effssl_kernels.ops.halo_gather import halo_gather_op
from effssl_kernels.reference.halo_gather import halo_gather_reference
from effssl_kernels.sparse import TileIndex

from .common import (CaseRows, check_output, device_info, pct_hbm, live_rows, mark_speedups, parse_args, report,
                     time_ms, timed_row, tiny)

LAYERS = [("layer1 8x8 tiles", 4, 64), ("layer2 4x4 tiles", 8, 128), ("layer3 2x2 tiles", 16, 256)]
BATCH = {"cuda": 256, "cpu": 8}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def run(device: str, quick: bool = False):
    info = device_info(device)
    dtype = DTYPE[device]
    es = torch.finfo(dtype).bits // 8
    N = 1 if tiny() else BATCH[device] // (4 if quick else 1)
    info.update(batch=N, dtype=str(dtype).replace("torch.", ""))  # in a partial JSON too
    g = torch.Generator().manual_seed(0)
    order = torch.rand(N, 49, generator=g).argsort(1)
    keep = (order < 25).view(N, 7, 7)  # keep ~0.5, exactly 25 of 49 blocks per image
    mask = BlockMask(keep.to(device), 32, 224)
    rows = live_rows()
    for name, stride, C in LAYERS[1:2] if tiny() else LAYERS:
        torch._dynamo.reset()
        idx = TileIndex.from_mask(mask, stride)
        table, (inv_order, offsets) = idx.halo_table(1), idx.halo_inverse(1)
        T, (bh, bw) = idx.num_tiles, idx.tile
        tiles = torch.randn(T, C, bh, bw, generator=g).to(device, dtype)
        tiles = tiles.contiguous(memory_format=torch.channels_last)
        tg = tiles.clone().requires_grad_()
        # channels last, as the output (and a conv's grad_input on channels-last tiles)
        grad = torch.randn(T, C, bh + 2, bw + 2, generator=g).to(device, dtype)
        grad = grad.contiguous(memory_format=torch.channels_last)
        compiled = torch.compile(halo_gather_reference, dynamic=False)
        out_bytes = T * C * (bh + 2) * (bw + 2) * es
        in_bytes = T * C * bh * bw * es
        case = f"{name} C={C} T={T}"
        fns = {
            "ours": lambda t: halo_gather_op(t, table, inv_order, offsets),
            "index_select (reference)": lambda t: halo_gather_reference(t, table),
            "torch.compile(reference)": lambda t: compiled(t, table),
        }
        dst = torch.empty(out_bytes // es, device=device, dtype=dtype)
        src = torch.randn(out_bytes // es, generator=g).to(device, dtype)
        t = time_ms(lambda: dst.copy_(src), device, min_run_time=0.3 if quick else 1.0)
        copy_gbps = 2 * out_bytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append({"case": case, "mode": "copy", "provider": "copy (yardstick)", **t,
                     "gbps": copy_gbps, "pct_copy_bw": 100.0})
        for mode in ("fwd", "fwd+bwd"):
            bwd = mode == "fwd+bwd"
            nbytes = in_bytes + out_bytes + table.numel() * 8
            if bwd:
                nbytes += out_bytes + in_bytes + (inv_order.numel() + offsets.numel()) * 8
            case_rows = CaseRows(rows)
            for prov, f in fns.items():
                fn = ((lambda f=f: torch.autograd.grad(f(tg), tg, grad)) if bwd
                      else (lambda f=f: f(tiles)))
                row = timed_row({"case": case, "mode": mode, "provider": prov}, fn, device,
                                0.3 if quick else 1.0)  # the warm-up also compiles
                if "median_ms" in row:
                    row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                    row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps
                    row["pct_hbm_limit"] = pct_hbm(info, row["gbps"])
                if prov == "ours" and "median_ms" in row:
                    # the timed shape's answer against the reference in float32: the forward is a
                    # copy (exact); the backward sums up to 4 halo copies in the kernel's dtype
                    ref = fns["index_select (reference)"]
                    want = (torch.autograd.grad(ref(tg.float()), tg, grad.float())[0] if bwd
                            else ref(tiles.float()))
                    check_output(row, fn()[0] if bwd else fn(), want, 1e-2 if bwd and es == 2 else 1e-6)
                case_rows.append(row)
            mark_speedups(case_rows)
    return rows, info, N, dtype


def main(argv=None) -> str:
    args = parse_args(__doc__, "a quarter of the batch, shorter timing", argv, name="halo_gather")
    rows, info, N, dtype = run(args.device, args.quick)
    return report(
        args, "halo_gather",
        f"halo_gather (one-pixel halo, keep 0.5) on {info['device']}, N={N}, {info['dtype']} "
        "(ours_speedup: provider time / ours, >1 means ours is faster)",
        info, rows,
        ["case", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "ours_speedup", "gbps",
         "pct_copy_bw", "pct_hbm_limit", "max_err", "note"],
    )


if __name__ == "__main__":
    main()
