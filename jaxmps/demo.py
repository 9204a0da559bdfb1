"""The training demo behind ``python -m jaxmps``: a small CNN made of jaxmps Flax NNX layers
learns scikit-learn's handwritten digits (8x8 images upsampled to 16x16), with a jit-compiled
optax step, a progress bar and held-out accuracy. First, two copies of the model train a few
steps from the same start, one on the native kernels and one with
``implementation="reference"``, to show that their losses agree and to time both.

Pieces usable on their own (notebooks/02_training.ipynb does): :func:`load_digits`,
:class:`DigitsCNN`, :func:`train_step`, :func:`accuracy`, :func:`train`,
:func:`compare_implementations`, and :func:`parse_args` / :func:`run` for the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ._src.ffi import backends
from .flax import nnx as layers

TARGET_ACCURACY = 0.97  # the default run reaches 0.98-0.99 on the held-out digits (seeds 0-3)
LOSS_AGREEMENT = 1e-3   # relative difference of native and reference losses called agreement


# ---- data ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Digits:
    """scikit-learn's 1797 handwritten digits as NHWC float32 images in [0, 1], split into a
    training and a held-out set."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(image_size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """Loads the digits data set that ships inside scikit-learn (no download), upsampled
    bilinearly from 8x8 to `image_size` x `image_size`, with a seeded held-out split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = data.images.astype(np.float32)[..., None] / 16.0  # pixel values are 0..16
    n = images.shape[0]
    images = np.asarray(jax.image.resize(images, (n, image_size, image_size, 1), "bilinear"))
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    labels = data.target.astype(np.int32)
    return Digits(images[train], labels[train], images[test], labels[test])


# ---- model ---------------------------------------------------------------------------------


class DigitsCNN(nnx.Module):
    """The demo network, every layer a jaxmps kernel::

        LocalContrastNorm -> Conv 3x3 -> BatchNorm -> relu          (size^2 x width)
        -> Conv 3x3 /2 -> InstanceNorm -> relu -> CrossChannelNorm  (size/2, 2 width)
        -> Conv 3x3 /2 -> BatchNorm -> relu                        (size/4, 2 width)
        -> Dense (MPS fully connected over the whole image) -> 10 logits
    """

    def __init__(self, *, rngs: nnx.Rngs, width: int = 16, image_size: int = 16,
                 implementation: Optional[str] = None):
        impl = dict(implementation=implementation)
        # No bias in a convolution feeding a norm: the norm subtracts it again, so its gradient
        # is rounding noise, which Adam would turn into full-size steps.
        conv = dict(use_bias=False, rngs=rngs, **impl)
        quarter = -(-image_size // 4)
        self.contrast = layers.LocalContrastNorm(5, **impl)
        self.conv1 = layers.Conv(1, width, (3, 3), **conv)
        self.norm1 = layers.BatchNorm(width, momentum=0.9, rngs=rngs, **impl)
        self.conv2 = layers.Conv(width, 2 * width, (3, 3), strides=2, **conv)
        self.norm2 = layers.InstanceNorm(2 * width, rngs=rngs, **impl)
        self.lrn = layers.CrossChannelNorm(5, alpha=1.0, beta=0.75, delta=1.0, **impl)
        self.conv3 = layers.Conv(2 * width, 2 * width, (3, 3), strides=2, **conv)
        self.norm3 = layers.BatchNorm(2 * width, momentum=0.9, rngs=rngs, **impl)
        self.head = layers.Dense(quarter * quarter * 2 * width, 10, rngs=rngs, **impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.contrast(x)
        x = jax.nn.relu(self.norm1(self.conv1(x)))
        x = self.lrn(jax.nn.relu(self.norm2(self.conv2(x))))
        x = jax.nn.relu(self.norm3(self.conv3(x)))
        return self.head(x)


# ---- training ------------------------------------------------------------------------------


def make_optimizer(model, learning_rate: float = 3e-3):
    """Adam on the model's parameters (``nnx.Param``; batch statistics are not trained)."""
    return nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)


@nnx.jit
def train_step(model: DigitsCNN, optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One jit-compiled training step: softmax cross-entropy, gradients (through the jaxmps
    gradient kernels), an optimizer update; parameters and batch statistics change in place.
    Returns the loss."""

    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _bound_step(model, optimizer) -> Callable:
    """``step(x, y) -> loss`` on this model and optimizer. ``nnx.cached_partial`` keeps NNX
    from walking the module graph on every call (about 1 ms a step for this small model)."""
    return nnx.cached_partial(train_step, model, optimizer)


@nnx.jit
def _predict(model, x):
    return jnp.argmax(model(x), axis=-1)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of `x` classified as `y`, with BatchNorm on its running statistics."""
    predicted = _predict(nnx.view(model, use_running_average=True), jnp.asarray(x))
    return float(np.mean(np.asarray(predicted) == y))


def batches(n: int, batch_size: int, rng: np.random.Generator,
            limit: Optional[int] = None) -> List[np.ndarray]:
    """Shuffled index batches of exactly `batch_size` (the remainder is dropped so one compiled
    step serves every batch), at most `limit` of them."""
    order = rng.permutation(n)
    out = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:limit] if limit else out


class ProgressBar:
    """A one-line progress bar redrawn in place on a terminal; elsewhere (pipes, logs,
    notebooks' captured output) it prints one line per epoch."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self, text: str) -> str:
        filled = self.width * self.done // max(self.total, 1)
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {text}"

    def step(self, text: str):
        self.done += 1
        if self.live:
            self.stream.write("\r" + self._line(text) + "\033[K")
            self.stream.flush()

    def epoch_end(self, text: str):
        if self.live:
            self.stream.write("\r" + self._line(text) + "\033[K\n")
        else:
            self.stream.write(self._line(text) + "\n")
        self.stream.flush()


@dataclasses.dataclass
class TrainResult:
    history: List[Dict]          # per epoch: epoch, loss (mean), test_accuracy, seconds
    step_losses: List[float]
    step_seconds: List[float]    # wall time of each step (the first one includes compilation)
    test_accuracy: float
    seconds: float


def train(model, data: Digits, *, epochs: int, batch_size: int, learning_rate: float = 3e-3,
          seed: int = 0, steps_per_epoch: Optional[int] = None,
          stream: Optional[TextIO] = None) -> TrainResult:
    """Trains `model` in place; evaluates held-out accuracy after every epoch."""
    optimizer = make_optimizer(model, learning_rate)
    step = _bound_step(model, optimizer)
    rng = np.random.default_rng(seed)
    n_steps = len(batches(len(data.y_train), batch_size, rng, steps_per_epoch))
    bar = ProgressBar(epochs * n_steps, stream)
    history, losses, times = [], [], []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_losses = []
        for idx in batches(len(data.y_train), batch_size, rng, steps_per_epoch):
            t0 = time.perf_counter()
            loss = float(step(jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])))
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            epoch_losses.append(loss)
            bar.step(f"epoch {epoch}/{epochs} loss {loss:.4f} {times[-1] * 1e3:.1f} ms/step")
        acc = accuracy(model, data.x_test, data.y_test)
        history.append(dict(epoch=epoch, loss=float(np.mean(epoch_losses)), test_accuracy=acc,
                            seconds=time.perf_counter() - start))
        bar.epoch_end(f"epoch {epoch}/{epochs} loss {history[-1]['loss']:.4f} "
                      f"held-out accuracy {acc:.3f}")
    return TrainResult(history, losses, times, history[-1]["test_accuracy"],
                       time.perf_counter() - start)


def median_step_seconds(step_seconds: Sequence[float]) -> Optional[float]:
    """Median step time, leaving out the first step (it includes compilation)."""
    steady = list(step_seconds[1:])
    return statistics.median(steady) if steady else None


@dataclasses.dataclass
class Comparison:
    native_losses: List[float]
    reference_losses: List[float]
    native_step_seconds: List[float]
    reference_step_seconds: List[float]
    max_relative_difference: float

    @property
    def agree(self) -> bool:
        return self.max_relative_difference <= LOSS_AGREEMENT


def compare_implementations(data: Digits, *, steps: int, batch_size: int, seed: int = 0,
                            width: int = 16, learning_rate: float = 3e-3) -> Comparison:
    """Trains two copies of one freshly initialised model for `steps` steps on the same
    batches, one on native kernels and one on the jnp reference, and compares the losses."""
    size = data.x_train.shape[1]
    runs = {}
    for implementation in ("native", "reference"):
        model = DigitsCNN(rngs=nnx.Rngs(seed), width=width, image_size=size,
                          implementation=None if implementation == "native" else "reference")
        step = _bound_step(model, make_optimizer(model, learning_rate))
        rng = np.random.default_rng(seed)
        idx = batches(len(data.y_train), batch_size, rng)
        losses, times = [], []
        for i in range(steps):
            b = idx[i % len(idx)]
            t0 = time.perf_counter()
            losses.append(float(step(jnp.asarray(data.x_train[b]), jnp.asarray(data.y_train[b]))))
            times.append(time.perf_counter() - t0)
        runs[implementation] = (losses, times)
    native, reference = runs["native"], runs["reference"]
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(native[0], reference[0]))
    return Comparison(native[0], reference[0], native[1], reference[1], diff)


# ---- command line --------------------------------------------------------------------------


class OptionError(ValueError):
    """A command-line option that cannot work with the data (reported, exit status 2)."""


BACKENDS = ("auto", "cpu", "cuda", "metal")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmps",
        description="Lists the jaxmps native backends, checks every native kernel against the "
                    "reference, then trains a small CNN of jaxmps layers on scikit-learn's "
                    "handwritten digits and compares native and reference kernels.")
    parser.add_argument("--epochs", type=_positive_int, default=6,
                        help="training epochs (default 6)")
    parser.add_argument("--batch-size", type=_positive_int, default=64,
                        help="images per step, at least 2 (default 64)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="where the kernels run: cpu (C++), cuda, metal (Apple GPU), or "
                             "auto (JAX's default device; Metal when available on a Mac)")
    parser.add_argument("--implementation", choices=("auto", "native", "reference"),
                        default="auto", help="kernels used for the main training run "
                                             "(default auto: native where available)")
    parser.add_argument("--compare-steps", type=_non_negative_int, default=8,
                        help="steps trained on both native and reference kernels to compare "
                             "losses (default 8; 0 skips the comparison)")
    parser.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                        help="cap on steps per epoch (default: the whole training set)")
    parser.add_argument("--learning-rate", type=_positive_float, default=3e-3,
                        help="Adam learning rate (default 3e-3)")
    parser.add_argument("--width", type=_positive_int, default=16,
                        help="channels of the first convolution (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-selfcheck", action="store_true",
                        help="skip the kernel self-check")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON report on stdout (progress goes to stderr)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and validates the command line (argparse exits with a message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("argument --batch-size: must be at least 2 (batch norm needs a batch), "
                     f"got {args.batch_size}")
    return args


def run(args: argparse.Namespace, log: TextIO) -> Dict:
    """Trains and compares as `args` say, printing to `log`; returns the report dict."""
    data = load_digits(seed=args.seed)
    if args.batch_size > len(data.y_train):
        raise OptionError(f"--batch-size must be at most the {len(data.y_train)} training "
                         f"images, got {args.batch_size}")
    print(f"data: scikit-learn digits upsampled to {data.x_train.shape[1]}x"
          f"{data.x_train.shape[2]}, {len(data.y_train)} training / {len(data.y_test)} "
          "held-out images", file=log)
    report: Dict = dict(data=dict(train=len(data.y_train), test=len(data.y_test),
                                  image_size=int(data.x_train.shape[1])))
    comparison = None
    if args.compare_steps:
        print(f"native vs reference: {args.compare_steps} steps from the same initial model",
              file=log)
        if not any(b.available for b in backends().values()):
            print("  (no native kernels here: both runs use the reference)", file=log)
        comparison = compare_implementations(data, steps=args.compare_steps,
                                             batch_size=args.batch_size, seed=args.seed,
                                             width=args.width,
                                             learning_rate=args.learning_rate)
        for i, (a, b) in enumerate(zip(comparison.native_losses,
                                       comparison.reference_losses), 1):
            print(f"  step {i}: native loss {a:.6f}  reference loss {b:.6f}", file=log)
        verdict = "agree" if comparison.agree else "DISAGREE"
        print(f"  losses {verdict}: max relative difference "
              f"{comparison.max_relative_difference:.2e} (limit {LOSS_AGREEMENT:.0e})", file=log)
    print(f"training {args.epochs} epochs, batch {args.batch_size}, implementation "
          f"{args.implementation}", file=log)
    # The implementation goes into the layers (part of the compiled graph's static structure),
    # not through use_implementation(): a jit cache entry traced with another default would
    # otherwise be reused.
    model = DigitsCNN(rngs=nnx.Rngs(args.seed), width=args.width,
                      image_size=data.x_train.shape[1],
                      implementation=None if args.implementation == "auto"
                      else args.implementation)
    result = train(model, data, epochs=args.epochs, batch_size=args.batch_size,
                   learning_rate=args.learning_rate, seed=args.seed,
                   steps_per_epoch=args.steps_per_epoch, stream=log)
    step_time = median_step_seconds(result.step_seconds)
    report.update(
        epochs=args.epochs, batch_size=args.batch_size, implementation=args.implementation,
        steps=len(result.step_losses), train_seconds=result.seconds,
        history=result.history, test_accuracy=result.test_accuracy,
        target_accuracy=TARGET_ACCURACY,
        reached_target=result.test_accuracy >= TARGET_ACCURACY,
        step_ms=dict(train=_ms(step_time)))
    if comparison is not None:
        report["step_ms"].update(native=_ms(median_step_seconds(comparison.native_step_seconds)),
                                 reference=_ms(median_step_seconds(
                                     comparison.reference_step_seconds)))
        report["comparison"] = dict(
            steps=len(comparison.native_losses), native_losses=comparison.native_losses,
            reference_losses=comparison.reference_losses,
            max_relative_difference=comparison.max_relative_difference,
            limit=LOSS_AGREEMENT, agree=comparison.agree)
    return report


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3
