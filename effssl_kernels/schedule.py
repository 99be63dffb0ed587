"""AAIP acceleration schedule: per training stage, the token keep and patch size of least CA-MSE.

Lin, Wu, Wei, Morgado, "Accelerating Augmentation Invariance Pretraining" (NeurIPS 2024,
arXiv 2410.22364) compress the ViT input sequence (random token dropout, FlexiViT patch
scaling) and choose, at a few points of training, the compression whose gradient estimate has
the smallest cost-adjusted mean squared error (CA-MSE) against the gradient of the
uncompressed model: aggressive compression early, milder later. Only the abstract and the
figure captions of the paper were available here (see shared/research/vit_data.md section 2);
the estimators and the exact rule below are this module's, derived from that description and
written out in ``AccelerationSchedule``'s docstring.

    sched = AccelerationSchedule(keeps=[1.0, 0.5, 0.25], patches=[16, 24, 30], total_steps=T)
    loss_fn = sched.vit_loss_fn(online, lambda batch: moco_loss(batch), momentum=momentum)
    for step in range(T):
        sched.on_step(step, loss_fn=loss_fn, params=online.parameters(), batches=next_batch)
        with sched.apply(online, "online"), sched.apply(momentum, "momentum"):
            loss = moco_loss(next_batch())      # online and momentum each see their setting
        ...
"""
from __future__ import annotations

import bisect
import contextlib
import math
import numbers
import time
from fractions import Fraction
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._utils import as_int, int_arg

__all__ = ["AccelerationSchedule", "Candidate"]


class Candidate(NamedTuple):
    """One acceleration setting: the kept fraction of patch tokens and the patch side.

    ``patch=None`` is the model's own patch size. A plain tuple ``(keep, patch)`` compares equal.
    """

    keep: float
    patch: Optional[int]


_CANDIDATE_KEYS = ("choice", "momentum")  # the history entries' Candidate fields


def _plain(obj):
    """``obj`` with every Candidate (a NamedTuple: not loadable with weights_only) a plain tuple."""
    if isinstance(obj, Candidate):
        return tuple(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _candidate(value, what: str) -> Candidate:
    if isinstance(value, (tuple, list)) and len(value) == 2:  # Candidate is a tuple
        keep, patch = value
    else:
        raise TypeError(f"{what} must be a (keep, patch) pair, got {value!r}")
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):  # NumPy floats too
        raise TypeError(f"{what}: keep must be a float, got {type(keep).__name__}")
    if not (0.0 < keep <= 1.0):  # also rejects NaN
        raise ValueError(f"{what}: keep must be in (0, 1], got {keep}")
    if patch is not None:
        try:
            patch = as_int(patch, f"{what}: patch")  # NumPy ints too
        except TypeError:
            raise TypeError(f"{what}: patch must be a positive int or None, got {patch!r}") from None
        if patch <= 0:
            raise ValueError(f"{what}: patch must be positive, got {patch}")
    return Candidate(float(keep), None if patch is None else int(patch))


def _positive_int(value, name: str, minimum: int = 1) -> int:
    return int_arg(name, "AccelerationSchedule", value, minimum)


class _Moments:
    """Running mean vector and summed squared deviation (Welford), for flattened gradients."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2 = 0.0

    def add(self, g: Tensor) -> None:
        self.n += 1
        if self.mean is None:
            self.mean = g.clone()
            return
        delta = g - self.mean
        self.mean.add_(delta, alpha=1.0 / self.n)
        self.m2 += float(torch.dot(delta, g - self.mean))  # one host sync per gradient

    @property
    def var(self) -> float:
        """Unbiased ``sum_i ||g_i - mean||^2 / (n - 1)`` (the trace of the covariance); NaN for n < 2."""
        return self.m2 / (self.n - 1) if self.n > 1 else float("nan")


_MOMENTUM_POLICIES = ("same_patch", "same", "full")


class AccelerationSchedule:
    """Chooses, per training stage, the (token keep, patch size) of least cost-adjusted gradient MSE.

    At each checkpoint (a fraction of ``total_steps``) the schedule estimates, for every
    candidate ``c`` of the grid and the current parameters:

    - the reference gradient ``g* = mean_j g_ref(B_j)`` of the uncompressed setting ``ref``
      over ``ref_batches`` batches (a large batch), and its per-batch variance ``V*``;
    - ``k = probe_batches`` gradients ``g_c,i`` of ``c`` on small batches ``b_1..b_k`` (the
      same ``k`` batches for every candidate, drawn independently of the reference batches),
      their mean ``mean_c`` and the per-batch variance
      ``Var_c = sum_i ||g_c,i - mean_c||^2 / (k - 1)`` (unbiased, trace of the covariance);
    - the squared bias ``Bias2_c = max(0, ||mean_c - g*||^2 - Var_c / k - V* / R)`` (``R =
      ref_batches``): ``||mean_c - g*||^2`` is biased upward by the sampling noise of both means,
      ``E||mean_c - g*||^2 = ||E g_c - E g_ref||^2 + Var_c / k + V* / R`` for independent
      batches, so the two terms are subtracted (``bias_correction=False`` keeps the raw value;
      ``V*`` needs ``R >= 2``, else that term is 0), then clipped at 0;
    - the cost ``kappa_c``: measured seconds of one forward + backward of ``loss_fn`` on one probe
      batch (host timer with ``torch.cuda.synchronize`` before and after on CUDA), the median
      over the probes after the first (the first pays warm-up: caches, allocator, a new patch
      size); ``cost_fn(c)`` replaces the measurement when given;

    and combines them by the rule

        CA-MSE_c = Bias2_c + (kappa_c / kappa_ref) * variance_scale * Var_c

    then trains until the next checkpoint with ``argmin_c CA-MSE_c`` (ties: the cheaper).
    Why: with the compute of one reference step, a candidate that is ``kappa_ref / kappa_c``
    times cheaper can average that many more samples (a larger batch or more steps); averaging
    divides the variance and leaves the bias, so the MSE that ``c`` buys for a fixed budget is
    ``Bias2_c + (kappa_c / kappa_ref) * Var_c`` (AAIP's "squared bias + cost-adjusted
    variance"). ``Var_c`` is the variance at the probe batch size; ``variance_scale`` (default 1)
    rescales it to the training batch size, ``b_probe / b_train``, when they differ. Early in
    training the gradient noise is large, so cheap (biased) settings win; near convergence the
    noise shrinks, the bias of compression dominates and milder settings win. The paper's own
    equations were not available here; this is the rule as its captions describe it (CA-MSE =
    squared bias + cost-adjusted variance, argmin per stage), with the estimators above.

    The reference setting ``ref`` (default: keep 1.0 at the smallest patch of the grid, or
    ``None`` = the model's own patch when the grid has it) is always a candidate (added to the
    grid if missing), since training uncompressed is always an option. Before the first
    checkpoint the online setting is ``ref``.

    Momentum / target encoder (``momentum=``): AAIP compares "asymmetric token dropout" and
    "symmetric patch scaling" (figure captions), i.e. token dropout on the online (query)
    branch only and the same patch size in both, so the default ``"same_patch"`` gives the
    momentum encoder keep 1.0 at the online patch size. ``"same"`` copies the online setting,
    ``"full"`` always runs it uncompressed (keep 1.0, its own patch); a ``(keep, patch)`` pair
    fixes it; a callable maps the online ``Candidate`` to the momentum one. The setting chosen
    for the online encoder is what the CA-MSE ranks; ``vit_loss_fn`` applies the momentum
    policy inside the probes too, so each candidate's gradient is that of the real step.

    Args:
        candidates: ``(keep, patch)`` pairs; or ``keeps`` x ``patches`` (the grid of both lists;
            ``patches`` defaults to ``[None]``, ``keeps`` to ``[1.0]``).
        total_steps: training steps; checkpoint ``i`` is step ``floor(checkpoints[i] * total_steps)``
            (exactly, with the fraction read as the decimal it prints as: 0.29 of 100 is 29).
        checkpoints: strictly increasing fractions in ``[0, 1)``; stage ``i`` lasts from checkpoint
            ``i`` to checkpoint ``i + 1`` (or the end).
        ref: the uncompressed setting, see above.
        ref_batches: ``R >= 1`` batches for ``g*`` (use ``R >= 2``: ``V*`` needs two).
        probe_batches: ``k >= 2`` small batches per candidate.
        variance_scale: ``> 0``, see the rule.
        bias_correction: subtract the finite-sample terms from the squared bias.
        cost_fn: ``cost_fn(candidate) -> float > 0`` replaces the measured seconds (tests,
            or FLOP models); only ratios to the reference's matter.
        momentum: the momentum-encoder policy, see above.
        multiple_of: ``K`` rounding of ``random_token_keep`` in ``apply`` (default 8, its
            default; 1 gives ``max(1, int(L * keep))`` tokens exactly).

    Raises:
        TypeError / ValueError for an empty grid, a keep outside ``(0, 1]``, a patch that is
        not a positive int, duplicate candidates, checkpoints unsorted or outside ``[0, 1)``,
        non-positive counts, ``probe_batches < 2`` or an unknown momentum policy.

    Attributes:
        candidates: the ``Candidate`` grid (``ref`` included).
        history: one dict per estimated checkpoint: ``step``, ``stage``, ``progress``,
            ``choice``, ``momentum``, ``ref_grad_norm2`` (``||g*||^2``), ``ref_var`` (``V*``),
            ``estimate_seconds`` and ``candidates``: per candidate ``keep``, ``patch``,
            ``bias2``, ``bias2_raw`` (``||mean_c - g*||^2``), ``variance``, ``seconds``
            (measured, NaN under ``cost_fn``), ``cost`` (``kappa_c / kappa_ref``), ``ca_mse``.
    """

    def __init__(
        self,
        candidates: Optional[Iterable] = None,
        *,
        keeps: Optional[Sequence[float]] = None,
        patches: Optional[Sequence[Optional[int]]] = None,
        total_steps: int,
        checkpoints: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
        ref=None,
        ref_batches: int = 8,
        probe_batches: int = 4,
        variance_scale: float = 1.0,
        bias_correction: bool = True,
        cost_fn: Optional[Callable[[Candidate], float]] = None,
        momentum: Union[str, tuple, Callable[[Candidate], Candidate]] = "same_patch",
        multiple_of: int = 8,
    ) -> None:
        fn = "AccelerationSchedule"
        if candidates is not None and (keeps is not None or patches is not None):
            raise ValueError(f"{fn}: give candidates or keeps/patches, not both")
        if candidates is None:
            if keeps is None and patches is None:
                raise ValueError(f"{fn}: empty grid: give candidates or keeps/patches")
            keeps = [1.0] if keeps is None else list(keeps)
            patches = [None] if patches is None else list(patches)
            candidates = [(k, p) for p in patches for k in keeps]
        grid = [_candidate(c, f"{fn}: candidate {c!r}") for c in candidates]
        if not grid:
            raise ValueError(f"{fn}: empty grid: no candidates")
        if len(set(grid)) != len(grid):
            raise ValueError(f"{fn}: duplicate candidates in {grid}")
        if ref is None:
            ints = [c.patch for c in grid if c.patch is not None]
            ref = (1.0, None if (len(ints) < len(grid) or not ints) else min(ints))
        self.ref = _candidate(ref, f"{fn}: ref")
        if self.ref.keep != 1.0:
            raise ValueError(f"{fn}: ref must keep all tokens (keep 1.0), got {self.ref}")
        if self.ref not in grid:
            grid.insert(0, self.ref)
        self.candidates: list[Candidate] = grid

        self.total_steps = _positive_int(total_steps, "total_steps")
        cps = list(checkpoints)
        if not cps:
            raise ValueError(f"{fn}: checkpoints must not be empty")
        for c in cps:
            if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (0.0 <= c < 1.0):
                raise ValueError(f"{fn}: checkpoints must be fractions in [0, 1), got {cps}")
        if any(b <= a for a, b in zip(cps, cps[1:])):
            raise ValueError(f"{fn}: checkpoints must be strictly increasing, got {cps}")
        self.checkpoints = [float(c) for c in cps]
        # the fraction as the decimal it prints as: 0.29 * 100 is step 29, not floor(28.999...)
        self.checkpoint_steps = [math.floor(Fraction(repr(c)) * self.total_steps) for c in self.checkpoints]
        if any(b <= a for a, b in zip(self.checkpoint_steps, self.checkpoint_steps[1:])):
            raise ValueError(f"{fn}: checkpoints {cps} fall on the same step of {total_steps}")

        self.ref_batches = _positive_int(ref_batches, "ref_batches")
        self.probe_batches = _positive_int(probe_batches, "probe_batches", 2)
        if isinstance(variance_scale, bool) or not isinstance(variance_scale, numbers.Real) \
                or not 0 < variance_scale < math.inf:  # inf: 0 * inf = NaN scores, min() skips them
            raise ValueError(f"{fn}: variance_scale must be a positive finite number, got {variance_scale!r}")
        self.variance_scale = float(variance_scale)
        self.bias_correction = bool(bias_correction)
        if cost_fn is not None and not callable(cost_fn):
            raise TypeError(f"{fn}: cost_fn must be callable")
        self.cost_fn = cost_fn
        if isinstance(momentum, str):
            if momentum not in _MOMENTUM_POLICIES:
                raise ValueError(f"{fn}: momentum must be one of {_MOMENTUM_POLICIES}, a (keep, patch) pair "
                                 f"or a callable, got {momentum!r}")
        elif not callable(momentum):
            momentum = _candidate(momentum, f"{fn}: momentum")
        self.momentum = momentum
        self.multiple_of = _positive_int(multiple_of, "multiple_of")

        self.history: list[dict] = []
        self._stage = -1  # index of the last estimated checkpoint
        self._choice: Candidate = self.ref

    # ------------------------------------------------------------------------- state
    @property
    def stage(self) -> int:
        """Index of the checkpoint whose estimate is in force (-1 before the first)."""
        return self._stage

    @property
    def current(self) -> Candidate:
        """The online encoder's setting in force."""
        return self._choice

    def momentum_config(self, online: Optional[Candidate] = None) -> Candidate:
        """The momentum encoder's setting for the online setting ``online`` (default: in force)."""
        c = self._choice if online is None else _candidate(online, "momentum_config")
        m = self.momentum
        if m == "same_patch":
            return Candidate(1.0, c.patch)
        if m == "same":
            return c
        if m == "full":
            return Candidate(1.0, None)
        if isinstance(m, Candidate):
            return m
        return _candidate(m(c), "momentum policy result")

    def config(self, role: str = "online") -> Candidate:
        """The setting in force for ``role`` (``"online"`` or ``"momentum"``)."""
        if role == "online":
            return self._choice
        if role == "momentum":
            return self.momentum_config()
        raise ValueError(f"AccelerationSchedule: role must be 'online' or 'momentum', got {role!r}")

    def _due_index(self, step: int) -> int:
        """Index of the latest checkpoint at or before ``step`` (-1 if none)."""
        return bisect.bisect_right(self.checkpoint_steps, step) - 1

    def due(self, step: int) -> bool:
        """True when ``step`` has reached a checkpoint that has not been estimated yet."""
        return self._due_index(int(step)) > self._stage

    def state_dict(self) -> dict:
        """Plain Python values only (Candidates as tuples), so ``torch.load``'s default
        ``weights_only=True`` reads a checkpoint holding it."""
        return {"stage": self._stage, "choice": tuple(self._choice), "history": _plain(self.history),
                "checkpoint_steps": list(self.checkpoint_steps)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; ValueError when it belongs to another schedule (a choice
        outside this grid, a stage past these checkpoints, other checkpoint steps: a stage chosen
        for steps 25-50 of 100 must not run from step 25 of 1000)."""
        steps = state.get("checkpoint_steps")
        if steps is not None and list(steps) != self.checkpoint_steps:
            raise ValueError(f"AccelerationSchedule.load_state_dict: the state's checkpoints fall on steps "
                             f"{list(steps)}, this schedule's on {self.checkpoint_steps} (another "
                             f"total_steps or checkpoints)")
        stage = int(state["stage"])
        if not -1 <= stage < len(self.checkpoints):
            raise ValueError(f"AccelerationSchedule.load_state_dict: stage {stage} is outside this "
                             f"schedule's {len(self.checkpoints)} checkpoints")
        choice = _candidate(state["choice"], "load_state_dict: choice")
        if choice not in self.candidates:
            raise ValueError(f"AccelerationSchedule.load_state_dict: choice {tuple(choice)} is not in this "
                             f"schedule's grid {[tuple(c) for c in self.candidates]}")
        if "history" not in state:
            raise ValueError("AccelerationSchedule.load_state_dict: the state has no 'history' (not a "
                             "state_dict of an AccelerationSchedule)")
        # every part checked before any is taken: a refused state leaves the schedule as it was
        history = [{k: (_candidate(v, f"load_state_dict: history {k}") if k in _CANDIDATE_KEYS
                        and v is not None else v) for k, v in entry.items()}
                   for entry in state["history"]]
        self._stage, self._choice, self.history = stage, choice, history

    # ------------------------------------------------------------------------- estimation
    def estimate(
        self,
        loss_fn: Callable[[Candidate, object], Tensor],
        params: Iterable[Tensor],
        batches: Union[Callable[[], object], Iterable],
        *,
        modules: Optional[Iterable[nn.Module]] = None,
    ) -> dict:
        """Bias, variance, cost and CA-MSE of every candidate at the current parameters.

        Args:
            loss_fn: ``loss_fn(candidate, batch) -> scalar loss`` whose gradient w.r.t. ``params``
                is that of one training step with ``candidate`` applied (e.g. ``vit_loss_fn``).
                It must not step an optimizer; ``.grad`` of ``params`` is left untouched
                (``torch.autograd.grad``).
            params: the trained tensors (those without ``requires_grad`` are skipped).
            batches: a callable returning a fresh batch per call, or an iterable; ``R`` batches are
                taken for the reference, then ``k`` probe batches shared by all candidates.
            modules: the modules ``loss_fn`` runs in training mode; their buffers (BatchNorm
                running statistics, ``num_batches_tracked``) are restored after the probes, so
                the extra forwards leave no trace in the model. Default: ``loss_fn.modules``
                when it has one (``vit_loss_fn``'s names its models), else none.

        The probes draw from the global RNG (token draws, dropout, and ``batches`` if it does),
        so the random stream of the training steps after a checkpoint differs from that of a run
        without the schedule; runs with the same seed stay reproducible.

        Returns one ``history`` entry (without step/stage), choice included. Costs
        ``R + k * len(candidates)`` forward + backward passes.
        """
        if modules is None:
            modules = getattr(loss_fn, "modules", ())
        snapshot = _buffer_snapshot(modules)
        try:
            return self._estimate(loss_fn, params, batches)
        finally:
            with torch.no_grad():
                for buf, value in snapshot:
                    buf.copy_(value)

    def _estimate(self, loss_fn, params, batches) -> dict:
        t_start = time.perf_counter()
        params = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
        if not params:
            raise ValueError("AccelerationSchedule.estimate: no parameter requires grad")
        if callable(batches):
            fetch = batches
        else:
            it = iter(batches)

            def fetch():
                try:
                    return next(it)
                except StopIteration:
                    raise ValueError(f"AccelerationSchedule.estimate: needs {self.ref_batches} + "
                                     f"{self.probe_batches} batches, the iterable ran out") from None

        acc = torch.promote_types(torch.float32, params[0].dtype)
        sync = _synchronizer(params)

        def grad_and_time(cand, batch):
            sync()
            t0 = time.perf_counter()
            loss = loss_fn(cand, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("AccelerationSchedule.estimate: loss_fn must return a scalar tensor")
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
            sync()
            dt = time.perf_counter() - t0
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(acc)
                              for g, p in zip(grads, params)])
            return flat, dt

        ref = _Moments()
        for _ in range(self.ref_batches):
            ref.add(grad_and_time(self.ref, fetch())[0])
        g_ref = ref.mean
        ref_var, ref_n = (ref.var if ref.n > 1 else 0.0), ref.n
        ref_norm2 = float(torch.dot(g_ref, g_ref))
        if not (math.isfinite(ref_norm2) and math.isfinite(ref_var)):
            raise ValueError(f"AccelerationSchedule: the reference {self.ref} gave a non-finite gradient "
                             f"(|g|^2 = {ref_norm2}, variance {ref_var}); no candidate can be judged against it")
        probes = [fetch() for _ in range(self.probe_batches)]

        rows = []
        for cand in self.candidates:
            mom, times = _Moments(), []
            for batch in probes:
                g, dt = grad_and_time(cand, batch)
                mom.add(g)
                times.append(dt)
                del g
            diff = mom.mean - g_ref
            raw = float(torch.dot(diff, diff))
            var, k = mom.var, mom.n
            del diff, mom  # free the mean before the next candidate's gradients
            if not (math.isfinite(raw) and math.isfinite(var)):
                # max(0, nan) is 0 and min() keeps the first NaN: never choose on a NaN score
                raise ValueError(f"AccelerationSchedule: candidate {cand} gave a non-finite gradient "
                                 f"(squared bias {raw}, variance {var})")
            bias2 = raw
            if self.bias_correction:
                bias2 = max(0.0, raw - var / k - ref_var / ref_n)
            seconds = _median(times[1:] if len(times) > 1 else times)
            rows.append({"keep": cand.keep, "patch": cand.patch, "bias2": bias2, "bias2_raw": raw,
                         "variance": var, "seconds": seconds})
        del g_ref, ref

        if self.cost_fn is not None:
            costs = [float(self.cost_fn(c)) for c in self.candidates]
            if not all(math.isfinite(x) and x > 0 for x in costs):
                raise ValueError(f"AccelerationSchedule: cost_fn must return positive costs, got {costs}")
            for r in rows:
                r["seconds"] = float("nan")
        else:
            costs = [r["seconds"] for r in rows]
        ref_cost = costs[self.candidates.index(self.ref)]
        for r, cost in zip(rows, costs):
            r["cost"] = cost / ref_cost if ref_cost > 0 else 1.0
            r["ca_mse"] = self.combine(r["bias2"], r["variance"], r["cost"])
        best = min(range(len(rows)), key=lambda i: (rows[i]["ca_mse"], rows[i]["cost"], i))
        choice = self.candidates[best]
        return {
            "choice": choice,
            "momentum": self.momentum_config(choice),
            "ref_grad_norm2": ref_norm2,
            "ref_var": ref_var,
            "estimate_seconds": time.perf_counter() - t_start,
            "candidates": rows,
        }

    def combine(self, bias2: float, variance: float, cost: float) -> float:
        """The rule: ``bias2 + cost * variance_scale * variance`` (``cost = kappa_c / kappa_ref``)."""
        return bias2 + cost * self.variance_scale * variance

    def update(
        self,
        step: int,
        loss_fn: Callable[[Candidate, object], Tensor],
        params: Iterable[Tensor],
        batches: Union[Callable[[], object], Iterable],
        *,
        modules: Optional[Iterable[nn.Module]] = None,
    ) -> Candidate:
        """Estimate now (``estimate``), record it in ``history`` for ``step``, put the argmin in force.

        The entry's ``stage`` is the latest checkpoint at or before ``step``, or the stage in force
        when that is later (a stage never goes back: an ``update`` for an earlier step re-estimates
        it); ``on_step`` calls this at checkpoints, a call in between re-estimates the stage in force.
        """
        entry = self.estimate(loss_fn, params, batches, modules=modules)
        # the latest checkpoint reached; an update between checkpoints re-estimates the stage in force
        idx = max(self._due_index(int(step)), self._stage)
        entry = {"step": int(step), "stage": idx, "progress": int(step) / self.total_steps, **entry}
        self.history.append(entry)
        self._stage = idx
        self._choice = entry["choice"]
        return self._choice

    def on_step(
        self,
        step: int,
        loss_fn: Optional[Callable[[Candidate, object], Tensor]] = None,
        params: Optional[Iterable[Tensor]] = None,
        batches: Union[Callable[[], object], Iterable, None] = None,
        *,
        modules: Optional[Iterable[nn.Module]] = None,
    ) -> Candidate:
        """The training-loop callback: at a checkpoint, ``update``; returns the online setting in force.

        Raises ValueError at a checkpoint when ``loss_fn``, ``params`` or ``batches`` is missing.
        """
        if self.due(step):
            if loss_fn is None or params is None or batches is None:
                raise ValueError(f"AccelerationSchedule.on_step: step {step} is a checkpoint; "
                                 "pass loss_fn, params and batches")
            self.update(step, loss_fn, params, batches, modules=modules)
        return self._choice

    # ------------------------------------------------------------------------- applying it to a ViT
    @contextlib.contextmanager
    def apply(
        self,
        model: nn.Module,
        role: str = "online",
        *,
        config=None,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[Candidate]:
        """Run the sparsified ViT in ``model`` with ``role``'s setting inside the ``with``.

        ``model`` is a ViT converted by ``effssl_kernels.sparsify_vit`` or a module holding
        exactly one (e.g. backbone + projector). Inside, every ``vit(x)`` / ``vit.forward_features(x)``
        call of that ViT draws a fresh ``random_token_keep`` for its own batch (``x.shape[0]``)
        and patch grid and runs under ``token_keep`` (keep 1.0: ``token_keep(None)``, all
        tokens), and the ViT runs at the setting's patch size (``effssl_kernels.patch_size``;
        skipped at its own size). Other ViTs are not affected, so the online and the momentum
        encoder can both be inside one ``with`` line with their own roles. ``config`` overrides
        the role's setting; ``generator`` (on the images' device) drives the token draws.
        Yields the ``Candidate`` applied.

        ``vit.forward_features`` is wrapped by an instance attribute for the duration (so direct
        ``forward_features`` calls are covered too); do not deep-copy the model inside. The
        wrapper draws the tokens and enters ``token_keep`` at each call, which Dynamo cannot
        trace: under ``torch.compile`` leave ``fullgraph`` False (the draw is a graph break; new
        draws do not recompile) or compile the blocks only.
        Raises TypeError when no sparsified ViT is found, ValueError for several, a bad role, a
        ViT already inside ``apply`` or a patch that does not divide the image size.
        """
        from .nn._state import graph_task_id
        from .nn.vit import is_sparse_vit, patch_size, token_keep
        from .tokens import random_token_keep

        cfg = self.config(role) if config is None else _candidate(config, "apply: config")
        vit = _find_vit(model, is_sparse_vit)
        pe = vit.patch_embed
        native = tuple(pe.patch_size)
        p = native if cfg.patch is None else (cfg.patch, cfg.patch)
        ceil = bool(getattr(pe, "dynamic_img_pad", False))
        multiple_of = self.multiple_of
        had_own = "forward_features" in vit.__dict__
        inner = vit.forward_features
        if getattr(inner, "_effssl_schedule", False):
            # nested keeps would let the outer one win while the inner patch size wins: refuse
            raise ValueError("AccelerationSchedule.apply: this ViT is already inside apply(); "
                             "one setting per model at a time")

        def forward_features(x, *args, **kwargs):
            keep = None
            if cfg.keep < 1.0 and generator is not None and graph_task_id() != -1:
                # a checkpoint's recomputation: the global RNG is restored for it, a generator
                # is not, so the tokens drawn here would differ from the forward's
                raise RuntimeError("AccelerationSchedule.apply: forward_features recomputed during "
                                   "backward (activation checkpointing) draws its kept tokens from "
                                   "`generator` again, which would not give the forward's tokens: "
                                   "pass generator=None (checkpointing restores the global RNG)")
            if cfg.keep < 1.0:
                H, W = x.shape[-2:]
                L = (-(-H // p[0]) * -(-W // p[1])) if ceil else (H // p[0]) * (W // p[1])
                keep = random_token_keep(x.shape[0], max(L, 1), cfg.keep, multiple_of=multiple_of,
                                         generator=generator, device=x.device)
            with token_keep(keep):
                return inner(x, *args, **kwargs)

        forward_features._effssl_schedule = True

        with contextlib.ExitStack() as stack:
            if p != native:
                stack.enter_context(patch_size(vit, p))
            vit.forward_features = forward_features
            try:
                yield cfg
            finally:
                if had_own:
                    vit.forward_features = inner
                else:
                    vit.__dict__.pop("forward_features", None)

    def vit_loss_fn(
        self,
        online: nn.Module,
        loss: Callable[[object], Tensor],
        *,
        momentum: Optional[nn.Module] = None,
        generator: Optional[torch.Generator] = None,
        modules: Iterable[nn.Module] = (),
    ) -> Callable[[Candidate, object], Tensor]:
        """A ``loss_fn(candidate, batch)`` for ``estimate`` / ``on_step`` from a plain ``loss(batch)``.

        The closure runs ``loss(batch)`` (which calls ``online`` and ``momentum`` as the training
        step does) inside ``apply(online, config=candidate)`` and, when given,
        ``apply(momentum, config=momentum_config(candidate))``. Its ``modules`` attribute,
        ``online``, ``momentum`` and ``modules`` (heads that ``loss`` calls outside them), tells
        ``estimate`` whose buffers to restore after the probes.
        """

        def loss_fn(cand: Candidate, batch) -> Tensor:
            with contextlib.ExitStack() as stack:
                stack.enter_context(self.apply(online, "online", config=cand, generator=generator))
                if momentum is not None:
                    stack.enter_context(self.apply(momentum, "momentum", config=self.momentum_config(cand),
                                                   generator=generator))
                return loss(batch)

        loss_fn.modules = tuple(m for m in (online, momentum) if m is not None) + tuple(modules)
        return loss_fn

    def table(self) -> list[dict]:
        """``history`` flattened: one row per checkpoint and candidate, ``chosen`` marked."""
        rows = []
        for h in self.history:
            for r in h["candidates"]:
                rows.append({"step": h["step"], "stage": h["stage"], **r,
                             "chosen": (r["keep"], r["patch"]) == tuple(h["choice"])})
        return rows


def _buffer_snapshot(modules: Iterable[nn.Module]) -> list:
    """(buffer, copy) of every buffer of ``modules`` (each once), for ``estimate`` to restore."""
    seen, out = set(), []
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"AccelerationSchedule.estimate: modules must be nn.Modules, got {type(m).__name__}")
        for buf in m.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                out.append((buf, buf.detach().clone()))
    return out


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _synchronizer(params: Sequence[Tensor]) -> Callable[[], None]:
    """Waits for the CUDA devices of ``params`` (host timers around asynchronous GPU work)."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    if not devices:
        return lambda: None

    def sync():
        for d in devices:
            torch.cuda.synchronize(d)

    return sync


def _find_vit(model: nn.Module, is_sparse_vit) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"AccelerationSchedule.apply: model must be an nn.Module, got {type(model).__name__}")
    if is_sparse_vit(model):
        return model
    found = [m for m in model.modules() if is_sparse_vit(m)]
    if not found:
        raise TypeError("AccelerationSchedule.apply: no sparsified ViT in model; call effssl_kernels.sparsify_vit first")
    if len(found) > 1:
        raise ValueError(f"AccelerationSchedule.apply: model holds {len(found)} sparsified ViTs; pass one")
    return found[0]
