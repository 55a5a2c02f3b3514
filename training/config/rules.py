"""Phase 1 of the preflight: the rules a config must follow, read from the config alone.

:func:`config_problems` (raised by :func:`check_config`) reads only the config: unknown or
misspelt keys (top level and inside every ``_component_`` node), value types and ranges (the
schema, :mod:`kdtune.training.config.schema`), the loss combination (chunked, fused or CE
only), chunk counts and ``ignore_index`` that must agree, LoRA options, the losses, optimizer
and scheduler built with their real options (a value their constructor rejects is named by its
key: the constructor is the one place such a range is written), and missing checkpoint,
tokenizer and data files. Later phases (models on the meta device, the data scan) are in
:mod:`kdtune.training.preflight`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException
from torchtune.training import ModelType

from kdtune.training.config.component_rules import check_by_building, check_components
from kdtune.training.config.errors import Problems
from kdtune.training.config.nodes import (
    checkpoint_files,
    closest,
    component_class,
    component_options,
    interpolated_keys,
    is_fused_loss,
    is_int,
    is_kdtune_loss,
    is_number,
    normalize_null_components,
)
from kdtune.training.config.schema import FIELDS, schema_problems, with_defaults

_DATA_FILE_SOURCES = ("json", "csv", "parquet", "text", "arrow")


# --------------------------------------------------------------------------------------------
# Phase 1: the config alone
# --------------------------------------------------------------------------------------------


def _check_top_level_keys(cfg: DictConfig, problems: Problems) -> None:
    """Unknown keys get the closest known key; the schema reports missing and bad values."""
    known = list(FIELDS)
    referenced = interpolated_keys(cfg)
    for key in cfg:
        key = str(key)
        if key not in FIELDS and key not in referenced:
            problems.error(
                f"unknown key '{key}'{closest(key, known)}: the recipe does not read it; "
                f"remove it or fix its spelling (known keys: kdtune validate --help)",
                key,
            )
    for key, message in schema_problems(cfg):
        problems.error(message, key)


def _check_on_policy(cfg: DictConfig, problems: Problems) -> None:
    """What an ``on_policy`` block cannot be combined with (its own keys are the schema's)."""
    node = cfg.get("on_policy")
    if node is None or problems.blocks("on_policy") or not node.get("fraction", 0.0):
        return
    if cfg.get("teacher_cache") is not None:
        problems.error(
            "on_policy.fraction > 0 with teacher_cache: the cache holds the teacher's view of the "
            "dataset's answers only, not of sampled sequences; set teacher_cache: null (an "
            "online teacher) or on_policy: null"
        )
    if cfg.get("teacher_model") is None:
        problems.error(
            "on_policy.fraction > 0 needs a teacher to grade the sampled tokens: configure "
            "teacher_model and teacher_checkpointer, or set on_policy: null"
        )
    dataset = cfg.get("dataset")
    if not isinstance(dataset, DictConfig) or dataset.get("packed", False):
        problems.error(
            "on_policy.fraction > 0 reads each sample's prompt from one unpacked dataset: use a "
            "single dataset node with packed: false"
        )


def _check_loss_setup(cfg: DictConfig, problems: Problems) -> None:
    """Which losses go together: chunked CE + chunked KD, fused KD alone, or CE only."""
    kd_ratio = cfg.get("kd_ratio")
    teacher, teacher_ckpt = cfg.get("teacher_model"), cfg.get("teacher_checkpointer")
    loss, kd_loss = cfg.get("loss"), cfg.get("kd_loss")
    cached = cfg.get("teacher_cache") is not None  # stands in for the teacher

    if (teacher is None) != (teacher_ckpt is None):
        missing = "teacher_checkpointer" if teacher_ckpt is None else "teacher_model"
        problems.error(
            f"{missing} is null but the other teacher key is set: set both teacher_model and "
            "teacher_checkpointer, or both to null for CE-only training (kd_ratio: 0.0)"
        )
    if teacher is None and not cached:
        if kd_ratio != 0:
            problems.error(
                f"teacher_model is null but kd_ratio = {kd_ratio!r}: without a teacher only "
                "CE training is possible; set kd_ratio: 0.0, or configure a teacher"
            )
        if kd_loss is not None:
            problems.error(
                "kd_loss is set but teacher_model is null: set kd_loss: null for CE-only "
                "training (the CE term comes from `loss`)"
            )
        if cfg.get("teacher_quantization") is not None:
            problems.error("teacher_quantization is set but teacher_model is null: set it to null")
    elif kd_loss is None:
        problems.error(
            "kd_loss is null but a teacher (or teacher_cache) is configured: set kd_loss to a "
            "loss from kdtune.losses (e.g. kdtune.losses.ForwardKLWithChunkedOutputLoss)"
        )

    try:
        fused = is_fused_loss(kd_loss)
    except Exception:
        return  # the import problem is already reported by check_components
    if fused:
        if loss is not None:
            problems.error(
                "loss is set but kd_loss is the fused loss, which computes the CE term itself "
                "from the same hidden states: set loss: null"
            )
        return
    if loss is None:
        problems.error(
            "loss is null: with a chunked kd_loss (or none) the CE term needs "
            "loss: {_component_: kdtune.losses.CEWithChunkedOutputLoss}"
        )
        return
    try:
        loss_cls = component_class(loss)
        kd_cls = component_class(kd_loss)
    except Exception:
        return
    for key, cls in (("loss", loss_cls), ("kd_loss", kd_cls)):
        if cls is None:
            continue
        # A loss without num_tokens (torchtune's own) is a mean over its micro-batch; the
        # recipe rescales it to the step's token count (loss_setup.StepNormalized).
        if not is_kdtune_loss(cls) and "ignore_index" not in component_options(cfg[key]):
            problems.error(
                f"{key}._component_ = {cfg[key]['_component_']}: its forward takes no num_tokens "
                "and it has no ignore_index, so its mean cannot be rescaled to the step's token "
                "count; use a loss from kdtune.losses or torchtune.modules.loss",
                key,
            )
            return
        if "num_output_chunks" not in component_options(cfg[key]):
            problems.error(f"{key}: {cfg[key]['_component_']} is not a chunked loss", key)
            return
    _check_chunked_pair(cfg, problems)


def _check_chunked_pair(cfg: DictConfig, problems: Problems) -> None:
    loss_options = component_options(cfg.loss)
    chunks = loss_options["num_output_chunks"]
    if not is_int(chunks) or chunks < 1:
        problems.error(
            f"loss.num_output_chunks = {chunks!r} is invalid: use an int >= 1",
            "loss.num_output_chunks",
        )
    if cfg.kd_loss is None:
        return
    kd_options = component_options(cfg.kd_loss)
    if kd_options["num_output_chunks"] != chunks:
        problems.error(
            f"kd_loss.num_output_chunks = {kd_options['num_output_chunks']!r} but "
            f"loss.num_output_chunks = {chunks!r}: both models emit one list of chunks shared by "
            "both losses; set both to the same number",
            "kd_loss.num_output_chunks",
        )
    if kd_options["ignore_index"] != loss_options["ignore_index"]:
        problems.error(
            f"kd_loss.ignore_index = {kd_options['ignore_index']!r} but loss.ignore_index = "
            f"{loss_options['ignore_index']!r}: set both to the same value",
            "kd_loss.ignore_index",
        )


def _check_loss_reduction(cfg: DictConfig, problems: Problems) -> None:
    """The recipe's own rule for its losses (their option ranges are their constructors')."""
    for key in ("loss", "kd_loss"):
        node = cfg.get(key)
        try:
            reduction = component_options(node).get("reduction") if node is not None else None
        except Exception:
            continue
        if reduction not in (None, "mean"):
            problems.error(
                f"{key}.reduction = {reduction!r}: the recipe divides every micro-batch's sum by "
                f"the step's token count through num_tokens, which needs reduction: mean",
                f"{key}.reduction",
            )


LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
"""What torchtune's ``lora_*`` builders accept in ``lora_attn_modules``."""


def _check_lora_options(cfg: DictConfig, problems: Problems) -> None:
    """A LoRA/DoRA builder's options (``model.lora_rank=0`` would divide by zero in the
    builder; an empty target list silently trains nothing)."""
    node = cfg.get("model")
    try:
        options = component_options(node) if isinstance(node, DictConfig) else {}
    except Exception:
        return  # import problems are reported by check_components
    if "lora_rank" not in options:
        return
    rank, alpha = options.get("lora_rank"), options.get("lora_alpha")
    dropout, modules = options.get("lora_dropout", 0.0), options.get("lora_attn_modules")
    if not is_int(rank) or rank < 1:
        problems.error(
            f"model.lora_rank = {rank!r} must be an int >= 1 (the adapters' inner dimension; "
            "the update is scaled by lora_alpha / lora_rank): e.g. 8",
            "model.lora_rank",
        )
    if alpha is not None and (not is_number(alpha) or alpha <= 0):
        problems.error(
            f"model.lora_alpha = {alpha!r} must be a number > 0 (often 2 * lora_rank)",
            "model.lora_alpha",
        )
    if not is_number(dropout) or not 0 <= dropout < 1:
        problems.error(
            f"model.lora_dropout = {dropout!r} must be in [0, 1): e.g. 0.0 or 0.05",
            "model.lora_dropout",
        )
    if modules is not None:
        names = [str(m) for m in modules] if isinstance(modules, ListConfig | list) else None
        unknown = [m for m in names if m not in LORA_ATTN_MODULES] if names is not None else []
        if names is None or unknown:
            problems.error(
                f"model.lora_attn_modules = {modules!r}: use a list drawn from "
                f"{list(LORA_ATTN_MODULES)} (unknown: {unknown or modules!r})",
                "model.lora_attn_modules",
            )
        elif not (names or options.get("apply_lora_to_mlp") or options.get("apply_lora_to_output")):
            problems.error(
                "model.lora_attn_modules is empty and apply_lora_to_mlp / apply_lora_to_output "
                "are false: the student would have no adapters; list modules (e.g. "
                "[q_proj, v_proj]) or use a full-model builder",
                "model.lora_attn_modules",
            )


def _check_quantizer(cfg: DictConfig, problems: Problems) -> None:
    """``quantizer`` builds one of the QAT quantisers kdtune trains with (cheap: no model);
    ``fake_quant_after_n_steps`` needs one."""
    from kdtune.quantization.qat import build_quantizer

    node = cfg.get("quantizer")
    if node is None:
        if cfg.get("fake_quant_after_n_steps") is not None:
            problems.error(
                "fake_quant_after_n_steps is set but quantizer is null: set a quantizer or "
                "remove fake_quant_after_n_steps",
                "fake_quant_after_n_steps",
            )
        return
    if problems.blocks("quantizer"):
        return
    try:
        build_quantizer(node)
    except ValueError as error:
        problems.error(str(error), "quantizer")


def _check_activation_offloading(cfg: DictConfig, problems: Problems) -> None:
    """As torchtune's recipes: offloading needs CUDA and activation checkpointing."""
    if not cfg.enable_activation_offloading:
        return
    if not str(cfg.device).startswith("cuda"):
        problems.error(
            f"enable_activation_offloading = true with device = {cfg.device!r}: offloading "
            "moves activations from the GPU to CPU memory; set it to false on CPU"
        )
    if not cfg.enable_activation_checkpointing:
        problems.error(
            "enable_activation_offloading = true needs enable_activation_checkpointing: true "
            "(as in torchtune): set both, or set enable_activation_offloading: false"
        )


def _check_datasets(cfg: DictConfig, problems: Problems) -> None:
    nodes = [("dataset", cfg.get("dataset"))]
    if isinstance(nodes[0][1], ListConfig):
        nodes = [(f"dataset[{i}]", node) for i, node in enumerate(cfg.dataset)]
    if cfg.get("validation_dataset") is not None:
        nodes.append(("validation_dataset", cfg.validation_dataset))
    for key, node in nodes:
        if not isinstance(node, DictConfig) or "_component_" not in node:
            problems.error(
                f"{key} must be a _component_ node (e.g. torchtune.datasets.alpaca_dataset)"
            )
            continue
        if key == "validation_dataset" and node.get("packed", False):
            problems.error(
                f"{key}.packed = true is not supported for validation (packing is a training "
                "speed-up): set packed: false"
            )
        if node.get("source") in _DATA_FILE_SOURCES and node.get("data_files") is not None:
            files = node.data_files
            for file in [files] if isinstance(files, str) else list(files):
                if not Path(str(file)).exists():
                    problems.error(
                        f"{key}.data_files: {file} does not exist; fix the path (tiny configs: "
                        "create the assets with `python -m kdtune.assets --out <assets_dir>`)",
                        f"{key}.data_files",
                    )


def _check_checkpoint_files(cfg: DictConfig, problems: Problems) -> None:
    for key in ("checkpointer", "teacher_checkpointer"):
        node = cfg.get(key)
        if node is None or (key == "teacher_checkpointer" and cfg.get("teacher_cache")):
            continue
        try:
            folder = Path(str(node.checkpoint_dir))
            files = checkpoint_files(node)
        except (OmegaConfBaseException, AttributeError, ValueError) as error:
            problems.error(f"{key}: needs checkpoint_dir and checkpoint_files ({error})", key)
            continue
        model_type = node.get("model_type")
        if model_type is not None and str(model_type) not in ModelType.__members__:
            problems.error(
                f"{key}.model_type = {model_type!r} is not one of torchtune's model types "
                f"{list(ModelType.__members__)}: use the one of the checkpoint's architecture",
                f"{key}.model_type",
            )
        if not folder.is_dir():
            problems.error(
                f"{key}.checkpoint_dir: {folder} does not exist; download the model there "
                "(e.g. `tune download <repo> --output-dir <dir>`) or fix the path",
                f"{key}.checkpoint_dir",
            )
            continue
        missing = [name for name in files if not (folder / name).is_file()]
        if "HFCheckpointer" in str(node["_component_"]) and not (folder / "config.json").is_file():
            missing.append("config.json")
        if missing:
            problems.error(
                f"{key}.checkpoint_files: {missing} not found in {folder}; fix checkpoint_files "
                "or the folder",
                f"{key}.checkpoint_files",
            )
    for key in ("path", "special_tokens_path", "merges_file"):
        value = cfg.tokenizer.get(key) if isinstance(cfg.get("tokenizer"), DictConfig) else None
        if isinstance(value, str) and not Path(value).exists():
            problems.error(f"tokenizer.{key}: {value} does not exist; fix the path", "tokenizer")


def _check_student_checkpointer(cfg: DictConfig, problems: Problems) -> None:
    from torchtune.training import FullModelHFCheckpointer

    try:
        cls = component_class(cfg.checkpointer)
    except Exception:
        return
    if not (isinstance(cls, type) and issubclass(cls, FullModelHFCheckpointer)):
        problems.error(
            f"checkpointer._component_ = {cfg.checkpointer['_component_']}: the student is saved "
            "in Hugging Face format; use torchtune.training.FullModelHFCheckpointer"
        )


def _check_tokenizer_length(cfg: DictConfig, problems: Problems) -> None:
    """``tokenizer.max_seq_len`` cuts every sample: null (no cut) or at least one token."""
    node = cfg.get("tokenizer")
    length = node.get("max_seq_len") if isinstance(node, DictConfig) else None
    if length is not None and (not is_int(length) or length < 1):
        problems.error(
            f"tokenizer.max_seq_len = {length!r} is invalid: use null (no cut) or the most "
            "tokens per sample (e.g. the models' context, 2048)",
            "tokenizer.max_seq_len",
        )


_DEPENDENT_CHECKS: tuple[Callable[[DictConfig, Problems], None], ...] = (
    _check_tokenizer_length,
    _check_loss_setup,
    _check_loss_reduction,
    _check_on_policy,
    _check_lora_options,
    _check_quantizer,
    check_by_building,
    _check_student_checkpointer,
    _check_activation_offloading,
    _check_datasets,
    _check_checkpoint_files,
)
"""Checks that read the values checked first (run even when those have problems: the user
sees everything at once; a check that fails on a reported bad value is skipped)."""


def config_problems(cfg: DictConfig, problems: Problems) -> DictConfig:
    """Phase 1 into ``problems``: the config alone. Builds nothing but the cheap components
    (losses, optimizer, scheduler on a stand-in parameter), reads only file names.

    Returns:
        The copy of ``cfg`` the later phases read: null component overrides read as null
        (:func:`normalize_null_components`), absent optional keys at their defaults.
    """
    cfg = normalize_null_components(cfg)
    _check_top_level_keys(cfg, problems)
    check_components(cfg, problems)
    cfg = with_defaults(cfg)
    for check in _DEPENDENT_CHECKS:
        reported = len(problems.errors)
        try:
            check(cfg, problems)
        except Exception:
            if not reported:
                raise
            # a consequence of a problem already reported (e.g. a value of the wrong type)
    return cfg


def check_config(cfg: DictConfig) -> DictConfig:
    """Phase 1: check the config alone; ``cfg`` is left unchanged.

    Returns:
        The checked copy the run reads: null component overrides read as null
        (:func:`~kdtune.training.config.nodes.normalize_null_components`), absent optional
        keys at their defaults.

    Raises:
        ConfigError: every problem found, one per line, each naming key, value and fix.
    """
    problems = Problems()
    checked = config_problems(cfg, problems)
    problems.raise_if_any("before building models")
    return checked
