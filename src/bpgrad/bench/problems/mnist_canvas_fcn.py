"""``mnist_canvas_fcn``: semantic segmentation of real MNIST digits on a canvas, metric mean IU.

The paper's dense-prediction experiments train FCNs on PASCAL VOC and report mean IU. VOC is not
obtainable offline here, so this problem keeps the task and the metric on real data that is:

* **Canvas.** Each 40x40 canvas holds two real MNIST digits (their central 20x20 crop, where
  MNIST's writers' ink lies), pasted at independent uniform offsets in ``[0, 20]^2`` and
  composited by the pixel-wise maximum. Training canvases use only MNIST training digits, test
  canvases only MNIST test digits, each digit at most once; the composition is drawn from a
  constant seed, so every trial sees the same canvases.
* **Labels from the ink.** A pixel whose composited ink is at least 128 / 255 belongs to the class
  of the digit that put the most ink there (class ``1 + digit``); every other pixel is background
  (class 0). 11 classes.
* **Net.** A small fully-convolutional network in FCN's pattern (Long, Shelhamer, Darrell 2015):
  three stride-2 convolutions down to 5x5 (so that a unit sees a whole digit), three learned
  stride-2 transposed convolutions back to 40x40 with skip connections added from the same
  resolutions, and a 1x1 classifier per pixel.
* **Loss** mean per-pixel cross-entropy. **Metric: mean IU** as FCN defines it (their
  ``score.py``): over the whole split accumulate the confusion counts per class ``c``; ``IU_c =
  TP_c / (TP_c + FP_c + FN_c)``; mean IU is the mean of ``IU_c`` over the classes with
  ``TP_c + FP_c + FN_c > 0``, i.e. classes absent from both the prediction and the ground truth
  are excluded (FCN's ``nanmean``); background is a class and counts. ``accuracy`` is pixel
  accuracy (dominated by background; mean IU is the metric of record).

Targets are stored as uint8 class maps (an eighth of the memory of int64) and
widened per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bpgrad.bench.problems import _common
from bpgrad.bench.problems._common import carve_validation, seeded
from bpgrad.bench.problems.base import Problem, Split, Splits, register_problem

CANVAS = 40
CROP = slice(4, 24)  # MNIST digits are centred in the middle 20x20 of the 28x28 image
DIGITS_PER_CANVAS = 2
INK_THRESHOLD = 128
NUM_CLASSES = 11  # background + 10 digits
N_TRAIN_CANVASES = 4000
N_TEST_CANVASES = 1000
#: constant seed of the composition (the canvases are part of the problem's definition)
COMPOSE_SEED = 2015


def compose_canvases(images: np.ndarray, labels: np.ndarray, n_canvases: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Compose ``n_canvases`` canvases from distinct ``images`` (uint8, N x 28 x 28).

    Returns the composited ink (uint8, n x 40 x 40) and the class maps (uint8, n x 40 x 40; 0 is
    background, ``1 + digit`` a digit's ink of at least ``INK_THRESHOLD``).
    """
    need = n_canvases * DIGITS_PER_CANVAS
    if need > images.shape[0]:
        raise ValueError(f"{n_canvases} canvases need {need} digits, only {images.shape[0]} given")
    chosen = rng.permutation(images.shape[0])[:need].reshape(n_canvases, DIGITS_PER_CANVAS)
    offsets = rng.integers(0, CANVAS - 20 + 1, size=(n_canvases, DIGITS_PER_CANVAS, 2))
    ink = np.zeros((n_canvases, CANVAS, CANVAS), np.uint8)
    owner_ink = np.zeros((n_canvases, CANVAS, CANVAS), np.uint8)
    classes = np.zeros((n_canvases, CANVAS, CANVAS), np.uint8)
    for k in range(DIGITS_PER_CANVAS):
        for i in range(n_canvases):
            digit = images[chosen[i, k], CROP, CROP]
            r, c = offsets[i, k]
            window = (i, slice(r, r + 20), slice(c, c + 20))
            # The digit with the most ink at a pixel owns it (ties: the earlier digit).
            wins = digit > owner_ink[window]
            owner_ink[window] = np.where(wins, digit, owner_ink[window])
            classes[window] = np.where(wins, 1 + int(labels[chosen[i, k]]), classes[window])
            ink[window] = np.maximum(ink[window], digit)
    classes[ink < INK_THRESHOLD] = 0
    return ink, classes


def confusion_counts(predicted: torch.Tensor, target: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class ``TP, FP, FN`` (float64 vectors) of integer label maps of equal shape."""
    t = target.reshape(-1).long()
    p = predicted.reshape(-1).long()
    hist = torch.bincount(t * num_classes + p, minlength=num_classes ** 2)
    hist = hist.reshape(num_classes, num_classes).to(torch.float64)  # rows: truth, cols: pred
    tp = hist.diagonal()
    return tp, hist.sum(0) - tp, hist.sum(1) - tp


CountsLike = torch.Tensor | np.ndarray | Sequence[float]


def mean_iu(tp: CountsLike, fp: CountsLike, fn: CountsLike) -> float:
    """FCN's mean IU: mean of ``TP / (TP + FP + FN)`` over classes where that sum is positive
    (classes absent from both prediction and truth are excluded). NaN if no class is present."""
    tp_a, fp_a, fn_a = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    union = tp_a + fp_a + fn_a
    present = union > 0
    if not present.any():
        return float("nan")
    return float(np.mean(tp_a[present] / union[present]))


class CanvasFCN(nn.Module):
    """FCN-style encoder-decoder: 40 -> 20 -> 10 -> 5 -> 10 -> 20 -> 40 with additive skips."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.down1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.down3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(64, 64, 3, padding=1)
        self.up0 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.classify = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores, shape (N, classes, 40, 40)."""
        relu = torch.relu
        f40 = relu(self.conv1(x))
        f20 = relu(self.down1(f40))
        f10 = relu(self.down2(f20))
        f5 = relu(self.mid(relu(self.down3(f10))))  # 5x5: each unit sees a whole digit
        u10 = relu(self.up0(f5) + f10)
        u20 = relu(self.up1(u10) + f20)
        u40 = relu(self.up2(u20) + f40)
        out: torch.Tensor = self.classify(u40)
        return out


@register_problem
class MnistCanvasFCN(Problem):
    """Two MNIST digits per 40x40 canvas, per-pixel 11-way labels, small FCN, mean IU."""

    name = "mnist_canvas_fcn"
    description = ("semantic segmentation: 2 real MNIST digits per 40x40 canvas, per-pixel "
                   "background/digit-class labels from the ink, small FCN, mean IU")
    batch_size = 32
    epochs = 5
    validation_size = 500
    eval_batch_size = 500
    split_metric_names = ("mean_iu",)
    split_sum_keys = tuple(f"{k}_{c}" for k in ("tp", "fp", "fn") for c in range(NUM_CLASSES))
    evaluation = ("after each epoch: per-pixel cross-entropy, pixel accuracy and mean IU (FCN's: "
                  "confusion counts accumulated over the whole split, classes absent from both "
                  "prediction and truth excluded, background included) on the valid canvases "
                  "(carved from the training canvases) and the 1000 test canvases (MNIST test "
                  "digits only)")
    reference = ("dense prediction in the spirit of the BPGrad paper's FCN/VOC experiments "
                 "(mean IU as in Long et al., CVPR 2015); canvases composed here from MNIST")

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Compose the canvases from the verified MNIST arrays (fetched on first use)."""
        v = self.validation_size if validation_size is None else validation_size
        arrays = _common.load_arrays("mnist", data_dir=data_dir, download=True)
        rng = np.random.default_rng(COMPOSE_SEED)
        n_train = min(N_TRAIN_CANVASES, arrays["x_train"].shape[0] // DIGITS_PER_CANVAS)
        n_test = min(N_TEST_CANVASES, arrays["x_test"].shape[0] // DIGITS_PER_CANVAS)
        x_tr, y_tr = compose_canvases(arrays["x_train"], arrays["y_train"], n_train, rng)
        x_te, y_te = compose_canvases(arrays["x_test"], arrays["y_test"], n_test, rng)
        as_input = _common.images_to_tensor
        train, valid = carve_validation(as_input(x_tr, None, None), torch.from_numpy(y_tr), v,
                                        seed)
        test = Split(as_input(x_te, None, None), torch.from_numpy(y_te))
        return Splits(train=train, valid=valid, test=test)

    def make_model(self, seed: int) -> nn.Module:
        """:class:`CanvasFCN` with PyTorch's default initialisation drawn from ``seed``."""
        with seeded(seed):
            return CanvasFCN()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean per-pixel cross-entropy."""
        return nn.functional.cross_entropy(outputs, targets.long())

    def batch_metrics(self, outputs: torch.Tensor, targets: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        """Sums over the batch's pixels, plus per-class ``tp_c``, ``fp_c``, ``fn_c``."""
        pixels = float(targets.numel())
        predicted = outputs.argmax(dim=1)
        out = {
            "loss_sum": self.loss(outputs, targets).detach() * pixels,
            "count": torch.tensor(pixels),
            "correct": (predicted == targets.long()).sum().to(torch.float64),
        }
        tp, fp, fn = confusion_counts(predicted, targets, NUM_CLASSES)
        for c in range(NUM_CLASSES):
            out[f"tp_{c}"], out[f"fp_{c}"], out[f"fn_{c}"] = tp[c], fp[c], fn[c]
        return out

    def split_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``mean_iu`` from the split's accumulated confusion counts."""
        if f"tp_{NUM_CLASSES - 1}" not in sums:
            return {}  # counts not available (e.g. summed across ranks without them)
        tp, fp, fn = ([sums[f"{k}_{c}"] for c in range(NUM_CLASSES)] for k in ("tp", "fp", "fn"))
        return {"mean_iu": mean_iu(tp, fp, fn)}
