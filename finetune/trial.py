"""One sweep trial: the Ray Tune function trainable that runs a fine-tuning job.

It lives in its own importable module because `python -m finetune.tune` makes the sweep's module `__main__`, and
Ray pickles a `__main__` function by value with all its globals; from here it goes by reference.
"""

from __future__ import annotations

import json

from ray.tune import Callback


def train_driver_fn(config: dict, context: dict) -> None:
    """Tune function trainable: build this trial's config (`config["params"]`, the sampled keys, over the sweep's
    `context`), run the fine-tuning job, report every epoch to Tune through TuneReportCallback (the Ray Train V2
    pattern)."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from finetune.train import run_finetune
    from finetune.tune import trial_config, trial_name

    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's trial table reports progress
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(context["base"], config["params"])
    cfg.run.name = f"trial_{trial_id}"
    cfg.run.output_dir = context["trials_dir"]  # local scratch of whichever node runs the trial
    cfg.run.storage_path = context["trials_storage"]  # checkpoints, summary.json, export: shared
    cfg.run.num_workers = max(1, cfg.run.num_workers)  # local mode bypasses Train callbacks: Tune would see nothing
    cfg.tracking.run_name = trial_name(config["params"], trial_id, context.get("numbered", False))
    cfg.tracking.tracking_uri, cfg.tracking.experiment = context["tracking_uri"], context["experiment"]
    tags = {"camae.sweep": context["sweep"], "camae.trial": trial_id,
            **{f"camae.param.{k}": json.dumps(v) for k, v in config["params"].items()}}
    run_finetune(cfg, parent_run_id=context["parent_run_id"], callbacks=[TuneReportCallback()], tags=tags,
                 progress=False)


class SweepProgress(Callback):
    """The sweep's terminal on the driver: one progress display over all trials' epochs (img/s, time left), and
    one line per trial when it ends: its best epoch, and its held-out test accuracy or why it has none."""

    def __init__(self, epochs: int, trials: int, numbered: bool, trials_storage: str):
        self.epochs, self.trials, self.numbered, self.trials_storage = epochs, trials, numbered, trials_storage
        self.progress, self.counted = None, False

    def __getstate__(self):  # saved with the Tuner's RunConfig: a restored sweep starts a new display
        return self.__dict__ | {"progress": None, "counted": False}

    def setup(self, **info) -> None:
        from camae.console import Progress

        self.progress = Progress(self.trials * self.epochs, "epochs (all trials)")

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        """Once: a resumed sweep shows only what is left (its finished trials' epochs and the epochs its
        unfinished trials already ran are off the total)."""
        if not self.counted:
            self.counted = True
            self.progress.shrink(sum(self.epochs if t.status == "TERMINATED" else
                                     int((t.last_result or {}).get("epoch", 0)) for t in trials))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self.progress.update(1, result.get("train/images_per_s"))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        from finetune.tune import trial_name

        last = trial.last_result or {}
        done = int(last.get("epoch", 0))
        self.progress.shrink(self.epochs - done)
        name = trial_name(trial.config["params"], trial.trial_id, self.numbered)
        self.progress.write(f"{name}: {self._outcome(trial.trial_id, done)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        from finetune.tune import trial_name

        self.progress.write(f"{trial_name(trial.config['params'], trial.trial_id, self.numbered)}: FAILED "
                            f"({trial.error_file or 'see the trial log'})")

    def on_experiment_end(self, trials: list, **info) -> None:
        self.progress.close()

    def _outcome(self, trial_id: str, done: int) -> str:
        from camae import storage

        summary_file = storage.join(self.trials_storage, f"trial_{trial_id}", "summary.json")
        if done < self.epochs or not storage.exists(summary_file):
            return f"stopped by ASHA after epoch {done}"
        s = json.loads(storage.read_text(summary_file))
        test = f", test/accuracy {s['test/accuracy']:.3f}" if "test/accuracy" in s else ""
        return f"best epoch {s['best_epoch']}: val/accuracy {s['best/val/accuracy']:.3f}{test}"
