"""AccelerationSchedule: AAIP's CA-MSE choice on toys with a known answer, its estimators against
closed forms, and the callback on a tiny sparsified timm ViT (online and momentum separately)."""
import copy
import io
import math
import time

import pytest
import torch
from torch import nn

import effssl_kernels as ek
from effssl_kernels.schedule import AccelerationSchedule, Candidate

timm = pytest.importorskip("timm")


# ----------------------------------------------------------------------------- toy: linear regression
# y = x . w_c + eps with x ~ N(0, I_d), eps ~ N(0, s^2). Candidate keep rho "compresses" by fitting
# a shifted target w_c = w* + Delta_rho (||Delta_rho||^2 = delta2 * (1/rho - 1), the optimum moves
# further the fewer tokens are kept) at cost rho (injected: cost_fn). With e = w - w* - Delta_rho,
# the batch-mean gradient of 0.5 * mean((x.w - y)^2) has mean e, so
#   bias^2 = ||Delta_rho||^2,   Var (per batch of B) = ((d + 1) ||e||^2 + d s^2) / B
# (E||x||^2 (x.e)^2 = (d + 2)||e||^2 for Gaussian x), and CA-MSE = bias^2 + rho * Var.
D, B, S, DELTA2 = 32, 16, 1.0, 1.0
KEEPS = [1.0, 0.5, 0.25]
# Distance^2 of w to w* at the four checkpoints (training progress): far -> converged.
T2 = [64.0, 16.0, 2.0, 0.0]


def _analytic(t2, rho):
    b2 = DELTA2 * (1 / rho - 1)
    var = ((D + 1) * (t2 + b2) + D * S * S) / B  # Delta is orthogonal to w - w*: ||e||^2 = t2 + b2
    return b2, var, b2 + rho * var


def _toy(seed):
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))
    u, v = q[:, 0], q[:, 1]  # shift direction, approach direction (orthogonal)
    w = torch.zeros(D, dtype=torch.float64, requires_grad=True)

    def loss_fn(c, batch):
        x, eps = batch
        y = x @ (w_star + math.sqrt(DELTA2 * (1 / c.keep - 1)) * u) + eps
        return 0.5 * ((x @ w - y) ** 2).mean()

    def batches():
        return (torch.randn(B, D, generator=g, dtype=torch.float64),
                S * torch.randn(B, generator=g, dtype=torch.float64))

    def place(t2):  # "training progress": w at distance sqrt(t2) from the optimum
        with torch.no_grad():
            w.copy_(w_star + math.sqrt(t2) * v)

    return w, loss_fn, batches, place


def _argmin(rows, key):
    return min(rows, key=key)["keep"]


def _small_sched(keeps, **kw):
    """A schedule over ``keeps`` that estimates from 2 reference and 2 probe batches, cost = keep,
    10 steps; ``kw`` overrides any of these or adds others."""
    kw = {"total_steps": 10, "ref_batches": 2, "probe_batches": 2, "cost_fn": lambda c: c.keep, **kw}
    return AccelerationSchedule(keeps=keeps, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_toy_picks_the_analytic_best_per_stage(seed):
    expected = [min(KEEPS, key=lambda r: _analytic(t2, r)[2]) for t2 in T2]
    # The toy is built so the answer changes with progress, with a margin the estimates resolve.
    assert expected == [0.25, 0.25, 0.5, 1.0]
    for t2 in T2:
        best, second = sorted(_analytic(t2, r)[2] for r in KEEPS)[:2]
        assert second >= 1.15 * best

    w, loss_fn, batches, place = _toy(seed)
    sched = AccelerationSchedule(keeps=KEEPS, total_steps=4, checkpoints=[0, 0.25, 0.5, 0.75],
                                 ref_batches=128, probe_batches=32, cost_fn=lambda c: c.keep)
    chosen = []
    for step, t2 in enumerate(T2):
        place(t2)
        chosen.append(sched.on_step(step, loss_fn, [w], batches).keep)
    assert chosen == expected
    assert [h["choice"].keep for h in sched.history] == expected
    assert [h["stage"] for h in sched.history] == [0, 1, 2, 3]

    # Other rules on the same estimates pick differently at some stage: the test can fail.
    rules = {
        "bias only": lambda r: (r["bias2"], r["cost"]),
        "cost-adjusted variance only": lambda r: r["cost"] * r["variance"],
        "MSE without cost": lambda r: r["bias2"] + r["variance"],
    }
    for name, key in rules.items():
        other = [_argmin(h["candidates"], key) for h in sched.history]
        assert other != expected, name

    # The estimates are near the closed forms: within 30% (the worst over seeds 0-11 was 19% for
    # the variance and 24% for the CA-MSE: 32 probes of a heavy-tailed gradient; the estimators'
    # accuracy is tested tightly below).
    for h, t2 in zip(sched.history, T2):
        for r in h["candidates"]:
            _, var, ca = _analytic(t2, r["keep"])
            assert r["variance"] == pytest.approx(var, rel=0.3)
            assert r["ca_mse"] == pytest.approx(ca, rel=0.3)
            assert r["cost"] == r["keep"]
            assert math.isnan(r["seconds"])  # cost_fn replaced the timer


# ----------------------------------------------------------------------------- estimators vs closed form
def test_bias_variance_estimators_match_closed_form():
    """Gradients drawn exactly from N(mu_c, sigma_c^2 I_d): bias^2 = ||mu_c - mu_ref||^2, Var = d sigma_c^2.

    Tolerances (repeats = 20 estimates averaged): the corrected squared bias within 10% + 0.5
    (standard error of the mean ~0.4 here), the variance within 3% (relative s.e. ~0.3%); the raw
    ``||mean_c - g*||^2`` overshoots by ``Var_c / k + V* / R`` = 8, which the test tells apart.
    """
    d, k, R = 256, 64, 64
    g = torch.Generator().manual_seed(1)
    mu_ref = torch.randn(d, generator=g, dtype=torch.float64)
    offset = torch.randn(d, generator=g, dtype=torch.float64)
    offset *= 4.0 / offset.norm()  # ||mu_c - mu_ref||^2 = 16
    dist = {(1.0, None): (mu_ref, 1.0), (0.5, None): (mu_ref + offset, 1.0), (0.25, None): (mu_ref - offset, 2.0)}
    theta = torch.zeros(d, dtype=torch.float64, requires_grad=True)

    def loss_fn(c, z):
        mu, sigma = dist[tuple(c)]
        return theta @ (mu + sigma * z)  # gradient: exactly mu + sigma * z

    sched = AccelerationSchedule(keeps=[1.0, 0.5, 0.25], total_steps=1, checkpoints=[0.0],
                                 ref_batches=R, probe_batches=k, cost_fn=lambda c: 1.0)
    raw_sched = AccelerationSchedule(keeps=[1.0, 0.5, 0.25], total_steps=1, checkpoints=[0.0],
                                     ref_batches=R, probe_batches=k, cost_fn=lambda c: 1.0, bias_correction=False)
    acc = {c: [0.0, 0.0, 0.0] for c in dist}
    repeats = 20
    for _ in range(repeats):
        e = sched.estimate(loss_fn, [theta], lambda: torch.randn(d, generator=g, dtype=torch.float64))
        for r in e["candidates"]:
            a = acc[(r["keep"], r["patch"])]
            a[0] += r["bias2"] / repeats
            a[1] += r["bias2_raw"] / repeats
            a[2] += r["variance"] / repeats
        assert e["ref_var"] == pytest.approx(d * 1.0, rel=0.1)
        assert e["ref_grad_norm2"] == pytest.approx(float(mu_ref @ mu_ref) + d / R, rel=0.1)
    for c, (mu, sigma) in dist.items():
        bias2 = float((mu - mu_ref) @ (mu - mu_ref))
        var = d * sigma**2
        b, raw, v = acc[c]
        assert v == pytest.approx(var, rel=0.03)
        assert b == pytest.approx(bias2, rel=0.1, abs=0.5)
        assert raw == pytest.approx(bias2 + var / k + d / R, rel=0.1, abs=0.5)
        assert abs(raw - bias2) > 3.0  # the correction is not a no-op at these sizes
    # bias_correction=False reports the raw value as the bias
    e = raw_sched.estimate(loss_fn, [theta], lambda: torch.randn(d, generator=g, dtype=torch.float64))
    assert all(r["bias2"] == r["bias2_raw"] for r in e["candidates"])


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_moments_are_welford_unbiased(n):
    # The estimators above divide by n - 1; at n = 3 dividing by n would be 33% off.
    from effssl_kernels.schedule import _Moments

    g = torch.Generator().manual_seed(n)
    gs = [torch.randn(5, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(n)]
    m = _Moments()
    for x in gs:
        m.add(x)
    torch.testing.assert_close(m.mean, torch.stack(gs).mean(0))
    if n == 1:
        assert math.isnan(m.var)
    else:
        assert m.var == pytest.approx(float(torch.stack(gs).var(0, unbiased=True).sum()), rel=1e-12)


def test_costs_are_measured_not_assumed():
    """A loss whose step takes longer for larger keeps: the measured costs rank them so."""
    theta = torch.zeros(4, requires_grad=True)

    def loss_fn(c, batch):
        time.sleep(0.02 * c.keep)
        return (theta * batch).sum()

    sched = AccelerationSchedule(keeps=[1.0, 0.25], total_steps=1, checkpoints=[0.0], ref_batches=2, probe_batches=3)
    e = sched.estimate(loss_fn, [theta], lambda: torch.ones(4))
    rows = {r["keep"]: r for r in e["candidates"]}
    assert rows[1.0]["seconds"] >= 0.02 and rows[0.25]["seconds"] >= 0.005
    assert rows[1.0]["cost"] == 1.0 and rows[0.25]["cost"] < 0.8
    # variance 0 and bias 0 (same gradient everywhere): the cheaper one wins the tie
    assert e["choice"] == (0.25, None)
    assert theta.grad is None  # estimate does not touch .grad


def test_the_first_probe_is_a_warm_up_not_a_cost():
    # each candidate's first probe pays its warm-up (allocations, a compile): its time is left
    # out of the median, or a slow first call would set the cost
    theta = torch.zeros(4, requires_grad=True)
    calls = {}

    def loss_fn(c, batch):
        calls[c] = calls.get(c, 0) + 1
        if calls[c] == 1 + 2 * (c.keep == 1.0):  # the reference's 2 batches come first for keep 1
            time.sleep(0.3)
        return (theta * batch).sum()

    sched = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=1, checkpoints=[0.0], ref_batches=2, probe_batches=2)
    rows = sched.estimate(loss_fn, [theta], lambda: torch.ones(4))["candidates"]
    assert all(r["seconds"] < 0.1 for r in rows), rows


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    from effssl_kernels.schedule import _median

    assert _median([4.0, 1.0, 3.0, 2.0]) == 2.5 and _median([3.0, 1.0, 2.0]) == 2.0 and _median([5.0]) == 5.0


def test_an_update_before_the_stage_in_force_keeps_the_stage():
    theta = torch.zeros(3, requires_grad=True)

    def loss_fn(c, z):
        return theta @ (z * c.keep)

    sched = _small_sched([1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.5])
    sched.update(60, loss_fn, [theta], lambda: torch.randn(3))
    assert sched.stage == 1
    sched.update(10, loss_fn, [theta], lambda: torch.randn(3))  # re-estimates stage 1, never goes back
    assert sched.stage == 1 and sched.history[-1]["stage"] == 1 and not sched.due(49)


def test_combination_rule_and_variance_scale():
    sched = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=10, variance_scale=0.25)
    assert sched.combine(2.0, 8.0, 0.5) == 2.0 + 0.5 * 0.25 * 8.0


@pytest.mark.parametrize("bad", [0.5, 1.0])
def test_non_finite_gradients_are_refused(bad):
    # a candidate (or the reference, keep 1.0) whose gradient is NaN must never be chosen:
    # max(0, nan) is 0 and min() keeps the first NaN, so a score would pick it silently
    theta = torch.zeros(3, requires_grad=True)

    def loss_fn(c, z):
        return theta @ (z * (float("nan") if c.keep == bad else c.keep))

    sched = _small_sched([0.5, 1.0, 0.25])
    with pytest.raises(ValueError, match="non-finite gradient"):
        sched.estimate(loss_fn, [theta], lambda: torch.randn(3))


def test_callback_stages_and_checkpoint_steps():
    theta = torch.zeros(3, requires_grad=True)
    def loss_fn(c, z):
        return theta @ (z * c.keep)

    sched = _small_sched([1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.5, 0.9])
    assert sched.checkpoint_steps == [0, 50, 90]
    assert sched.current == (1.0, None) and sched.stage == -1
    with pytest.raises(ValueError, match="checkpoint"):
        sched.on_step(0)  # a checkpoint, nothing to estimate with
    due = [s for s in range(100) if sched.due(s)]
    assert due == list(range(100))  # nothing estimated yet: every step is past checkpoint 0
    def fetch():
        return torch.randn(3)

    steps = []
    for s in range(100):
        if sched.due(s):
            steps.append(s)
        sched.on_step(s, loss_fn, [theta], fetch)
    assert steps == [0, 50, 90]
    assert [h["step"] for h in sched.history] == [0, 50, 90]
    assert len(sched.table()) == 3 * 2 and sum(r["chosen"] for r in sched.table()) == 3
    # resuming past a checkpoint estimates once, for the latest one
    fresh = _small_sched([1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.5, 0.9])
    fresh.on_step(60, loss_fn, [theta], fetch)
    assert fresh.stage == 1 and not fresh.due(89) and fresh.due(90)
    state = fresh.state_dict()
    again = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.5, 0.9])
    again.load_state_dict(state)
    assert again.stage == 1 and again.current == fresh.current
    # through a checkpoint file, read with torch.load's default weights_only=True
    buf = io.BytesIO()
    torch.save({"schedule": fresh.state_dict()}, buf)
    buf.seek(0)
    loaded = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.5, 0.9])
    loaded.load_state_dict(torch.load(buf)["schedule"])
    assert loaded.stage == 1 and loaded.current == fresh.current
    assert loaded.history[-1]["choice"] == fresh.history[-1]["choice"]
    assert type(loaded.history[-1]["choice"]) is type(fresh.history[-1]["choice"])
    # a state of another schedule is refused, not half taken
    other = AccelerationSchedule(keeps=[1.0, 0.25], total_steps=100, checkpoints=[0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="not in this schedule's grid"):
        other.load_state_dict({**state, "choice": (0.5, None)})
    short = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.0])
    with pytest.raises(ValueError, match=r"fall on steps \[0, 50, 90\], this schedule's on \[0\]"):
        short.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "checkpoint_steps"}  # a state without the steps
    with pytest.raises(ValueError, match="outside this schedule's 1 checkpoints"):
        short.load_state_dict(older)
    assert short.stage == -1
    longer = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=1000, checkpoints=[0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="another total_steps or checkpoints"):
        longer.load_state_dict(state)  # stage 1 would run from step 100 although it starts at 500
    assert longer.stage == -1
    # a bad or missing history is refused before the stage and choice are taken (until
    # 2026-12-06 they were taken first: a caught error left the schedule at the refused choice)
    for bad in ({k: v for k, v in state.items() if k != "history"},
                {**state, "history": [{"choice": (2.0, None)}]}):
        fresh2 = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.5, 0.9])
        before = (fresh2.stage, fresh2.current, list(fresh2.history))
        with pytest.raises(ValueError, match="history"):
            fresh2.load_state_dict(bad)
        assert (fresh2.stage, fresh2.current, list(fresh2.history)) == before


def test_checkpoint_steps_are_exact_and_numpy_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    # 0.29 * 100 == 28.999999999999996 in floats: the step is 29, as the fraction reads
    s = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.0, 0.29, 0.57])
    assert s.checkpoint_steps == [0, 29, 57]
    assert AccelerationSchedule(keeps=[1.0], total_steps=7, checkpoints=[0.0, 0.5]).checkpoint_steps == [0, 3]
    n = AccelerationSchedule(keeps=[np.float32(0.5), 1.0], patches=[np.int64(16)], total_steps=np.int64(10),
                             checkpoints=[np.float64(0.0)], ref_batches=np.int32(2))
    assert n.total_steps == 10 and type(n.total_steps) is int and (0.5, 16) in n.candidates
    assert all(type(c.patch) is int for c in n.candidates)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        AccelerationSchedule(keeps=[1.0], total_steps=10.0)
    with pytest.raises(TypeError, match="patch must be a positive int or None"):
        AccelerationSchedule(keeps=[1.0], patches=[16.0], total_steps=10)


def test_estimate_restores_the_models_buffers():
    # The probes run the model in training mode: BatchNorm would fold their compressed batches
    # into its running statistics and count them in num_batches_tracked.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    head = nn.BatchNorm1d(1)
    before = {k: v.clone() for k, v in {**net.state_dict(), **head.state_dict()}.items()}
    sched = _small_sched([1.0, 0.5])

    def loss_fn(cand, batch):
        return head(net(batch * cand.keep)).square().mean()

    params = list(net.parameters())
    sched.estimate(loss_fn, params, lambda: torch.randn(8, 3), modules=[net, head])
    after = {**net.state_dict(), **head.state_dict()}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    loss_fn.modules = (net,)  # vit_loss_fn's attribute: the default when modules is not given
    sched.estimate(loss_fn, params, lambda: torch.randn(8, 3))
    assert torch.equal(net[1].running_mean, before["1.running_mean"])
    assert net[1].num_batches_tracked == 0 and head.num_batches_tracked > 0  # head not named
    with pytest.raises(TypeError, match="modules must be nn.Modules"):
        sched.estimate(loss_fn, params, lambda: torch.randn(8, 3), modules=[net[0].weight])


# ----------------------------------------------------------------------------- the ViT callback
def _tiny_vit():
    m = timm.create_model("vit_small_patch16_224", img_size=48, patch_size=16, depth=1, embed_dim=32,
                          num_heads=2, num_classes=0)
    return ek.sparsify_vit(m)


def _token_counter(vit):
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen


def test_apply_sets_tokens_and_patch_per_role():
    online = _tiny_vit()
    momentum = copy.deepcopy(online).requires_grad_(False)
    on_seen, mom_seen = _token_counter(online), _token_counter(momentum)
    x = torch.randn(3, 3, 48, 48)
    sched = AccelerationSchedule(keeps=[1.0, 0.5], patches=[16, 24], total_steps=10, multiple_of=1)
    assert sched.ref == (1.0, 16)
    cfg = Candidate(0.5, 24)
    with sched.apply(online, "online", config=cfg) as applied, \
            sched.apply(momentum, "momentum", config=sched.momentum_config(cfg)) as applied_m:
        assert applied == cfg and applied_m == (1.0, 24)  # default: keep all, same patch
        out = online(x)
        online.forward_features(x)
        momentum(x)
    # 48 px: patch 16 -> 3x3 = 9 tokens, patch 24 -> 2x2 = 4; + cls
    assert on_seen == [1 + 2, 1 + 2] and mom_seen == [1 + 4]
    assert out.shape == (3, 32)
    online(x)
    momentum(x)
    assert on_seen[-1] == 1 + 9 and mom_seen[-1] == 1 + 9  # outside: the original models
    assert "forward_features" not in online.__dict__ and online.patch_embed._effssl_patch is None

    # token keep only (own patch): online drops, momentum ("same_patch") keeps all
    with sched.apply(online, config=(0.5, 16)), sched.apply(momentum, "momentum", config=sched.momentum_config((0.5, 16))):
        online(x)
        momentum(x)
    assert on_seen[-1] == 1 + 4 and mom_seen[-1] == 1 + 9
    # the role's setting in force when no config is given; a wrapper module holding the ViT works
    sched._choice = Candidate(0.5, 24)
    wrapped = nn.Sequential(online, nn.Linear(32, 8))
    with sched.apply(wrapped, "online"), sched.apply(momentum, "momentum"):
        assert wrapped(x).shape == (3, 8)
        momentum(x)
    assert on_seen[-1] == 1 + 2 and mom_seen[-1] == 1 + 4


def test_apply_counts_padded_patches_on_a_dynamic_pad_vit():
    # dynamic_img_pad pads the image up to whole patches: 56 px at patch 16 is 4x4 = 16 tokens
    # (not the 3x3 that fit), so keep 0.5 keeps 8 of all 16
    m = timm.create_model("vit_small_patch16_224", img_size=48, patch_size=16, depth=1, embed_dim=32,
                          num_heads=2, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    vit = ek.sparsify_vit(m)
    seen = _token_counter(vit)
    sched = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=10, multiple_of=1)
    with sched.apply(vit, config=(0.5, 16)):
        vit(torch.randn(2, 3, 56, 56))
    assert seen == [1 + 8]


def test_apply_with_checkpointing():
    # a checkpoint recomputes forward_features during backward: with the global RNG (restored by
    # checkpoint) it redraws the forward's tokens; a generator would draw others, so it is refused
    torch.manual_seed(0)
    a = _tiny_vit().double()
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    sched = AccelerationSchedule(keeps=[1.0, 0.5], patches=[16], total_steps=10, multiple_of=1)
    torch.manual_seed(1)
    with sched.apply(a, config=(0.5, 16)):
        a(x).square().sum().backward()
    torch.manual_seed(1)
    with sched.apply(b, config=(0.5, 16)):
        ek.masked_checkpoint(b, x).square().sum().backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=lambda m, k=k: f"{k}: {m}")
    with sched.apply(b, config=(0.5, 16), generator=torch.Generator().manual_seed(5)):
        y = ek.masked_checkpoint(b, x)
        with pytest.raises(RuntimeError, match="generator=None"):
            y.sum().backward()


def test_copy_made_inside_apply_is_the_plain_model():
    online = _tiny_vit()
    x = torch.randn(2, 3, 48, 48)
    ref = online(x)
    sched = AccelerationSchedule(keeps=[1.0, 0.5], patches=[16, 24], total_steps=10, multiple_of=1)
    plain = copy.deepcopy(online)
    with sched.apply(online, config=(0.5, 24)):
        teacher = copy.deepcopy(online)
        buf = io.BytesIO()
        torch.save(online, buf)  # the wrapper (a local closure) is not part of the model
    with torch.no_grad():
        for t, u in zip(teacher.parameters(), plain.parameters()):
            t.mul_(2)
            u.mul_(2)
    assert "forward_features" not in teacher.__dict__
    assert torch.equal(teacher(x), plain(x))  # its own weights, every token, patch 16
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), ref)


@pytest.mark.parametrize("policy, expected", [
    ("same_patch", (1.0, 24)), ("same", (0.5, 24)), ("full", (1.0, None)),
    ((0.75, 16), (0.75, 16)), (lambda c: Candidate(c.keep, 16), (0.5, 16)),
])
def test_momentum_policies(policy, expected):
    sched = AccelerationSchedule(keeps=[1.0, 0.5], patches=[16, 24], total_steps=10, momentum=policy)
    assert sched.momentum_config((0.5, 24)) == expected


def test_estimate_on_vit_probes_each_setting_for_both_roles():
    torch.manual_seed(0)
    online = _tiny_vit().train()
    momentum = copy.deepcopy(online).requires_grad_(False)
    on_seen, mom_seen = _token_counter(online), _token_counter(momentum)
    head = nn.Linear(32, 16)

    def moco_loss(images):
        q = nn.functional.normalize(head(online(images)), dim=-1)
        with torch.no_grad():
            k = nn.functional.normalize(head(momentum(images.flip(-1))), dim=-1)
        logits = q @ k.T / 0.2
        return nn.functional.cross_entropy(logits, torch.arange(images.shape[0]))

    sched = AccelerationSchedule(keeps=[1.0, 0.5], patches=[16, 24], total_steps=10, ref_batches=2,
                                 probe_batches=2, multiple_of=1)
    loss_fn = sched.vit_loss_fn(online, moco_loss, momentum=momentum, modules=[head])
    assert loss_fn.modules == (online, momentum, head)  # whose buffers estimate restores
    params = list(online.parameters()) + list(head.parameters())
    choice = sched.on_step(0, loss_fn, params, lambda: torch.randn(4, 3, 48, 48))
    h = sched.history[0]
    assert choice in sched.candidates and h["choice"] == choice and sched.current == choice
    assert len(h["candidates"]) == 4
    for r in h["candidates"]:
        assert r["seconds"] > 0 and r["cost"] > 0
        assert math.isfinite(r["bias2"]) and r["bias2"] >= 0 and r["variance"] > 0
        assert r["ca_mse"] == pytest.approx(r["bias2"] + r["cost"] * r["variance"])
    assert next(r for r in h["candidates"] if (r["keep"], r["patch"]) == (1.0, 16))["cost"] == 1.0
    # every candidate ran on the online encoder; the momentum encoder kept all tokens at its patch
    assert set(on_seen) == {10, 5, 3}  # (1, 16) and (0.5, 16) -> 10, 5; (1, 24) -> 5; (0.5, 24) -> 3
    assert set(mom_seen) == {10, 5}
    assert all(p.grad is None for p in params)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(candidates=[]), ValueError, "empty grid"),
    (dict(), ValueError, "empty grid"),
    (dict(keeps=[0.0]), ValueError, "keep must be in"),
    (dict(keeps=[1.5]), ValueError, "keep must be in"),
    (dict(keeps=[float("nan")]), ValueError, "keep must be in"),
    (dict(keeps=["a"]), TypeError, "keep must be a float"),
    (dict(keeps=[1.0], patches=[0]), ValueError, "patch must be positive"),
    (dict(keeps=[1.0], patches=[16.0]), TypeError, "patch must be a positive int"),
    (dict(candidates=[(1.0, 16), (1.0, 16)]), ValueError, "duplicate"),
    (dict(candidates=[(1.0,)]), TypeError, "pair"),
    (dict(keeps=[1.0], checkpoints=[0.5, 0.25]), ValueError, "strictly increasing"),
    (dict(keeps=[1.0], checkpoints=[0.1, 0.15]), ValueError, "fall on the same step"),  # both step 1 of 10
    (dict(keeps=[1.0], checkpoints=[0.0, 1.0]), ValueError, r"\[0, 1\)"),
    (dict(keeps=[1.0], checkpoints=[-0.1]), ValueError, r"\[0, 1\)"),
    (dict(keeps=[1.0], checkpoints=[]), ValueError, "empty"),
    (dict(keeps=[1.0], probe_batches=1), ValueError, "probe_batches"),
    (dict(keeps=[1.0], ref_batches=0), ValueError, "ref_batches"),
    (dict(keeps=[1.0], momentum="teacher"), ValueError, "momentum"),
    (dict(keeps=[1.0], variance_scale=0.0), ValueError, "variance_scale"),
    (dict(keeps=[1.0], variance_scale=float("inf")), ValueError, "positive finite"),  # 0 * inf: NaN scores
    (dict(keeps=[0.5], ref=(0.5, None)), ValueError, "keep 1.0"),
    (dict(keeps=[True]), TypeError, "keep must be a float"),  # a bool is not a keep ratio
    (dict(candidates=[(1.0, None), (0.5, None)], patches=[16]), ValueError, "not both"),
    (dict(keeps=[1.0], checkpoints=[False]), ValueError, r"\[0, 1\)"),  # nor a checkpoint
])
def test_bad_arguments(kwargs, exc, match):
    kwargs.setdefault("total_steps", 10)
    with pytest.raises(exc, match=match):
        AccelerationSchedule(**kwargs)


def test_bad_apply_and_estimate():
    sched = AccelerationSchedule(keeps=[1.0, 0.5], patches=[16, 20], total_steps=10)
    with pytest.raises(TypeError, match="sparsify_vit"):
        with sched.apply(nn.Linear(2, 2)):
            pass
    vit = _tiny_vit()
    with pytest.raises(ValueError, match="role"):
        with sched.apply(vit, "teacher"):
            pass
    with pytest.raises(ValueError, match="divide"):
        with sched.apply(vit, config=(1.0, 20)):  # 20 does not divide 48
            pass
    with sched.apply(vit), pytest.raises(ValueError, match="already inside"):
        with sched.apply(vit, config=(0.5, 16)):
            pass
    assert "forward_features" not in vit.__dict__
    with pytest.raises(ValueError, match="two|several|2"):
        with sched.apply(nn.Sequential(vit, _tiny_vit())):
            pass
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        sched.estimate(lambda c, b: theta * b, [theta], lambda: torch.ones(2))
    with pytest.raises(ValueError, match="ran out"):
        sched.estimate(lambda c, b: theta @ b, [theta], [torch.ones(2)] * 3)
    with pytest.raises(ValueError, match="requires grad"):
        sched.estimate(lambda c, b: theta @ b, [torch.zeros(2)], lambda: torch.ones(2))


def test_default_ref_of_a_mixed_grid_is_the_models_own_patch():
    s = AccelerationSchedule(candidates=[(1.0, None), (0.5, 16), (1.0, 16)], total_steps=10)
    assert s.ref == (1.0, None) and s.current == (1.0, None)


def test_a_state_saved_before_the_first_checkpoint_loads():
    s = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.1, 0.5])
    t = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=100, checkpoints=[0.1, 0.5])
    t.load_state_dict(s.state_dict())  # stage -1: nothing estimated yet
    assert t.stage == -1 and t.current == (1.0, None) and t.due(10) and not t.due(9)


def test_half_params_accumulate_in_float32():
    # fp16 gradients of 10 over 4096 entries: ||g||^2 = 409600 overflows fp16 (max 65504)
    theta = torch.zeros(4096, dtype=torch.float16, requires_grad=True)
    sched = _small_sched([1.0, 0.5])
    e = sched.estimate(lambda c, z: (theta * z).sum() * c.keep, [theta],
                       lambda: torch.full((4096,), 10.0, dtype=torch.float16))
    assert e["ref_grad_norm2"] == 4096 * 100.0
    rows = {r["keep"]: r for r in e["candidates"]}
    assert rows[0.5]["bias2_raw"] == 4096 * 25.0


def test_a_param_unused_by_the_loss_gives_a_zero_gradient():
    theta = torch.zeros(3, requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)  # e.g. a head only some settings call
    sched = _small_sched([1.0, 0.5])
    e = sched.estimate(lambda c, z: theta @ (z * c.keep), [theta, unused], lambda: torch.randn(3))
    assert e["choice"] in sched.candidates


def test_one_reference_batch_drops_the_reference_variance_term():
    # R = 1 leaves no reference variance to estimate: its term is 0 (documented), not NaN
    theta = torch.zeros(3, requires_grad=True)
    sched = _small_sched([1.0, 0.5], ref_batches=1)
    e = sched.estimate(lambda c, z: theta @ (z * c.keep), [theta], lambda: torch.randn(3))
    assert e["ref_var"] == 0.0


def test_probes_are_the_same_k_batches_for_every_candidate():
    theta = torch.zeros(3, requires_grad=True)
    fetched = []

    def fetch():
        fetched.append(torch.randn(3))
        return fetched[-1]

    sched = _small_sched([1.0, 0.5, 0.25], probe_batches=3)
    sched.estimate(lambda c, z: theta @ (z * c.keep), [theta], fetch)
    assert len(fetched) == 2 + 3  # R + k batches, not R + k * candidates


def test_bias_correction_is_exact_on_fixed_gradients():
    # d = 1, gradient = z. Reference batches 0, 2: g* = 1, V* = 2. Probes 10, 14: mean 12,
    # Var = 8 (k = 2), raw = 121, bias2 = 121 - 8 / 2 - 2 / 2 = 116
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zs = [torch.tensor([v], dtype=torch.float64) for v in (0.0, 2.0, 10.0, 14.0)]
    sched = _small_sched([1.0], patches=[16, 32], cost_fn=lambda c: 1.0)
    e = sched.estimate(lambda c, z: theta @ z, [theta], iter(zs))
    r = e["candidates"][0]
    assert (r["bias2_raw"], r["variance"], e["ref_var"]) == (121.0, 8.0, 2.0)
    assert r["bias2"] == 116.0


def test_cost_fn_returning_zero_is_refused():
    theta = torch.zeros(3, requires_grad=True)
    sched = _small_sched([1.0, 0.5], cost_fn=lambda c: 0.0 if c.keep < 1 else 1.0)
    with pytest.raises(ValueError, match="positive costs"):
        sched.estimate(lambda c, z: theta @ (z * c.keep), [theta], lambda: torch.randn(3))


def test_costs_are_relative_to_the_reference_wherever_it_sits():
    theta = torch.zeros(3, requires_grad=True)
    sched = _small_sched([0.5, 1.0])
    assert sched.candidates.index(sched.ref) == 1
    e = sched.estimate(lambda c, z: theta @ (z * c.keep), [theta], lambda: torch.randn(3))
    assert {r["keep"]: r["cost"] for r in e["candidates"]} == {0.5: 0.5, 1.0: 1.0}


def _free_choice_sched():
    # every candidate has the same gradient (bias 0, variance 0): the cheapest wins, here (0.5, 24)
    return _small_sched([1.0, 0.5], patches=[16, 24], cost_fn=lambda c: c.keep / c.patch)


def test_history_momentum_is_that_of_the_new_choice():
    theta = torch.zeros(3, requires_grad=True)
    e = _free_choice_sched().estimate(lambda c, z: theta @ z, [theta], lambda: torch.randn(3))
    assert e["choice"] == (0.5, 24) and e["momentum"] == (1.0, 24)


def test_table_marks_only_the_chosen_candidate():
    # (0.5, 24) chosen: (0.5, 16) has the same keep and must not be marked
    theta = torch.zeros(3, requires_grad=True)
    sched = _free_choice_sched()
    sched.update(0, lambda c, z: theta @ z, [theta], lambda: torch.randn(3))
    assert [(r["keep"], r["patch"]) for r in sched.table() if r["chosen"]] == [(0.5, 24)]


def test_apply_restores_an_instance_forward_features():
    vit = _tiny_vit()
    own = vit.forward_features
    vit.forward_features = own  # e.g. another wrapper's instance attribute
    sched = AccelerationSchedule(keeps=[1.0, 0.5], total_steps=10, multiple_of=1)
    with sched.apply(vit, config=(0.5, 16)):
        vit(torch.randn(1, 3, 48, 48))
    assert vit.__dict__.get("forward_features") is own
