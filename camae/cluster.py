"""Ray at the edges: joining the cluster and the checks every job makes before any worker starts.

A job started by `ray job submit` (or with $RAY_ADDRESS set) joins that cluster; otherwise a local one starts.
Before training, the driver checks what a multi-node cluster breaks silently: CPUs left for Ray Data, a storage
location every node can read (camae.storage.check_shared) and an MLflow store every node can reach.
"""

from __future__ import annotations

import os

from camae.config import ConfigError

FORWARDED = ("AWS_", "GOOGLE_", "AZURE_", "MLFLOW_TRACKING_")  # credentials and endpoints every node needs


def connect() -> None:
    """Join the cluster named by $RAY_ADDRESS (set by `ray job submit`), else start a local one. A driver started
    outside `ray job submit` (`camae finetune` with RAY_ADDRESS set) hands its object-store and MLflow credentials
    (FORWARDED variables) to every worker through the runtime env, as `--runtime-env-json` does for a job.

    Quiet unless --verbose (camae.console): workers' and actors' output stays in the session's log files. A local
    cluster's processes are told its dashboard (RAY_API_SERVER_ADDRESS): Ray Train's PlacementGroupCleaner asks the
    state API whether its controller lives, and without an address that API looks for "the" local cluster and
    fails with a traceback ("Found multiple active Ray instances") whenever another one runs on the machine.

    Ray Train workers and Tune trials stay in the job's working directory (RAY_CHDIR_TO_TRIAL_DIR=0, which Tune
    hands on to its trials): by default each changes into a scratch directory of its own, and a relative path in
    a config (the quickstart's `models/quickstart-mae`) would then name nothing. Relative paths mean the same
    everywhere: the repository locally, the unpacked `--working-dir` under `ray job submit`."""
    import logging

    import ray
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from camae.console import quiet_ray_data, verbose

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # read where trainers and trials are made
    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    in_job = RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ  # a job's own runtime env already carries them
    local = os.environ.get("RAY_ADDRESS", "local") == "local" and not in_job
    options = {}
    if local:
        options["dashboard_port"] = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{options['dashboard_port']}"
    ray.init(log_to_driver=verbose(), logging_level=logging.INFO if verbose() else logging.ERROR,
             runtime_env={"env_vars": env} if env and not in_job else None, **options)
    quiet_ray_data()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def check_cpus(workers: int, cpus_per_worker: float, key: str = "run") -> None:
    """Ray Data needs CPUs of its own: if training workers take them all, fit() hangs without an error."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = workers * cpus_per_worker
    if taken >= total:
        raise ConfigError(f"{key}.num_workers x {key}.cpus_per_worker = {taken:g} CPUs, but the Ray cluster has "
                          f"{total:g}: Ray Data needs at least one CPU left to decode images; lower them (or start "
                          "the nodes with more logical CPUs, `ray start --num-cpus N`)")


def check_outputs(storage_path: str, tracking_uri: str, storage_key: str = "run.storage_path") -> None:
    """On a multi-node cluster, the job's storage and (a SQLite) MLflow store must be visible from every node; an
    MLflow server must answer (on any cluster)."""
    from camae import storage
    from camae.tracking import check_tracking

    check_tracking(tracking_uri)
    multi_node = len(alive_nodes()) > 1
    if not multi_node and not storage.is_uri(storage_path):
        return  # one node: a local path is shared by definition (object stores are still checked below)
    storage.check_shared(storage_path, storage_key)
    if tracking_uri.startswith("sqlite:///") and multi_node:
        db_dir = os.path.dirname(tracking_uri.removeprefix("sqlite:///"))
        try:
            storage.check_shared(db_dir, "tracking.tracking_uri")
        except ConfigError as err:
            raise ConfigError(f"tracking.tracking_uri={tracking_uri} is a SQLite file that workers on other nodes "
                              "cannot reach; start an MLflow server (`mlflow server --serve-artifacts ...`) and set "
                              "tracking.tracking_uri=http://HOST:PORT") from err


def user_error(err: BaseException) -> BaseException | None:
    """The camae error (bad data or config: a ValueError of a camae module) that made a Ray task fail, or None.
    Ray Data hands the driver a RayTaskError(UserCodeException) whose cause no longer holds the original exception,
    only its traceback text: the error is rebuilt from its last `camae.<module>.<Class>: message` line."""
    import importlib
    import re

    found = re.findall(r"^(camae(?:\.\w+)+)\.(\w+): (.+)$", str(err), flags=re.MULTILINE)
    if not found:
        return None
    module, name, message = found[-1]
    cls = getattr(importlib.import_module(module), name, None)
    return cls(message) if isinstance(cls, type) and issubclass(cls, ValueError) else None
