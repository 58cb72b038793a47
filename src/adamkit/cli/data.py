"""The training text: CPython's own documentation, which ships with every Python.

``pydoc_data.topics.topics`` maps help topics to their text (about 465 kB). Joined in
sorted key order it is the same string on every machine with the same Python, so a
seed fixes the whole run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CliError


def load_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CliError("this Python has no pydoc_data module, which adamkit train reads its text from")
    return "\n".join(topics[key] for key in sorted(topics))


class CharCorpus:
    """Characters as tokens, split into train (first part) and validation (the rest)."""

    def __init__(self, text: str, val_fraction: float = 0.1) -> None:
        # The vocabulary covers the whole text, so no validation character is unknown.
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        data = self.encode(text)
        split = int(len(data) * (1.0 - val_fraction))
        self.train, self.val = data[:split], data[split:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())

    def train_batch(self, batch_size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of the training text, every one of its ``len - context`` windows
        of context + 1 characters equally likely (the last character too is a target);
        the generator is the only source of randomness."""
        starts = torch.randint(0, len(self.train) - context, (batch_size,), generator=generator)
        return _windows(self.train, starts, context)

    def val_batches(self, batch_size: int, context: int, count: int) -> list[tuple[Tensor, Tensor]]:
        """Fixed, evenly spaced windows of the validation text: every evaluation sees the
        same ones and draws no random numbers, so evaluating never changes the run."""
        total = batch_size * count
        starts = torch.linspace(0, len(self.val) - context - 1, total).long()
        return [_windows(self.val, chunk, context) for chunk in starts.split(batch_size)]


def _windows(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    offsets = starts[:, None] + torch.arange(context + 1)
    rows = data[offsets]
    return rows[:, :-1], rows[:, 1:]
