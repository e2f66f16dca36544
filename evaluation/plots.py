"""PNG plots for evaluate.py: metric bars against reference numbers, and training curves read back from
the run's TensorBoard event files (read directly: TFRecord framing + the Event protocol buffer). Plotting
needs matplotlib, the `plots` extra; reading the event files does not."""

from __future__ import annotations

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or ImportError saying which extra installs it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'homegen[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of `logdir`, as (step, value) sorted by step."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            while header := f.read(12):  # uint64 length + uint32 crc of the length
                if len(header) < 12:
                    break
                (length,) = struct.unpack("<Q", header[:8])
                data = f.read(length)
                f.read(4)  # crc of the data
                if len(data) < length:
                    break  # a record still being written
                event = event_pb2.Event.FromString(data)
                for value in event.summary.value:
                    series.setdefault(value.tag, {})[event.step] = value.simple_value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_training_curves(logdir: str, path: str, tags: tuple[str, ...]) -> bool:
    """One panel per tag found; returns False when the run has no such scalars."""
    scalars = read_scalars(logdir)
    found = [t for t in tags if t in scalars]
    if not found:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.5), squeeze=False)
    for ax, tag in zip(axes[0], found):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_bars(groups: dict[str, dict[str, float]], metrics: list[str], title: str, path: str) -> None:
    """Grouped bars: one group per metric, one bar per system (e.g. homegen vs TIGER)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 3, 3.8))
    width = 0.8 / max(len(groups), 1)
    for k, (name, values) in enumerate(groups.items()):
        xs = [m + k * width for m in range(len(metrics))]
        ax.bar(xs, [values.get(m, 0.0) for m in metrics], width, label=name)
    ax.set_xticks([m + width * (len(groups) - 1) / 2 for m in range(len(metrics))], metrics)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
