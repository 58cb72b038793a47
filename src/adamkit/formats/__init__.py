"""Storage of optimizer state and params: names, defaults, and whole per-param states.

docs/design/formats.md specifies everything here; ``state`` implements the moment
formats, ``param`` the update policies of low-precision params. This file resolves a
param group's choices for one param, and builds a param's state: fresh, or converted
from a saved one (a checkpoint, or a state of another format).

A param's state records what it is in two tags, ``state_format`` and ``param_update``,
so a checkpoint describes itself. They are 0-dim integer tensors holding a code
(``FORMAT_CODES``, ``UPDATE_CODES``): a state dict then holds tensors only, as
torch.optim's does, which ``torch.distributed.checkpoint``'s flattened state dicts
require; and DCP, which loads a checkpoint into the live state's own tensors, carries the
saved tags into them too, so a checkpoint of another format is refused there instead of
being read as the live one. Checkpoints of earlier versions hold the tags as str; they
are read, and replaced by tensors at the next conversion. A state without tags (a
torch.optim one, or one built by code) is read from its tensors (``stored_formats``).
"""

from __future__ import annotations

import functools
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from . import param, state

STATE_FORMATS = ("fp32", "bf16", "int8")  # the choices of state_format= (None: like the param)
PARAM_UPDATES = ("nearest", "kahan", "stochastic", "master")  # the choices of param_update=
LOW_PRECISION = (torch.bfloat16, torch.float16)
# state_format=None: like the param; float16 state could not hold ε = 1e-8 nor small v.
DEFAULT_STATE = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
                 torch.float16: "fp32"}
DEFAULT_UPDATE = "kahan"  # for bfloat16/float16 params; "nearest" rounds as torch does
# (not its bits: torch's foreach ops round bf16 state after every op, docs/precision.md)
# A float moment's dtype is its format (in any state: adamkit's or torch.optim's).
_DTYPE_FORMAT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.float16: "fp16", torch.complex64: "fp32", torch.complex128: "fp64"}
GROUP_DEFAULTS = {"state_format": None, "param_update": None, "seed": 0, "int8_min_size": 4096}
# The tags of a param's state (module docstring): the codes of its format and update.
TAGS = ("state_format", "param_update")
FORMAT_CODES = {"fp32": 0, "bf16": 1, "int8": 2, "fp64": 3, "fp16": 4}
UPDATE_CODES = {"nearest": 0, "kahan": 1, "stochastic": 2, "master": 3}
_FORMAT_NAMES = {code: name for name, code in FORMAT_CODES.items()}
_UPDATE_NAMES = {code: name for name, code in UPDATE_CODES.items()}
# The update policy a state's buffer says (formats.md, "Checkpoints"); none: "nearest".
_BUFFER_POLICY = {"kahan_comp": "kahan", "master_param": "master", "sr_seed": "stochastic"}


def _names(values, none: bool = True) -> str:
    return ", ".join(["None"] * none + [repr(v) for v in values])


def validate(group: dict[str, Any]) -> None:
    """ValueError naming the valid values for any bad storage choice of ``group``."""
    if group["state_format"] not in (None, *STATE_FORMATS):
        raise ValueError(f"Invalid state_format: {group['state_format']!r}; valid values are "
                         f"{_names(STATE_FORMATS)}")
    if group["param_update"] not in (None, *PARAM_UPDATES):
        raise ValueError(f"Invalid param_update: {group['param_update']!r}; valid values are "
                         f"{_names(PARAM_UPDATES)}")
    seed, size = group["seed"], group["int8_min_size"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"Invalid seed: {seed!r}; it must be an int")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"Invalid int8_min_size: {size!r}; it must be an int >= 0")


def resolve(p: Tensor, group: dict[str, Any]) -> tuple[str, str]:
    """(state format, param update) of ``p`` under ``group``'s choices.

    Complex params keep state like the param (the formats are defined for real values);
    float32/float64 params always update "nearest" (there is nothing to compensate for
    at the precision the step computes in). Under "int8", params with fewer than
    ``int8_min_size`` elements, judged on the full size (a DTensor's numel is global, so
    sharding never changes the choice), keep "fp32": their scales would cost more than
    the codes save, and small tensors (biases, norms) are the most sensitive."""
    if p.is_complex():
        return ("fp64" if p.dtype == torch.complex128 else "fp32"), "nearest"
    fmt = group["state_format"] or DEFAULT_STATE.get(p.dtype, "fp32")
    if fmt == "int8" and p.numel() < group["int8_min_size"]:
        fmt = "fp32"
    update = (group["param_update"] or DEFAULT_UPDATE) if p.dtype in LOW_PRECISION else "nearest"
    return fmt, update


def format_of(t: Tensor) -> str:
    """The format of a plain moment tensor (the functional API's, a torch.optim checkpoint's)."""
    if t.dtype not in _DTYPE_FORMAT:
        raise ValueError(f"moments of dtype {t.dtype} are no state format (formats.md)")
    return _DTYPE_FORMAT[t.dtype]


def fresh_state(p: Tensor, fmt: str, update: str, amsgrad: bool,
                seed_of_param: int) -> dict[str, Any]:
    """Zero moments of format ``fmt`` and the buffers of ``update``; no ``step``."""
    out: dict[str, Any] = {}
    for name in state.MOMENTS[: 3 if amsgrad else 2]:
        out.update(state.zeros(p, name, fmt))
    out.update(param.buffers(p, update, seed_of_param))
    out.update(tags(fmt, update))
    return out


def tags(fmt: str, update: str) -> dict[str, Tensor]:
    """The tags of a state in (fmt, update): 0-dim int64 tensors on the host, as sr_seed."""
    return {"state_format": torch.tensor(FORMAT_CODES[fmt], device="cpu"),
            "param_update": torch.tensor(UPDATE_CODES[update], device="cpu")}


def _is_code(t: Any) -> bool:
    return (isinstance(t, Tensor) and t.dim() == 0 and t.layout == torch.strided and not t.is_meta
            and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool))


def tags_of(st: dict[str, Any]) -> tuple[str | None, str | None] | None:
    """The (format, update) a live state's tags say (None for a code no format has), or
    None where it has no tags in this encoding: the step then converts the state, which
    reads it as a checkpoint is read (stored_formats). Never raises."""
    fmt, update = st.get("state_format"), st.get("param_update")
    if not (_is_code(fmt) and _is_code(update)):
        return None
    return _FORMAT_NAMES.get(int(fmt)), _UPDATE_NAMES.get(int(update))


def _through_torch(saved: dict[str, Any]) -> bool:
    """Tags that passed through torch.optim's load_state_dict, which casts every state
    tensor but ``step`` to a floating param's dtype (and rebuilt an earlier version's str
    tags from a generator): the state is then torch.optim's (moments cast to the param
    dtype, buffers not stepped along)."""
    fmt = saved.get("state_format")
    return ((isinstance(fmt, Tensor) and fmt.is_floating_point())
            or (isinstance(fmt, str) and fmt.startswith("<generator object")))


def _saved_tags(saved: dict[str, Any]) -> tuple[str, str] | None:
    """What a state's tags say (a missing param_update: "nearest", as earlier versions
    read it); None where it has none or they went through torch.optim. ValueError for
    tags no version writes."""
    if "state_format" not in saved or _through_torch(saved):
        return None
    names = []
    for key, known, codes in (("state_format", state.STORAGE, _FORMAT_NAMES),
                              ("param_update", PARAM_UPDATES, _UPDATE_NAMES)):
        tag = saved.get(key, "nearest")
        name = codes.get(int(tag)) if _is_code(tag) else tag  # a str: an earlier version's
        if not isinstance(name, str) or name not in known:  # (a list is unhashable)
            shown = repr(tag)
            if isinstance(tag, Tensor):
                shown = (f"a tensor holding {tag.item()!r}" if tag.numel() == 1 and not tag.is_meta
                         else f"a tensor of shape {tuple(tag.shape)}")
            listed = ", ".join(f"{c} ({n})" for c, n in codes.items() if n in known)
            raise ValueError(f"unknown {key} tag {shown}: a tag is a 0-dim integer tensor "
                             f"holding one of the codes {listed} (or, as earlier versions "
                             "saved it, the name as str)")
        names.append(name)
    return names[0], names[1]


def stored_formats(saved: dict[str, Any], update: str | None = None) -> tuple[str, str]:
    """(state format, param update) a state (live, or a checkpoint's) is stored in.

    Its tags say it where it has them (its tensors are then checked against them where
    they are read). A state without tags (torch.optim's, one built by code) is read from
    its tensors (formats.md, "Checkpoints"): uint8 ``exp_avg`` codes are "int8" (their
    ``*_scale`` tensors are checked where the codes are read), a float ``exp_avg``'s
    dtype is its format; the policy is the one whose buffer the state holds
    (``kahan_comp``, ``master_param``, ``sr_seed``), else "nearest". Where it holds the
    buffers of several policies, ``update`` (the policy it is converted to) picks its
    own, else kahan's or master's, which hold θ. Tags that went through torch.optim are
    read as torch.optim's state: moments by their dtype, "nearest" (the buffers, which
    torch.optim's steps did not update, dropped)."""
    tagged = _saved_tags(saved)
    if tagged is not None:
        return tagged
    moment = saved.get("exp_avg")
    if isinstance(moment, Tensor) and moment.dtype == torch.uint8:
        fmt = "int8"
    else:
        scaled = [f"{m}_scale" for m in state.MOMENTS if f"{m}_scale" in saved]
        got = moment.dtype if isinstance(moment, Tensor) else type(moment).__name__
        if scaled:  # adamkit's int8 state, its codes cast by torch.optim
            raise ValueError(f"state with {scaled[0]} but exp_avg of {got}: int8 codes that "
                             "passed through torch.optim's load_state_dict (which casts them "
                             "to the param's dtype) cannot be read as moments; load adamkit's "
                             "own checkpoint")
        if not isinstance(moment, Tensor) or moment.dtype not in _DTYPE_FORMAT:
            raise ValueError(f"exp_avg of {got} is no moment format (float moments, or uint8 "
                             "int8 codes with their scales)")
        fmt = _DTYPE_FORMAT[moment.dtype]
    if _through_torch(saved):
        return fmt, "nearest"
    return fmt, _held_policy(saved, update)


def _held_policy(saved: dict[str, Any], update: str | None) -> str:
    held = [policy for key, policy in _BUFFER_POLICY.items() if key in saved]
    if update in held or not held:
        return update if update in held else "nearest"
    return held[0]  # kahan's, master's, then the seed's (_BUFFER_POLICY's order)


def state_fits(p: Tensor, st: dict[str, Any], fmt: str, update: str) -> bool:
    """Whether a live state's tensors are exactly what format ``fmt`` and policy
    ``update`` store for ``p`` (its tags say so; code can still have changed them: a
    moment cast to bfloat16, an int8 scale replaced or deleted, a buffer of another dtype
    after ``model.half()``, another policy's buffer or int8 scales beside float moments
    added). Where not, the step converts the state as it converts a checkpoint, which
    validates it (the native kernel reads these through raw pointers) and drops what the
    new storage does not keep."""
    if any(t.is_neg() for t in written_tensors(st, _FORMATS_TENSORS)):
        return False  # its memory holds -t: the conversion's copy holds t
    if any(key in st for key, policy in _BUFFER_POLICY.items() if policy != update):
        return False
    if fmt != "int8" and any(f"{m}_scale" in st for m in state.MOMENTS):
        return False
    want = state.storage_dtype(fmt, p)
    for name in state.MOMENTS:
        t = st.get(name)
        if t is None and name == "max_exp_avg_sq":
            continue
        if not isinstance(t, Tensor) or t.dtype != want or t.device != p.device:
            return False
        if fmt == "int8" and not state.scales_fit(st, p, [name]):
            return False
    return param.buffers_fit(p, st, update)


def written_tensors(st: dict[str, Any], keys: frozenset[str]) -> list[Tensor]:
    """The tensors of a live state under ``keys`` (written_keys): those a step writes."""
    return [t for k, t in st.items() if k in keys and isinstance(t, Tensor)]


@functools.lru_cache(maxsize=None)
def written_keys(fmt: str | None, update: str | None, amsgrad: bool) -> frozenset[str]:
    """The state keys whose tensors a step in (fmt, update) writes in place: the step
    counter, the moments (max v with amsgrad), their int8 scales, the policy's buffer;
    None for any format, policy: every one a step may write."""
    moments = state.MOMENTS if amsgrad else state.MOMENTS[:2]
    keys = {"step", *moments}
    if fmt in ("int8", None):
        keys.update(f"{m}_scale" for m in moments)
    keys.update(buf for policy, buf in param.BUFFERS.items() if update in (policy, None))
    return frozenset(keys)


# every state tensor a format or policy keeps (the step counter is the optimizer's)
_FORMATS_TENSORS = written_keys(None, None, True) - {"step"}


# every key of a param's state that adamkit reads (others are kept, as torch keeps them)
OWN_KEYS = frozenset({"step", *TAGS, "sr_seed", *param.BUFFERS.values(),
                      *state.MOMENTS, *(f"{m}_scale" for m in state.MOMENTS)})


def convert_state(p: Tensor, saved: dict[str, Any], fmt: str, update: str,
                  seed_of_param: int) -> dict[str, Any]:
    """A private copy of ``saved`` in format ``fmt`` with policy ``update``; no ``step``.

    Moments are decoded from the saved format (through float32, float64 if saved so) and
    encoded in ``fmt``; the same format is copied as is (int8 codes and scales too, so a
    round trip is exact). Buffers follow param.convert_buffers. The saved format is what
    its tags say, else what its tensors hold (stored_formats). Nothing is modified;
    ValueError if anything does not fit ``p``."""
    src_fmt, src_update = stored_formats(saved, update)
    missing = [name for name in state.MOMENTS[:2] if name not in saved]
    if missing:
        raise ValueError(f"the state lacks {missing[0]} (has {sorted(saved)})")
    out: dict[str, Any] = {}
    # float moments: each its own dtype's format (torch.optim casts each to the param's
    # dtype on load, so moments of two float dtypes are a valid checkpoint); tagged or
    # int8 ones: the state's format, which their dtypes are checked against
    own_dtype = src_fmt != "int8" and _saved_tags(saved) is None
    for name in state.MOMENTS:
        if name not in saved:
            continue
        moment_fmt = _moment_format(saved[name]) if own_dtype else src_fmt
        value = state.load_moment(saved, name, moment_fmt, p)  # validates
        if moment_fmt == fmt:
            dtype = state.storage_dtype(fmt, p)
            out[name] = state.copy_like(p, saved[name], dtype)
            if fmt == "int8":
                out[f"{name}_scale"] = saved[f"{name}_scale"].to(p.device, torch.float32, copy=True)
        else:
            out.update(state.encoded(value, p, name, fmt))
    out.update(param.convert_buffers(p, saved, src_update, update, seed_of_param))
    for key, value in saved.items():  # keys of others (a newer adamkit, user code): kept
        if key not in OWN_KEYS:
            out[key] = value.clone() if isinstance(value, Tensor) else deepcopy(value)
    out.update(tags(fmt, update))
    return out


def _moment_format(t: Any) -> str:
    """A float moment's own format (its dtype's)."""
    return _DTYPE_FORMAT.get(t.dtype, "?") if isinstance(t, Tensor) else "?"


def torch_state(p: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
    """One param's saved state as torch.optim.Adam keeps it: a copy of ``step`` and the
    moments in float32, or float64 where they are (torch.optim casts them to p's dtype
    when it loads them); no tags, int8 scales or seeds, and the buffers dropped as in a
    conversion to "nearest"."""
    wide = "fp64" if stored_formats(saved)[0] == "fp64" else "fp32"  # never rounded down
    converted = convert_state(p, saved, wide, "nearest", seed_of_param=0)
    return {"step": saved["step"].clone(),
            **{name: converted[name] for name in state.MOMENTS if name in converted}}
