"""``adamkit.AdamW``: Adam with decoupled weight decay (Loshchilov & Hutter, <https://arxiv.org/abs/1711.05101>)."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from .optimizer import Adam
from .param_groups import set_decay_mode


class AdamW(Adam):
    r"""Adam with decoupled weight decay, a drop-in for ``torch.optim.AdamW``.

    The same as ``adamkit.Adam`` with ``decouple_wd=True`` and ``weight_decay=1e-2``:
    θ ← θ·(1 − lr·λ) before each update (torch.optim.AdamW's form), so decay does not
    pass through the moments. ``decouple_lr=True`` makes the decay fully decoupled from
    the learning rate's size, θ ← θ·(1 − (lr/max_lr)·λ), as in the paper's Algorithm 2
    (λ times the schedule multiplier lr/max_lr); λ = λ_AdamW·max_lr does what AdamW's
    λ_AdamW does at the peak lr (1e-5 to 1e-4 at lr 1e-3). Storage (``state_format``,
    ``param_update``, ``seed``, ``int8_min_size``) is Adam's.

    Example:
        >>> import torch, adamkit
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = adamkit.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        state_format: str | None = None,
        param_update: str | None = None,
        seed: int = 0,
        int8_min_size: int = 4096,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            decouple_wd=True,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            maximize=maximize,
            backend=backend,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            state_format=state_format,
            param_update=param_update,
            seed=seed,
            int8_min_size=int8_min_size,
        )

    def _normalize_group(self, group: dict[str, Any], fallback: dict[str, Any]) -> None:
        super()._normalize_group(group, fallback)
        set_decay_mode(group, True)  # as torch.optim.AdamW, whatever the checkpoint says
