"""The config keys a resume changes without asking; any other change needs `--allow-config-change`.

They change how a run is watched, saved, sped up or how long it goes on, not what its checkpoints so
far mean. A key ending in "." is a whole section. They live apart from the run folder's code so that
`kosmos train --help` lists them without importing the trainer.
"""

FREE_ON_RESUME = (
    "train.max_steps",
    "train.log_interval",
    "train.max_nonfinite_steps",
    "train.init_from",
    "train.compile",
    "train.threads",
    "train.eval_interval",
    "train.spike.",
    # What the validation loss is measured on (the held-out share is not free: it decides what is
    # trained on).
    "data.validation.corpora",
    "data.validation.rows",
    "checkpoint.",
    "logging.",
    "deepspeed.activation_checkpointing",
    # The loader's processes and reading: the saved positions regroup onto any number of workers.
    "data.num_workers",
    "data.cache_mb",
    "data.cache_dir",
    "data.read_retry_s",
    "data.read_timeout_s",
    "data.max_skip_fraction",
)


def free_keys_listed() -> str:
    """The keys as messages list them, a section as `section.*`."""
    return ", ".join(k + "*" if k.endswith(".") else k for k in FREE_ON_RESUME)
