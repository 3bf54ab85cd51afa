"""MultiDigits: a MultiMNIST-style multitask benchmark from scikit-learn's digits.

scikit-learn ships 1,797 handwritten digits (8x8 pixels, ``load_digits``; no
download). As in MultiMNIST, each example overlays two digits on a larger
canvas: the *left* digit is pasted near the top-left corner and the *right*
digit near the bottom-right corner of a 12x12 canvas, each shifted by a random
0-2 pixels, and overlapping pixels take the maximum. The two digits overlap on
about a third of the canvas. The 1,797 digits are first split 60/20/20 into
train/validation/test pools, and each split's pairs use only its own pool, so
no test digit is ever seen in training.

Two variants on the same images:

- ``pair``: 2 tasks, the 10-way class of the left and of the right digit
  (MultiMNIST's tasks).
- ``many``: 12 binary tasks: "digit d is present" for d = 0..9, "left > right"
  and "left + right >= 10".

Every method of :mod:`benchmarks._mtl_bench` trains the same MLP on them.

Run (the tables in ``docs/benchmarks/multidigits.md``)::

    python -m benchmarks.multidigits --out DIR   # full settings
    python -m benchmarks.multidigits --quick     # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from sklearn.datasets import load_digits

from benchmarks import _mtl_bench as mtl

CANVAS = 12
DIGIT = 8
MAX_SHIFT = 2
VARIANTS = ("pair", "many")
MANY_TASK_NAMES = tuple(f"has {d}" for d in range(10)) + ("L>R", "L+R≥10")
DOCS_PATH = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks", "multidigits.md")


def overlay_pairs(
    rng: np.random.Generator, images: np.ndarray, left: np.ndarray, right: np.ndarray
) -> np.ndarray:
    """Pastes ``images[left]`` top-left and ``images[right]`` bottom-right, shifted.

    Args:
      rng: draws the shifts.
      images: ``(m, 8, 8)`` digits with values in [0, 1].
      left, right: ``(n,)`` indices into ``images``.

    Returns:
      ``(n, 12, 12)`` float32 canvases (pixel-wise maximum of the two digits).
    """
    n = len(left)
    canvas = np.zeros((n, CANVAS, CANVAS), np.float32)
    far = CANVAS - DIGIT  # the right digit's corner before its shift
    shifts = rng.integers(0, MAX_SHIFT + 1, size=(n, 4))
    for i in range(n):
        r, c = shifts[i, 0], shifts[i, 1]
        canvas[i, r : r + DIGIT, c : c + DIGIT] = images[left[i]]
        r, c = far - shifts[i, 2], far - shifts[i, 3]
        window = canvas[i, r : r + DIGIT, c : c + DIGIT]
        np.maximum(window, images[right[i]], out=window)
    return canvas


def task_labels(variant: str, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``(n, k)`` int32 labels of the tasks of ``variant`` from the two digit classes."""
    if variant == "pair":
        return np.stack([left, right], axis=1).astype(np.int32)
    if variant == "many":
        present = [(left == d) | (right == d) for d in range(10)]
        attributes = [left > right, left + right >= 10]
        return np.stack(present + attributes, axis=1).astype(np.int32)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")


def split_pools(num_images: int, data_seed: int = 0) -> dict[str, np.ndarray]:
    """Splits digit indices 60/20/20 into disjoint train/val/test pools."""
    order = np.random.default_rng(data_seed).permutation(num_images)
    cut1, cut2 = int(0.6 * num_images), int(0.8 * num_images)
    return {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}


def make_pairs(
    sizes: dict[str, int], data_seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Two-digit images of each split and the classes of their two digits.

    Args:
      sizes: number of examples of each split (keys ``train``, ``val``, ``test``).
      data_seed: seed of the pool split, the pairing and the shifts.

    Returns:
      For each split, ``(x, left, right)``: ``(n, 144)`` float32 flattened
      canvases in [0, 1] and the ``(n,)`` classes of the left and right digits.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    classes = digits.target.astype(np.int64)
    pools = split_pools(len(images), data_seed)
    # A different stream from the pool split's, for the pairs and the shifts.
    rng = np.random.default_rng([data_seed, 1])
    pairs = {}
    for split, pool in pools.items():
        left = rng.choice(pool, size=sizes[split])
        right = rng.choice(pool, size=sizes[split])
        x = overlay_pairs(rng, images, left, right).reshape(sizes[split], -1)
        pairs[split] = (x, classes[left], classes[right])
    return pairs


def load_multidigits(
    variant: str = "pair",
    num_train: int = 8000,
    num_val: int = 2000,
    num_test: int = 2000,
    data_seed: int = 0,
) -> mtl.Benchmark:
    """Builds MultiDigits (deterministic given the sizes and ``data_seed``).

    The same images (and digit pairs) are produced for both variants; only the
    labels differ.

    Args:
      variant: ``"pair"`` (2 ten-way tasks) or ``"many"`` (12 binary tasks).
      num_train, num_val, num_test: number of two-digit examples per split.
      data_seed: seed of the pool split, the pairing and the shifts.

    Returns:
      A :class:`benchmarks._mtl_bench.Benchmark` with flattened 144-pixel inputs.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    pairs = make_pairs({"train": num_train, "val": num_val, "test": num_test}, data_seed)
    arrays = {
        split: (x, task_labels(variant, left, right)) for split, (x, left, right) in pairs.items()
    }
    if variant == "pair":
        names, kind, num_classes = ("left", "right"), "multiclass", 10
    else:
        names, kind, num_classes = MANY_TASK_NAMES, "binary", 1
    description = (
        f"MultiDigits-{variant}: two scikit-learn digits (8x8) overlaid on a 12x12 "
        "canvas (left digit top-left, right digit bottom-right, each shifted by 0-2 "
        "pixels, pixel-wise max), digits split 60/20/20 into train/validation/test "
        "pools before pairing. "
        + (
            "Tasks: the 10-way class of the left and of the right digit."
            if variant == "pair"
            else "Tasks: 12 binary labels: digit d present (d = 0..9), left > right, "
            "left + right >= 10. Metric: accuracy (the presence tasks have about 19% "
            "positives)."
        )
    )
    return mtl.Benchmark(
        name=f"multidigits-{variant}",
        task_names=names,
        kind=kind,
        num_classes=num_classes,
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_val=arrays["val"][0],
        y_val=arrays["val"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        description=description,
    )


FULL = dict(num_train=6000, num_val=2000, num_test=2000)
QUICK = dict(num_train=512, num_val=128, num_test=128)


def main(argv: list[str] | None = None) -> dict[str, mtl.Summary]:
    """Runs the MultiDigits comparison and prints (and optionally writes) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mtl.add_common_arguments(parser, DOCS_PATH)
    parser.add_argument("--variant", choices=VARIANTS + ("both",), default="both")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    sizes = QUICK if args.quick else FULL
    cfg = mtl.TrainConfig(
        hidden=(32,) if args.quick else (128, 128),
        epochs=args.epochs or (2 if args.quick else 20),
        # Chosen from {1e-3, 3e-3, 1e-2} in a preliminary run of STL, LS and FAMO:
        # 1e-3 leaves the models underfit after 20 epochs (cosine decay).
        learning_rate=args.lr or 1e-2,
        batch_size=64 if args.quick else 128,
        num_seeds=args.seeds or (2 if args.quick else 3),
        compile_options=mtl.QUICK_COMPILE_OPTIONS if args.quick else None,
        task_gradients=args.gradients,
    )
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    command = " ".join(["python -m benchmarks.multidigits", *argv])
    summaries, sections = {}, []
    clock = mtl.RunClock()
    for variant in variants:
        bench = load_multidigits(variant, **sizes)
        summary = mtl.run_benchmark(
            bench, cfg, args.methods, args.gamma, ablation_gammas=mtl.ablation_gammas(args)
        )
        summaries[variant] = summary
        sections.append(mtl.report(summary, command, f"MultiDigits-{variant}"))
    text = "\n\n".join(sections) + f"\n\n{clock.summary()}\n"
    print("\n" + text)
    mtl.write_markdown(args, DOCS_PATH, "MultiDigits", text)
    return summaries


if __name__ == "__main__":
    main()
