"""``fortunes_lstm``: a character-level LSTM language model on the fortune-mod corpus.

Data: :data:`bpgrad.bench.data.sources.FORTUNES` — the ``computers``, ``science`` and
``songs-poems`` collections of Debian's ``fortunes`` package (597k characters, 2396 fortunes),
sha256-pinned per file. Whole fortunes are held out for the test split (10 %, constant seed), so
no test text is seen in training. Characters map to a fixed 98-symbol alphabet (printable ASCII,
newline, an end-of-fortune mark, one code for anything else); nothing is computed from the data.

Examples: each split's character stream is cut into consecutive, non-overlapping windows of 65
characters; the model reads the first 64 and predicts each next character (targets = the window
shifted by one). The validation windows are carved from the training windows with the trial's
seed (they share fortunes with neighbouring training windows: it is a selection split, the test
split is the clean one). Inputs and targets are int64 character codes.

Model: embedding 32 -> one LSTM layer of 128 units -> linear to 98 logits per position; PyTorch's
default initialisation. Loss: mean cross-entropy per predicted character (nats; bits per
character = loss / ln 2); ``accuracy`` is next-character accuracy over all predicted positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bpgrad.bench.data.formats import FORTUNE_VOCAB
from bpgrad.bench.problems import _common
from bpgrad.bench.problems._common import carve_validation, seeded
from bpgrad.bench.problems.base import Problem, Split, Splits, register_problem

CONTEXT = 64


def windows(stream: np.ndarray, length: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``length + 1`` codes → (inputs, next-character targets)."""
    n = (stream.size - 1) // length
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    w = torch.from_numpy(stream[idx].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class CharLSTM(nn.Module):
    """Embedding → LSTM → per-position logits, returned as (N, vocab, T) for cross-entropy."""

    def __init__(self, vocab: int = FORTUNE_VOCAB, embed: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the next character at every position, shape (N, vocab, T)."""
        h, _ = self.lstm(self.embed(x))
        out: torch.Tensor = self.head(h).transpose(1, 2)
        return out


@register_problem
class FortunesLSTM(Problem):
    """Character-level LSTM language model on three fortune-mod collections."""

    name = "fortunes_lstm"
    description = ("sequence model: character-level LSTM language model (64-char context) on "
                   "fortune-mod's computers/science/songs-poems collections (Debian)")
    batch_size = 32
    epochs = 5
    validation_size = 500
    eval_batch_size = 500
    evaluation = ("after each epoch: mean next-character cross-entropy (nats) and accuracy over "
                  "all positions of the valid windows (carved from training windows) and of the "
                  "test windows (held-out fortunes), in eval mode")
    reference = ("character-level language model in the spirit of DeepOBS's tolstoi_char_rnn "
                 "(smaller: 1 LSTM layer of 128); corpus from Debian's fortunes package")

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Windows of the verified fortunes streams; valid carved from train with ``seed``."""
        v = self.validation_size if validation_size is None else validation_size
        arrays = _common.load_arrays("fortunes", data_dir=data_dir, download=True)
        x_tr, y_tr = windows(arrays["x_train"])
        train, valid = carve_validation(x_tr, y_tr, v, seed)
        x_te, y_te = windows(arrays["x_test"])
        return Splits(train=train, valid=valid, test=Split(x_te, y_te))

    def make_model(self, seed: int) -> nn.Module:
        """:class:`CharLSTM`, PyTorch's default initialisation drawn from ``seed``."""
        with seeded(seed):
            return CharLSTM()

    def batch_metrics(self, outputs: torch.Tensor, targets: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """Sums over every predicted character of the batch."""
        chars = float(targets.numel())
        return {
            "loss_sum": self.loss(outputs, targets).detach() * chars,
            "count": torch.tensor(chars),
            "correct": (outputs.argmax(dim=1) == targets).sum().to(torch.float64),
        }
