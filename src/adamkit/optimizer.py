"""``adamkit.Adam``: param groups, lazy state, bucketing and checkpoints.

The math lives elsewhere (``reference.py`` states it, ``backends/`` run it). This file
only decides *what* to update: it gathers the params that have gradients, validates
everything that could fail, then groups them into buckets of one device, dtype and
step count and hands each bucket to its backend with scalars computed once.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from .hyperparams import scalar_dtype, step_scalars, validate_group

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# Group keys only torch.optim uses: dropped on load, adamkit's `backend` replaces them.
_TORCH_ONLY_KEYS = ("foreach", "fused", "capturable", "differentiable")


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, https://arxiv.org/abs/1412.6980), a drop-in for ``torch.optim.Adam``.

    For each parameter θ with gradient g, at its step t (counted per parameter)::

        m ← β1·m + (1 − β1)·g              # betas=(β1, β2)
        v ← β2·v + (1 − β2)·g²
        θ ← θ − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + eps)

    Weight decay λ (``weight_decay``) has three modes:

    * coupled L2 (default, as torch.optim.Adam): g ← g + λθ, without touching ``.grad``;
    * ``decouple_wd=True`` (AdamW): θ ← θ·(1 − lr·λ) before the update;
    * ``decouple_lr=True`` (fully decoupled): θ ← θ·(1 − (lr/max_lr)·λ). The decay follows
      the *shape* of the lr schedule but not its size, so λ must be much smaller than
      AdamW's: around 1e-5 to 1e-4. ``max_lr`` defaults to the group's initial lr.
      Wins over ``decouple_wd``.

    Args:
        params: iterable of tensors or of dicts defining param groups.
        lr: learning rate (float or 1-element Tensor). Default 1e-3.
        betas: decay rates (β1, β2) of the first and second moment. Default (0.9, 0.999).
        eps: added to √v̂ for numerical stability. Default 1e-8.
        weight_decay: λ. Default 0.
        amsgrad: normalise by the running max of v (Reddi et al., 2018). Default False.
        decouple_wd: AdamW-style decay. ``decoupled_weight_decay`` (torch's name) is a synonym.
        decouple_lr: fully decoupled decay, scaled by lr/max_lr.
        max_lr: the lr that the decay of ``decouple_lr`` is relative to.
        maximize: maximise the objective instead of minimising it.
        backend: where the step runs: "auto" (fastest available), "reference" (the float64
            oracle, slow) or "torch" (foreach ops, any device).
        foreach, fused: torch's flags, accepted for drop-in use: ``foreach=True`` asks for
            the "torch" backend, ``fused=True`` for the fastest ("auto").

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
    keeps the scaled values) and a step with an inf or NaN gradient is skipped whole.
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
        weight_decay: float = 0.0,
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
    ) -> None:
        if decoupled_weight_decay is not None:
            decouple_wd = decouple_wd or bool(decoupled_weight_decay)
        if foreach and fused:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if foreach:
            backend = "torch"
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decouple_wd=decouple_wd,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            backend=backend,
        )
        super().__init__(params, defaults)

    # ---- groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated before anything is stored."""
        group = {**self.defaults, **param_group}
        if group["decouple_lr"] and group["max_lr"] is None:
            lr = group["lr"]
            param_group = {**param_group, "max_lr": lr.item() if isinstance(lr, Tensor) else lr}
            group["max_lr"] = param_group["max_lr"]
        validate_group(group)
        backends.check_name(group["backend"])
        super().add_param_group(param_group)

    def _normalize_group(self, group: dict[str, Any], fallback: dict[str, Any]) -> None:
        """Give a loaded group (torch's or an older adamkit's) every key adamkit uses."""
        if "decouple_wd" not in group:
            group["decouple_wd"] = bool(group.get("decoupled_weight_decay", False))
        group.pop("decoupled_weight_decay", None)
        for key in _TORCH_ONLY_KEYS:
            group.pop(key, None)
        for key, value in fallback.items():
            group.setdefault(key, value)
        if group["decouple_lr"] and group["max_lr"] is None:
            lr = group["lr"]
            group["max_lr"] = lr.item() if isinstance(lr, Tensor) else lr

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            self._normalize_group(group, self.defaults)

    # ---- the step -------------------------------------------------------------------

    def _gather(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """The params to update, per group; raises before anything is changed."""
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "Adam does not support sparse gradients, please consider SparseAdam instead"
                    )
            work.append((group, params))
        return work

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale_inv = self._amp_grad_scale_inv()
        if grad_scale_inv is None:
            return loss  # GradScaler found an inf or NaN: skip the step, change nothing

        # Plan first: everything that can raise does so before any state changes.
        plans = []
        for group, params in self._gather():
            buckets: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in params:
                state = self.state.get(p)
                t = int(state["step"].item()) + 1 if state else 1
                buckets[(p.device, p.dtype, t)].append(p)
            for (device, dtype, t), ps in buckets.items():
                backend = backends.resolve(group["backend"], device, dtype)
                plans.append((group, t, ps, backend))

        for group, t, ps, backend in plans:
            states = [self._state_for(p, group) for p in ps]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            bucket = backends.Bucket(
                group=group,
                params=ps,
                grads=[p.grad for p in ps],
                exp_avgs=[s["exp_avg"] for s in states],
                exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                states=states,
            )
            scalars = step_scalars(group, t)
            if grad_scale_inv != 1.0:
                scalars = replace(scalars, grad_scale_inv=grad_scale_inv)
            backend.step(bucket, scalars)
        return loss

    def _amp_grad_scale_inv(self) -> float | None:
        """1/scale for grads a GradScaler left scaled, 1.0 without one, None to skip.

        GradScaler sets `found_inf` (inf/NaN seen in any grad) and `grad_scale` (None when
        the user already called ``scaler.unscale_``) for the duration of ``step``. Reading
        them costs one host sync per step, as torch's own skip check does."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            return None
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return 1.0
        # As GradScaler's own unscale: the reciprocal in float64, rounded to float32.
        return float(torch.tensor(1.0 / float(scale), dtype=torch.float32))

    # ---- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout and key names; ``decoupled_weight_decay`` mirrors ``decouple_wd``
        so that torch.optim.Adam loads the same decay mode."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group["decoupled_weight_decay"] = bool(group["decouple_wd"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of adamkit or torch.optim.Adam/AdamW.

        Everything is checked and copied before anything is replaced: a state dict that
        does not fit (group or param counts, tensor shapes, hyperparameters) raises
        ValueError and leaves this optimizer as it was.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result

        saved_groups = deepcopy(state_dict["param_groups"])
        if len(self.param_groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    f"of optimizer's group (group {i}: {len(saved['params'])} saved params, "
                    f"{len(group['params'])} in the optimizer)"
                )

        new_groups, new_state = [], defaultdict(dict)
        saved_state = state_dict["state"]
        for group, saved in zip(self.param_groups, saved_groups):
            fallback = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            new_group = {**saved, "params": group["params"]}
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]
            self._normalize_group(new_group, fallback)
            validate_group(new_group)
            backends.check_name(new_group["backend"])
            new_groups.append(new_group)
            for saved_id, p in zip(saved["params"], group["params"]):
                if saved_id in saved_state:
                    new_state[p] = self._load_param_state(p, saved_state[saved_id], saved_id)

        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @staticmethod
    def _load_param_state(p: Tensor, saved: dict[str, Any], saved_id: Any) -> dict[str, Any]:
        """A private copy of one param's saved state, on p's device and in p's dtype."""
        if "step" not in saved or "exp_avg" not in saved or "exp_avg_sq" not in saved:
            raise ValueError(
                f"loaded state for parameter {saved_id} lacks one of 'step', 'exp_avg', "
                f"'exp_avg_sq' (has {sorted(saved)})"
            )
        out: dict[str, Any] = {}
        for key, value in saved.items():
            if key == "step":
                out[key] = torch.tensor(float(value), dtype=scalar_dtype())
            elif isinstance(value, Tensor):
                if key in MOMENTS and value.shape != p.shape:
                    raise ValueError(
                        f"loaded state for parameter {saved_id} has {key} of shape "
                        f"{tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}"
                    )
                dtype = p.dtype if p.is_floating_point() or p.is_complex() else value.dtype
                out[key] = value.to(device=p.device, dtype=dtype, copy=True)
            else:
                out[key] = deepcopy(value)
        return out
