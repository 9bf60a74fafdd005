"""One sweep trial: the Ray Tune function trainable that runs a fine-tuning job.

It lives in its own importable module because `python -m finetune.tune` makes the sweep's module `__main__`, and
Ray pickles a `__main__` function by value with all its globals; from here it goes by reference.
"""

from __future__ import annotations

import json


def train_driver_fn(config: dict, context: dict) -> None:
    """Tune function trainable: build this trial's config (`config["params"]`, the sampled keys, over the sweep's
    `context`), run the fine-tuning job, report every epoch to Tune through TuneReportCallback (the Ray Train V2
    pattern)."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from finetune.train import run_finetune
    from finetune.tune import trial_config

    ray.data.DataContext.get_current().enable_progress_bars = False  # Tune's trial table reports progress
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(context["base"], config["params"])
    cfg.run.name = f"trial_{trial_id}"
    cfg.run.output_dir = context["trials_dir"]  # local scratch of whichever node runs the trial
    cfg.run.storage_path = context["trials_storage"]  # checkpoints, summary.json, export: shared
    cfg.run.num_workers = max(1, cfg.run.num_workers)  # local mode bypasses Train callbacks: Tune would see nothing
    cfg.tracking.run_name = f"{context['sweep']}-{trial_id}"
    cfg.tracking.tracking_uri, cfg.tracking.experiment = context["tracking_uri"], context["experiment"]
    tags = {"camae.sweep": context["sweep"], "camae.trial": trial_id,
            **{f"camae.param.{k}": json.dumps(v) for k, v in config["params"].items()}}
    run_finetune(cfg, parent_run_id=context["parent_run_id"], callbacks=[TuneReportCallback()], tags=tags)
