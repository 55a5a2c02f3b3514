"""The recipe's config keys: one typed schema, the single source of each key's type, default
(or required-ness), range and one-line doc.

:class:`RecipeConfig` is a dataclass whose fields are the top-level keys. It drives
:func:`schema_problems` (every problem of every key, collected), :func:`with_defaults` (the
recipe reads every key, so absent optional keys are filled in), ``kdtune validate --help`` and
the key table of ``docs/configs.md`` (:func:`markdown_table`; a test keeps them equal). Keys that hold a
``_component_`` node are typed :data:`Component`: the component itself is checked by importing
it and by its own signature (:mod:`kdtune.training.config.component_rules`), and losses and optimizers
by building them, not here.

Defaults follow torchtune 0.6.1's KD recipes where torchtune has the key (``kd_ratio`` 0.5,
``log_every_n_steps`` 1, ``fsdp_reshard_after_forward`` true, ...), so torchtune's own KD
configs run unchanged; keys only kdtune has default to "off".
"""

# ruff: noqa: RUF009  (`key()` returns a dataclasses.field; ruff only knows field() itself)
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

Component = typing.NewType("Component", dict)
"""A ``{_component_: dotted.path, ...}`` node (checked by import and signature elsewhere)."""
Block = typing.NewType("Block", dict)
"""A mapping of a feature's own keys (not a component), checked by that feature's code."""
Components = typing.NewType("Components", list)
"""A component node, or a list of them (datasets, concatenated as torchtune does)."""
Names = typing.NewType("Names", list)
"""A list of names (strings)."""

_REQUIRED = MISSING


def key(
    doc: str,
    default: Any = _REQUIRED,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    multi_process: bool = False,
) -> Any:
    """A schema field: its doc, default (none: required), range (``above``: exclusive lower
    bound) or choices."""
    metadata = {
        "doc": doc,
        "above": above,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "multi_process": multi_process,
    }
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class OnPolicyConfig:
    """The keys of the ``on_policy`` block (:mod:`kdtune.training.on_policy`)."""

    fraction: float = key(
        "share of optimizer steps whose sequences are sampled (lambda; 0: off-policy only)",
        0.0,
        minimum=0.0,
        maximum=1.0,
    )
    max_new_tokens: int = key("the most tokens per completion", minimum=1)
    temperature: float = key("sampling temperature (0: greedy)", 1.0, minimum=0.0)
    top_k: int | None = key("sample among the k most likely tokens (null: all)", None, minimum=1)
    top_p: float | None = key(
        "sample from the smallest set of tokens with this much mass (null: all)",
        None,
        above=0.0,
        maximum=1.0,
    )
    source: str = key(
        "who writes the sequences: student (on-policy KD, as GKD) or teacher (sequence-level KD)",
        "student",
        choices=("student", "teacher"),
    )


BLOCKS: dict[str, type] = {"on_policy": OnPolicyConfig}
"""Top-level keys that hold a block of their own keys, and the dataclass of those keys."""


@dataclass(kw_only=True)
class RecipeConfig:
    """The top-level keys of the knowledge_distillation recipe, in the order of the docs."""

    output_dir: str = key("folder for checkpoints, metrics.jsonl and logs")
    device: str = key("cpu or cuda", choices=("cpu", "cuda"))
    dtype: str = key(
        "fp32 or bf16 (fp16 is refused: the recipe has no loss scaling)", choices=("fp32", "bf16")
    )
    seed: int | None = key(
        "int seed for torch/numpy/random and the data order (null: random, then logged)",
        None,
        minimum=0,
    )
    deterministic: bool = key(
        "true: deterministic algorithms (warn on non-deterministic ops)", False
    )
    model: Component = key("student model builder (_component_)")
    teacher_model: Component | None = key(
        "teacher model builder (_component_), or null for CE-only training"
    )
    teacher_quantization: str | None = key(
        "null or int8_weight_only (torchao; teacher linear layers only)",
        None,
        choices=("int8_weight_only",),
    )
    quantizer: Component | None = key(
        "quantisation-aware training of the student: a QAT quantiser (_component_: torchtune's "
        "Int8DynActInt4WeightQATQuantizer / Int4WeightOnlyQATQuantizer, or kdtune's "
        "GGUFQ8_0QATQuantizer / GGUFQ4_0QATQuantizer), or null",
        None,
    )
    fake_quant_after_n_steps: int | None = key(
        "with a quantizer: optimizer steps trained before fake quantisation starts (null: 0)",
        None,
        minimum=0,
    )
    teacher_cache: str | None = key(
        "null, or a folder built by `kdtune cache-teacher`: train from its top-k teacher "
        "log-probs; no teacher is built or loaded (the teacher keys are unused)",
        None,
    )
    on_policy: Block | None = key(
        "on-policy distillation: its keys are the on_policy.* rows; null: off-policy only", None
    )
    tokenizer: Component = key("tokenizer builder (_component_)")
    checkpointer: Component = key("student checkpointer (torchtune FullModelHFCheckpointer)")
    teacher_checkpointer: Component | None = key(
        "teacher checkpointer (_component_), or null for CE-only training"
    )
    resume_from_checkpoint: bool | str = key(
        "false, true (the newest checkpoint of the branch trained last; a corrupt one falls back to the one before) or a checkpoint folder",
        False,
    )
    resume_trust_pickled_state: bool = key(
        "true: read a checkpoint's training_state.pt that needs full unpickling (kdtune's older "
        "checkpoints; it can run code stored in the file); false: refuse it",
        False,
    )
    resume_allow_changes: Names | None = key(
        "resuming refuses a checkpoint trained from other inputs (data, tokenizer, model, "
        "student_base, teacher, or a key among dtype, kd_ratio, loss, kd_loss, optimizer, "
        "lr_scheduler, epochs, shuffle, clip_grad_norm, on_policy, quantizer, "
        "fake_quant_after_n_steps); list the names to accept on purpose",
        None,
    )
    dataset: Components = key("training dataset (_component_, or a list of them)")
    validation_dataset: Component | None = key(
        "held-out dataset (_component_), or null for no validation", None
    )
    validation_batch_size: int | None = key(
        "batch size of the validation data loader (null: batch_size)", None, minimum=1
    )
    validate_every_n_steps: int | None = key(
        "validate every N optimizer steps (null: only at the end)", None, minimum=1
    )
    validation_max_batches: int | None = key(
        "validate on at most N batches (null: the whole dataset)", None, minimum=1
    )
    shuffle: bool = key("shuffle the training data (seeded by seed and the epoch)", True)
    batch_size: int = key("micro-batch size per device", minimum=1)
    gradient_accumulation_steps: int = key("micro-batches per optimizer step", 1, minimum=1)
    epochs: int = key("number of epochs", minimum=1)
    max_steps_per_epoch: int | None = key(
        "cap on optimizer steps per epoch (null: the whole dataset)", None, minimum=1
    )
    stop_after_steps: int | None = key(
        "end this run after N optimizer steps in all (with a checkpoint); the schedule still "
        "spans the whole run, so a resumed run continues exactly",
        None,
        minimum=1,
    )
    optimizer: Component = key(
        "optimizer (_component_; the recipe passes the trainable parameters)"
    )
    lr_scheduler: Component | None = key(
        "scheduler (_component_; the recipe passes num_training_steps), or null", None
    )
    clip_grad_norm: float | None = key(
        "max gradient norm (null: no clipping; the norm is still logged)", None, above=0.0
    )
    loss: Component | None = key(
        "chunked CE loss (kdtune.losses or torchtune.modules.loss), or null with the fused loss"
    )
    kd_loss: Component | None = key(
        "KD loss from kdtune.losses (chunked or fused) or torchtune.modules.loss, or null for "
        "CE-only training"
    )
    kd_ratio: float = key(
        "loss = (1 - kd_ratio) * CE + kd_ratio * KD, in [0, 1]", 0.5, minimum=0.0, maximum=1.0
    )
    enable_activation_checkpointing: bool = key(
        "recompute each transformer layer in backward", False
    )
    enable_activation_offloading: bool = key(
        "move saved activations to CPU in forward, back for backward (torchtune's "
        "OffloadActivations; needs device: cuda and enable_activation_checkpointing: true)",
        False,
    )
    compile: bool = key("torch.compile both models' transformer layers and the loss modules", False)
    save_every_n_steps: int | None = key(
        "save a checkpoint every N optimizer steps (null: only at the end)", None, minimum=1
    )
    keep_last_n_checkpoints: int | None = key(
        "keep the newest N checkpoints of the branch being trained (null: keep all)",
        None,
        minimum=1,
    )
    save_adapter_weights_only: bool = key(
        "LoRA/DoRA students: save only the adapter, not merged weights", False
    )
    metric_logger: Component = key("torchtune metric logger (_component_)")
    on_non_finite: str = key(
        "a step whose loss or gradient norm is NaN/inf: stop (error naming the step and the "
        "last good checkpoint; nothing non-finite is saved) or skip (no update; costs one host "
        "read per step)",
        "stop",
        choices=("stop", "skip"),
    )
    max_non_finite_steps: int = key(
        "on_non_finite: skip: stop with an error once this many steps were skipped in the run",
        10,
        minimum=1,
    )
    scan_dataset: bool = key(
        "before any weights load, tokenize every training and validation sample once and report "
        "samples, target tokens, truncated samples and samples with no target (false: skip)",
        True,
    )
    drop_samples_without_target: bool = key(
        "leave training samples without a target token (the answer cut off at "
        "tokenizer.max_seq_len, or empty) out of the data, as the scan counts them (needs "
        "scan_dataset: true); false keeps them (a step without any target makes no update)",
        True,
    )
    log_every_n_steps: int = key(
        "log to metric_logger and the progress bar every N optimizer steps", 1, minimum=1
    )
    log_peak_memory_stats: bool = key(
        "CUDA: also log peak active/allocated/reserved GiB at each logging step (torchtune's "
        "get_memory_stats)",
        False,
    )
    profiler: Component | None = key(
        "torch profiler (torchtune.training.setup_torch_profiler; enabled: false is a no-op), "
        "or null",
        None,
    )
    collective_timeout_minutes: float = key(
        "multi-process runs: a collective that waits longer than this (a stopped or hung "
        "rank) fails the run instead of hanging",
        60.0,
        above=0.0,
    )
    fsdp_cpu_offload: bool = key(
        "multi-process runs: keep parameter shards, gradients and optimizer state in CPU memory "
        "(FSDP2 CPUOffloadPolicy; the optimizer step runs on the CPU)",
        False,
        multi_process=True,
    )
    fsdp_reshard_after_forward: bool = key(
        "multi-process runs: free the student's gathered layer weights after forward (true: "
        "least memory) or keep them for backward (false: less communication)",
        True,
        multi_process=True,
    )
    fsdp_teacher_reshard_after_forward: bool = key(
        "multi-process runs: free the teacher's gathered layer weights after forward (true); "
        "false keeps a full teacher copy on every rank",
        True,
        multi_process=True,
    )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RecipeConfig)}
"""The top-level keys."""
BLOCK_FIELDS: dict[str, dataclasses.Field] = {
    f"{block}.{f.name}": f for block, cls in BLOCKS.items() for f in dataclasses.fields(cls)
}
"""The keys inside blocks, by dotted name (``on_policy.fraction``)."""
_ALL_FIELDS = {**FIELDS, **BLOCK_FIELDS}
_TYPES: dict[str, Any] = {
    **typing.get_type_hints(RecipeConfig),
    **{
        f"{block}.{name}": hint
        for block, cls in BLOCKS.items()
        for name, hint in typing.get_type_hints(cls).items()
    },
}


def documented_keys() -> list[str]:
    """Every key in the order of the docs: each block's keys right after the block."""
    names = []
    for name in FIELDS:
        names.append(name)
        names += [key for key in BLOCK_FIELDS if key.startswith(f"{name}.")]
    return names


def is_required(name: str) -> bool:
    return _ALL_FIELDS[name].default is _REQUIRED


def doc(name: str) -> str:
    return _ALL_FIELDS[name].metadata["doc"]


def default_text(name: str) -> str:
    """The default as YAML would spell it, or ``required``."""
    if is_required(name):
        return "required"
    value = _ALL_FIELDS[name].default
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


DISTRIBUTED_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["multi_process"])
"""Keys read only when ``torchrun`` launched several processes (their defaults apply there)."""


def _allowed(name: str) -> list[type]:
    annotation = _TYPES[name]
    args = typing.get_args(annotation)
    return list(args) if args and typing.get_origin(annotation) is not None else [annotation]


def _matches(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is Component:
        return isinstance(value, DictConfig | dict) and "_component_" in value
    if kind is Block:
        return isinstance(value, DictConfig | dict) and "_component_" not in value
    if kind is Components:
        items = value if isinstance(value, ListConfig | list) else [value]
        return len(items) > 0 and all(_matches(item, Component) for item in items)
    if kind is Names:
        return isinstance(value, ListConfig | list) and all(isinstance(v, str) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _spell(kind: Any) -> str:
    names = {
        type(None): "null",
        bool: "true or false",
        int: "an int",
        float: "a number",
        str: "a string",
        Component: "a {_component_: ...} node",
        Block: "a mapping of its keys",
        Components: "a {_component_: ...} node or a list of them",
        Names: "a list of names",
    }
    return names[kind]


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for key ``name`` (type, range, choices), or None."""
    kinds = _allowed(name)
    meta = _ALL_FIELDS[name].metadata
    if not any(_matches(value, kind) for kind in kinds):
        allowed = " or ".join(_spell(kind) for kind in kinds)
        return f"{name} = {value!r} is invalid: set {name} to {allowed}"
    if value is None or isinstance(value, bool | DictConfig | ListConfig):
        return None
    if meta["choices"] is not None and isinstance(value, str):
        device_kind = value.split(":")[0] if name == "device" else value
        if device_kind not in meta["choices"]:
            return (
                f"{name} = {value!r} is not supported: use one of {list(meta['choices'])} "
                f"({doc(name)})"
            )
    if meta["above"] is not None and not value > meta["above"]:
        return f"{name} = {value!r} is invalid: set {name} to a number > {meta['above']:g}"
    low, high = meta["minimum"], meta["maximum"]
    if isinstance(value, int | float) and low is not None and high is not None:
        if not low <= value <= high:
            return f"{name} = {value!r} is outside [{low:g}, {high:g}]: {doc(name)}"
    elif isinstance(value, int | float) and low is not None and value < low:
        kind = "an int" if int in kinds else "a number"
        return f"{name} = {value!r} is invalid: set {name} to {kind} >= {low:g}"
    elif isinstance(value, int | float) and high is not None and value > high:
        return f"{name} = {value!r} is invalid: set {name} to a number <= {high:g}"
    return None


def block_problems(block: str, node: Any) -> list[tuple[str, str]]:
    """``(key, message)`` for every problem of a block's own keys: unknown keys (with the
    closest known one), missing required keys, and each value's type, range and choices."""
    names = [f.name for f in dataclasses.fields(BLOCKS[block])]
    found = []
    unknown = sorted(str(k) for k in node if str(k) not in names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        found.append((block, f"{block} has unknown key(s) {unknown}{hint}; its keys are {names}"))
    for name in names:
        dotted = f"{block}.{name}"
        if name not in node:
            if is_required(dotted):
                found.append((dotted, f"{dotted} is required ({doc(dotted)}): add it to {block}"))
            continue
        problem = value_problem(dotted, node[name])
        if problem is not None:
            found.append((dotted, problem))
    return found


def block_values(block: str, node: Any) -> dict[str, Any]:
    """A checked block's values, absent keys at their defaults."""
    return {f.name: node.get(f.name, f.default) for f in dataclasses.fields(BLOCKS[block])}


def schema_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(key, message)`` for every problem of the config's values against the schema (types,
    ranges, choices, required keys, and the keys of blocks such as ``on_policy``), all
    collected. Unknown top-level keys are reported by the caller (it knows which names
    ``${...}`` interpolations use)."""
    problems = []
    for name in FIELDS:
        if name not in cfg:
            if is_required(name):
                problems.append(
                    (
                        name,
                        f"missing key '{name}' ({doc(name)}): add it to the config (the recipe "
                        "has no default for it; copy a shipped config with `kdtune cp`)",
                    )
                )
            continue
        try:
            value = cfg[name]
        except OmegaConfBaseException as error:
            problems.append(
                (name, f"{name}: cannot resolve its value ({error}); fix the ${{...}} reference")
            )
            continue
        found = value_problem(name, value)
        if found is not None:
            problems.append((name, found))
        elif name in BLOCKS and value is not None:
            problems += block_problems(name, value)
    return problems


def with_defaults(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every absent optional key set to its default."""
    cfg = cfg.copy()
    for name, spec in FIELDS.items():
        if name not in cfg and spec.default is not _REQUIRED:
            OmegaConf.update(cfg, name, spec.default, force_add=True, merge=False)
    return cfg


def help_text() -> str:
    """``kdtune validate --help``'s key list: name, default (or required) and doc."""
    width = max(len(name) for name in documented_keys()) + 2
    lines = [f"  {name:<{width}}[{default_text(name)}] {doc(name)}" for name in documented_keys()]
    return "keys of the knowledge_distillation recipe ([default] or [required]):\n" + "\n".join(
        lines
    )


def markdown_table() -> str:
    """The key table of ``docs/configs.md`` (a test checks the page holds exactly this;
    ``python -m kdtune.training.config.schema`` prints it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name in documented_keys():
        rows.append(f"| `{name}` | {default_text(name)} | {doc(name)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
