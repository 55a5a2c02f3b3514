"""Knowledge distillation: a full or LoRA/DoRA student learns from a frozen teacher.

Launch (see ``configs/`` for the YAMLs; each opens with its own command)::

    kdtune run knowledge_distillation --config tiny/full_chunked output_dir=/tmp/kd
    tune run kdtune/recipes/knowledge_distillation.py --config path/to/config.yaml key=value

The loss of every optimizer step is ``(1 - kd_ratio) * CE + kd_ratio * KD``, each term a mean
over all target tokens of the step (every micro-batch; every rank once data-parallel), so
gradient accumulation gives the gradient of one large batch. Two loss paths, chosen by
``kd_loss``: *chunked* (both models return logits in chunks, consumed by a chunked CE and KD
loss) or *fused* (``kdtune.losses.fused.FusedLinearKDLoss`` takes final hidden states and
output weights and never materialises the logits). With ``teacher_model: null`` and
``kd_ratio: 0.0`` the recipe fine-tunes with CE alone.

Before any model is built the config is checked (:mod:`kdtune.training.config_checks`), then
the vocabularies of student, teacher and tokenizer (models built on the meta device).

One process or many, one code path. Launched by ``torchrun`` with several processes
(``kdtune run --nproc_per_node N``, ``tune run --nproc_per_node N``, or ``torchrun --nnodes``
across machines) the recipe starts a process group (NCCL on CUDA, gloo on CPU), builds both
models on the meta device, shards every transformer layer and the root with FSDP2
(``fully_shard``; the teacher frozen), and loads rank 0's checkpoint into the shards. Every
rank reads its own share of each global batch; each loss is its token sum divided by the
token count of the whole step on all ranks, and FSDP2 sums the gradients, so any process
count gives the gradients of the same global batch. Rank 0 alone reads checkpoints, writes
files and logs. The differences live in :mod:`kdtune.training.runtime` (decisions) and
:mod:`kdtune.training.distributed` (collectives, no-ops in one process).

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per step and per validation,
plus setup and per-rank memory records), ``checkpoints/step_N/`` (Hugging Face weights +
training state, written atomically; the last one holds the final student) and whatever the
configured ``metric_logger`` writes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from kdtune import __version__
from kdtune.teacher_cache import source as teacher_cache
from kdtune.training import checkpointing as ckpt
from kdtune.training import distributed
from kdtune.training.config_checks import (
    check_config,
    check_models,
    describe_model,
    is_fused_loss,
    kd_vocab_columns,
    loss_chunks,
    tokenizer_max_id,
)
from kdtune.training.data import (
    batch_to_device,
    build_dataset,
    count_loss_tokens,
    next_micro_batches,
    sft_collate,
    shift_labels,
)
from kdtune.training.metrics import MetricsWriter
from kdtune.training.runtime import (
    Runtime,
    build_model,
    compile_loss,
    finish_teacher,
    freeze_all_but_adapters,
    is_dora,
    load_weights,
    lora_rank_and_alpha,
    lora_target_modules,
    prepare_for_training,
    set_determinism,
    setup_runtime,
    student_state_dict,
    trainable_parameters,
)
from kdtune.training.steps import ChunkedLossStep, FusedLossStep, MicroBatchLoss
from kdtune.training.validation import validate

log = utils.get_logger("INFO")

# Settings of a run that must not change across a resume, or the resumed run would not continue
# the same sequence of batches and steps.
_RESUME_INVARIANTS = (
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "steps_per_epoch",
    "world_size",
)


class KDRecipe(FTRecipeInterface):
    """Knowledge-distillation recipe (one class, torchtune's shape).

    Call :meth:`setup`, :meth:`train`, :meth:`cleanup`. Public progress attributes:
    ``global_step`` (optimizer steps done), ``epoch`` and ``steps_in_epoch``.

    Raises:
        ConfigError: from the constructor, for any config problem (before models are built).
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg)
        self._cfg = cfg
        self._runtime: Runtime = setup_runtime(cfg)
        self._output_dir = Path(cfg.output_dir)
        self._kd_ratio = float(cfg.kd_ratio)
        self._accumulation = int(cfg.gradient_accumulation_steps)
        self.seed = set_determinism(cfg.seed, cfg.deterministic, self._runtime.device)
        self.global_step = 0
        self.epoch = 0
        self.steps_in_epoch = 0
        self._metrics = MetricsWriter(self._output_dir, enabled=self._runtime.is_main)

    # ------------------------------------------------------------------------------------------
    # Setup

    def setup(self, cfg: DictConfig) -> None:
        """Tokenizer, vocabulary checks, models, losses, optimizer, data, scheduler, state."""
        runtime = self._runtime
        resume_folder, resumed = self._read_resume_state(cfg)
        if resumed is not None:
            self._restore_seed(resumed)

        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._check_vocabularies(cfg)
        # teacher_cache: its top-k rows replace the teacher (checked before models are built).
        self._teacher_cache = teacher_cache.open_for_training(cfg)

        self._metric_logger = config.instantiate(cfg.metric_logger) if runtime.is_main else None
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)

        self._student = self._setup_student(cfg, resume_folder)
        self._teacher = self._setup_teacher(cfg)
        self._setup_losses(cfg)
        # Measured before any forward: afterwards gathered layers may still be registered.
        parameter_memory = self._parameter_memory()

        # After sharding: the optimizer must hold the (DTensor) shards.
        self._optimizer = config.instantiate(cfg.optimizer, trainable_parameters(self._student))
        if resumed is not None:
            distributed.load_full_optimizer_state_dict(
                self._student,
                self._optimizer,
                resumed.get("optimizer"),  # rank 0's; broadcast to the others
                broadcast_from_rank0=True,
            )

        self._setup_data(cfg)
        self._total_steps = int(cfg.epochs) * self._steps_per_epoch
        if resumed is not None:
            self._restore_progress(resumed)
        self._lr_scheduler = (
            config.instantiate(
                cfg.lr_scheduler,
                self._optimizer,
                num_training_steps=self._total_steps,
                last_epoch=self.global_step - 1,
            )
            if cfg.lr_scheduler is not None
            else None
        )
        # Steps after the checkpoint are redone; a fresh run starts a fresh file.
        self._metrics.truncate_after(self.global_step)
        self._metrics.write(
            {"kind": "setup", "step": self.global_step, "world_size": runtime.world_size}
            | parameter_memory
        )
        if resumed is not None:
            rng = ckpt.rank_rng_state(resumed["rng"], runtime.rank)
            ckpt.restore_rng_state(rng, runtime.device)
        start = f"resumed at step {self.global_step}" if resumed is not None else "fresh run"
        log.info(
            f"Setup done: {'LoRA' if self._is_lora else 'full'} student, "
            f"{'fused' if self._fused else 'chunked'} loss, {runtime.world_size} process(es), "
            f"{self._steps_per_epoch} steps/epoch, {start}; parameter GiB per rank: "
            f"{parameter_memory['param_memory_gib']}"
        )

    def _read_resume_state(self, cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from and its training state, or ``(None, None)``.

        Rank 0 alone looks for and reads the checkpoint (the other ranks need neither the
        files nor the memory of the optimizer state) and shares the rest; an error there is
        raised on every rank.
        """
        folder = state = shared = error = None
        if self._runtime.is_main:
            try:
                folder = ckpt.resolve_resume_folder(cfg.output_dir, cfg.resume_from_checkpoint)
                state = ckpt.load_training_state(folder) if folder is not None else None
            except ValueError as raised:
                error = raised
            if state is not None:
                shared = {key: value for key, value in state.items() if key != "optimizer"}
        folder, shared, error = distributed.broadcast_object((folder, shared, error))
        if error is not None:
            raise error
        if state is not None:  # rank 0 keeps the optimizer state to broadcast it later
            shared["optimizer"] = state["optimizer"]
        return folder, shared

    def _restore_seed(self, resumed: dict[str, Any]) -> None:
        saved = resumed["run"]["seed"]
        if self._cfg.seed is not None and self._cfg.seed != saved:
            raise ValueError(
                f"seed = {self._cfg.seed} but the checkpoint was trained with seed {saved}: "
                f"resume with seed={saved} (or null)"
            )
        self.seed = set_determinism(saved, self._cfg.deterministic, self._runtime.device)

    def _check_vocabularies(self, cfg: DictConfig) -> None:
        """Vocab sizes of student, teacher and tokenizer agree (models built on meta)."""
        student = describe_model(cfg.model)
        teacher = describe_model(cfg.teacher_model) if cfg.teacher_model is not None else None
        check_models(cfg, student, teacher, tokenizer_max_id(self._tokenizer))

    def _setup_student(self, cfg: DictConfig, resume_folder: Path | None) -> nn.Module:
        """Build on meta, freeze a LoRA base, wrap and shard, then load rank 0's weights."""
        runtime = self._runtime
        self._checkpointer = config.instantiate(cfg.checkpointer)
        model = build_model(cfg.model, runtime.dtype)
        self._is_lora = freeze_all_but_adapters(model)
        if cfg.save_adapter_weights_only and not self._is_lora:
            raise ValueError(
                "save_adapter_weights_only = true needs a LoRA/DoRA student (a lora_* model "
                "builder): set it to false for a full-parameter student"
            )
        state = self._student_state(cfg, model, resume_folder) if runtime.is_main else None
        prepare_for_training(
            model,
            runtime,
            trainable=True,
            activation_checkpointing=cfg.enable_activation_checkpointing,
            compile_layers=cfg.compile,
        )
        load_weights(model, state, runtime)
        del state
        training.validate_expected_param_dtype(
            ((n, p) for n, p in model.named_parameters() if p.requires_grad),
            dtype=runtime.dtype,
        )
        return model

    def _student_state(
        self, cfg: DictConfig, model: nn.Module, resume_folder: Path | None
    ) -> dict[str, Tensor]:
        """The student's full state dict (rank 0): original, or resumed, weights and adapters."""
        # The original checkpoint is always read: its weight map lays out the saved shards, and
        # a LoRA student's base weights come from it.
        base = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        adapters = None
        if resume_folder is not None:
            if self._is_lora:
                adapters = torch.load(resume_folder / ckpt.ADAPTER_FILENAME, weights_only=True)
            else:
                base = self._load_saved_full_weights(cfg, resume_folder)
        return student_state_dict(model, base, adapters, seed=self.seed)

    def _load_saved_full_weights(self, cfg: DictConfig, folder: Path) -> dict[str, Tensor]:
        """A full student's weights from a checkpoint folder, via the same HF checkpointer."""
        reader = config.instantiate(
            cfg.checkpointer,
            checkpoint_dir=str(folder),
            checkpoint_files=ckpt.hf_weight_files(folder),
        )
        return reader.load_checkpoint()[training.MODEL_KEY]

    def _setup_teacher(self, cfg: DictConfig) -> nn.Module | None:
        if cfg.teacher_model is None or self._teacher_cache is not None:
            return None
        runtime = self._runtime
        teacher = build_model(cfg.teacher_model, runtime.dtype)
        state = None
        if runtime.is_main:
            checkpointer = config.instantiate(cfg.teacher_checkpointer)
            state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        prepare_for_training(
            teacher,
            runtime,
            trainable=False,
            activation_checkpointing=False,  # no backward through the teacher
            compile_layers=cfg.compile,
        )
        load_weights(teacher, state, runtime)
        del state
        return finish_teacher(teacher, cfg.teacher_quantization)

    def _parameter_memory(self) -> dict[str, list[float]]:
        """GiB of parameters each rank holds (its shards), student and teacher (collective)."""
        student = distributed.local_parameter_bytes(self._student) / 2**30
        teacher = 0.0
        if self._teacher is not None:
            teacher = distributed.local_parameter_bytes(self._teacher) / 2**30
        return {
            "param_memory_gib": distributed.gather_from_ranks(student + teacher),
            "student_param_memory_gib": distributed.gather_from_ranks(student),
            "teacher_param_memory_gib": distributed.gather_from_ranks(teacher),
        }

    def _setup_losses(self, cfg: DictConfig) -> None:
        self._fused = is_fused_loss(cfg.kd_loss)
        self._vocab_columns = kd_vocab_columns(cfg)
        if self._fused:
            fused_loss = config.instantiate(cfg.kd_loss)
            self._ignore_index = fused_loss.ignore_index
            self._num_chunks = loss_chunks(cfg.kd_loss)
            if cfg.compile:
                compile_loss(fused_loss)
            self._loss_step = FusedLossStep(fused_loss, self._kd_ratio)
            return
        ce_loss = config.instantiate(cfg.loss)
        kd_loss = config.instantiate(cfg.kd_loss)
        self._ignore_index = ce_loss.ignore_index
        self._num_chunks = ce_loss.num_output_chunks
        # Both models return their logits as the same number of chunks the losses expect.
        self._student.set_num_output_chunks(self._num_chunks)
        if self._teacher is not None:
            self._teacher.set_num_output_chunks(self._num_chunks)
        if cfg.compile:
            ce_loss, kd_loss = compile_loss(ce_loss), compile_loss(kd_loss)
        self._loss_step = ChunkedLossStep(ce_loss, kd_loss, self._kd_ratio)

    def _setup_data(self, cfg: DictConfig) -> None:
        """This rank's loaders: every ``world_size``-th sample of the epoch's permutation.

        Rank ``r``'s ``k``-th batch holds permutation positions ``r + world_size * j`` for
        ``j`` in ``[k * batch_size, (k + 1) * batch_size)``, so the ranks' ``k``-th batches
        together are positions ``[k * W * batch_size, (k + 1) * W * batch_size)``: the same
        samples one process reads with ``batch_size`` ``W * batch_size``.
        """
        runtime = self._runtime
        dataset, collate = teacher_cache.indexed(
            build_dataset(cfg.dataset, self._tokenizer),
            sft_collate(self._tokenizer.pad_id, self._ignore_index),
        )
        teacher_cache.check_num_samples(self._teacher_cache, dataset)
        self._dataloader = distributed.build_dataloader(
            dataset,
            batch_size=cfg.batch_size,
            collate_fn=collate,
            shuffle=cfg.shuffle,
            seed=self.seed,
            rank=runtime.rank,
            world_size=runtime.world_size,
            drop_last=True,
        )
        steps = len(self._dataloader) // self._accumulation
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, int(cfg.max_steps_per_epoch))
        if steps == 0:
            raise ValueError(
                f"the dataset gives {len(self._dataloader)} batches of batch_size "
                f"{cfg.batch_size} per rank, fewer than gradient_accumulation_steps = "
                f"{self._accumulation}: lower batch_size or gradient_accumulation_steps"
            )
        self._steps_per_epoch = steps
        self._val_dataloader = None
        if cfg.validation_dataset is not None:
            self._val_dataloader = distributed.build_dataloader(
                build_dataset(cfg.validation_dataset, self._tokenizer),
                batch_size=cfg.validation_batch_size,
                collate_fn=collate,
                shuffle=False,
                seed=self.seed,
                rank=runtime.rank,
                world_size=runtime.world_size,
                drop_last=False,
            )

    def _run_invariants(self) -> dict[str, Any]:
        cfg = self._cfg
        return {
            "seed": self.seed,
            "batch_size": int(cfg.batch_size),
            "gradient_accumulation_steps": self._accumulation,
            "steps_per_epoch": self._steps_per_epoch,
            "world_size": self._runtime.world_size,
        }

    def _restore_progress(self, resumed: dict[str, Any]) -> None:
        """Progress counters and the data-loader position of a resumed run."""
        saved, now = resumed["run"], self._run_invariants()
        for key in _RESUME_INVARIANTS:
            if saved[key] != now[key]:
                raise ValueError(
                    f"cannot resume exactly: {key} was {saved[key]} in the checkpoint and is "
                    f"{now[key]} now; resume with the checkpoint's settings (batch_size, "
                    "gradient_accumulation_steps, max_steps_per_epoch, seed, process count)"
                )
        progress = resumed["progress"]
        self.global_step = progress["global_step"]
        self.epoch, self.steps_in_epoch = progress["epoch"], progress["steps_in_epoch"]
        if self.steps_in_epoch >= self._steps_per_epoch:  # saved at the end of an epoch
            self.epoch, self.steps_in_epoch = self.epoch + 1, 0
        if self.steps_in_epoch > 0:
            self._dataloader.load_state_dict(resumed["dataloader"])

    # ------------------------------------------------------------------------------------------
    # Training

    def accumulate_gradients(self, micro_batches: list[dict[str, Tensor]]) -> dict[str, Any]:
        """Forward and backward over one optimizer step's micro-batches (no optimizer step).

        Every micro-batch loss is divided by the step's total target-token count, so the
        accumulated gradient is the gradient of the step's mean loss.

        Returns:
            ``{"loss", "ce_loss", "kd_loss"}`` (step means; ``kd_loss`` None without a
            teacher) and ``"num_tokens"`` (the step's target tokens over all ranks).
        """
        device = self._runtime.device
        batches = [batch_to_device(batch, device) for batch in micro_batches]
        labels = [shift_labels(batch["labels"], self._ignore_index) for batch in batches]
        num_tokens = distributed.all_reduce_sum(count_loss_tokens(labels, self._ignore_index))
        parts: list[MicroBatchLoss] = []
        for batch, shifted in zip(batches, labels):
            teacher = teacher_cache.teacher_view(
                self._teacher, self._teacher_cache, batch, shifted, self._ignore_index
            )
            part = self._loss_step(self._student, teacher, batch["tokens"], shifted, num_tokens)
            part.loss.backward()
            parts.append(MicroBatchLoss(part.loss.detach(), part.ce, part.kd))
        return self._step_losses(parts, num_tokens)

    def _step_losses(self, parts: list[MicroBatchLoss], num_tokens: Tensor) -> dict[str, Any]:
        """Sum the micro-batch terms (each already divided by the step's count) over ranks."""
        has_kd = parts[0].kd is not None
        no_kd = torch.zeros((), device=parts[0].loss.device)
        local = torch.stack(
            [
                torch.stack([p.loss.float() for p in parts]).sum(),
                torch.stack([p.ce.float() for p in parts]).sum(),
                torch.stack([p.kd.float() for p in parts]).sum() if has_kd else no_kd,
            ]
        )
        total = distributed.all_reduce_sum(local).tolist()
        return {
            "loss": total[0],
            "ce_loss": total[1],
            "kd_loss": total[2] if has_kd else None,
            "num_tokens": int(num_tokens.item()),
        }

    def _optimizer_step(self) -> float:
        """Clip (if configured), step optimizer and scheduler; return the pre-clip grad norm.

        The norm covers every rank's gradient shards (the same value on every rank).
        """
        max_norm = self._cfg.clip_grad_norm
        grad_norm = distributed.clip_grad_norm_(
            self._student, max_norm=float(max_norm) if max_norm is not None else math.inf
        )
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return float(grad_norm.item())

    def _stop_requested(self) -> bool:
        stop = self._cfg.stop_after_steps
        return stop is not None and self.global_step >= stop

    def train(self) -> None:
        """Run the remaining steps; validate and checkpoint as configured; save at the end."""
        cfg = self._cfg
        progress = tqdm(
            total=self._total_steps,
            initial=self.global_step,
            disable=not self._runtime.is_main,
            dynamic_ncols=True,
        )
        validated_at = saved_at = -1
        while self.epoch < int(cfg.epochs) and not self._stop_requested():
            self._dataloader.sampler.set_epoch(self.epoch)
            batches = iter(self._dataloader)
            while self.steps_in_epoch < self._steps_per_epoch and not self._stop_requested():
                micro_batches = next_micro_batches(batches, self._accumulation)
                if micro_batches is None:
                    break
                self._train_step(micro_batches, progress)
                if self._due(cfg.validate_every_n_steps):
                    self._validate()
                    validated_at = self.global_step
                last = self.global_step >= self._total_steps or self._stop_requested()
                if self._due(cfg.save_every_n_steps) and not last:
                    self.save_checkpoint()
                    saved_at = self.global_step
            if self.steps_in_epoch >= self._steps_per_epoch:
                self.epoch, self.steps_in_epoch = self.epoch + 1, 0
        progress.close()
        finished = self.epoch >= int(cfg.epochs)
        if finished and validated_at != self.global_step:
            self._validate()
        if saved_at != self.global_step:
            self.save_checkpoint(final=finished)

    def _due(self, every: int | None) -> bool:
        return every is not None and self.global_step % every == 0

    def _train_step(self, micro_batches: list[dict[str, Tensor]], progress: tqdm) -> None:
        started = time.perf_counter()
        losses = self.accumulate_gradients(micro_batches)
        lr = self._optimizer.param_groups[0]["lr"]
        grad_norm = self._optimizer_step()
        self.global_step += 1
        self.steps_in_epoch += 1
        seconds = time.perf_counter() - started
        peaks = distributed.gather_from_ranks(distributed.peak_memory_gib(self._runtime.device))
        record = {
            "kind": "train",
            "step": self.global_step,
            "epoch": self.epoch,
            **losses,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": losses["num_tokens"] / seconds,
            "step_seconds": seconds,
            "peak_memory_gib": max(peaks),
        }
        self._metrics.write(record)
        progress.update(1)
        if self.global_step % self._cfg.log_every_n_steps == 0:
            self._metrics.write(
                {"kind": "memory", "step": self.global_step, "peak_memory_gib": peaks}
            )
            progress.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}"
            )
            self._log_to_metric_logger(record, prefix="")

    def _log_to_metric_logger(self, record: dict[str, Any], prefix: str) -> None:
        if self._metric_logger is None:
            return
        payload = {
            f"{prefix}{key}": value
            for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, int | float)
        }
        self._metric_logger.log_dict(payload, step=self.global_step)

    def _validate(self) -> None:
        if self._val_dataloader is None:
            return
        result = validate(
            self._student,
            self._teacher,
            self._val_dataloader,
            runtime=self._runtime,
            ignore_index=self._ignore_index,
            num_chunks=self._num_chunks,
            vocab_columns=self._vocab_columns,
            max_batches=self._cfg.validation_max_batches,
        )
        record = {"kind": "val", "step": self.global_step, "epoch": self.epoch, **vars(result)}
        self._metrics.write(record)
        self._log_to_metric_logger(record, prefix="val_")
        if self._runtime.is_main:
            log.info(f"validation at step {self.global_step}: {vars(result)}")

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, epoch: int | None = None, *, final: bool = False) -> Path | None:
        """Write ``checkpoints/step_<global_step>/`` atomically; prune old ones.

        Every rank takes part (the full student and optimizer state are gathered to rank 0,
        which alone writes); all ranks wait until the folder is complete. ``epoch`` is
        accepted for torchtune's interface and ignored: checkpoints are named by optimizer
        step.

        Returns:
            The checkpoint folder on rank 0, None on the other ranks.
        """
        adapter_only = self._is_lora and bool(self._cfg.save_adapter_weights_only)
        # Collectives: every rank gathers, rank 0 receives.
        state = distributed.gather_full_state_dict(self._student, trainable_only=adapter_only)
        optimizer_state = distributed.gather_full_optimizer_state_dict(
            self._student, self._optimizer
        )
        rng = distributed.gather_objects(ckpt.capture_rng_state(self._runtime.device))
        folder = None
        if self._runtime.is_main:
            folder = self._write_checkpoint(state, optimizer_state, rng, adapter_only, final)
        del state, optimizer_state
        distributed.barrier()  # no rank goes on, or ends, before the checkpoint is complete
        return folder

    def _write_checkpoint(
        self,
        state: dict[str, Tensor],
        optimizer_state: dict[str, Any],
        rng: list[dict[str, Any]],
        adapter_only: bool,
        final: bool,
    ) -> Path:
        training_state = {
            "optimizer": optimizer_state,
            # Every rank is at the same batch of its shard, and the loader's state holds no
            # rank, so rank 0's position serves all ranks (for the same process count).
            "dataloader": self._dataloader.state_dict(),
            "rng": rng,  # one entry per rank
            "run": self._run_invariants(),
            "progress": {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "steps_in_epoch": self.steps_in_epoch,
            },
        }
        manifest = {
            "kdtune_version": __version__,
            "final": final,
            "epoch": self.epoch,
            "steps_in_epoch": self.steps_in_epoch,
            "total_steps": self._total_steps,
            "student": "lora" if self._is_lora else "full",
            "merged_weights": not adapter_only,
            "world_size": self._runtime.world_size,
        }
        weights = self._weights_to_save(state, adapter_only)
        folder = ckpt.save_checkpoint_folder(
            self._output_dir,
            self.global_step,
            lambda staging: ckpt.write_hf_weights(
                self._checkpointer, weights, staging, adapter_only
            ),
            training_state,
            manifest,
        )
        ckpt.prune_checkpoints(self._output_dir, self._cfg.keep_last_n_checkpoints)
        log.info(f"saved checkpoint {folder}")
        return folder

    def _weights_to_save(self, state: dict[str, Tensor], adapter_only: bool) -> dict[str, Any]:
        """The checkpointer's input: full weights, or adapter (+ merged) weights for LoRA.

        ``state`` is the full state dict, or only the adapters when ``adapter_only``.
        """
        if not self._is_lora:
            return {training.MODEL_KEY: state}
        rank, alpha = lora_rank_and_alpha(self._student)
        weights: dict[str, Any] = {
            training.ADAPTER_KEY: get_adapter_state_dict(state),
            training.ADAPTER_CONFIG: {
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": lora_target_modules(self._student),
                "peft_type": "LORA",
                "use_dora": is_dora(self._student),
            },
        }
        if not adapter_only:
            # get_merged_lora_ckpt merges in place; the gathered dict is ours alone.
            weights[training.MODEL_KEY] = get_merged_lora_ckpt(state, rank=rank, alpha=alpha)
        return weights

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Knowledge distillation. Run ``kdtune ls`` for configs; override any key with key=value.

    Under ``torchrun`` with several processes the process group lives as long as this call:
    the recipe starts it and this ends it (barrier, then ``destroy_process_group``).
    """
    recipe = KDRecipe(cfg=cfg)
    config.log_config(recipe_name="KDRecipe", cfg=cfg)  # rank 0 only, once the group exists
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    distributed.teardown()


if __name__ == "__main__":
    sys.exit(recipe_main())
