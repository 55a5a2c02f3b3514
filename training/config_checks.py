"""Check a KD recipe config before anything is built.

The phases of the preflight (:mod:`kdtune.training.preflight` runs them all, for the recipe and
``kdtune validate``, and reports every problem at once):

1. :func:`config_problems` (raised by :func:`check_config`) reads only the config: unknown or
   misspelt keys (top level and inside every ``_component_`` node), value types and ranges,
   the loss combination (chunked, fused or CE only), chunk counts and ``ignore_index`` that
   must agree, LoRA options, the losses, optimizer and scheduler built with their real options
   (a value they reject is named by its key), and missing checkpoint, tokenizer and data files.
2. :func:`model_problems` compares facts about the models and the tokenizer: vocabulary sizes
   (an error naming both, unless ``kd_loss.vocab_columns`` truncates to the smaller one and the
   tokenizer never produces an id beyond it) and the teacher's size (a warning when smaller
   than the student). :func:`describe_model` gets those facts, and the architecture a
   checkpoint's ``config.json`` must match, by building a model on the meta device, which
   costs no memory and loads no weights.

Every problem is a :class:`Problem` keyed by the config key at fault (a later check of that key
is skipped: :meth:`Problems.blocks`); raised, they are one :class:`ConfigError` (a
``ValueError``) listing each with its key, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torchtune.config._utils import _get_component_from_path
from torchtune.modules.peft import get_adapter_params
from torchtune.training import ModelType

from kdtune.losses.fused import FusedLinearKDLoss
from kdtune.training.config_schema import FIELDS, schema_problems, with_defaults


class ConfigError(ValueError):
    """A config problem found before any model is built. The message names key, value and fix."""


DISTRIBUTED_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["multi_process"])
"""Keys read only when ``torchrun`` launched several processes (their defaults apply there)."""

_DATA_FILE_SOURCES = ("json", "csv", "parquet", "text", "arrow")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


# --------------------------------------------------------------------------------------------
# Small readers used by the checks (and by the recipe, so both read the config the same way)
# --------------------------------------------------------------------------------------------


def _closest(name: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def interpolated_keys(cfg: DictConfig) -> set[str]:
    """Top-level names that some value refers to as ``${name...}`` (e.g. ``assets_dir``)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            found.update(_INTERPOLATION.findall(node))

    walk(container)
    return found


def component_class(node: Any) -> Any:
    """The object a ``_component_`` node names (imported), or None for a null node."""
    if node is None:
        return None
    return _get_component_from_path(str(node["_component_"]))


def component_options(node: DictConfig) -> dict[str, Any]:
    """The options a component is built with: its signature defaults, then the node's values.

    Used to read e.g. ``kd_loss.temperature`` when the YAML relies on the class default.
    """
    target = component_class(node)
    options: dict[str, Any] = {}
    for name, param in inspect.signature(target).parameters.items():
        if param.default is not inspect.Parameter.empty:
            options[name] = param.default
    for key, value in node.items():
        if key != "_component_":
            options[str(key)] = value
    return options


def _forward_accepts(cls: Any, name: str) -> bool:
    forward = getattr(cls, "forward", None)
    return forward is not None and name in inspect.signature(forward).parameters


def is_fused_loss(node: Any) -> bool:
    """True when a loss node names :class:`kdtune.losses.fused.FusedLinearKDLoss` (or a subclass)."""
    if node is None:
        return False
    cls = component_class(node)
    return isinstance(cls, type) and issubclass(cls, FusedLinearKDLoss)


def loss_chunks(node: DictConfig) -> int:
    """Number of chunks of a chunked loss (``num_output_chunks``) or the fused loss (``num_chunks``)."""
    options = component_options(node)
    return int(options["num_chunks"] if is_fused_loss(node) else options["num_output_chunks"])


# --------------------------------------------------------------------------------------------
# Phase 1: the config alone
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One config problem: the key at fault (dotted, e.g. ``optimizer.lr``; empty when no
    single key is) and the message naming its value and the fix."""

    key: str
    message: str


@dataclass
class Problems:
    """Collects every problem of every phase so the user sees them all at once."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, message: str, key: str = "") -> None:
        self.errors.append(Problem(key, message))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def blocks(self, key: str) -> bool:
        """True when a problem of ``key``, a key inside it or the node holding it was reported
        (a later check of ``key`` would only repeat it, or fail on the bad value)."""
        for problem in self.errors:
            a, b = sorted((problem.key, key), key=len)
            if a and (b == a or b.startswith((f"{a}.", f"{a}["))):
                return True
        return False

    def text(self, phase: str) -> str:
        """``N config problem(s) <phase>:`` and one ``  - message`` line per problem."""
        lines = "\n".join(f"  - {problem.message}" for problem in self.errors)
        return f"{len(self.errors)} config problem(s) {phase}:\n{lines}"

    def raise_if_any(self, phase: str) -> None:
        if self.errors:
            raise ConfigError(self.text(phase))


def _check_top_level_keys(cfg: DictConfig, problems: Problems) -> None:
    """Unknown keys get the closest known key; the schema reports missing and bad values."""
    known = list(FIELDS)
    referenced = interpolated_keys(cfg)
    for key in cfg:
        key = str(key)
        if key not in FIELDS and key not in referenced:
            problems.error(
                f"unknown key '{key}'{_closest(key, known)}: the recipe does not read it; "
                f"remove it or fix its spelling (known keys: kdtune validate --help)",
                key,
            )
    for message in schema_problems(cfg):
        problems.error(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _component_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every ``_component_`` node under ``node`` (depth first) with its dotted path."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            yield path, node
        for key in node:
            yield from _component_nodes(node._get_node(key), f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _component_nodes(node._get_node(index), f"{path}[{index}]")


def _check_component_keys(path: str, node: DictConfig, problems: Problems) -> Callable | None:
    """The component imports, and each of the node's keys is a parameter it takes."""
    try:
        target = component_class(node)
    except Exception as error:  # import problems of any kind are reported, not raised
        problems.error(
            f"{path}._component_ = {node['_component_']!r} cannot be imported: {error}", path
        )
        return None
    names = accepted_options(target)
    if names is None:
        return target  # takes **kwargs that go nowhere we can see: any key may be meant for it
    for key in node:
        key = str(key)
        if key != "_component_" and key not in names:
            problems.error(
                f"{path}.{key}: {node['_component_']} has no option '{key}'"
                f"{_closest(key, names)}; its options are {names}",
                f"{path}.{key}",
            )
    return target


def accepted_options(target: Callable) -> list[str] | None:
    """The keyword options ``target`` accepts, or None when it takes ``**kwargs`` that cannot be
    followed. A class whose ``__init__`` passes ``**kwargs`` up its bases (kdtune's losses) is
    followed through its MRO until an ``__init__`` without ``**kwargs`` closes the list."""
    signatures = []
    if inspect.isclass(target):
        signatures = [vars(k)["__init__"] for k in target.__mro__ if "__init__" in vars(k)]
    else:
        signatures = [target]
    names: list[str] = []
    for function in signatures:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        names += [n for n, p in parameters.items() if p.kind not in _VARIADIC and n != "self"]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return list(dict.fromkeys(names))
    return None


_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)


def _check_by_building(cfg: DictConfig, problems: Problems) -> None:
    """Build the cheap components with their real options (the losses, and the optimizer and
    scheduler on one stand-in parameter), so a value they reject is reported here, naming the
    key, not at step 1. A key with a problem already reported is not built again."""
    from torchtune import config

    for key in ("loss", "kd_loss", "optimizer", "lr_scheduler"):
        if isinstance(cfg.get(key), DictConfig):
            _check_option_types(key, cfg[key], problems)
    for key in ("loss", "kd_loss"):
        node = cfg.get(key)
        if node is None or problems.blocks(key):
            continue
        try:
            config.instantiate(node)
        except Exception as error:
            problems.error(f"{key}: {node['_component_']} rejects its options: {error}", key)
    optimizer_node = cfg.get("optimizer")
    if optimizer_node is None or problems.blocks("optimizer"):
        return
    try:
        optimizer = config.instantiate(optimizer_node, [nn.Parameter(torch.zeros(1))])
    except Exception as error:
        problems.error(
            f"optimizer: {optimizer_node['_component_']} rejects its options: {error}", "optimizer"
        )
        return
    scheduler_node = cfg.get("lr_scheduler")
    if scheduler_node is None or problems.blocks("lr_scheduler"):
        return
    try:
        config.instantiate(scheduler_node, optimizer, num_training_steps=1)
    except Exception as error:
        problems.error(
            f"lr_scheduler: {scheduler_node['_component_']} rejects its options: {error}",
            "lr_scheduler",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_option_types(key: str, node: DictConfig, problems: Problems) -> None:
    """An option whose default (or, without one, its annotation) is a number, or whose default
    is a tuple of numbers (``betas``), must be one: ``optimizer.lr=fast`` is named here instead
    of surfacing as a ``TypeError`` inside the component."""
    try:
        parameters = inspect.signature(component_class(node)).parameters
    except Exception:
        return  # import problems are reported by _check_components
    for name, value in node.items():
        param = parameters.get(str(name))
        if param is None:
            continue
        expected = _expected_type(param)
        if expected is None or _has_type(value, expected):
            continue
        default = (
            ""
            if param.default is inspect.Parameter.empty
            else f"; its default is {param.default!r}"
        )
        problems.error(
            f"{key}: {node['_component_']} rejects its options: {key}.{name} = {value!r} is "
            f"not {expected}{default}",
            f"{key}.{name}",
        )


def _expected_type(param: inspect.Parameter) -> str | None:
    """ "a number", "a list of N numbers" or None (not checked) for a component parameter."""
    default = param.default
    if default is inspect.Parameter.empty:
        numeric = param.annotation in (int, float, "int", "float")
        return "a number" if numeric else None
    if _is_number(default):
        return "a number"
    if isinstance(default, tuple) and default and all(_is_number(v) for v in default):
        return f"a list of {len(default)} numbers"
    return None


def _has_type(value: Any, expected: str) -> bool:
    if expected == "a number":
        return _is_number(value)
    size = int(expected.split()[3])
    sequence = isinstance(value, ListConfig | list | tuple)
    return sequence and len(value) == size and all(_is_number(v) for v in value)


def _check_on_policy(cfg: DictConfig, problems: Problems) -> None:
    """The ``on_policy`` block's own keys, and what it cannot be combined with."""
    from kdtune.training.on_policy import on_policy_settings

    try:
        settings = on_policy_settings(cfg.get("on_policy"))
    except ValueError as error:
        problems.error(str(error), "on_policy")
        return
    if settings is None:
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


def _check_components(cfg: DictConfig, problems: Problems) -> None:
    for key in cfg:
        for path, node in _component_nodes(cfg._get_node(key), str(key)):
            _check_component_keys(path, node, problems)


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
        return  # the import problem is already reported by _check_components
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
        # recipe rescales it to the step's token count (runtime.StepNormalized).
        if not _forward_accepts(cls, "num_tokens") and "ignore_index" not in component_options(
            cfg[key]
        ):
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
    if not _is_int(chunks) or chunks < 1:
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


def _check_kd_options(cfg: DictConfig, problems: Problems) -> None:
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
    if cfg.get("kd_loss") is None:
        return
    try:
        options = component_options(cfg.kd_loss)
    except Exception:
        return
    temperature = options.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or not temperature > 0
    ):
        problems.error(
            f"kd_loss.temperature = {temperature!r} must be > 0: logits are divided by it; "
            "use 1.0 for plain KD or a value like 2.0 to soften both distributions",
            "kd_loss.temperature",
        )
    columns = options.get("vocab_columns")
    if columns is not None and (not _is_int(columns) or columns < 1):
        problems.error(
            f"kd_loss.vocab_columns = {columns!r} is invalid: use null or the smaller vocab size",
            "kd_loss.vocab_columns",
        )
    if is_fused_loss(cfg.kd_loss):
        chunks = options.get("num_chunks")
        if chunks is not None and (not _is_int(chunks) or chunks < 1):
            problems.error(
                f"kd_loss.num_chunks = {chunks!r} is invalid: use null (chunks sized by the "
                "memory budget) or an int >= 1",
                "kd_loss.num_chunks",
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
        return  # import problems are reported by _check_components
    if "lora_rank" not in options:
        return
    rank, alpha = options.get("lora_rank"), options.get("lora_alpha")
    dropout, modules = options.get("lora_dropout", 0.0), options.get("lora_attn_modules")
    if not _is_int(rank) or rank < 1:
        problems.error(
            f"model.lora_rank = {rank!r} must be an int >= 1 (the adapters' inner dimension; "
            "the update is scaled by lora_alpha / lora_rank): e.g. 8",
            "model.lora_rank",
        )
    if alpha is not None and (not _is_number(alpha) or alpha <= 0):
        problems.error(
            f"model.lora_alpha = {alpha!r} must be a number > 0 (often 2 * lora_rank)",
            "model.lora_alpha",
        )
    if not _is_number(dropout) or not 0 <= dropout < 1:
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


def checkpoint_files(node: DictConfig) -> list[str]:
    """The file names a torchtune checkpointer node loads (list form or filename_format form)."""
    files = node.checkpoint_files
    if isinstance(files, DictConfig):
        count = int(str(files.max_filename))
        width = len(str(files.max_filename))
        return [
            str(files.filename_format).format(str(i).zfill(width), str(files.max_filename))
            for i in range(1, count + 1)
        ]
    return [str(file) for file in files]


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


def normalize_null_components(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` where a top-level ``{_component_: null, ...}`` node is null.

    torchtune's override rule rewrites ``teacher_model=null`` on the command line into
    ``teacher_model._component_=null`` (the key holds a component); this makes such an override
    mean what it says. ``cfg`` itself is left unchanged.
    """
    cfg = cfg.copy()
    for key in list(cfg.keys()):
        node = cfg._get_node(key)
        is_component = isinstance(node, DictConfig) and "_component_" in node
        if is_component and node._get_node("_component_")._is_none():
            cfg[key] = None
    return cfg


_DEPENDENT_CHECKS: tuple[Callable[[DictConfig, Problems], None], ...] = (
    _check_loss_setup,
    _check_kd_options,
    _check_on_policy,
    _check_lora_options,
    _check_by_building,
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
    _check_components(cfg, problems)
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


def check_config(cfg: DictConfig) -> None:
    """Phase 1: check the config alone; ``cfg`` is left unchanged (null component overrides
    are read as null, :func:`normalize_null_components`).

    Raises:
        ConfigError: every problem found, one per line, each naming key, value and fix.
    """
    problems = Problems()
    config_problems(cfg, problems)
    problems.raise_if_any("before building models")


# --------------------------------------------------------------------------------------------
# Phase 2: facts about the models and the tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about a model: its vocabulary, its size, its context
    (``max_seq_len``; None: unknown) and its architecture keyed by the Hugging Face
    ``config.json`` field that must match it (:data:`HF_ARCHITECTURE_FIELDS`)."""

    vocab_size: int
    num_params: int
    max_seq_len: int | None = None
    architecture: dict[str, int] = field(default_factory=dict)
    has_adapters: bool = False  # LoRA/DoRA parameters


HF_ARCHITECTURE_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "vocab_size",
)
"""``config.json`` fields compared with the model a builder makes (a field absent from the file
is not compared)."""


def model_architecture(model: nn.Module) -> dict[str, int]:
    """The :data:`HF_ARCHITECTURE_FIELDS` of a torchtune decoder (those it has), read from its
    modules' shapes (works on the meta device)."""
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) == 0:
        return {}
    attn, mlp = getattr(layers[0], "attn", None), getattr(layers[0], "mlp", None)
    found: dict[str, Any] = {
        "num_hidden_layers": len(layers),
        "num_attention_heads": getattr(attn, "num_heads", None),
        "num_key_value_heads": getattr(attn, "num_kv_heads", None),
        "hidden_size": getattr(attn, "embed_dim", None),
        "intermediate_size": getattr(
            getattr(getattr(mlp, "w1", None), "weight", None), "shape", [None]
        )[0],
        "head_dim": getattr(attn, "head_dim", None),
        "vocab_size": model_vocab_size(model),
    }
    return {name: int(value) for name, value in found.items() if _is_int(value)}


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the output projection (the logits' last dimension) of a torchtune decoder."""
    output = getattr(model, "output", None)
    weight = getattr(output, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    tied = getattr(output, "tied_module", None)  # TiedLinear: the embedding's rows
    if tied is not None:
        return int(tied.weight.shape[0])
    embeddings = getattr(model, "tok_embeddings", None)
    if embeddings is not None:
        return int(embeddings.weight.shape[0])
    raise ConfigError(f"cannot find the vocabulary size of {type(model).__name__}")


def describe_model(node: DictConfig) -> ModelFacts:
    """Build the model of a config node on the meta device (no memory, no weights) and describe it."""
    from torchtune import config

    with torch.device("meta"):
        model = config.instantiate(node)
    num_params = sum(p.numel() for p in model.parameters())
    context = getattr(model, "max_seq_len", None)
    facts = ModelFacts(
        vocab_size=model_vocab_size(model),
        num_params=num_params,
        max_seq_len=int(context) if _is_int(context) else None,
        architecture=model_architecture(model),
        has_adapters=bool(get_adapter_params(model)),
    )
    del model
    return facts


def tokenizer_max_id(tokenizer: Any) -> int:
    """The largest token id a tokenizer can produce from text (special tokens included).

    Works for tiktoken-based tokenizers (Llama 3: ``vocab_size`` counts every id) and for BPE
    tokenizers with an ``encoder`` and ``special_tokens`` mapping (Qwen2). The image
    placeholder (``tokenizer.image_id``, Llama 3's ``<|image|>`` = 128256, one past the text
    models' 128,256 rows) is left out: it is only emitted for image content, never for text.
    """
    special = getattr(tokenizer, "special_tokens", None)
    special_ids = set(special.values()) if isinstance(special, dict) else set()
    special_ids.discard(getattr(tokenizer, "image_id", None))
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict) and encoder:
        return int(max([*encoder.values(), *special_ids]))
    base_vocab_size = getattr(tokenizer, "base_vocab_size", None)
    if _is_int(base_vocab_size):
        return int(max([base_vocab_size - 1, *special_ids]))
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if _is_int(vocab_size):
        return int(vocab_size - 1)
    raise ConfigError(
        f"tokenizer: cannot tell the largest id of {type(tokenizer).__name__} (it has neither "
        "vocab_size nor encoder); use a torchtune tokenizer"
    )


def check_models(
    cfg: DictConfig,
    student: ModelFacts,
    teacher: ModelFacts | None,
    max_token_id: int | None,
) -> list[str]:
    """Phase 2: vocabularies of student, teacher and tokenizer agree; the teacher is the larger.

    Args:
        cfg: the recipe config (reads ``kd_loss.vocab_columns``).
        student: facts of the student model.
        teacher: facts of the teacher model, or None (CE-only).
        max_token_id: the tokenizer's largest id (None: not checked).

    Returns:
        Warnings (also issued with :func:`warnings.warn`).

    Raises:
        ConfigError: on a vocabulary mismatch, naming both sizes and the fix.
    """
    problems = Problems()
    model_problems(cfg, student, teacher, max_token_id, problems)
    problems.raise_if_any("in the model vocabularies")
    for message in problems.warnings:
        warnings.warn(message, stacklevel=2)
    return problems.warnings


def model_problems(
    cfg: DictConfig,
    student: ModelFacts,
    teacher: ModelFacts | None,
    max_token_id: int | None,
    problems: Problems,
) -> None:
    """:func:`check_models` into ``problems`` (errors and warnings)."""
    columns = kd_vocab_columns(cfg)
    vocab = "kd_loss.vocab_columns"
    if max_token_id is not None and max_token_id >= student.vocab_size:
        problems.error(
            f"the tokenizer produces ids up to {max_token_id} but the student (model) has "
            f"vocab size {student.vocab_size}: use a student with vocab > {max_token_id} or "
            "the matching tokenizer",
            "model",
        )
    if teacher is None:
        return
    if columns is None and teacher.vocab_size != student.vocab_size:
        smaller = min(teacher.vocab_size, student.vocab_size)
        problems.error(
            f"vocab sizes differ: teacher (teacher_model) {teacher.vocab_size}, student "
            f"(model) {student.vocab_size}. If the extra rows are padding the tokenizer never "
            f"produces, set kd_loss.vocab_columns: {smaller} to compare only the first "
            f"{smaller} logits",
            vocab,
        )
    if columns is not None:
        smaller = min(teacher.vocab_size, student.vocab_size)
        if columns > smaller:
            problems.error(
                f"kd_loss.vocab_columns = {columns} exceeds the smaller vocab (teacher "
                f"{teacher.vocab_size}, student {student.vocab_size}): set it to {smaller}",
                vocab,
            )
        if max_token_id is not None and max_token_id >= columns:
            problems.error(
                f"kd_loss.vocab_columns = {columns} truncates the vocab, but the tokenizer "
                f"produces ids up to {max_token_id} (teacher vocab {teacher.vocab_size}, "
                f"student vocab {student.vocab_size}): truncation would drop real tokens; "
                "use models with matching vocabularies",
                vocab,
            )
    if max_token_id is not None and max_token_id >= teacher.vocab_size:
        problems.error(
            f"the tokenizer produces ids up to {max_token_id} but the teacher (teacher_model) "
            f"has vocab size {teacher.vocab_size}: use the tokenizer both models share",
            "teacher_model",
        )
    if teacher.num_params < student.num_params:
        problems.warn(
            f"teacher_model has fewer parameters ({teacher.num_params:,}) than the student "
            f"model ({student.num_params:,}): check that teacher_model and model are not "
            "swapped"
        )


def kd_vocab_columns(cfg: DictConfig) -> int | None:
    """``kd_loss.vocab_columns`` (None: the vocabularies must match)."""
    if cfg.kd_loss is None:
        return None
    return component_options(cfg.kd_loss).get("vocab_columns")


def check_config_and_models(cfg: DictConfig) -> list[str]:
    """Everything ``kdtune validate`` and the recipe check before loading weights, except the
    dataset scan: the config, the tokenizer, the models on the meta device against each other
    and against their checkpoints' ``config.json`` (:func:`kdtune.training.preflight.check_run`).
    Returns the warnings (also issued); raises :class:`ConfigError` listing every problem."""
    from kdtune.training.preflight import PREFLIGHT, check_run

    report = check_run(cfg, scan_data=False)
    report.problems.raise_if_any(PREFLIGHT)
    for message in report.problems.warnings:
        warnings.warn(message, stacklevel=2)
    return report.problems.warnings
