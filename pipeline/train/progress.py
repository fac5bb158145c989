"""The console's one line per epoch, printed by the rank-0 training worker."""

from __future__ import annotations


def progress_line(history: list[dict[str, float]], epochs: int) -> str:
    """`epoch i/N` with train loss, train and val top-1 error, lr, images/s and the time
    left (the mean epoch time so far times the epochs to go).

    Args:
        history: Every epoch's metrics so far, the newest last.
        epochs: The epochs the run trains at most (train.epochs).
    """
    m = history[-1]
    mean_s = sum(h["epoch_time_s"] for h in history) / len(history)
    left = int(mean_s * (epochs - int(m["epoch"])))
    return (
        f"epoch {int(m['epoch'])}/{epochs}  train loss {m['train_loss']:.4f}  top-1 error train "
        f"{m['train_top1_error']:.2%} val {m['val_top1_error']:.2%}  lr {m['lr']:.5g}  "
        f"{m['images_per_s']:.0f} img/s  {left // 60}m{left % 60:02d}s left"
    )
