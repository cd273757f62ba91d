"""Training configuration: one YAML file with a section per component.

```
model: ../model/tiny.yaml      # a ModelConfig, inline or the path of its own YAML file
tokenizer: sample/tokenizer.model
data: {...}                    # kosmos.data.DataConfig
train: {max_steps, seed, log_interval, ...}
optimizer: {lr, betas, eps, weight_decay, warmup_steps, grad_clip}
checkpoint: {interval, keep}
deepspeed: {zero_stage, offload, bf16, activation_checkpointing, extra}
logging: {tensorboard, wandb_project, progress_bar, peak_tflops}
```

`load_train_config` checks keys, types and values; `check_inputs` then checks the files the config
names (tokenizer, corpora). Both run before any compute, every error names its dotted key, and each
reports all the problems it finds at once. A relative path in the file is relative to the file (see
`kosmos.config.PATH`); loading makes every path absolute.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kosmos import config as config_io
from kosmos.config import ConfigError
from kosmos.data.config import DataConfig
from kosmos.model import ModelConfig


@dataclass
class SpikeConfig:
    """Loss-spike rollback (kosmos.train.spike): back to the last checkpoint, past the data read since."""

    enabled: bool = False
    # A step whose loss is over `factor` x the mean loss of the last `window` steps is a spike (judged
    # once `window` steps are in; spikes and non-finite steps are left out of the mean).
    factor: float = 1.5
    window: int = 100
    # This many spikes in a row (or train.max_nonfinite_steps non-finite steps) roll the run back.
    consecutive: int = 1
    # Rollbacks over the whole run; the next one stops training with an error instead.
    max_rollbacks: int = 3

    def validate(self, prefix: str) -> None:
        if self.factor <= 1:
            raise ConfigError(f"{prefix}.factor: must be over 1")
        for name in ("window", "consecutive"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be at least 1")
        if self.max_rollbacks < 0:
            raise ConfigError(f"{prefix}.max_rollbacks: must not be negative")


@dataclass
class LoopConfig:
    max_steps: int = 1000
    seed: int = 1234
    log_interval: int = 10
    # A run of this many consecutive non-finite steps (loss or gradient) stops training (or, with
    # `spike`, rolls it back).
    max_nonfinite_steps: int = 5
    # Start from the weights of a run folder or checkpoint (fine-tuning); optimizer, schedule and
    # data position start fresh. Ignored once the run has checkpoints of its own (it resumes).
    init_from: str | None = field(default=None, metadata=config_io.PATH)
    # torch.compile each decoder layer (fuses its element-wise work; compiled once, on the first step).
    compile: bool = False
    # Repeatable on a GPU: deterministic algorithms only (kosmos.train.state.use_deterministic_algorithms).
    deterministic: bool = False
    # Intra-op threads of each training process (default: its cores less one per loader worker;
    # kosmos.threads).
    threads: int | None = None
    # The validation loss on `data.validation` every this many steps, and at the end (0: at the end only).
    eval_interval: int = 0
    spike: SpikeConfig = field(default_factory=SpikeConfig)

    def validate(self, prefix: str) -> None:
        for name in ("max_steps", "log_interval", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{prefix}.threads: must be at least 1 (or null: chosen from the cores)")
        if self.eval_interval < 0:
            raise ConfigError(f"{prefix}.eval_interval: must not be negative")


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then linear decay to zero at `train.max_steps` (docs/training.md)."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    # Not applied to biases, norms or the connector's latent queries.
    weight_decay: float = 0.01
    warmup_steps: int = 375
    grad_clip: float = 2.0

    def validate(self, prefix: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: expected two numbers in [0, 1), got {list(self.betas)}")
        for name in ("lr", "eps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must not be negative")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps: must not be negative")


@dataclass
class CheckpointConfig:
    interval: int = 1000
    keep: int = 3

    def validate(self, prefix: str) -> None:
        if self.interval < 1:
            raise ConfigError(f"{prefix}.interval: must be at least 1")
        if self.keep < 1:
            raise ConfigError(f"{prefix}.keep: must be at least 1")


@dataclass
class DeepSpeedConfig:
    """What selects and adjusts the stock DeepSpeed configs in `kosmos/configs/deepspeed/`."""

    zero_stage: int = 2
    # ZeRO-Offload: optimizer state (stage 2) or optimizer state and parameters (stage 3) in host memory.
    offload: bool = False
    # "auto": bf16 on GPUs that support it, fp32 everywhere else.
    bf16: Literal["auto"] | bool = "auto"
    # true: every decoder layer recomputes its activations in the backward pass; a number N: the
    # first N layers only (`kosmos bench train --memory` finds how many a micro-batch needs).
    activation_checkpointing: bool | int = False
    # Merged last into the generated DeepSpeed config, for settings not covered above.
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        # Stage 0 is left out on purpose: only DeepSpeed's ZeRO optimizers skip a step whose
        # gradients are not finite, which the trainer relies on.
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage: {self.zero_stage} is not a ZeRO stage (use 1, 2 or 3)")
        if self.offload and self.zero_stage == 1:
            raise ConfigError(f"{prefix}.offload: CPU offload needs ZeRO stage 2 or 3")
        if self.activation_checkpointing is not True and self.activation_checkpointing < 0:
            raise ConfigError(f"{prefix}.activation_checkpointing: must be true, false or a number of layers")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: str | None = None  # set to log to Weights & Biases (needs `pip install wandb`)
    progress_bar: bool = True
    # Peak dense FLOP/s of one device in TFLOP/s, for MFU; unset: looked up for known GPUs, and no
    # MFU on CPU.
    peak_tflops: float | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    tokenizer: str = field(metadata=config_io.PATH)
    data: DataConfig
    train: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, prefix: str) -> None:
        if self.train.eval_interval and not self.data.validation.enabled:
            raise ConfigError(
                "train.eval_interval: there is no held-out set; set data.validation.holdout or "
                "data.validation.corpora"
            )


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return config_io.load(TrainConfig, path, overrides)


MISSING_CORPUS_HINT = (
    "build a corpus with `kosmos data build`, index shards where they lie with `kosmos data index`, or "
    "make the sample corpus with `kosmos data sample --out DIR`"
)
MISSING_TOKENIZER_HINT = (
    "train one on the corpora with `kosmos tokenizer train --corpus DIR... --vocab-size N --out FILE`, "
    "or use the sample corpus's (`kosmos data sample --out DIR` writes DIR/tokenizer.model)"
)


def check_inputs(cfg: TrainConfig, world_size: int | None = None) -> None:
    """`input_problems`, raised together (ConfigError) if there are any."""
    config_io.raise_problems(input_problems(cfg, world_size))


def input_problems(cfg: TrainConfig, world_size: int | None = None) -> list[str]:
    """Every problem of what the config names, one line each: the tokenizer fits the model, the
    corpora exist and hold what they should, `train.init_from` exists, the packages the logging needs
    are installed; with `world_size`, the step layout on that many ranks too. Needs no torch."""
    from kosmos.data import sources
    from kosmos.data.config import rows_per_step, stream_layout
    from kosmos.tokenizer import Tokenizer, TokenizerError

    problems = []
    if not Path(cfg.tokenizer).exists():
        problems.append(f"tokenizer: {cfg.tokenizer} does not exist; {MISSING_TOKENIZER_HINT}")
    else:
        try:
            vocab_size = Tokenizer(cfg.tokenizer).vocab_size
        except TokenizerError as error:
            problems.append(f"tokenizer: {error}")
        else:
            if vocab_size != cfg.model.text.vocab_size:
                problems.append(
                    f"model.text.vocab_size: {cfg.model.text.vocab_size} does not match the tokenizer "
                    f"{cfg.tokenizer} ({vocab_size} ids)"
                )
    indexes = {}
    for key, corpus in cfg.data.listed_corpora("data"):
        if sources.is_local(corpus.path) and not Path(sources.local_path(corpus.path)).exists():
            problems.append(f"{key}.path: {corpus.path} does not exist; {MISSING_CORPUS_HINT}")
            continue
        try:
            index = cfg.data.check_corpus(corpus, key, "data")
        except ConfigError as error:
            problems += config_io.problems_of(error)
            continue
        if corpus in cfg.data.corpora:
            indexes[corpus.name] = index
    if world_size is not None:
        try:
            _, virtual = stream_layout(cfg.data, world_size)
            rows_per_step(cfg.data, indexes, world_size, cfg.model.connector.num_queries, virtual)
        except ConfigError as error:
            problems += config_io.problems_of(error)
    if cfg.train.init_from is not None and not Path(cfg.train.init_from).exists():
        problems.append(f"train.init_from: {cfg.train.init_from} does not exist")
    if cfg.logging.wandb_project and not _importable("wandb"):
        problems.append(
            "logging.wandb_project: logging to Weights & Biases needs the wandb package, which is not "
            'installed (pip install wandb, or pip install -e ".[wandb]" from the clone)'
        )
    return problems


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
