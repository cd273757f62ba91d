"""The training loop: data -> DeepSpeed engine -> metrics and checkpoints, resumable at any step.

Each optimizer step takes the loader's micro-batches for this rank. The loss is normalised by the
number of labelled tokens of the whole step over all ranks (as fairseq/torchscale did), so every
token weighs the same whatever micro-batch or rank it landed on. A step whose loss or gradient is not
finite is skipped by DeepSpeed's ZeRO optimizer; the trainer counts it, and a run of
`train.max_nonfinite_steps` of them stops training.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from kosmos import config as config_io
from kosmos.checkpoint import load_weights, read_latest
from kosmos.data.batch import Batch
from kosmos.data.skips import Counts, Reason, saved
from kosmos.data.sources import scrubbed
from kosmos.model import KosmosModel, attention_pairs, training_flops
from kosmos.model.attention import attends_per_document
from kosmos.model.kosmos import check_image_slots
from kosmos.tokenizer import IGNORE_INDEX, Tokenizer
from kosmos.train.checkpoint import CheckpointManager
from kosmos.train.config import TrainConfig, check_inputs
from kosmos.train.elastic import Resize, derived_seed
from kosmos.train.engine import DistributedEnv, build_engine, check_hardware, init_distributed, use_bf16
from kosmos.train.metrics import MetricsLogger, flops_utilisation, peak_flops, peak_memory_gb
from kosmos.train.optim import follow_config
from kosmos.train.preemption import StopRequest
from kosmos.train.run_folder import RunLock, record_event, record_launch, resume_changes
from kosmos.train.spike import SpikeDetector, TrainingDiverged
from kosmos.train.state import (
    TrainState,
    rng_state,
    seed_everything,
    set_rng_state,
    use_deterministic_algorithms,
)
from kosmos.train.validation import ValidationSet

T = TypeVar("T")

# Per-corpus sums kept over a logging interval (one row per corpus), all-reduced when logged.
LOSS_SUM, LABELLED, TOKENS, POSITIONS, IMAGES, ATTENTION_PAIRS = SUMS = range(6)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, env: DistributedEnv):
        self.cfg = cfg
        self.run_dir = run_dir
        self.env = env
        self.corpora = [corpus.name for corpus in cfg.data.corpora]
        self.bf16 = use_bf16(cfg.deepspeed.bf16)
        from kosmos.data import build_loader

        tokenizer = Tokenizer(cfg.tokenizer)
        # First, as it checks the step layout against the world size (a config error).
        self.loader = build_loader(
            cfg.data,
            tokenizer,
            rank=env.rank,
            world_size=env.world_size,
            image_size=cfg.model.vision.image_size,
            num_image_tokens=cfg.model.connector.num_queries,
        )
        self.validation = None
        if cfg.data.validation.enabled:
            started = time.perf_counter()
            self.validation = ValidationSet(
                cfg.data,
                tokenizer,
                cfg.model.vision.image_size,
                cfg.model.connector.num_queries,
                env.rank,
                env.world_size,
            )
            rows = ", ".join(f"{name} {n}" for name, n in self.validation.rows.items())
            self._print(
                f"validation set: rows of {cfg.data.seq_len} per corpus: {rows} "
                f"(read in {time.perf_counter() - started:.1f} s)"
            )
        # Identical initial weights on every rank: ZeRO-3 partitions each rank's own copy.
        seed_everything(cfg.train.seed)
        self.model = KosmosModel(cfg.model)
        self.model.gradient_checkpointing = cfg.deepspeed.activation_checkpointing
        if cfg.train.compile:
            self.model.compile_layers()
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep, env.is_main)
        resuming = self.checkpoints.latest_tag() is not None
        if cfg.train.init_from is not None and not resuming:
            source = load_weights(self.model, cfg.train.init_from)
            self._print(f"initialised the weights from {source}")
        # A checkpoint of another world size loads through its universal form (converted here).
        resize = Resize.find(self.checkpoints.latest_path(), env.world_size) if resuming else None
        if resize is not None:
            resize.prepare(env.is_main)
        self.engine = build_engine(
            cfg, self.model, self.loader.micro_batches_per_step, self.bf16, load_universal=resize is not None
        )
        self.state = TrainState()
        self.resumed_from: Path | None = None
        if resuming:
            self._resume(resize)
        else:
            seed_everything(cfg.train.seed + env.rank)  # each rank its own dropout masks

        self.peak_flops = peak_flops(cfg.logging, env.device, self.bf16)
        if self.peak_flops:  # the MFU convention, named once in the log: a spec peak, not a measured one
            source = "logging.peak_tflops" if cfg.logging.peak_tflops else "the GPU's dense bf16 spec"
            self._print(f"mfu: against {self.peak_flops / 1e12:g} TFLOP/s per GPU ({source})")
        # MFU counts the attention the backend does: per packed document, or over whole rows.
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        backend = self.model.attention_backend(env.device, dtype, needs_grad=True)
        self.per_document_attention = attends_per_document(backend)
        self.stop = StopRequest()
        self.spikes = SpikeDetector(cfg.train.spike) if cfg.train.spike.enabled else None
        self._mark_good()
        self.metrics = MetricsLogger(
            run_dir,
            cfg.logging,
            scrubbed(config_io.to_dict(cfg)),  # no credential in any URL of it
            start_step=self.state.step,
            max_steps=cfg.train.max_steps,
            enabled=env.is_main,
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def _client_state(self) -> dict:
        everyone = [None] * self.env.world_size
        dist.all_gather_object(everyone, {"data": self.loader.state_dict(), "rng": rng_state()})
        return {
            "kosmos": {"train": self.state.state_dict(), "world_size": self.env.world_size, "ranks": everyone}
        }

    def _save(self) -> None:
        started = time.perf_counter()
        self.checkpoints.save(
            self.engine, self.state.step, self._client_state(), self.cfg.model, Path(self.cfg.tokenizer)
        )
        self._mark_good()
        self._print(f"step {self.state.step}: checkpoint saved in {time.perf_counter() - started:.1f} s")

    def _resume(self, resize: Resize | None) -> None:
        client = self.checkpoints.load(self.engine) if resize is None else resize.load(self.engine)
        follow_config(self.engine.lr_scheduler, self.cfg.optimizer)
        saved = client["kosmos"]
        self.state.load_state_dict(saved["train"])
        # Every rank's positions: on the saved layout the loader takes its own, on another one (ranks
        # or loader workers) it regroups the virtual streams.
        self.loader.load_state_dict([rank["data"] for rank in saved["ranks"]])
        if resize is None:
            set_rng_state(saved["ranks"][self.env.rank]["rng"])
        else:
            self._print(resize.describe(self.state.step))
            seed_everything(derived_seed(self.cfg.train.seed, self.state.step, self.env.rank))
        self.resumed_from = self.checkpoints.root / self.checkpoints.latest_tag()
        self._print(f"resumed from {self.resumed_from} at step {self.state.step}")

    # -- loss spikes ----------------------------------------------------------------------------

    def _mark_good(self) -> None:
        """From here on, what the loader reads would be passed over by a rollback."""
        self.loader_step_at_good = self.loader.step
        self.read_since_good = Counter()

    def _step_loss(self, sums: torch.Tensor) -> float | None:
        total = sums.sum(0)[[LOSS_SUM, LABELLED]]
        dist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] else None

    def _rolled_back(self, sums: torch.Tensor, applied: bool, too_many_nonfinite: bool) -> bool:
        """Judge the step just taken; roll the run back when it calls for it."""
        self.read_since_good.update(ref.corpus for ref in self.loader.last_step_samples)
        loss = self._step_loss(sums) if applied else None
        limit = self.spikes.threshold()
        if not (self.spikes.observe(loss) or too_many_nonfinite):
            return False
        if too_many_nonfinite:
            why = f"{self.state.consecutive_nonfinite} non-finite steps in a row"
        else:
            why = f"loss {loss:.4g} over {limit:.4g} ({self.cfg.train.spike.factor} x the running mean)"
        self._roll_back(why, loss, limit)
        return True

    def _roll_back(self, why: str, loss: float | None, limit: float | None) -> None:
        """Back to the last checkpoint, past the data read since it (or raise TrainingDiverged)."""
        state, spike = self.state, self.cfg.train.spike
        latest = self.checkpoints.latest_tag()
        if state.rollbacks >= spike.max_rollbacks or latest is None:
            last = f"the last checkpoint is {self.checkpoints.root / latest}" if latest else "no checkpoint yet"
            raise TrainingDiverged(
                f"step {state.step}: {why}, after {state.rollbacks} rollbacks (train.spike.max_rollbacks "
                f"{spike.max_rollbacks}); {last}"
            )
        if Resize.find(self.checkpoints.latest_path(), self.env.world_size) is not None:
            raise TrainingDiverged(
                f"step {state.step}: {why}; the last checkpoint {latest} was saved by another number of "
                f"ranks, and a rollback keeps the world size: resume from it as it was saved"
            )
        counts = [None] * self.env.world_size
        dist.all_gather_object(counts, dict(self.read_since_good))
        passed_over = _sum_counts(counts)
        data_steps = [self.loader_step_at_good + 1, self.loader.step]
        spike_step, rollbacks = state.step, state.rollbacks + 1
        rolled_back = state.rolled_back_samples + sum(passed_over.values())
        saved = self.checkpoints.load(self.engine)["kosmos"]
        follow_config(self.engine.lr_scheduler, self.cfg.optimizer)
        state.load_state_dict(saved["train"])
        state.rollbacks, state.rolled_back_samples = rollbacks, rolled_back
        state.consecutive_nonfinite = 0
        set_rng_state(saved["ranks"][self.env.rank]["rng"])
        self.spikes.reset()
        self._mark_good()
        record = {
            "step": state.step,
            "event": "rollback",
            "reason": why,
            "spike_step": spike_step,
            "spike_loss": loss,
            "spike_threshold": limit,
            "checkpoint": f"checkpoints/{latest}",
            "data_steps_passed_over": data_steps,
            "samples_passed_over": passed_over,
            "rollbacks": rollbacks,
        }
        self.metrics.rewind(state.step)
        self.metrics.log(record)
        if self.env.is_main:
            record_event(self.run_dir, record)
        self._print(
            f"step {spike_step}: {why}: rolled back to {latest} (rollback {rollbacks} of at most "
            f"{spike.max_rollbacks}); data steps {data_steps[0]}-{data_steps[1]} passed over "
            f"({sum(passed_over.values())} documents begun in them)"
        )

    # -- one step -------------------------------------------------------------------------------

    def _train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches, then the optimizer step.

        Returns this step's per-corpus sums (SUMS: LOSS_SUM, LABELLED, TOKENS, POSITIONS, IMAGES,
        ATTENTION_PAIRS).
        """
        # Checked on the host, where a bad batch is an error; on the GPU it would be a device-side
        # assertion, which leaves the CUDA context unusable.
        for mb in micro_batches:
            check_image_slots(mb.image_mask, 0 if mb.images is None else len(mb.images), self.image_slots)
        # Counted on the host: the step never waits for the device (no sync, no blocking copy).
        labelled = sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in micro_batches)
        labelled = self._to_device(torch.tensor([labelled], dtype=torch.float64))
        dist.all_reduce(labelled)
        # DeepSpeed averages gradients over ranks; scaling by the world size makes the result the
        # gradient of the mean loss over every labelled token of the step.
        scale = (self.env.world_size / labelled.clamp(min=1)).squeeze(0)
        sums = torch.zeros(len(self.corpora), len(SUMS), dtype=torch.float64, device=self.env.device)
        for mb in micro_batches:
            output = self.engine(**mb.to(self.env.device, non_blocking=True).inputs())
            loss = output.token_loss.sum() * scale.to(output.token_loss.dtype)
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()
            sums += self._batch_sums(mb, output.token_loss.detach())
        return sums

    @property
    def image_slots(self) -> int:
        return self.cfg.model.connector.num_queries

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """`host` on the device, queued like a kernel (from pinned memory): the host does not wait."""
        if self.env.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.env.device, non_blocking=True)

    def _batch_sums(self, host_batch: Batch, token_loss: torch.Tensor) -> torch.Tensor:
        """Per-corpus sums of one micro-batch: the loss from the device, the counts from the host copy
        of the batch, which reach the device in one copy that the host does not wait for."""
        rows, length = host_batch.segment_ids.shape
        counts = torch.stack(
            [
                (host_batch.labels != IGNORE_INDEX).sum(1).double(),
                (host_batch.segment_ids > 0).sum(1).double(),
                torch.full((rows,), float(length), dtype=torch.float64),
                host_batch.image_mask.sum(1).double() / self.image_slots,
                attention_pairs(host_batch.segment_ids, self.per_document_attention).double(),
            ],
            dim=1,
        )
        which = torch.tensor([self.corpora.index(name) for name in host_batch.corpora])
        corpus_of_row = torch.nn.functional.one_hot(which, len(self.corpora)).double()  # [rows, corpora]
        corpus_of_row, counts = self._to_device(torch.cat([corpus_of_row, counts], 1)).split(
            [len(self.corpora), counts.shape[1]], dim=1
        )
        losses = token_loss.double().sum(1, keepdim=True)
        return corpus_of_row.T @ torch.cat([losses, counts], 1)

    # -- logging --------------------------------------------------------------------------------

    def _record(self, sums: torch.Tensor, seconds: float, lr: float) -> dict:
        dist.all_reduce(sums)
        sums = sums.cpu()
        total = sums.sum(0)
        self.state.tokens_seen += int(total[TOKENS])
        counters = [None] * self.env.world_size
        dist.all_gather_object(counters, (self.loader.skipped, self.loader.dropped_images))
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.state.step,
            "loss": float(total[LOSS_SUM] / total[LABELLED]) if total[LABELLED] else None,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": float(total[TOKENS]) / seconds if seconds else None,
            "mfu": self._mfu(total, seconds),
            "memory_gb": round(peak_memory_gb(self.env.device), 3),
            "tokens_seen": self.state.tokens_seen,
        }
        for name, row in zip(self.corpora, sums):
            record[f"loss_{name}"] = float(row[LOSS_SUM] / row[LABELLED]) if row[LABELLED] else None
            record[f"tokens_{name}"] = int(row[TOKENS])
        record["skipped_samples"] = _sum_counts(skipped for skipped, _ in counters)
        record["dropped_images"] = _sum_counts(dropped for _, dropped in counters)
        if self.state.rolled_back_samples:
            record["skipped_samples"][Reason.ROLLED_BACK] = self.state.rolled_back_samples
        record["skipped_nonfinite_steps"] = self.state.nonfinite_steps
        return record

    def _mfu(self, total: torch.Tensor, seconds: float) -> float | None:
        if self.peak_flops is None or not seconds:
            return None
        flops = training_flops(
            self.cfg.model,
            positions=float(total[POSITIONS]),
            labelled=float(total[LABELLED]),
            images=float(total[IMAGES]),
            attention_pairs=float(total[ATTENTION_PAIRS]),
        )
        parts = flops_utilisation(flops, seconds, self.env.world_size * self.peak_flops)
        return parts["language"] + parts["vision"]

    def _print(self, text: str) -> None:
        if self.env.is_main:
            tqdm.write(text)  # above the progress bar, not through it

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        cfg, state = self.cfg, self.state
        interval = torch.zeros(len(self.corpora), len(SUMS), dtype=torch.float64, device=self.env.device)
        seconds = 0.0
        data = iter(self.loader)
        while state.step < cfg.train.max_steps:
            started = time.perf_counter()
            lr = self.engine.get_lr()[0]
            sums = self._train_step(next(data))
            state.step += 1
            applied = self.engine.was_step_applied()
            if applied:
                interval += sums
                state.consecutive_nonfinite = 0
            else:
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
                self._print(f"step {state.step}: non-finite loss or gradient, update skipped")
            seconds += time.perf_counter() - started
            self.metrics.advance()

            too_many_nonfinite = state.consecutive_nonfinite >= cfg.train.max_nonfinite_steps
            if self.spikes is not None and self._rolled_back(sums, applied, too_many_nonfinite):
                interval.zero_()
                seconds = 0.0
                continue
            stopping = self.stop.anywhere(self.env.device)
            saving = (
                state.step % cfg.checkpoint.interval == 0 or state.step == cfg.train.max_steps or stopping
            )
            if state.step % cfg.train.log_interval == 0 or saving or too_many_nonfinite:
                self.metrics.log(self._record(interval, seconds, lr))
                interval.zero_()
                seconds = 0.0
            if too_many_nonfinite:
                latest = self.checkpoints.latest_tag()
                self._print(
                    f"stopping: {state.consecutive_nonfinite} consecutive steps up to step {state.step} had a "
                    f"non-finite loss or gradient; their updates were skipped. The last checkpoint is "
                    f"{self.checkpoints.root / latest if latest else 'none'}."
                )
                return 1
            if self.validation is not None and (
                state.step == cfg.train.max_steps
                or (cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0)
            ):
                # Before the checkpoint of the same step: a resume from it goes on after this point.
                self.metrics.log({"step": state.step, **self.validation.loss(self.engine, self.env.device)})
            if saving:
                self._save()
            if stopping:
                self._print(
                    f"stopped at step {state.step} by {self.stop.signal_name or 'a signal on another rank'}; "
                    f"run the same command again to resume"
                )
                return 0
        self._print(f"done: {state.step} steps; checkpoints in {self.checkpoints.root}")
        return 0

    def close(self) -> None:
        """Stop the loader's workers, give back the signals, close the logs (after an error too)."""
        self.loader.close()
        self.stop.close()
        self.metrics.close()


def _sum_counts(per_rank) -> dict[str, int]:
    total: Counts = Counter()
    for counts in per_rank:
        total.update(counts)
    return saved(total)


def train(cfg: TrainConfig, run_dir: Path, allowed_changes: list[str] | None = None) -> int:
    """Train (or resume) the run in `run_dir`; returns the process exit code.

    Nothing is written into the run folder before the launch is accepted: the config checked, the
    folder locked, the changes of a resume allowed, the model and loader built and the checkpoint
    restored. `allowed_changes` are keys or sections a resume may change (`--allow-config-change`).
    """
    # DeepSpeed calls torch.distributed functions that torch has renamed, once per bucket and step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    check_inputs(cfg)
    if cfg.train.deterministic:
        use_deterministic_algorithms()  # before any CUDA work
    env = init_distributed()
    lock = RunLock(run_dir) if env.is_main else None
    trainer = None
    try:
        check_hardware(cfg, env)
        _on_main(env, lambda: lock.acquire())
        resuming = read_latest(run_dir / "checkpoints") is not None
        changes = _on_main(
            env, lambda: resume_changes(run_dir, cfg, allowed_changes or []) if resuming else []
        )
        trainer = Trainer(cfg, run_dir, env)
        if env.is_main:
            resumed_from = (
                None if trainer.resumed_from is None else str(trainer.resumed_from.relative_to(run_dir))
            )
            record_launch(run_dir, cfg, changes, trainer.state.step, resumed_from, env.world_size)
            for change in changes:
                print(f"resuming with {change.key}: {change.old!r} -> {change.new!r}", flush=True)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()
        dist.destroy_process_group()


def _on_main(env: DistributedEnv, work: Callable[[], T]) -> T:
    """Do `work` on rank 0 only; every rank returns its result, or raises its error."""
    outcome: list = [None]
    if env.is_main:
        try:
            outcome[0] = (work(), None)
        except Exception as error:  # noqa: BLE001 - handed on to every rank, raised there
            outcome[0] = (None, error)
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result
