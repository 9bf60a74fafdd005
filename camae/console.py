"""What a job prints: camae's own lines, one progress display, and Ray's logs kept in files unless --verbose.

Quiet by default: Ray's workers, actors and Ray Data write to the session's log files (`ray_logs()` says where)
instead of the terminal, and the job shows one progress display (a bar on a TTY, one line per epoch otherwise).
`--verbose` (or CAMAE_VERBOSE=1, which a job's subprocesses inherit) brings Ray's output back.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

VERBOSE_ENV = "CAMAE_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def setup(is_verbose: bool = False) -> None:
    """Logging for a job's entry point: camae's INFO lines as `[camae...] ...`; Ray's own loggers at ERROR and
    MLflow's at WARNING (INFO with --verbose); Python warnings from Ray's modules, and deprecation and future
    warnings from any library, only with --verbose."""
    import warnings

    if is_verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    logging.getLogger("ray").setLevel(logging.INFO if verbose() else logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose() else logging.WARNING)
    if not verbose():
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_ray_data() -> None:
    """Ray Data logs each dataset's plan and progress to the console at INFO from the driver too (its own logging
    config, set when ray.data is imported): keep those in its file (ray-data.log) unless --verbose."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose()
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.INFO if verbose() else logging.WARNING)


def ray_logs() -> str:
    """The running Ray session's log directory (on this node)."""
    import ray

    return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")


def say(message: str) -> None:
    """One line of the job's own output (above the progress bar, if one is shown)."""
    if Progress.current is not None:
        Progress.current.write(message)
    else:
        print(f"[camae] {message}", flush=True)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Epochs done of `total`, with images/s and the time left: a tqdm bar on a TTY, else a line per epoch."""

    current: Progress | None = None

    def __init__(self, total: int, label: str = "epochs", stream=None):
        self.total, self.label, self.done, self.start = max(total, 0), label, 0, time.monotonic()
        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="epoch", desc=f"[camae] {label}", file=self.stream,
                            dynamic_ncols=True, bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}"
                                                           "{postfix}]")
        Progress.current = self

    def update(self, n: int = 1, images_per_s: float | None = None, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(f"{images_per_s:.0f} img/s" if images_per_s else "", refresh=False)
            self.bar.update(n)
            return
        rate = f"  {images_per_s:.0f} img/s" if images_per_s else ""
        left = (time.monotonic() - self.start) / self.done * (self.total - self.done) if self.done else 0.0
        print(f"[camae] {self.label} {self.done}/{self.total}{rate}  ETA {duration(left)}"
              f"{'  ' + note if note else ''}", flush=True)

    def shrink(self, n: int) -> None:
        """n epochs will not run (a trial stopped early)."""
        self.total = max(self.done, self.total - n)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[camae] {message}", file=self.stream)
        else:
            print(f"[camae] {message}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        Progress.current = None


class FollowRun:
    """Progress of one MLflow run, read from the store every `interval` s in a thread: the run's `epoch` metric
    is logged once an epoch is committed (with its checkpoint), wherever the workers run. A context manager."""

    def __init__(self, tracking_uri: str, run_id: str, epochs: int, interval: float = 1.0):
        self.uri, self.run_id, self.epochs, self.interval = tracking_uri, run_id, epochs, interval
        self.stop = threading.Event()

    def __enter__(self):
        self.progress = Progress(self.epochs)
        self.thread = threading.Thread(target=self._poll, name="camae-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self._read()
        self.progress.close()

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            self._read()

    def _read(self) -> None:
        from mlflow.tracking import MlflowClient

        try:
            metrics = MlflowClient(self.uri).get_run(self.run_id).data.metrics
        except Exception:  # noqa: BLE001 -- a slow or restarting store only delays the display
            return
        epoch = int(metrics.get("epoch", 0))
        if epoch > self.progress.done:
            note = f"val/accuracy {metrics['val/accuracy']:.3f}" if "val/accuracy" in metrics else ""
            self.progress.update(epoch - self.progress.done, metrics.get("train/images_per_s"), note)
