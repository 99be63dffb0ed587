"""photometric: our per-sample colour jitter / grayscale / blur / solarize / normalise against
what a user has on device tensors, and the share of an SSL step spent augmenting.

Cases ([N, 3, S, S] views after multi_crop -> normalised float32; N=256 on a GPU, 16 on a CPU):
- SimCLR (blur kernel 23), BYOL view 1 and BYOL view 2 presets on uint8 224 px views;
- SimCLR on float32 224 px views (in [0, 1]);
- DINO local preset on uint8 96 px views, 8 local views per image (8N views).
Providers (all on the bench device, parameters drawn per sample by ``PhotometricSampler``):
- ours: ``effssl_kernels.photometric`` (the device's default backend) with the sampler's CPU
  parameters, as a training loop calls it (host checks, packing, pinned copies included);
- ours, kernel only: the op on parameters already packed on the device;
- reference: ``photometric_reference``, the batched plain-PyTorch oracle;
- torchvision v2 loop: per sample, the ``torchvision.transforms.v2.functional`` calls with that
  sample's parameters (read as Python numbers beforehand, as a per-sample pipeline draws them on
  the host), then ``to_dtype(scale=True)`` + ``normalize``, stacked; on a CPU timed on the first
  32 samples and scaled to all (said in the note);
- torchvision v2 batched: one ``v2.Compose`` (RandomApply([ColorJitter]), RandomGrayscale,
  RandomApply([GaussianBlur]), RandomSolarize, ToDtype, Normalize) called once on the batch: ONE
  parameter draw for the whole batch, so a lower bound on the work, not the same augmentation;
- kornia: ``kornia.augmentation.AugmentationSequential`` (ColorJitter, RandomGrayscale,
  RandomGaussianBlur, RandomSolarize, Normalize), per-sample parameters, on float input (uint8
  views are converted inside the timed call); skipped when kornia is not installed;
- copy: ``dst_f32.copy_(src)`` of the same element count from the input dtype, the yardstick.
GB/s counts the least traffic: one read of the input and one write of the float32 output;
``pct_copy_bw`` is GB/s over the copy's. Ours' note says whether the issue's goal (>= 70% of
the copy's bandwidth and >= 5x the torchvision loop) is met.

Second table: a SimSiam step (fwd+bwd of two views, ``bench_simsiam_step``'s model; ResNet-50 at
224 px, N=256 images, bf16 autocast on a GPU; ResNet-18 at 64 px, N=8 on a CPU) and the share
``aug_ms / (aug_ms + step_ms)`` of augmenting its 2N uint8 views (SimSiam's recipe: the
sampler's defaults, blur kernel 10% of the side) with the torchvision loop (before) and ours
(after).

    python -m bench.bench_photometric [--device cuda|cpu] [--out DIR] [--quick]
"""
from __future__ import annotations

import importlib.util
import os

import torch

from effssl_kernels.ops.photometric import pack_params
from effssl_kernels.photometric import PhotometricSampler, photometric
from effssl_kernels.reference.photometric import photometric_mismatch, photometric_reference

from .common import CaseRows, device_info, pct_hbm, live_rows, mark_speedups, out_dir, parse_args, print_table, timed_row, tiny, write_json

LOOP_CPU = 32  # on a CPU, the torchvision loop is timed on this many samples and scaled
COPY = "copy (yardstick)"


def _warm(fn, device):  # two calls: the first of a case allocates and fills caches
    fn()
    fn()


def _cases(device: str, quick: bool):
    n = 2 if tiny() else (256 if device == "cuda" else 16) // (4 if quick else 1)
    g, l = (48, 32) if tiny() else (224, 96)
    return [  # (case, N, side, input dtype, sampler)
        (f"SimCLR uint8 {g}", n, g, torch.uint8, PhotometricSampler.simclr()),
        (f"BYOL view 1 uint8 {g}", n, g, torch.uint8, PhotometricSampler.byol(1)),
        (f"BYOL view 2 uint8 {g}", n, g, torch.uint8, PhotometricSampler.byol(2)),
        (f"SimCLR float32 {g}", n, g, torch.float32, PhotometricSampler.simclr()),
        (f"DINO local uint8 {l}", 8 * n, l, torch.uint8, PhotometricSampler.dino_local()),
    ]


def random_views(N: int, side: int, dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (N, 3, side, side), generator=g, dtype=torch.uint8)
    return (x if dtype == torch.uint8 else x.to(dtype) / 255).to(device)


def per_sample(p):
    """Each sample's parameters as Python numbers, and the chain's constants."""
    p = p.to("cpu")
    thr = p.solarize_threshold
    thr = thr.tolist() if isinstance(thr, torch.Tensor) else [float(thr)] * p.num_samples
    rows = list(zip(p.jitter_apply.tolist(), p.order.tolist(), p.brightness.tolist(), p.contrast.tolist(),
                    p.saturation.tolist(), p.hue.tolist(), p.gray.tolist(), p.blur_sigma.tolist(),
                    p.solarize.tolist(), thr))
    norm = None if p.mean is None else (p.mean.tolist(), p.std.tolist())
    return rows, p.blur_kernel, norm


def torchvision_chain(x, s, k, norm):
    """One sample ``x`` [3, H, W] through torchvision v2 functional calls: ``s`` its row of
    ``per_sample``, ``k`` the blur kernel size, ``norm`` (mean, std) or None. Also the tests'
    per-sample torchvision oracle; half views stay in their dtype (torchvision rounds each op)."""
    from torchvision.transforms.v2 import functional as TF

    jitter, order, b, c, sat, hue, gray, sigma, sol, thr = s
    if jitter:
        for t in order:
            if t == 0:
                x = TF.adjust_brightness(x, b)
            elif t == 1:
                x = TF.adjust_contrast(x, c)
            elif t == 2:
                x = TF.adjust_saturation(x, sat)
            elif hue != 0.0:
                x = TF.adjust_hue(x, hue)
    if gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if sigma > 0:
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    if sol:
        x = TF.solarize(x, thr * 255 if x.dtype == torch.uint8 else thr)
    if norm is not None:
        x = TF.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x
        x = TF.normalize(x, *norm)
    return x


def torchvision_loop(views, host, limit=None):
    """The per-sample loop on the first ``limit`` views (``host``: ``per_sample(params)``), stacked."""
    rows, k, norm = host
    n = views.shape[0] if limit is None else min(limit, views.shape[0])
    return torch.stack([torchvision_chain(views[i], rows[i], k, norm) for i in range(n)])


def torchvision_batched(sampler, dtype):
    from torchvision.transforms import v2

    scale = 255 if dtype == torch.uint8 else 1
    t = [v2.RandomApply([v2.ColorJitter(*sampler.jitter)], p=sampler.jitter_p),
         v2.RandomGrayscale(sampler.gray_p),
         v2.RandomApply([v2.GaussianBlur(sampler.blur_kernel, sampler.blur_sigma)], p=sampler.blur_p),
         v2.RandomSolarize(sampler.solarize_threshold * scale, p=sampler.solarize_p),
         v2.ToDtype(torch.float32, scale=True)]
    if sampler.mean is not None:
        t.append(v2.Normalize(sampler.mean, sampler.std))
    return v2.Compose(t)


def kornia_aug(sampler, dtype, device):
    import kornia.augmentation as K

    k = sampler.blur_kernel
    augs = [K.ColorJitter(*sampler.jitter, p=sampler.jitter_p), K.RandomGrayscale(p=sampler.gray_p),
            K.RandomGaussianBlur((k, k), sampler.blur_sigma, p=sampler.blur_p)]
    if sampler.solarize_p > 0:  # threshold 0.5 +- 0, no addition
        augs.append(K.RandomSolarize(0.0, 0.0, p=sampler.solarize_p))
    if sampler.mean is not None:
        augs.append(K.Normalize(torch.tensor(sampler.mean), torch.tensor(sampler.std)))
    seq = K.AugmentationSequential(*augs).to(device)
    return lambda x: seq(x.float().div_(255) if dtype == torch.uint8 else x)


def _loop_row(row, views, host, device, mrt):
    """The torchvision loop, timed on all views (GPU) or LOOP_CPU of them and scaled (CPU)."""
    N = views.shape[0]
    n = N if device == "cuda" else min(LOOP_CPU, N)
    row = timed_row(row, lambda: torchvision_loop(views, host, n), device, mrt, _warm)
    if "median_ms" in row and n < N:
        row.update({k: row[k] * N / n for k in ("median_ms", "p20_ms", "p80_ms")})
        row["note"] = f"timed on {n} samples, x{N / n:.4g}"
    return row


def _check(row: dict, got, want, views_dtype, std=None) -> dict:
    """Judge the timed kernel's answer by the tests' rule (``photometric_mismatch``): a MISMATCH
    note when it is outside the kernels' tolerance."""
    row["max_err"], row["frac_off"], why = photometric_mismatch(got, want, views_dtype, std=std)
    if why:
        row["note"] = f"MISMATCH vs the reference ({why})"
    return row


def run(device: str, quick: bool = False):
    info = device_info(device)
    mrt = 0.05 if tiny() else (0.2 if quick else 0.5)
    has_kornia = importlib.util.find_spec("kornia") is not None
    ops = torch.ops.effssl_kernels
    kernel = ops._photometric_triton if device == "cuda" else ops.photometric
    rows = live_rows()
    for case, N, S, dtype, sampler in _cases(device, quick):
        sampler.generator = torch.Generator().manual_seed(0)
        views = random_views(N, S, dtype, device)
        params_cpu = sampler.sample(N)
        params = params_cpu.to(device)
        packed = pack_params(params, N)
        host = per_sample(params)
        n_el = views.numel()
        nbytes = n_el * (views.element_size() + 4)
        label = f"{case} (N={N})"
        # ours: the public call with the sampler's CPU params (checked and packed on the host,
        # pinned copies); "kernel only": the op on params already packed on the device.
        fns = {"ours": lambda: photometric(views, params_cpu),
               "ours, kernel only": lambda: kernel(views, *packed),
               "reference": lambda: photometric_reference(views, params)}
        src = torch.empty(n_el, dtype=dtype, device=device)
        dst = torch.empty(n_el, dtype=torch.float32, device=device)

        def derive():  # after every row: a run cut at its time limit keeps its ratios
            copy = next((r for r in case_rows if r["provider"] == COPY and "median_ms" in r), None)
            copy_gbps = nbytes / (copy["median_ms"] * 1e-3) / 1e9 if copy else None
            for r in case_rows:
                if "median_ms" in r:
                    r["images_per_s"] = N / (r["median_ms"] * 1e-3)
                    r["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
                    if copy_gbps:
                        r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbps
                    r["pct_hbm_limit"] = pct_hbm(info, r["gbps"])
            mark_speedups([r for r in case_rows if r["provider"] != COPY])
            ours = case_rows[0]
            vs_loop = ours.get("speedup_vs_torchvision v2 loop")
            if "pct_copy_bw" in ours and vs_loop is not None and "MISMATCH" not in str(ours.get("note")):
                met = ours["pct_copy_bw"] >= 70 and vs_loop >= 5
                ours["note"] = f"goal (>=70% copy bw, >=5x tv loop): {'met' if met else 'not met'}"

        def add(row):
            case_rows.append(row)
            derive()

        # issue 7's target first: ours, the copy and the torchvision loop, then the rest
        case_rows = CaseRows(rows)
        ours = timed_row({"case": label, "provider": "ours"}, fns.pop("ours"), device, mrt, _warm)
        add(_check(ours, photometric(views, params_cpu), fns["reference"](), dtype, params_cpu.std)
            if "median_ms" in ours else ours)
        add(timed_row({"case": label, "provider": COPY}, lambda: dst.copy_(src), device, mrt, _warm))
        add(_loop_row({"case": label, "provider": "torchvision v2 loop"}, views, host, device, mrt))
        for p, fn in fns.items():
            add(timed_row({"case": label, "provider": p}, fn, device, mrt, _warm))
        try:
            comp = torchvision_batched(sampler, dtype)
            add(timed_row({"case": label, "provider": "torchvision v2 batched",
                           "note": "one parameter draw for the whole batch (lower bound)"},
                          lambda: comp(views), device, mrt, _warm))
        except ImportError as e:
            add({"case": label, "provider": "torchvision v2 batched", "note": f"failed: {e}"[:120]})
        if has_kornia:
            krow = {"case": label, "provider": "kornia", "note": "per-sample params, float input"}
            try:
                aug = kornia_aug(sampler, dtype, device)
                add(timed_row(krow, lambda: aug(views), device, mrt, _warm))
            except Exception as e:
                add({**krow, "note": f"failed: {type(e).__name__}: {e}"[:160]})
        else:
            add({"case": label, "provider": "kornia", "note": "kornia not installed"})
    return rows, info


def step_share(device: str, quick: bool = False, live: list | None = None):
    """Rows of the SimSiam-step table: augmentation share before (torchvision loop) and after
    (ours), each added to ``live`` (the benchmark's live rows) as soon as it is timed, so a run
    stopped at its time limit keeps them."""
    import torchvision

    from .bench_simsiam_step import SimSiam

    gpu = device == "cuda"
    arch, feat, img, n = ("resnet50", 2048, 224, 256) if gpu else ("resnet18", 512, 64, 8)
    n = max(2, n // 4) if quick else n
    img, n = (32, 2) if tiny() else (img, n)
    mrt = 0.05 if tiny() else (0.2 if quick else (2.0 if gpu else 1.0))
    fmt = torch.channels_last if gpu else torch.contiguous_format
    torch.manual_seed(0)
    model = SimSiam(getattr(torchvision.models, arch)(), feat).to(device, memory_format=fmt).train()
    sampler = PhotometricSampler(blur_kernel=img // 10 | 1, generator=torch.Generator().manual_seed(0))
    views = random_views(2 * n, img, torch.uint8, device, seed=1)
    params_cpu = sampler.sample(2 * n)
    params = params_cpu.to(device)
    v = photometric_reference(views, params).contiguous(memory_format=fmt)
    v1, v2 = v[:n], v[n:]

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            loss = model.loss(v1, v2)
        loss.backward()

    label = (f"SimSiam step, {arch} {img}px, {n} images x 2 views"
             + (", bf16 autocast" if gpu else ", fp32 (tiny CPU config)"))
    st = timed_row({}, step, device, mrt, _warm)
    out = CaseRows([] if live is None else live)

    def add(r):
        r["step_ms"] = st.get("median_ms")
        if "median_ms" in r and r["step_ms"] is not None:
            r["aug_ms"] = r.pop("median_ms")
            for k in ("p20_ms", "p80_ms"):
                r.pop(k, None)
            r["aug_share_pct"] = 100 * r["aug_ms"] / (r["aug_ms"] + r["step_ms"])
        if "note" in st:
            r["note"] = "; ".join(filter(None, [r.get("note"), f"step {st['note']}"]))
        out.append(r)
        return r

    before = add(_loop_row({"case": label, "provider": "torchvision v2 loop (before)"}, views,
                           per_sample(params), device, mrt))
    after = add(timed_row({"case": label, "provider": "ours (after)"}, lambda: photometric(views, params_cpu),
                          device, mrt, _warm))
    if all("aug_ms" in r for r in out):
        after["step_speedup"] = (before["aug_ms"] + before["step_ms"]) / (after["aug_ms"] + after["step_ms"])
    return list(out)


def main(argv=None) -> str:
    args = parse_args(__doc__, "a quarter of the views, shorter timing", argv, name="photometric")
    rows, info = run(args.device, args.quick)
    n = len(rows)
    share = step_share(args.device, args.quick, live=rows)  # appended to rows as they are timed
    rows = rows[:n]
    path = os.path.join(out_dir(args), "photometric.json")
    write_json(path, {**info, "quick": bool(args.quick)}, rows + share)
    print_table(f"photometric on {info['device']}, views -> normalised float32 "
                "(ours_speedup: provider time / ours, >1 means ours is faster)", rows,
                ["case", "provider", "median_ms", "p20_ms", "p80_ms", "images_per_s", "ours_speedup", "gbps",
                 "pct_copy_bw", "pct_hbm_limit", "max_err", "frac_off", "note"])
    print_table("augmentation share of an SSL step (2N views, aug_ms / (aug_ms + step_ms))", share,
                ["case", "provider", "aug_ms", "step_ms", "aug_share_pct", "step_speedup", "note"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
