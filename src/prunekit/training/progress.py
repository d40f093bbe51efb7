"""Progress output of the training loop and optional TensorBoard logging.

:func:`make_progress` gives a ``tqdm`` bar (per step, with rate and ETA) when stderr is a terminal,
and otherwise (log files, ``nohup``, CI) a :class:`PlainProgress` that prints one line every
``every_s`` seconds and/or every ``every_steps`` steps::

    [retrain] step 120/500 (24.0%)  3.21 it/s  elapsed 37s  ETA 1m58s  loss=0.1234

``PRUNEKIT_NO_PROGRESS=1`` silences both.  Both objects offer the tqdm methods the loop uses
(``update``, ``set_postfix``, ``write``, ``close``).

:class:`TensorBoardLogger` is a loop hook writing ``<phase>/loss``, ``<phase>/lr`` and
``<phase>/sparsity`` per step and every evaluated metric (``<phase>/eval/<key>``) with
``torch.utils.tensorboard.SummaryWriter`` (recipe ``log.tensorboard: true`` → ``out_dir/tb``).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from prunekit.algorithms.hooks import Hook
from prunekit.core.errors import RecipeError
from prunekit.training.config import Runtime

__all__ = ["make_progress", "PlainProgress", "TensorBoardLogger", "quiet", "format_seconds"]


def quiet() -> bool:
    return os.environ.get("PRUNEKIT_NO_PROGRESS") == "1"


def format_seconds(s: float) -> str:
    s = int(max(0, round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class PlainProgress:
    """A progress line at a fixed interval (seconds and/or steps) for non-terminal output."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", every_s: float = 30.0,
                 every_steps: int = 0, stream=None, clock=time.monotonic):
        self.total, self.n, self.desc = int(total), int(initial), desc
        self.every_s, self.every_steps = float(every_s or 0), int(every_steps or 0)
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = self.last = clock()
        self.n0 = self.n
        self.postfix: dict = {}
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        due_s = self.every_s > 0 and now - self.last >= self.every_s
        due_n = self.every_steps > 0 and self.n % self.every_steps == 0
        if due_s or due_n or (self.n == self.total and self.lines):
            self.emit(now)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        dt = max(now - self.t0, 1e-9)
        rate = (self.n - self.n0) / dt
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = format_seconds((self.total - self.n) / rate) if rate > 0 else "?"
        extra = "".join(f"  {k}={v}" for k, v in self.postfix.items())
        return (f"[{self.desc}] step {self.n}/{self.total} ({pct:.1f}%)  {rate:.2f} it/s  "
                f"elapsed {format_seconds(dt)}  ETA {eta}{extra}")

    def emit(self, now: float | None = None) -> None:
        self.last = self.clock() if now is None else now
        print(self.line(self.last), file=self.stream, flush=True)
        self.lines += 1

    def set_postfix(self, **kw) -> None:
        self.postfix = {k: str(v) for k, v in kw.items()}

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _Silent(PlainProgress):
    def emit(self, now=None) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)   # evaluation lines still go out


def make_progress(total: int, initial: int, desc: str, runtime: Runtime | None = None):
    """A tqdm bar on a terminal, a :class:`PlainProgress` otherwise (see module doc)."""
    rt = runtime or Runtime()
    if quiet():
        return _Silent(total, initial, desc)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, unit="step")
    return PlainProgress(total, initial, desc, every_s=rt.progress_every_s, every_steps=rt.progress_every_steps)


class TensorBoardLogger(Hook):
    """Loop hook: loss, learning rate and sparsity per step, evaluated metrics per evaluation."""

    def __init__(self, log_dir: str | os.PathLike, offsets: dict[str, int] | None = None,
                 base: Callable[[], int] | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (optional dependency)
        except ImportError as e:
            raise RecipeError(f"log.tensorboard: true needs the tensorboard package (pip install tensorboard): {e}") from None
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.offsets = dict(offsets or {})
        self.base = base                         # steps of the run before this fit (the runner's count)
        self._sparsity: tuple[int, float] | None = None

    def _step(self, ctx) -> int:
        return (self.base() if self.base is not None else self.offsets.get(ctx.phase, 0)) + ctx.step

    def after_step(self, ctx) -> None:
        step, tag = self._step(ctx), ctx.phase or "train"
        loss = getattr(ctx, "loss", None)
        if loss is not None:
            self.writer.add_scalar(f"{tag}/loss", float(loss), step)
        self.writer.add_scalar(f"{tag}/lr", float(ctx.optimizer.param_groups[0]["lr"]), step)
        if ctx.masks is not None and len(ctx.masks):
            self.writer.add_scalar(f"{tag}/sparsity", 100.0 * ctx.masks.sparsity(), step)

    def evaluated(self, ctx, metrics: dict) -> None:
        step, tag = self._step(ctx), ctx.phase or "train"
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "examples"):
                self.writer.add_scalar(f"{tag}/eval/{k}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
