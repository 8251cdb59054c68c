"""Real data that ships inside a package: scikit-learn's digits, and small BN CNNs trained on it.

scikit-learn ships 1797 8×8 grey images of handwritten digits (``load_digits``, no download;
read here from the package's data file). They are scaled to [0, 1], split stratified 60/20/20
(seeded) into train, validation (what a collapse run evaluates and stops on) and test (reported
once at the end, never used for a decision), and standardized with the training split's mean
and std. The models are written the way the zoo writes
them (torchvision's ``BasicBlock`` from :mod:`normfold.models.resnet`, the VGG-BN classifier
head), shrunk for 8×8 inputs:

- ``digits-cnn``: ``Conv-BN-ReLU`` ×3 (the last with stride 2), global average pool, Linear;
- ``digits-resnet``: a ``Conv-BN-ReLU`` stem and three BasicBlocks (16, 32 stride 2, 64 stride 2);
- ``digits-vgg``: two ``Conv-BN-ReLU`` pairs with max pools, then
  ``Linear-BN1d-ReLU-Dropout-Linear-BN1d-ReLU-Linear``.

Training is seeded (weights, batch order) and so repeats exactly on one machine.
Needs ``pip install 'normfold[examples]'`` (torch, scikit-learn).
"""

from __future__ import annotations

__all__ = ["MODELS", "Digits", "accuracy", "batches", "build", "correct", "finetuner", "load", "train"]

import dataclasses
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normfold.errors import InputError
from normfold.models.resnet import BasicBlock


@dataclasses.dataclass(frozen=True)
class Digits:
    """Standardized ``(N, 1, 8, 8)`` float32 images and int64 labels per split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load(seed: int = 0) -> Digits:
    images, labels = _digits_arrays()
    images = images / 16.0
    rng = np.random.default_rng(seed)
    # Stratified 60/20/20: each class is shuffled and cut at the same fractions.
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = [round(0.6 * members.size), round(0.8 * members.size)]
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.extend(chunk.tolist())
    train, val, test = (np.sort(np.asarray(part)) for part in parts)
    mean, std = images[train].mean(), images[train].std()

    def images_of(index: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((images[index] - mean) / std, dtype=torch.float32).unsqueeze(1)

    def labels_of(index: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(labels[index], dtype=torch.int64)

    return Digits(
        images_of(train), labels_of(train), images_of(val), labels_of(val), images_of(test), labels_of(test)
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 images ``(N, 8, 8)`` in 0..16 and their labels, read from scikit-learn's package.

    The file is what ``sklearn.datasets.load_digits`` reads; reading it directly spares the
    import of scikit-learn and scipy (seconds), which nothing else here needs.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise InputError("the digits example needs scikit-learn's bundled data: pip install 'normfold[examples]'")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width), *_conv_bn_relu(width, width), *_conv_bn_relu(width, 2 * width, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(1, width))
        self.layers = nn.Sequential(
            BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 4 * width, stride=2)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DigitsVGG(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 2 * 2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "digits-resnet": DigitsResNet,
    "digits-vgg": DigitsVGG,
}


def build(name: str, seed: int = 0) -> nn.Module:
    if name not in MODELS:
        raise InputError(f"unknown example {name!r}; choose one of: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` in batches of ``size``, shuffled by ``generator`` when given."""
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]


def train(
    model: nn.Module,
    data: Digits,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch: int = 64,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
    temperature: float = 4.0,
    progress: bool = False,
) -> nn.Module:
    """Adam over the training split, in place; returns ``model`` in eval mode.

    The loss is cross-entropy, or with a ``teacher`` and ``distill = α > 0`` the logit
    distillation of Hinton et al.: ``(1 − α)·CE + α·T²·KL(softmax(teacher/T) ‖ softmax(model/T))``
    (the teacher runs in eval mode without gradients). ``progress`` shows a bar that moves on
    every training step, with the running loss.
    """
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    if teacher is not None:
        teacher.eval()
    steps = epochs * math.ceil(len(data.train_x) / batch)
    with tqdm(total=steps, desc="train", unit="step", disable=None if progress else True, leave=False) as bar:
        for _ in range(epochs):
            for x, y in batches(data.train_x, data.train_y, batch, generator):
                optimizer.zero_grad()
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if teacher is not None and distill > 0:
                    with torch.no_grad():
                        target = F.log_softmax(teacher(x) / temperature, dim=1)
                    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, log_target=True,
                                    reduction="batchmean")
                    loss = (1 - distill) * loss + distill * temperature**2 * soft
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix_str(f"loss {float(loss.detach()):.4f}", refresh=False)
    return model.eval()


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per sample, 1.0 where ``model`` predicts the label, else 0.0 (``collapse``'s paired stop)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hits = (model(x).argmax(dim=1) == y).double().numpy()
    model.train(was_training)
    return hits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(correct(model, x, y).mean())


def finetuner(
    data: Digits, *, epochs: int = 1, lr: float = 1e-3, batch: int = 64, distill: float = 0.0,
    progress: bool = False,
) -> Callable[..., None]:
    """A ``finetune(model, step, teacher=None)`` callback: ``epochs`` of Adam on the training split.

    With ``distill = α > 0`` it distils from the ``teacher`` the collapse driver passes (the dense
    model), see :func:`train`.
    """

    def finetune(model: nn.Module, step: int, teacher: nn.Module | None = None) -> None:
        train(model, data, epochs=epochs, lr=lr, batch=batch, seed=step, teacher=teacher, distill=distill,
              progress=progress)

    return finetune
