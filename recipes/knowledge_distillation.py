"""Knowledge distillation: a full or LoRA/DoRA student learns from a frozen teacher.

Launch (see ``configs/`` for the YAMLs; each opens with its own command)::

    kdtune run knowledge_distillation --config tiny/full_chunked output_dir=/tmp/kd
    tune run kdtune/recipes/knowledge_distillation.py --config path/to/config.yaml key=value

Each step's loss is ``(1 - kd_ratio) * CE + kd_ratio * KD``, each term a mean over all target
tokens of the step (all micro-batches and ranks), so accumulation gives one large batch's
gradient. The teacher is a model (chunked logits, or hidden states for the fused loss), a
``teacher_cache`` of its top-k log-probs, or absent (CE only); with ``on_policy`` the student
first samples the step's answers (:mod:`kdtune.training.on_policy`). The config is checked
before any model is built; one process or many is one code path (FSDP2 via
:mod:`~kdtune.training.parallel`, no-ops in one process).

Outputs in ``output_dir``: ``metrics.jsonl``, ``checkpoints/step_N/`` (HF weights + training
state, written atomically; never after a NaN/inf step: :mod:`~kdtune.training.guard`) and
``logs/`` (:mod:`~kdtune.training.console`; the ``metric_logger`` writes there too).

One file, by torchtune's convention (``tune run`` and ``tune cp`` take a recipe as one file,
and a reader should hold the whole job in one place); every helper it calls lives in
:mod:`kdtune.training`, so this file stays the job's outline at about 500 lines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from kdtune import __version__
from kdtune.quantization import qat
from kdtune.teacher_cache import source as teacher_cache
from kdtune.training import console, host_memory, parallel, process_group, run_lock
from kdtune.training.adapters import freeze_all_but_adapters
from kdtune.training.checkpoint import fingerprints, resume, save, state_dicts
from kdtune.training.config.nodes import kd_vocab_columns
from kdtune.training.config.rules import check_config
from kdtune.training.data import (
    batch_to_device,
    count_loss_tokens,
    model_inputs,
    next_micro_batches,
    rank_loaders,
    shift_labels,
    steps_per_epoch,
)
from kdtune.training.guard import NO_TARGET_KEY, SKIPPED_KEY, NonFiniteGuard
from kdtune.training.loss_setup import build_loss_step
from kdtune.training.metrics import (
    MetricsWriter,
    PendingStep,
    StepLog,
    StepLosses,
    parameter_memory_record,
    peak_memory_gib,
)
from kdtune.training.on_policy import on_policy_rollout
from kdtune.training.preflight import preflight, samples_left_out
from kdtune.training.runtime import (
    Runtime,
    build_model,
    finish_teacher,
    load_weights,
    memory_stats_reader,
    prepare_student,
    prepare_teacher_for_sharding,
    set_determinism,
    setup_profiler,
    setup_runtime,
    trainable_parameters,
)
from kdtune.training.steps import MicroBatchLoss, build_lr_scheduler, optimizer_step
from kdtune.training.stop_signals import Preempted, StopRequest
from kdtune.training.validation import validate

log = utils.get_logger("INFO")


class KDRecipe(FTRecipeInterface):
    """Knowledge-distillation recipe (one class, torchtune's shape).

    Call :meth:`setup`, :meth:`train`, :meth:`cleanup`. Public progress attributes:
    ``global_step`` (optimizer steps done), ``epoch`` and ``steps_in_epoch``.

    Raises:
        ConfigError: from the constructor, for any config problem (before models are built).
    """

    def __init__(self, cfg: DictConfig) -> None:
        cfg = check_config(cfg)  # the one config pass of the launch; preflight does the rest
        self._cfg = cfg
        self._runtime: Runtime = setup_runtime(cfg)
        # One run per output_dir: a second one stops here, before anything is loaded.
        self._run_lock = run_lock.hold_output_dir(cfg.output_dir, is_main=self._runtime.is_main)
        self._output_dir = Path(cfg.output_dir)
        self._kd_ratio = float(cfg.kd_ratio)
        self._accumulation = int(cfg.gradient_accumulation_steps)
        self.seed = set_determinism(cfg.seed, cfg.deterministic, self._runtime.device)
        self.global_step = 0
        self.epoch = 0
        self.steps_in_epoch = 0
        self._metrics = MetricsWriter(self._output_dir, enabled=self._runtime.is_main)
        self._guard = NonFiniteGuard(cfg.on_non_finite, int(cfg.max_non_finite_steps))
        self.stop_request = StopRequest()  # recipe_main installs its signal handlers
        self._preempted = False

    # ------------------------------------------------------------------------------------------
    # Setup

    def setup(self, cfg: DictConfig) -> None:
        """Tokenizer, vocabulary checks, models, losses, optimizer, data, scheduler, state.

        ``cfg`` (torchtune's interface) is ignored: the constructor's checked copy is used.
        """
        cfg = self._cfg
        runtime = self._runtime
        resume_folder, resumed, self._lineage = resume.read_resume_state(
            cfg.output_dir, cfg.resume_from_checkpoint, is_main=runtime.is_main, cfg=cfg
        )
        if resumed is not None:
            seed = resume.saved_seed(resumed, cfg.seed)
            self.seed = set_determinism(seed, cfg.deterministic, runtime.device)
            self._guard.resumed(resume_folder, resumed["progress"])

        # Config, models on meta vs checkpoints, data scan: every problem before any weights.
        # A teacher_cache's top-k rows replace the teacher (opened and checked there).
        report = preflight(cfg, self._metrics, resumed, is_main=runtime.is_main)
        self._tokenizer, self._teacher_cache = report.tokenizer, report.cache
        self._left_out = samples_left_out(cfg, report)  # samples without a target

        self._metric_logger = config.instantiate(cfg.metric_logger) if runtime.is_main else None
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)
        memory_stats = memory_stats_reader(cfg.log_peak_memory_stats, runtime.device)
        self._step_log = StepLog(
            self._metrics, self._metric_logger, cfg.log_every_n_steps, memory_stats
        )
        self._step_log.check = self._guard.check_records  # raises on a NaN/inf or empty step

        self._student = self._setup_student(cfg, resume_folder)
        self._teacher = self._setup_teacher(cfg)
        self._offload_activations = training.get_act_offloading_ctx_manager(
            self._student, cfg.enable_activation_offloading
        )
        self._profiler = setup_profiler(cfg.profiler)
        self._setup_losses(cfg)
        # Measured before any forward: afterwards gathered layers may still be registered.
        parameter_memory = parameter_memory_record(self._student, self._teacher)

        # After sharding: the optimizer must hold the (DTensor) shards.
        self._optimizer = config.instantiate(cfg.optimizer, trainable_parameters(self._student))
        if resumed is not None:
            state_dicts.load_full_optimizer_state_dict(
                self._student,
                self._optimizer,
                resumed.get("optimizer"),  # rank 0's; broadcast to the others
                broadcast_from_rank0=True,
            )

        self._setup_data(cfg)
        self._total_steps = int(cfg.epochs) * self._steps_per_epoch
        if resumed is not None:
            self._restore_progress(resumed)
        self._lr_scheduler = build_lr_scheduler(
            cfg.lr_scheduler, self._optimizer, self._total_steps, self.global_step
        )
        # Steps after the checkpoint are redone; a fresh run starts a fresh file.
        self._metrics.truncate_after(self.global_step)
        self._metrics.write(
            {"kind": "setup", "step": self.global_step, "world_size": runtime.world_size}
            | parameter_memory
        )
        if resumed is not None:
            rng = resume.rank_rng_state(resumed["rng"], runtime.rank)
            resume.restore_rng_state(rng, runtime.device)
        start = f"resumed at step {self.global_step}" if resumed is not None else "fresh run"
        log.info(
            f"Setup done: {'LoRA' if self._is_lora else 'full'} student, "
            f"{'fused' if self._fused else 'chunked'} loss, {runtime.world_size} process(es), "
            f"{self._steps_per_epoch} steps/epoch, {start}; parameter GiB per rank: "
            f"{[round(gib, 4) for gib in parameter_memory['param_memory_gib']]}"
        )

    def _setup_student(self, cfg: DictConfig, resume_folder: Path | None) -> nn.Module:
        """Build on meta, freeze a LoRA base, wrap and shard, then load rank 0's weights."""
        runtime = self._runtime
        self._checkpointer = config.instantiate(cfg.checkpointer)
        model = build_model(cfg.model, runtime.dtype)
        # QAT: fake-quantised modules swapped in on meta, before freezing, sharding and loading
        self._quantizer = qat.build_quantizer(cfg.quantizer)
        model = qat.prepare_student(model, self._quantizer, runtime.dtype)
        self._fake_quant = None
        if self._quantizer is not None:
            self._fake_quant = qat.FakeQuantSchedule(self._quantizer, cfg.fake_quant_after_n_steps)
        self._is_lora = freeze_all_but_adapters(model)
        resume.check_student_kind(resume_folder, self._is_lora)
        state = None
        if runtime.is_main:
            state = resume.student_start_state(
                cfg.checkpointer, self._checkpointer, model, resume_folder, seed=self.seed
            )
        prepare_student(
            model,
            runtime,
            activation_checkpointing=cfg.enable_activation_checkpointing,
            compile_layers=cfg.compile,
        )
        load_weights(model, state, runtime, resume_folder or cfg.checkpointer.checkpoint_dir)
        del state
        training.validate_expected_param_dtype(
            ((n, p) for n, p in model.named_parameters() if p.requires_grad),
            dtype=runtime.dtype,
        )
        return model

    def _setup_teacher(self, cfg: DictConfig) -> nn.Module | None:
        if cfg.teacher_model is None or self._teacher_cache is not None:
            return None
        runtime = self._runtime
        teacher = build_model(cfg.teacher_model, runtime.dtype)
        state = None
        if runtime.is_main:
            checkpointer = config.instantiate(cfg.teacher_checkpointer)
            state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        prepare_teacher_for_sharding(teacher, runtime, compile_layers=cfg.compile)
        load_weights(teacher, state, runtime, cfg.teacher_checkpointer.checkpoint_dir)
        del state
        return finish_teacher(teacher, cfg.teacher_quantization)

    def _setup_losses(self, cfg: DictConfig) -> None:
        losses = build_loss_step(cfg, self._student, self._teacher)
        self._loss_step, self._fused = losses.step, losses.fused
        self._ignore_index, self._num_chunks = losses.ignore_index, losses.num_chunks
        self._vocab_columns = kd_vocab_columns(cfg)

    def _setup_data(self, cfg: DictConfig) -> None:
        runtime = self._runtime
        self._dataloader, self._val_dataloader = rank_loaders(
            cfg,
            self._tokenizer,
            self._ignore_index,
            self.seed,
            runtime.rank,
            runtime.world_size,
            self._left_out,
        )
        # Without the scan's list of samples to leave out, a step may have no target: its
        # token count is read on the host (one sync) so that its update can be left out.
        self._may_lack_targets = self._left_out is None or cfg.on_policy is not None
        teacher_cache.check_num_samples(self._teacher_cache, self._dataloader.dataset.dataset)
        self._rollout = on_policy_rollout(
            cfg, self._dataloader.dataset, self._tokenizer, self.seed, self._ignore_index
        )
        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader), cfg.batch_size, self._accumulation, cfg.max_steps_per_epoch
        )

    def _progress(self) -> dict[str, int]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "steps_in_epoch": self.steps_in_epoch,
            SKIPPED_KEY: self._guard.skipped,
            NO_TARGET_KEY: self._guard.no_target_steps,
        }

    def _run_invariants(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "batch_size": int(self._cfg.batch_size),
            "gradient_accumulation_steps": self._accumulation,
            "steps_per_epoch": self._steps_per_epoch,
            "world_size": self._runtime.world_size,
        }

    def _restore_progress(self, resumed: dict[str, Any]) -> None:
        """Progress counters and the data-loader position of a resumed run."""
        self.global_step, self.epoch, self.steps_in_epoch = resume.resumed_progress(
            resumed, self._run_invariants(), self._steps_per_epoch
        )
        if self.steps_in_epoch > 0:
            self._dataloader.load_state_dict(resumed["dataloader"])

    # ------------------------------------------------------------------------------------------
    # Training

    def accumulate_gradients(self, micro_batches: list[dict[str, Tensor]]) -> dict[str, Any]:
        """Forward and backward over one step's micro-batches (no optimizer step): the step's
        mean ``loss``, ``ce_loss``, ``kd_loss`` (None without a teacher) and ``num_tokens`` (all
        ranks) as Python numbers (one host sync; the training loop reads them when it logs)."""
        return self._accumulate(micro_batches).to_host()

    def _accumulate(self, micro_batches: list[dict[str, Tensor]]) -> StepLosses:
        """The KD step: every micro-batch loss is its token sum divided by the step's target
        token count (all micro-batches, all ranks), so the accumulated gradient is the gradient
        of the step's mean loss. No host sync: the results stay on the device."""
        batches = [batch_to_device(batch, self._runtime.device) for batch in micro_batches]
        labels = [
            shift_labels(b["labels"], self._ignore_index, b.get("input_pos")) for b in batches
        ]
        num_tokens = process_group.all_reduce_sum(count_loss_tokens(labels, self._ignore_index))
        parts: list[MicroBatchLoss] = []
        for index, (batch, shifted) in enumerate(zip(batches, labels)):
            # FSDP2 reduce-scatters the gradients once, in the last micro-batch's backward.
            parallel.set_gradient_sync(self._student, index == len(batches) - 1)
            teacher = teacher_cache.teacher_view(
                self._teacher, self._teacher_cache, batch, shifted, self._ignore_index
            )
            with self._offload_activations:
                part = self._loss_step(
                    self._student,
                    teacher,
                    batch["tokens"],
                    shifted,
                    num_tokens,
                    **model_inputs(batch),
                )
            self._release_host_memory()  # the forward's freed pages (training.host_memory)
            part.loss.backward()
            parts.append(MicroBatchLoss(part.loss.detach(), part.ce, part.kd))
        return StepLosses.summed(parts, num_tokens)

    def _release_host_memory(self) -> None:
        """On CPU, give the heap's free pages back to the system (lower peak resident memory;
        :mod:`kdtune.training.host_memory`). Device memory is the caching allocator's."""
        if self._runtime.device.type == "cpu":
            host_memory.release_free_heap()

    def _stop_requested(self) -> bool:
        stop = self._cfg.stop_after_steps
        return self._preempted or (stop is not None and self.global_step >= stop)

    def train(self) -> None:
        """Run the remaining steps; validate and checkpoint as configured; save at the end."""
        cfg = self._cfg
        progress = tqdm(
            total=self._total_steps,
            initial=self.global_step,
            disable=not self._runtime.is_main,
            dynamic_ncols=True,
        )
        self._step_log.progress = progress
        self._profiler.start()
        validated_at = saved_at = -1
        while self.epoch < int(cfg.epochs) and not self._stop_requested():
            self._dataloader.sampler.set_epoch(self.epoch)
            batches = iter(self._dataloader)
            while self.steps_in_epoch < self._steps_per_epoch and not self._stop_requested():
                micro_batches = next_micro_batches(batches, self._accumulation)
                if micro_batches is None:
                    break
                self._train_step(micro_batches, progress)
                self._preempted = self.stop_request.agreed(self._runtime.device)
                self._profiler.step()
                if self._due(cfg.validate_every_n_steps):
                    self._validate()
                    validated_at = self.global_step
                last = self.global_step >= self._total_steps or self._stop_requested()
                if self._due(cfg.save_every_n_steps) and not last:
                    self.save_checkpoint()
                    saved_at = self.global_step
            if self.steps_in_epoch >= self._steps_per_epoch:
                self.epoch, self.steps_in_epoch = self.epoch + 1, 0
        self._profiler.stop()
        self._step_log.flush()
        self._step_log.progress = None
        progress.close()
        finished = self.epoch >= int(cfg.epochs)
        if finished and validated_at != self.global_step:
            self._validate()
        if saved_at != self.global_step:
            self.save_checkpoint(final=finished)
        if self._preempted and not finished:
            raise self.stop_request.stopped(self.global_step, self._guard.last_checkpoint)

    def _due(self, every: int | None) -> bool:
        return every is not None and self.global_step % every == 0

    def _train_step(self, micro_batches: list[dict[str, Tensor]], progress: tqdm) -> None:
        """One optimizer step; its record waits, on the device, for the next logging step."""
        started = time.perf_counter()
        extra: dict[str, float] = {}
        if self._fake_quant is not None:  # a function of the step: a resumed run agrees
            extra["fake_quant"] = float(self._fake_quant.apply(self._student, self.global_step))
        if self._rollout is not None:  # on-policy steps: the sequences are sampled first
            micro_batches, generation = self._rollout.step(
                self._student, self._teacher, micro_batches, self.global_step
            )
            extra |= generation
        losses = self._accumulate(micro_batches)
        has_targets = not self._may_lack_targets or bool(losses.num_tokens.item())
        if not has_targets:
            message = self._guard.no_target_step(self.global_step + 1)
            if self._runtime.is_main:
                log.warning(message)
        self._release_host_memory()  # the backward's, before the optimizer's state grows
        grad_norm, lr, skipped = optimizer_step(
            self._student,
            self._optimizer,
            self._lr_scheduler,
            max_norm=self._cfg.clip_grad_norm,
            guard=self._guard,
            loss_sums=losses.sums,
            has_targets=has_targets,
        )
        self.global_step, self.steps_in_epoch = self.global_step + 1, self.steps_in_epoch + 1
        self._step_log.add(
            PendingStep(
                step=self.global_step,
                epoch=self.epoch,
                lr=lr,
                seconds=time.perf_counter() - started,
                peak_memory_gib=peak_memory_gib(self._runtime.device),
                losses=losses,
                grad_norm=grad_norm,
                skipped=skipped,
                extra=extra,
            )
        )

    def _validate(self) -> None:
        self._step_log.flush()
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
        log.info(f"validation at step {self.global_step}: {console.figures(vars(result))}")
        self._step_log.write_validation(record)  # the guard: a NaN validation CE stops the run

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, epoch: int | None = None, *, final: bool = False) -> Path | None:
        """Write ``checkpoints/step_<global_step>/`` atomically and prune old ones; a collective
        (rank 0 writes, returns the folder; others get None). ``epoch`` is ignored (torchtune's
        interface): checkpoints are named by optimizer step."""
        self._step_log.flush()  # the guard checks the steps' losses, then the weights:
        self._guard.check_weights(self._student, self.global_step)
        adapter_only = self._is_lora and bool(self._cfg.save_adapter_weights_only)
        state = state_dicts.gather_full_state_dict(self._student, trainable_only=adapter_only)
        optimizer_state = state_dicts.gather_full_optimizer_state_dict(
            self._student, self._optimizer
        )
        rng = process_group.gather_objects(resume.capture_rng_state(self._runtime.device))
        folder = None
        if self._runtime.is_main:
            folder = save.save_step_checkpoint(
                self._output_dir,
                self.global_step,
                checkpointer=self._checkpointer,
                weights=save.weights_to_save(
                    self._student, state, is_lora=self._is_lora, adapter_only=adapter_only
                ),
                adapter_only=adapter_only,
                training_state={
                    "optimizer": optimizer_state,
                    # Rank 0's loader position serves all ranks (same batch of each shard).
                    "dataloader": self._dataloader.state_dict(),
                    "rng": rng,  # one entry per rank
                    "run": self._run_invariants(),
                    "progress": self._progress(),
                },
                manifest={
                    "kdtune_version": __version__,
                    "final": final,
                    **self._progress(),
                    **self._lineage,  # run_id, parent
                    "total_steps": self._total_steps,
                    "student": "lora" if self._is_lora else "full",
                    "merged_weights": not adapter_only,
                    "world_size": self._runtime.world_size,
                    "fingerprints": fingerprints.record(self._cfg, is_lora=self._is_lora),
                },
                keep_last=self._cfg.keep_last_n_checkpoints,
            )
        del state, optimizer_state
        process_group.barrier()  # no rank goes on, or ends, before the checkpoint is complete
        self._guard.saved(folder, self._output_dir, self.global_step)
        return folder

    def cleanup(self) -> None:
        """Close the metric logger and free output_dir (also after a failed setup)."""
        if getattr(self, "_metric_logger", None) is not None:
            self._metric_logger.close()
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Knowledge distillation. Run ``kdtune ls`` for configs; override any key with key=value.

    Under ``torchrun`` with several processes the process group lives as long as this call:
    the recipe starts it and this ends it (barrier, then ``destroy_process_group``).
    """
    with console.run_context(cfg.get("output_dir")):  # warnings, errors, log files
        recipe = KDRecipe(cfg=cfg)
        recipe.stop_request.install()  # SIGTERM/SIGINT/SIGUSR1: checkpoint, then stop
        finished = False
        try:
            console.start_run_log(recipe._cfg, recipe._runtime.is_main)  # + resolved config
            recipe.setup(cfg=cfg)
            with console.log_above_progress_bar():
                recipe.train()
            finished = True
        except Preempted:
            finished = True  # every rank stops here, after the same checkpoint
            raise
        finally:
            recipe.stop_request.uninstall()
            recipe.cleanup()
            # After a failure no barrier: the other ranks may never reach it.
            process_group.teardown(wait_for_all=finished)


if __name__ == "__main__":
    console.exit_recipe(console.run_recipe_main(recipe_main))
