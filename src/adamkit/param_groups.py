"""Param-group bookkeeping that torch.optim's conventions ask for.

What a group dict holds besides the hyperparameters that ``hyperparams.py`` validates:
the backend torch's ``foreach``/``fused`` flags choose, the decay mode under its two keys
(adamkit's ``decouple_wd`` and torch's ``decoupled_weight_decay``, kept equal), the
default of ``max_lr``, and how often a param is listed. Pure functions of the groups:
``optimizer.Adam`` calls them when a group is added, loaded or stepped.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import formats
from .hyperparams import refuse_torch_only

FOREACH_TENSOR = "{} as a Tensor is not supported for capturable=False and foreach=True"

# The hyperparameters torch.optim.Adam's step reads from every group: a live group
# without one raises KeyError there, at every step, and so it does here (filled from the
# defaults, a deleted lr was stepped with the defaults' without a word).
STEPPED_TORCH_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def betas_tuple(betas: Any) -> Any:
    """The defaults' betas as torch.optim stores them: a tuple, with 1-element Tensors
    squeezed to 0-dim. What is not iterable is kept as given, for ``validate_group`` to
    raise torch's error on it (after the lr's and eps's checks, in torch's order)."""
    try:
        return tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)
    except TypeError:
        return betas


def initial_lr(lr: Any) -> Any:
    """max_lr's default, the group's lr as a number: a Tensor's value (one of several
    elements stays a Tensor, for the group's check to name it)."""
    return lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 else lr


def listings(groups: list[dict[str, Any]]) -> list[list[int]]:
    """Per group, per position in its params, how often that param was listed before it,
    in this group or an earlier one (0 at its first listing): ``Adam._gather(repeat)``
    takes the listings numbered ``repeat``, so that a param's updates run in torch's order."""
    seen: dict[int, int] = {}
    numbers = []
    for group in groups:
        numbers.append([])
        for p in group["params"]:
            numbers[-1].append(seen.get(id(p), 0))
            seen[id(p)] = numbers[-1][-1] + 1
    return numbers


def decay_mode(group: dict[str, Any], last: bool | None, default: bool) -> bool:
    """The decay mode a group dict asks for under its two keys, ``decouple_wd`` and torch's
    ``decoupled_weight_decay``. ``last``: the mode both keys held when last synced, so that
    the one changed since then wins; None for a dict not synced yet (passed to the
    optimizer, or loaded), where torch's key wins when given (torch.optim reads and
    changes only its own). ``default``: the mode where neither key is given. A key given
    as None is given: False, as torch.optim reads it."""
    if "decoupled_weight_decay" in group:
        theirs = bool(group["decoupled_weight_decay"])
        if last is None or theirs != last:
            return theirs
    if "decouple_wd" in group:
        return bool(group["decouple_wd"])
    return default if last is None else last


def set_decay_mode(group: dict[str, Any], value: bool) -> None:
    group["decouple_wd"] = group["decoupled_weight_decay"] = value


def backend_for_torch_flags(backend: str, lr: Any, *, foreach: bool | None = None,
                             fused: bool | None = None, capturable: bool = False,
                             differentiable: bool = False) -> str:
    """The backend torch.optim's flags ask for in a group dict: ``foreach=True`` the
    "torch" backend, ``fused=True`` the fastest (as "auto"). Raises torch's errors for
    combinations torch refuses, and ValueError for capturable and differentiable
    (``refuse_torch_only``). The constructor runs the same checks, in torch's order
    around its others."""
    check_foreach_lr(lr, foreach, capturable)
    check_torch_flags(foreach, fused, capturable, differentiable)
    return foreach_backend(backend, foreach)


def check_foreach_lr(lr: Any, foreach: bool | None, capturable: bool) -> None:
    """torch.optim's foreach path takes a float lr only (adamkit's torch backend does not
    mind, but foreach=True asks for torch's behaviour); capturable=True lifts it. The
    betas get the same check from the caller, after their ranges and kinds."""
    if foreach and not capturable and isinstance(lr, Tensor):
        raise ValueError(FOREACH_TENSOR.format("lr"))


def check_foreach_betas(betas: Any, foreach: bool | None, capturable: bool) -> None:
    """check_foreach_lr's twin for the betas, run after their ranges and kinds (both are
    Tensors or neither then, so betas[0] names them, as torch's message does)."""
    if foreach and not capturable and isinstance(betas[0], Tensor):
        raise ValueError(FOREACH_TENSOR.format("betas[0]"))


def check_torch_flags(foreach: bool | None, fused: bool | None, capturable: bool,
                      differentiable: bool) -> None:
    """torch.optim.Adam's errors for its flags (it raises them once the params are
    added), then adamkit's refusal of the two it cannot honour."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    refuse_torch_only({"capturable": capturable, "differentiable": differentiable})


def foreach_backend(backend: str, foreach: bool | None) -> str:
    """"torch" for foreach=True (torch.optim's multi-tensor path), else ``backend``."""
    if not foreach:
        return backend
    if backend not in ("auto", "torch"):  # it would be replaced without a word
        raise ValueError(f"foreach=True asks for the 'torch' backend, but backend={backend!r} "
                         "was given too; pass one of them")
    return "torch"


def sync_decay_modes(groups: list[dict[str, Any]], last: dict[int, tuple[dict, bool]]
                     ) -> dict[int, tuple[dict, bool]]:
    """Make each live group's two decay-mode keys equal again, the one set since the
    last sync winning (code written for torch.optim sets ``decoupled_weight_decay``,
    adamkit's own ``decouple_wd``). ``last`` is the record the previous sync returned,
    id(group) -> (group, mode when synced); returns the new record."""
    synced = {}
    for group in groups:
        seen = last.get(id(group))
        before = seen[1] if seen is not None and seen[0] is group else None
        mode = decay_mode(group, before, False)
        set_decay_mode(group, mode)
        synced[id(group)] = (group, mode)
    return synced


def fill_live_group(group: dict[str, Any], fallback: dict[str, Any]) -> None:
    """Give a group appended to param_groups by hand (torch's keys only) adamkit's keys;
    torch's KeyError for one of torch's keys it lacks (deleted from a live group, say)."""
    for key in STEPPED_TORCH_KEYS:
        if key not in group:
            raise KeyError(key)
    normalize_loaded_group(group, fallback)


def normalize_loaded_group(group: dict[str, Any], fallback: dict[str, Any]) -> None:
    """Give a loaded group (torch's or an older adamkit's) every key adamkit uses."""
    # adamkit saves both keys equal; where they differ the state dict went through
    # torch.optim, which only reads and changes its own key
    set_decay_mode(group, decay_mode(group, None, False))
    for key, value in {**formats.GROUP_DEFAULTS, **fallback}.items():
        group.setdefault(key, value)
    if group["decouple_lr"] and group["max_lr"] is None:
        group["max_lr"] = initial_lr(group["lr"])
