"""Checkpoints: any saved state into an optimizer's storage, and a state dict for torch.optim.

``Adam.state_dict`` is torch's own (torch's layout and key names, the decay keys synced).
Loading (``load``) accepts adamkit's and torch.optim's state dicts, checks and converts
everything before it replaces anything, and converts each param's state from the format
it was saved in into the one the optimizer is configured with (docs/design/formats.md,
"Checkpoints"). ``torch_state_dict`` goes the other way: every state decoded into what
torch.optim.Adam keeps, so that torch.optim can continue a run adamkit started in any
storage.
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import backends, formats
from .formats import param as param_policy
from .hyperparams import TORCH_FLAGS, check_live_group, scalar_dtype

if TYPE_CHECKING:
    from .optimizer import Adam

# Group keys of adamkit's own, which torch.optim has no use for (``decouple_wd`` is
# mirrored by torch's ``decoupled_weight_decay``; ``decouple_lr`` is refused on export).
# ``max_lr`` goes only where it is None: OneCycleLR keeps its peak lr under that key and
# reads it at every step, in torch.optim too.
ADAMKIT_ONLY_KEYS = ("decouple_wd", "decouple_lr", "backend", *formats.GROUP_DEFAULTS)
# Keys every torch.optim.Adam/AdamW (and adamkit) checkpoint's groups have held: a group
# without one is refused, where filling it from the live group would train on at a
# value the run never had (torch.optim loads it and fails at the next step).
SAVED_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")
# Keys older torch versions did not save, with the value torch.optim.Adam's
# __setstate__ gives them there (the decay mode's key: Adam._normalize_group).
TORCH_GROUP_DEFAULTS = {"amsgrad": False, "maximize": False}


def load(opt: Adam, state_dict: dict[str, Any]) -> None:
    """``Adam.load_state_dict``: see its docstring."""
    state_dict = state_dict.copy()
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result

    saved_groups = deepcopy(state_dict["param_groups"])
    if len(opt.param_groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        missing = [key for key in SAVED_GROUP_KEYS if key not in saved]
        if missing:
            raise ValueError(f"loaded state dict's parameter group {i} has no "
                             f"{', '.join(map(repr, missing))}: it is not a state dict of "
                             "torch.optim.Adam/AdamW or adamkit, or was edited")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size "
                f"of optimizer's group (group {i}: {len(saved['params'])} saved params, "
                f"{len(group['params'])} in the optimizer)"
            )

    new_groups, loaded = [], {}  # saved id -> (param, its state loaded)
    saved_state = state_dict["state"]
    index = 0
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        # adamkit's own keys a torch.optim checkpoint lacks, and torch's flags, come from
        # the live group (its configuration); any other key only the live group has (a
        # scheduler's initial_lr, a user's) is dropped, as torch.optim builds the group
        # from the saved one
        fallback = {k: group[k] for k in (*ADAMKIT_ONLY_KEYS, "max_lr", *TORCH_FLAGS) if k in group}
        # configured, not saved
        storage = {k: group[k] for k in (*formats.GROUP_DEFAULTS, "backend")}
        new_group = {**TORCH_GROUP_DEFAULTS, **saved, **storage, "params": group["params"]}
        for key in TORCH_FLAGS:  # the loading group's, as its `backend` (the fallback)
            new_group.pop(key, None)
        if "param_names" in group and "param_names" not in saved:
            new_group["param_names"] = group["param_names"]
        try:
            opt._normalize_group(new_group, fallback)
            if "decouple_lr" not in saved and new_group["decouple_lr"]:
                _into_fully_decoupled(new_group)
            check_live_group(new_group)  # its values as saved, which torch.optim loads as given
        except (TypeError, ValueError, RuntimeError) as e:  # every misfit checkpoint is a ValueError
            raise ValueError(f"loaded param group {i}: {e}") from None
        formats.validate(new_group)
        backends.check_name(new_group["backend"])
        new_groups.append(new_group)
        for saved_id, p in zip(saved["params"], group["params"]):
            # `{}` is no state: reading opt.state[p] (a defaultdict) before p's
            # first step saves one, and torch.optim loads it as a param without state
            # torch.optim loads a None (or any non-dict) and fails at the next step
            entry = saved_state.get(saved_id, {})
            if not isinstance(entry, dict):
                raise ValueError(f"loaded state for parameter {saved_id} is a {type(entry).__name__}, "
                                 "not a dict of its state")
            if entry:
                loaded[saved_id] = (p, _load_param_state(p, saved_state[saved_id], saved_id, new_group, index))
            index += 1
    named = {saved_id for saved in saved_groups for saved_id in saved["params"]}
    new_state = defaultdict(dict)  # in the saved order, as torch.optim loads it
    for key, entry in saved_state.items():
        if key in named:
            if key in loaded:
                p, state = loaded[key]
                new_state[p] = state
            continue
        if isinstance(entry, dict) and all(k in entry for k in ("step", "exp_avg", "exp_avg_sq")):
            shown = sorted(named, key=repr)[:8]
            raise ValueError(
                f"loaded state dict holds a param's state under key {key!r}, which no param of "
                f"its param_groups has (their ids: {shown}{', ...' if len(named) > 8 else ''}): "
                "each param's state is saved under its id in 'params' (a state dict that went "
                "through JSON has str keys: convert them back with int(key))")
        new_state[key] = entry  # no param's (a user's, a library's): the object itself, as torch.optim keeps it

    opt.__setstate__({"state": new_state, "param_groups": new_groups})
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def _into_fully_decoupled(group: dict[str, Any]) -> None:
    """A torch.optim group's weight decay (it has no ``decouple_lr``) loaded into a
    fully decoupled group: AdamW's λ, which removes lr·λ per step, is λ·max_lr fully
    decoupled (docs/adam.md), the same decay at every lr; taken as it is, it removed
    max_lr times as much, 1% per step for AdamW's 0.01 (found by review). Coupled decay
    (an L2 term through the moments) has no fully decoupled equivalent: ValueError."""
    wd = group["weight_decay"]
    if not group["decouple_wd"] and float(wd) != 0:
        raise ValueError(f"torch.optim's coupled weight decay (weight_decay={wd}, an L2 term through "
                         "the moments) has no fully decoupled equivalent: load it into a group with "
                         "decouple_lr=False, or set its weight_decay to 0 first")
    group["weight_decay"] = wd * float(group["max_lr"])


def _load_param_state(p: Tensor, saved: dict[str, Any], saved_id: Any,
                      group: dict[str, Any], index: int) -> dict[str, Any]:
    """A private copy of one param's saved state, on p's device, in the group's format."""
    # DCP's flattened state dict is rebuilt from the live state's keys, and a key the
    # checkpoint lacks (sr_seed into a stochastic run, int8 scales) comes back as {}
    saved = {k: v for k, v in saved.items() if not (k in formats.OWN_KEYS and isinstance(v, dict) and not v)}
    # detached: copies of a saved tensor that requires grad (torch.optim's differentiable
    # state) carried a graph back to it, which kept the checkpoint's tensor alive
    saved = {k: v.detach() if isinstance(v, Tensor) else v for k, v in saved.items()}
    if "step" not in saved or "exp_avg" not in saved or "exp_avg_sq" not in saved:
        raise ValueError(
            f"loaded state for parameter {saved_id} lacks one of 'step', 'exp_avg', "
            f"'exp_avg_sq' (has {sorted(saved)})"
        )
    for key in formats.OWN_KEYS & saved.keys():  # torch's copy raised its own errors mid-conversion
        value = saved[key]
        if isinstance(value, Tensor) and (value.layout != torch.strided or (value.is_meta and not p.is_meta)):
            kind = "meta" if value.is_meta else str(value.layout).removeprefix("torch.")
            raise ValueError(f"loaded state for parameter {saved_id}: {key} is a {kind} tensor, "
                             "which holds no dense values to load")
    fmt, update = formats.resolve(p, group)
    seed = param_policy.sr_seed(group["seed"], index)
    try:
        step = _saved_step(saved["step"], scalar_dtype())
        converted = formats.convert_state(p, saved, fmt, update, seed)
    except ValueError as exc:
        raise ValueError(f"loaded state for parameter {saved_id}: {exc}") from None
    return {"step": step, **converted}


def _saved_step(step: object, dtype: torch.dtype) -> Tensor:
    """A saved step count as the step's counter of ``dtype`` (ValueError otherwise): a
    whole number ≥ 0 within the counter's range, as an int, a float, a NumPy number or a
    one-element real Tensor (torch.optim loads any). A NaN or infinite one loaded and then
    failed every step, as did one beyond the counter's range (float32: 3.4e38), which it
    rounded to ∞;
    a fractional one was truncated by the step (torch.optim would use it as is). A count
    the counter cannot hold exactly is rounded to it, as its own counting rounds: a
    float32 counter stalls there, as torch's does past 2^24 (test_step_counter_limit),
    where the bias corrections are 1 to float32's precision."""
    if isinstance(step, Tensor) and step.is_meta:  # (torch.optim loads it, and its step fails)
        raise ValueError("step is a meta tensor, which holds no count to load")
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex():
        step = step.item()
    elif type(step).__module__ == "numpy" and getattr(step, "shape", None) == ():
        step = step.item()  # a NumPy scalar (a count converted from JAX, say), as torch loads it
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (
            0 <= step < math.inf and step == int(step)):
        shown = f"a Tensor of shape {tuple(step.shape)}" if isinstance(step, Tensor) else repr(step)
        raise ValueError(f"step must be a whole number of steps ≥ 0 (an int, float, NumPy "
                         f"number or one-element Tensor), got {shown}")
    try:
        value = float(step)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"step is beyond the range of the {dtype} step counter (an int of "
                         f"{step.bit_length()} bits)") from None
    counter = torch.tensor(value, dtype=dtype, device="cpu")
    if not counter.isfinite():
        raise ValueError(f"step {value:.4g} is beyond the range of the {dtype} step counter")
    return counter


def torch_state_dict(opt: Adam) -> dict[str, Any]:
    """``Adam.torch_state_dict``: see its docstring."""
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        if group["decouple_lr"]:  # as torch's AdamW: λ_f fully decoupled is λ_f/max_lr there
            group["weight_decay"] = group["weight_decay"] / float(group["max_lr"])
            group["decouple_wd"] = group["decoupled_weight_decay"] = True
    params = {}  # index in the state dict → param, as torch's state_dict numbered them
    for group, packed in zip(opt.param_groups, saved["param_groups"]):
        params.update(zip(packed["params"], group["params"]))
    state = {index: formats.torch_state(params[index], s) if index in params else s
             for index, s in saved["state"].items() if s or index not in params}
    # (an entry that is no param's: as state_dict gives it, a user's object)
    groups = [{k: deepcopy(v) for k, v in g.items()
               if k not in ADAMKIT_ONLY_KEYS and not (k == "max_lr" and v is None)}
              for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
