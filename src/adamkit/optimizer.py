"""``adamkit.Adam``: param groups, lazy state, bucketing and checkpoints.

The math lives elsewhere (``reference.py`` states it, ``backends/`` run it). This file
only decides *what* to update: it gathers the params that have gradients, validates
everything that could fail, then groups them into buckets of one device, dtype, storage
(state format and param update policy, see ``formats/``) and step count and hands each
bucket to its backend with scalars computed once.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, checkpoints, formats, wrappers
from . import param_groups as groups
from .formats import param as param_policy
from .hyperparams import TORCH_FLAGS, check_beta_kinds, check_live_group, check_ranges, scalar_dtype, validate_group
from .backends import write_mark
from .step_cache import CachedBucket, StepCache, run_bucket, scalars_for
from .wrappers import eagerly, torch_eagerly


class UnreadableStateError(ValueError, RuntimeError):
    """A live optimizer state edited into one no storage format reads (a moment cast to
    another dtype, an int8 scale cut short). A ValueError, as a checkpoint that cannot be
    loaded; also a RuntimeError, which is what torch.optim's step raises on a moment of
    the wrong dtype, so code written against either catches it."""


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, https://arxiv.org/abs/1412.6980), a drop-in for ``torch.optim.Adam``.

    For each parameter θ with gradient g, at its step t (counted per parameter):

        m ← β1·m + (1 − β1)·g              # betas=(β1, β2)
        v ← β2·v + (1 − β2)·g²
        θ ← θ − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + eps)

    Weight decay λ (``weight_decay``) has three modes:

    * coupled L2 (default, as torch.optim.Adam): g ← g + λθ, without touching ``.grad``;
    * ``decouple_wd=True`` (AdamW, as torch.optim.AdamW): θ ← θ·(1 − lr·λ) before the update;
    * ``decouple_lr=True`` (fully decoupled): θ ← θ·(1 − (lr/max_lr)·λ), the decay of
      Loshchilov & Hutter's Algorithm 2 (<https://arxiv.org/abs/1711.05101>: λ times the
      schedule multiplier). The decay follows the *shape* of the lr schedule but not its
      size, so λ is much smaller than AdamW's: λ_AdamW·max_lr, around 1e-5 to 1e-4 at a
      peak lr of 1e-3. ``max_lr`` defaults to the group's initial lr. Wins over
      ``decouple_wd``.

    Args:
        params: iterable of tensors or of dicts defining param groups.
        lr: learning rate (float or 1-element Tensor). Default 1e-3.
        betas: decay rates (β1, β2) of the first and second moment. Default (0.9, 0.999).
        eps: added to √v̂ for numerical stability. Default 1e-8.
        weight_decay: λ. Default 0.
        amsgrad: normalise by the running max of v, bias-corrected with the current step
            (torch's variant of Reddi et al., 2018, <https://openreview.net/forum?id=ryQu7f-RZ>).
            Default False.
            Switched on between steps, the max starts at that step's v (torch.optim
            raises KeyError there).
        decouple_wd: AdamW-style decay. ``decoupled_weight_decay`` (torch's name) is a synonym
            (``decouple_wd=True`` with ``decoupled_weight_decay=False`` is a ValueError;
            ``decoupled_weight_decay=True`` decouples whatever ``decouple_wd`` says, as
            its default False cannot be told from a False given), also as a group key:
            ``defaults`` and the groups hold both, and setting either
            on a group between steps switches the mode (the next step makes them equal
            again).
        decouple_lr: fully decoupled decay, scaled by lr/max_lr.
        max_lr: the lr that the decay of ``decouple_lr`` is relative to (``OneCycleLR``
            writes its peak under this key).
        maximize: maximise the objective instead of minimising it.
        backend: where the step runs: "auto" (fastest available), "cpu" (the fused native
            kernels, CPU tensors), "torch" (foreach ops, any device) or "reference" (the
            float64 oracle, slow).
        foreach, fused: torch's flags, accepted for drop-in use: ``foreach=True`` asks for
            the "torch" backend (with another explicit ``backend``: ValueError),
            ``fused=True`` for the fastest ("auto"). Also read in a group dict when the
            group is added, which then holds the ``backend`` they chose (and keeps the
            flags as given; changed later, they move no group to another backend).
        capturable, differentiable: torch's flags, accepted as False; True raises
            ValueError (CUDA-graph capture and differentiating through the step are
            torch.optim's), as arguments, in a group dict or set on a group later.
            Unlike torch.optim's, ``defaults`` and the groups hold none of these four
            keys (``backend`` says where a group runs): given to the constructor, they
            only choose the backend; given in a group dict, they stay in it as given.
            Read them with ``group.get("fused")``.
        state_format: how the moments are stored (docs/precision.md): ``None`` (default:
            like the param, as torch; float16 params get "fp32"), "fp32" (8 bytes per
            param), "bf16" (4) or "int8" (block-scaled 8-bit floats, about 2.03).
        param_update: how bfloat16/float16 params take the update: "kahan" (default for
            them; a compensation buffer in the param dtype), "nearest" (torch's rounding,
            which drops updates below half an ulp), "stochastic" (seeded stochastic
            rounding, no memory) or "master" (a float32 copy). Ignored for float32/64.
        seed: seeds "stochastic" (its low 32 bits); the draws depend only on seed, the
            param's position in the optimizer and the step, so a resumed run repeats them.
        int8_min_size: under "int8", params with fewer elements keep "fp32" state.

    Example:
        >>> import torch, adamkit
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = adamkit.Adam(model.parameters(), lr=1e-2)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()

    Mixed precision: ``torch.amp.GradScaler`` hands the step its scale and ``found_inf``
    (``_step_supports_amp_scaling``): the grads are unscaled inside the step (``.grad``
    keeps the scaled values) and a step with an inf or NaN gradient is skipped whole. As
    with torch.optim's fused Adam, the scaler then calls ``step`` also for the steps it
    skips, so step hooks run for them too, and see the scaled grads; code that takes a
    call of ``step`` for a step taken (HF Accelerate's ``step_was_skipped``, which has the
    same issue with torch's fused AdamW: huggingface/accelerate#4242) should read the
    scaler instead: a skipped step lowers ``scaler.get_scale()`` at ``scaler.update()``.
    A skipped step changes nothing, so skipped first steps create no state, as with
    torch.optim's other Adams (its fused one creates zeroed moments at step 0; the steps
    after are the same either way). A scale of 0 (after about 166 skipped steps in a row)
    raises ValueError, where torch's fused step would write NaN into every param.

    Hooks and profiling: step hooks (``register_step_pre_hook``, the global ones) run as
    in torch.optim, and wherever a range can be recorded (a profiler, an execution-trace
    observer), every step is its ``Optimizer.step#Adam.step`` range. Where neither is
    there, the step skips torch's wrapper, whose range alone cost more than the rest of
    the step's Python around the kernel (``adamkit.wrappers``).

    Validation: the constructor and ``add_param_group`` check each group's hyperparameters
    with torch.optim's errors. Values set on a group later (a scheduler, your code, a
    loaded checkpoint) are stepped with as given, as torch.optim does; only those no step
    can take raise, before anything changes: a value that is not a number (TypeError, as
    torch.optim's step; RuntimeError, as its ops, for a complex one or a Tensor of several
    elements), a Tensor lr of several elements, betas that are not a pair, a β2
    below 0 (torch.optim steps it into a negative second moment) or whose 1 − β2^t is
    negative,
    ``decouple_lr`` without a usable ``max_lr``, and (torch's RuntimeError) a float32
    step handed lr/(1 − β1^t) or a coupled λ beyond float32's range. A state edited into
    one no format reads (a moment cast to another dtype) raises ``adamkit.UnreadableStateError``,
    both a ValueError and torch's RuntimeError; a moment of another shape, RuntimeError.
    """

    # torch.amp.GradScaler then sets `grad_scale` and `found_inf` on the optimizer instead
    # of unscaling `.grad` in place; `step` unscales inside the kernel.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,  # an int, as torch.optim.Adam's (its repr shows 0)
        amsgrad: bool = False,
        *,
        decouple_wd: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        maximize: bool = False,
        backend: str = "auto",
        decoupled_weight_decay: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        state_format: str | None = None,
        param_update: str | None = None,
        seed: int = 0,
        int8_min_size: int = 4096,
    ) -> None:
        # torch.optim's checks in its order: a foreach Tensor lr, the ranges and kinds
        # (before the params: Adam([], lr=-1) names the lr; on the betas as given, so
        # betas=[0.9] raises torch's "list index out of range"), the flags once the
        # params are in (Adam([p], lr=-1, fused=True, foreach=True) names the lr too)
        groups.check_foreach_lr(lr, foreach, capturable)
        check_ranges(dict(lr=lr, eps=eps, betas=betas, weight_decay=weight_decay))
        check_beta_kinds(betas)
        groups.check_foreach_betas(betas, foreach, capturable)
        backend = groups.foreach_backend(backend, foreach)
        if decoupled_weight_decay is not None:
            if decouple_wd and not decoupled_weight_decay:  # (decouple_wd's default is False)
                raise ValueError("decouple_wd=True and decoupled_weight_decay=False contradict each other: "
                                 "they are adamkit's and torch's names of one setting; give one")
            decouple_wd = decouple_wd or bool(decoupled_weight_decay)
        defaults = dict(
            lr=lr,
            betas=groups.betas_tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decouple_wd=decouple_wd,
            decoupled_weight_decay=decouple_wd,  # torch's key, as torch.optim's defaults hold it
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            backend=backend,
            state_format=state_format,
            param_update=param_update,
            seed=seed,
            int8_min_size=int8_min_size,
        )
        self._step_lock = threading.RLock()  # one step at a time (_update)
        super().__init__(params, defaults)
        groups.check_torch_flags(foreach, fused, capturable, differentiable)
        eagerly(type(self)._update)  # made here where dynamo is imported (see wrappers.eagerly)
        eagerly(wrappers.zero_grad)

    # ---- groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated before anything is stored.

        As in torch.optim, the dict passed is the one stored (later edits to it reach
        the optimizer), with the defaults filled in."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        # torch's first checks of the params, before the hyperparameters (which torch
        # never range-checks in a group): their exception types, KeyError and TypeError
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list instead.")
        self._sync_decay_modes()  # the defaults' mode, whichever key was set
        group = {**self.defaults, **param_group}
        flags = {key: param_group[key] for key in TORCH_FLAGS if key in param_group}
        if flags:  # torch.optim honours them per group: read as the constructor reads them
            group["backend"] = groups.backend_for_torch_flags(group["backend"], group["lr"], **flags)
        groups.set_decay_mode(group, groups.decay_mode(param_group, None, self.defaults["decouple_wd"]))
        fill_max_lr = group["decouple_lr"] and group["max_lr"] is None
        if fill_max_lr:
            group["max_lr"] = groups.initial_lr(group["lr"])
        validate_group(group)
        formats.validate(group)
        backends.check_name(group["backend"])
        # after their ranges, as the constructor's
        groups.check_foreach_betas(group["betas"], flags.get("foreach"), flags.get("capturable", False))
        # Valid: only now is the caller's dict changed, and given back as it was where
        # torch's checks of the params (a non-leaf, a param in another group) refuse it
        given = dict(param_group)
        try:
            groups.set_decay_mode(param_group, group["decouple_wd"])
            if flags.get("foreach"):
                param_group["backend"] = group["backend"]
            if fill_max_lr:
                param_group["max_lr"] = group["max_lr"]
            torch_eagerly(super().add_param_group, "add_param_group")(param_group)
        except BaseException:
            param_group.clear()
            param_group.update(given)
            raise
        self._sync_decay_modes()  # records the new group's mode

    def _normalize_group(self, group: dict[str, Any], fallback: dict[str, Any]) -> None:
        """Give a loaded group (torch's or an older adamkit's) every key adamkit uses."""
        groups.normalize_loaded_group(group, fallback)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_step_lock" not in self.__dict__:  # unpickled or copied (a load keeps its lock)
            self._step_lock = threading.RLock()
        self._step_cache = None  # it holds the replaced state tensors
        for key in TORCH_FLAGS:  # torch's __setstate__ adds `differentiable`
            self.defaults.pop(key, None)
        # master copies are in sync with their params now (a load made them, or a copy
        # of the optimizer, which the record of versions does not travel with)
        versions = self._master_versions()
        for p, st in _param_states(self.state):
            if isinstance(st.get("master_param"), Tensor):
                versions[p] = write_mark(p)
        self.defaults.setdefault("decoupled_weight_decay", self.defaults.get("decouple_wd", False))
        for key, value in formats.GROUP_DEFAULTS.items():  # pickled before formats existed
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            self._normalize_group(group, self.defaults)
        self._sync_decay_modes()  # loaded groups: their keys are equal, and recorded now

    def _sync_decay_modes(self) -> None:
        """Make the two decay-mode keys of each live group, and of the defaults, equal
        again, the one set since the last sync winning: called before a step's plan, a
        state_dict and a new group."""
        # the defaults too: code written for torch.optim sets defaults["decoupled_weight_decay"]
        # for the groups it adds later
        self._decay_modes = groups.sync_decay_modes([self.defaults, *self.param_groups],
                                                    getattr(self, "_decay_modes", {}))

    # ---- the step -------------------------------------------------------------------

    def _gather(self, repeat: int = 0) -> list[tuple[dict[str, Any], list[tuple[int, Tensor, int]]]]:
        """Per group, the params to update as (position in the optimizer, param, position
        in the group); the first orders groups then params and seeds stochastic rounding.
        ``repeat``: only each param's occurrence of that number in the optimizer (a param
        listed twice, in one group or in two, is updated twice, _repeats). Raises before
        anything is changed."""
        work, offset = [], 0
        self._sync_decay_modes()
        for group, listings in zip(self.param_groups, groups.listings(self.param_groups)):
            if not self.defaults.keys() <= group.keys():  # appended to param_groups by hand,
                groups.fill_live_group(group, self.defaults)  # or a key deleted
            check_live_group(group)  # edited since it was added (a scheduler, by hand)
            formats.validate(group)
            backends.check_name(group["backend"])
            params = [(offset + j, p, j)
                      for j, (p, k) in enumerate(zip(group["params"], listings))
                      if k == repeat and p.grad is not None]
            offset += len(group["params"])
            for _, p, _ in params:
                backends.check_param(p)
                backends.check_grad(p, p.grad)
            work.append((group, params))
        return work

    def _planned_state(self, p: Tensor, group: dict[str, Any], fmt: str, update: str,
                       index: int) -> dict[str, Any] | None:
        """The state p needs for a step in (fmt, update), or None if its own fits as is.

        New for a param without state; converted (formats.convert_state) when its state
        is in another format or policy (the group was changed, or it predates formats).
        Pure: nothing is stored here, so a step that raises later changes nothing."""
        state = self.state.get(p)
        resynced = False
        if state and isinstance(state.get("master_param"), Tensor) and self._master_moved(p):
            # p was written in place since master was last in sync (model.load_state_dict,
            # nn.init, an in-place op): where p is no longer master's rounding, the write is
            # the new value and master restarts from it (also before a conversion to
            # another policy or format); elsewhere master keeps its bits
            state = {**state, "master_param": param_policy.resync_master(p, state["master_param"])}
            resynced = True
        if not state:
            seed = param_policy.sr_seed(group["seed"], index)
            new = {"step": torch.tensor(0.0, dtype=scalar_dtype(), device="cpu"),
                   **formats.fresh_state(p, fmt, update, group["amsgrad"], seed)}
        elif (error := _reshaped(state, p)) is not None:
            raise error
        elif ((stored := formats.tags_of(state)) != (fmt, update)
              or not formats.state_fits(p, state, fmt, update)):
            seed = param_policy.sr_seed(group["seed"], index)
            try:
                new = {"step": state["step"], **formats.convert_state(p, state, fmt, update, seed)}
            except ValueError as exc:  # a live state edited into one no format reads
                shown = f", state_format {stored[0]!r}" if stored and stored[0] else ""
                raise UnreadableStateError(
                    f"the optimizer state of param {index} (shape {tuple(p.shape)}{shown}) "
                    f"cannot be read: {exc}") from None
        elif resynced:
            new = state
        elif group["amsgrad"] and "max_exp_avg_sq" not in state:
            new = dict(state)
        else:
            return None
        if group["amsgrad"] and "max_exp_avg_sq" not in new:
            new.update(formats.state.zeros(p, "max_exp_avg_sq", fmt))
        return new

    # torch.optim's wrapper of `step` (hooks, a profiler range), taken where a hook or a
    # profiler can see the step: wrappers.py
    profile_hook_step = staticmethod(wrappers.profile_hook_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the grads, as torch.optim's ``zero_grad``: to None (default), or to zeros."""
        # eagerly under torch.compile, as torch's own, which is torch._disable_dynamo's
        eagerly(wrappers.zero_grad)(self, set_to_none, super().zero_grad)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eagerly(type(self)._update)(self)
        return loss

    # Under torch.compile (of `opt.step` or of a training step that calls it) the update
    # runs eagerly, as written (`wrappers.eagerly`): on the cpu backend it is one fused call
    # per bucket already, and dynamo would trace the planning around it (caches of plans,
    # ctypes calls) into graph breaks, warnings and seconds of compiling, for nothing.
    # The closure above stays traceable.
    def _update(self) -> None:
        # torch.no_grad's effect in two C calls: as a decorator of `step` it took 20-45 us
        # a step, cold after the kernel's streaming (benchmarks/step_overhead.py)
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            # one step at a time: the cached plan (its buckets' grads, the kernel's
            # pointer table) is the optimizer's, and two threads stepping it at once
            # emptied each other's grads (IndexError; NaN from the GIL-free kernel)
            with self._step_lock:
                self._update_without_grad()
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    def _update_without_grad(self) -> None:
        grad_scale_inv = self._amp_grad_scale_inv()
        if grad_scale_inv is None:
            return  # GradScaler found an inf or NaN: skip the step, change nothing

        cache = getattr(self, "_step_cache", None)
        if cache is not None:
            try:
                if cache.try_step(self, grad_scale_inv):
                    return
            except BaseException:  # the next step plans anew: a plan that raised would
                # raise again, after moving the buckets before it again
                cache.record_master_versions(self._master_versions())
                self._step_cache = None
                raise
            cache.record_master_versions(self._master_versions())
        self._step_cache = None
        repeats = self._repeats()
        if repeats > 1:  # no cache: a bucket holds each param once
            self._check_later_listings(repeats, grad_scale_inv)
            for repeat in range(repeats):
                self._planned_step(grad_scale_inv, repeat)
            return
        self._step_cache = StepCache(self, self._planned_step(grad_scale_inv))

    def _repeats(self) -> int:
        """The most times one param is listed: in one group (torch.optim warns that this
        will be an error) or in two (add_param_group refuses it; an edit of param_groups
        does it). torch's default CPU step (the for-loop) then updates it once per listing,
        in turn (group by group), with one state; its foreach and fused steps give other
        numbers within a group. adamkit does as the for-loop on every backend: one full
        step per listing."""
        return 1 + max((k for ks in groups.listings(self.param_groups) for k in ks), default=0)

    def _check_later_listings(self, repeats: int, grad_scale_inv: float) -> None:
        """What only a later listing's step can raise, before the first listing steps:
        its group's scalars at the count the param will have reached (a group edited to
        an lr float32 cannot hold raised after the first group had moved every param),
        and the storage that group gives it. Params and grads are the first listing's,
        checked by its own plan (``_gather`` checks every group)."""
        for repeat in range(1, repeats):
            for group, params in self._gather(repeat):
                for _, p, _ in params:
                    *_, counted = _listing_plan(p, group, self.state.get(p), repeat + 1)
                    scalars_for(group, counted, grad_scale_inv, p.dtype)

    def _master_versions(self) -> dict[Tensor, tuple[int, int]]:
        """param → its write mark (backends.write_mark) when its master copy was last in
        sync with it (after a step wrote both, or a load made master). Not in checkpoints:
        a version counter means nothing in another process. A dict keyed by the params
        themselves, as ``self.state`` is: a weak reference to a param would make
        torch.utils.swap_tensors refuse it."""
        versions = getattr(self, "_master_sync", None)
        if versions is None:
            versions = self._master_sync = {}
        return versions

    def _master_moved(self, p: Tensor) -> bool:
        """Whether p was changed in place, or swapped, since its master copy was in sync.
        Writes autograd sees bump the counter; writes through ``p.data`` do not."""
        synced = self._master_versions().get(p)
        return synced is not None and synced != write_mark(p)

    def _planned_step(self, grad_scale_inv: float, repeat: int = 0) -> list[CachedBucket]:
        """The full step: plan every bucket, then run them; returns the plan for reuse."""
        # Plan first: everything that can raise does so before any state changes.
        plans, pending = [], {}
        gathered = self._gather(repeat)
        for group_index, (group, params) in enumerate(gathered):
            buckets: dict[tuple, list[tuple[int, Tensor]]] = defaultdict(list)
            for index, p, position in params:
                state = self.state.get(p)
                fmt, update, t, counted = _listing_plan(p, group, state, 1)
                buckets[(p.device, p.dtype, fmt, update, t, counted)].append((position, p))
                new = pending[id(p)] = self._planned_state(p, group, fmt, update, index)
                if state:  # torch's errors for what no in-place op writes, before any write
                    used = state if new is None else new  # (a conversion's copies pass)
                    written = formats.written_keys(fmt, update, group["amsgrad"])
                    backends.check_written(formats.written_tensors(used, written))
            for (device, dtype, fmt, update, t, counted), members in buckets.items():
                backend = backends.resolve(group["backend"], device, dtype)
                ps = [p for _, p in members]
                plans.append((group_index, group, [pos for pos, _ in members], t, counted, ps,
                              fmt, update, backend,
                              scalars_for(group, counted, grad_scale_inv, dtype)))

        # New states enter self.state in the params' order, as torch.optim's do (its
        # state_dict lists them so), not bucket by bucket: a group of two dtypes has two
        for group, params in gathered:
            for _, p, _ in params:
                new = pending[id(p)]
                if new is not None:
                    self.state[p] = new
        done = []
        for group_index, group, positions, t, counted, ps, fmt, update, backend, s in plans:
            states = [self.state[p] for p in ps]
            bucket = backends.Bucket(
                group=group,
                params=ps,
                grads=[p.grad for p in ps],
                exp_avgs=[s["exp_avg"] for s in states],
                exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                states=states,
                state_format=fmt,
                param_update=update,
                steps=[s["step"] for s in states],
            )
            prepared = run_bucket(backend, bucket, s, stalled=counted != t)
            done.append(CachedBucket(group_index, group, positions, counted, backend, bucket, prepared))
        # After every bucket ran: views of one tensor share a version counter, and a
        # later bucket's write to one would look like a user's write to another
        versions = self._master_versions()
        for cb in done:
            if cb.bucket.param_update == "master":
                for p in cb.bucket.params:
                    versions[p] = write_mark(p)
        # the record holds its params: drop those whose master copy is gone
        for p in [p for p in versions if not isinstance(self.state.get(p, {}).get("master_param"), Tensor)]:
            del versions[p]
        return done

    def _amp_grad_scale_inv(self) -> float | None:
        """1/scale for grads a GradScaler left scaled, 1.0 without one, None to skip.

        GradScaler sets `found_inf` (inf/NaN seen in any grad) and `grad_scale` (None when
        the user already called ``scaler.unscale_``) for the duration of ``step``. Reading
        them costs two host syncs per step (one for each; torch's foreach step syncs once
        for found_inf, its fused step not at all, unscaling on the device)."""
        found_inf = getattr(self, "found_inf", None)
        # a tensor, or the int 0 where no grad was seen (GradScaler sums an empty list)
        if found_inf is not None and float(found_inf):
            return None
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return 1.0
        scale = float(scale)  # once: on a GPU each read is a sync
        if scale == 0:  # torch's fused step would write NaN into every param
            raise ValueError(
                "grad_scale is 0, so the grads cannot be unscaled (a GradScaler's scale halves at "
                "each step with inf/NaN grads, and reaches 0 after about 166 in a row from 2**16): "
                "nothing was changed")
        # As GradScaler's own unscale: the reciprocal in float64, rounded to float32.
        return float(torch.tensor(1.0 / scale, dtype=torch.float32, device="cpu"))

    # ---- memory -----------------------------------------------------------------------

    def state_bytes(self, per_element: bool = False) -> int | float:
        """Bytes of optimizer state: every tensor in ``self.state`` (moments, int8 codes
        and scales, kahan/master buffers, step counters, stochastic-rounding seeds and the
        two 0-dim tags).

        With ``per_element=True``, that total divided by the number of elements of the
        params that have state: the figure the formats are quoted in (docs/precision.md;
        for a large float32 param with fp32 state 8, bf16 4, int8 2.03; a bfloat16 param
        adds 2 for "kahan", 4 for "master"). 0 when no param has state yet."""
        total, elements = 0, 0
        for p, state in _param_states(self.state):
            if not state:  # reading ``self.state[p]`` of a param never stepped stores {}
                continue
            tensors = [v for v in state.values() if isinstance(v, Tensor)]
            total += sum(t.numel() * t.element_size() for t in tensors)
            elements += p.numel()
        if per_element:
            return total / elements if elements else 0.0
        return total

    # ---- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout and key names; ``decoupled_weight_decay`` equals ``decouple_wd``
        so that torch.optim.Adam loads the same decay mode."""
        self._sync_decay_modes()  # before torch's state_dict, whose post-hooks see its dict
        self._resync_moved_masters()
        return torch_eagerly(super().state_dict, "state_dict")()

    @torch.no_grad()
    def _resync_moved_masters(self) -> None:
        """Apply now the resync of master copies whose params were written in place since
        the last step (the next step would, _plan): the saved master would otherwise undo
        the write on resume, as a load declares master and param in sync. In place, so the
        step cache's tensors stay valid; resyncing is idempotent, so its later check of
        the versions (still the old ones) changes nothing more."""
        cache = getattr(self, "_step_cache", None)
        versions = self._master_versions()
        if cache is not None:  # the latest step's versions, where the cache ran it
            cache.record_master_versions(versions)
        for p, st in _param_states(self.state):
            master = st.get("master_param")
            # (a master that no longer fits p is left to the step, which raises for it)
            if isinstance(master, Tensor) and master.shape == p.shape and self._master_moved(p):
                synced = param_policy.resync_master(p, master)
                if master.device == p.device:
                    master.copy_(synced)
                else:  # p moved (to a GPU, say): master joins it, no cached plan holds it
                    st["master_param"] = synced
                versions[p] = write_mark(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of adamkit or torch.optim.Adam/AdamW.

        Hyperparameters come from the state dict; storage (``state_format``,
        ``param_update``, ``seed``, ``int8_min_size``) and ``backend`` (where it runs: a
        property of this machine, not of the run) are this optimizer's: each param's
        saved state says its own format, and is converted into the configured one
        (fp32/bf16/int8 into one another, torch.optim's into kahan or master, kahan or
        master into nearest; docs/design/formats.md, "Checkpoints"). torch.optim saves
        no ``decouple_lr`` or ``max_lr``: they are this optimizer's too, and into a
        ``decouple_lr`` group torch's AdamW λ loads as λ·max_lr, the same decay (its
        coupled λ ≠ 0 raises ValueError: there is no fully decoupled equivalent).

        Everything is checked and copied before anything is replaced: a state dict that
        does not fit (group or param counts, tensor shapes, hyperparameters, formats, a
        group without lr, betas, eps or weight_decay, a param's state under a key no
        saved param has, as after a trip through JSON) raises ValueError and leaves this
        optimizer as it was. A group without amsgrad or maximize (older torch) loads
        them as False, as torch.optim does; an entry of the state that is no param's is
        kept as it is, as torch.optim keeps it.
        """
        # torch.optim's load keeps the state's tensors as given (an inference-mode load
        # gives normal tensors); this one copies them, and copies made in inference mode
        # would be inference tensors, which no later step outside it may write
        with torch.inference_mode(False):
            checkpoints.load(self, state_dict)

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state dict as torch.optim.Adam/AdamW would have saved it, for
        continuing the run in torch.optim from any adamkit storage.

        Each param's state becomes ``step`` and the moments in float32, float64 kept (int8
        codes and bf16 decoded; torch.optim casts them to the param's dtype when it loads
        them);
        int8 scales, the format tags and stochastic-rounding seeds are dropped, and so are
        a Kahan compensation and a master copy, as on a load into ``param_update="nearest"``:
        torch.optim continues from the param itself, at most half an ulp of it lost.
        Groups keep torch's keys (``decoupled_weight_decay`` gives the decay mode). Nothing
        of this optimizer is changed or shared (entries of ``state`` that are no param's
        are given as ``state_dict()`` gives them). (A plain ``state_dict()`` loads into
        torch.optim too, but torch would read int8 codes as moment values.)

        A group with ``decouple_lr=True`` is exported as torch's AdamW decay with
        λ/max_lr, the same decay (torch.optim has no fully decoupled mode, and would read
        a plain state dict's λ as AdamW's).

        Example::

            theirs = torch.optim.AdamW(model.parameters())
            theirs.load_state_dict(opt.torch_state_dict())
        """
        return checkpoints.torch_state_dict(self)


def _listing_plan(p: Tensor, group: dict[str, Any], state: dict | None,
                  ahead: int) -> tuple[str, str, int, int]:
    """p's storage in ``group`` (refused where no step can give it) and the step ``ahead``
    steps past its counter: t and, as torch.optim takes it, what the counter reads once
    it counted t (2^24 for float32 past there; t is then stochastic rounding's cue).
    torch's error for a counter no step can count."""
    fmt, update = formats.resolve(p, group)
    backends.check_storage(p, fmt, update)
    if not state:
        return fmt, update, ahead, ahead
    backends.check_step_counter(state["step"])
    t = int(state["step"].item()) + ahead
    return fmt, update, t, backends.counter_reads(t, [state["step"]])


def _param_states(state: dict) -> list[tuple[Tensor, dict]]:
    """The (param, state) entries of ``opt.state``: torch.optim keeps other entries (a
    user's or a library's, under keys that are no tensor) through state_dict and load,
    and so does adamkit, which never reads them."""
    return [(p, st) for p, st in state.items() if isinstance(p, Tensor) and isinstance(st, dict)]


def _reshaped(state: dict[str, Any], p: Tensor) -> RuntimeError | None:
    """The error for a state whose moments no longer have their param's shape (a param
    resized in place keeps its identity; torch.optim fails in its first op), or None.
    Every moment: an exp_avg_sq of another shape raised torch's broadcast error after the
    buckets before it had stepped (every format stores them in p's shape)."""
    for name in formats.state.MOMENTS:
        m = state.get(name)
        if isinstance(m, Tensor) and m.shape != p.shape:
            what = "" if name == "exp_avg" else f" ({name})"
            return RuntimeError(f"the state of a param of shape {tuple(p.shape)} has shape "
                                f"{tuple(m.shape)}{what}: was the param resized in place after "
                                "its state was created?")
    return None
