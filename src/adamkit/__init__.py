"""adamkit: Adam-family optimizers for PyTorch, exact first, then fast, then lean.

The public surface:

* ``Adam`` and ``AdamW``, drop-ins for their torch.optim namesakes, with torch's
  decoupled decay (``decouple_wd``) and fully decoupled weight decay (``decouple_lr``);
* ``adamkit.reference``, the algorithm in plain float64 (the oracle);
* ``adamkit.functional``, a functional step over lists of tensors;
* ``UnreadableStateError``, what a step raises on a live state edited into one no
  storage format reads (a ValueError and a RuntimeError).
"""

from . import functional, reference
from .adamw import AdamW
from .optimizer import Adam, UnreadableStateError

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "UnreadableStateError", "functional", "reference", "__version__"]
