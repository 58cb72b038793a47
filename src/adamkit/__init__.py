"""adamkit: Adam-family optimizers for PyTorch, exact first, then fast, then lean.

The public surface:

* :class:`Adam` and :class:`AdamW`, drop-ins for their torch.optim namesakes with
  decoupled (``decouple_wd``) and fully decoupled (``decouple_lr``) weight decay;
* :mod:`adamkit.reference`, the algorithm in plain float64 (the oracle);
* :mod:`adamkit.functional`, a functional step over lists of tensors;
* :class:`UnreadableStateError`, what a step raises on a live state edited into one no
  storage format reads (a ValueError and a RuntimeError).
"""

from . import functional, reference
from .adamw import AdamW
from .optimizer import Adam, UnreadableStateError

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "UnreadableStateError", "functional", "reference", "__version__"]
