"""A table of bad inputs: each fails before any weights load, naming the problem, in the recipe
and in ``kdtune validate`` alike (one preflight code path, :mod:`kdtune.training.preflight`).

Each row is a bad config value, file, dataset or checkpoint applied to the tiny full (or LoRA)
config, on a 24-record copy of the tiny data. For each row the recipe runs (constructor, then
``setup``) with the weight loaders and the model builder replaced by functions that fail the
test if called, and ``kdtune validate`` runs through its Python entry on the same config saved
to YAML: both must fail, and both messages must contain the row's words.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from torchtune.training import FullModelHFCheckpointer

from kdtune.cli.main import main as kdtune_main
from kdtune.recipes import knowledge_distillation as recipe_module
from kdtune.teacher_cache.build import BuildOptions, build_teacher_cache, shard_name

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

Prepare = Callable[[DictConfig, Path, Path], None]
"""``prepare(cfg, folder, assets_root)``: write the row's files into ``folder``, point ``cfg``
at them."""


@dataclass(frozen=True)
class Row:
    id: str
    words: list[str]  # every one appears in the recipe's error and in validate's report
    overrides: list[str] = field(default_factory=list)
    prepare: Prepare | None = None
    config: str = "full_chunked"


# --------------------------------------------------------------------------------------------
# Helpers that make bad files


def _records(assets_root: Path, count: int = 24) -> list[dict]:
    return json.loads((assets_root / "data" / "train.json").read_text())[:count]


def data_text(text: str, key: str = "dataset", name: str = "data.json") -> Prepare:
    """The dataset node ``key`` reads a file holding ``text``."""

    def prepare(cfg: DictConfig, folder: Path, assets_root: Path) -> None:
        path = folder / name
        path.write_text(text)
        OmegaConf.update(cfg, f"{key}.data_files", str(path), merge=False)

    return prepare


def data_records(edit: Callable[[list[dict]], list[dict]], key: str = "dataset") -> Prepare:
    """The dataset node ``key`` reads the small data after ``edit``."""

    def prepare(cfg: DictConfig, folder: Path, assets_root: Path) -> None:
        path = folder / f"{key}.json"
        path.write_text(json.dumps(edit(_records(assets_root))))
        OmegaConf.update(cfg, f"{key}.data_files", str(path), merge=False)

    return prepare


def long_record(records: list[dict]) -> list[dict]:
    records[3] = {**records[3], "output": " ".join(["word"] * 700)}
    return records


def hf_config(which: str, text: str | None = None, **changes: object) -> Prepare:
    """A copy of the tiny ``which`` checkpoint (student/teacher) whose config.json has
    ``changes`` (or is ``text``; None: deleted when ``changes`` is empty)."""
    key = "checkpointer" if which == "student" else "teacher_checkpointer"

    def prepare(cfg: DictConfig, folder: Path, assets_root: Path) -> None:
        copy = folder / which
        shutil.copytree(assets_root / which, copy)
        path = copy / "config.json"
        if text is not None:
            path.write_text(text)
        elif changes:
            path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        else:
            path.unlink()
        OmegaConf.update(cfg, f"{key}.checkpoint_dir", str(copy), merge=False)

    return prepare


def list_dataset(cfg: DictConfig, folder: Path, assets_root: Path) -> None:
    """``dataset`` as a list of two nodes, the second reading malformed JSON."""
    bad = folder / "second.json"
    bad.write_text('[{"instruction": "a", "input": "", "output": "b"},')
    second = OmegaConf.merge(cfg.dataset, {"data_files": str(bad)})
    cfg.dataset = OmegaConf.create([cfg.dataset, second])


def bad_special_tokens(cfg: DictConfig, folder: Path, assets_root: Path) -> None:
    path = folder / "special_tokens.json"
    path.write_text("{not json")
    cfg.tokenizer.special_tokens_path = str(path)


def damaged_cache(damage: Callable[[Path], None]) -> Prepare:
    """A teacher cache built for the row's config (3 shards), then ``damage(cache_folder)``."""

    def prepare(cfg: DictConfig, folder: Path, assets_root: Path) -> None:
        cfg.teacher_cache = str(folder / "cache")
        options = BuildOptions(top_k=8, knots=8, samples_per_shard=8, batch_size=8)
        build_teacher_cache(cfg, options)
        damage(folder / "cache")

    return prepare


def truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


CACHED = "full_chunked_cached"
LORA = "lora_chunked"
TABLE = [
    # --- issue 21's rows -----------------------------------------------------------------------
    Row("tokenizer.max_seq_len 0", ["tokenizer.max_seq_len", "0"], ["tokenizer.max_seq_len=0"]),
    Row(
        "on_policy.temperature text",
        ["on_policy.temperature", "'hot'"],
        ["on_policy={fraction: 0.5, max_new_tokens: 4, temperature: hot}"],
    ),
    # --- config values: optimizer, scheduler, losses, LoRA, top-level keys -----------------
    Row("optimizer.lr text", ["optimizer.lr", "'fast'", "not a number"], ["optimizer.lr=fast"]),
    Row(
        "optimizer.weight_decay text",
        ["optimizer.weight_decay", "'abc'", "not a number"],
        ["optimizer.weight_decay=abc"],
    ),
    Row(
        "optimizer.weight_decay negative",
        ["optimizer:", "weight_decay", "-1.0"],
        ["optimizer.weight_decay=-1.0"],
    ),
    Row("optimizer.betas one value", ["optimizer.betas", "2 numbers"], ["optimizer.betas=[0.9]"]),
    Row(
        "optimizer unknown class",
        ["optimizer._component_", "cannot be imported"],
        ["optimizer._component_=torch.optim.AdamX"],
    ),
    Row("optimizer misspelt option", ["optimizer.lrr", "did you mean"], ["optimizer.lrr=0.1"]),
    Row(
        "scheduler warmup text",
        ["lr_scheduler.num_warmup_steps", "'abc'", "not a number"],
        ["lr_scheduler.num_warmup_steps=abc"],
    ),
    Row(
        "scheduler num_cycles text",
        ["lr_scheduler.num_cycles", "'half'"],
        ["lr_scheduler.num_cycles=half"],
    ),
    Row("kd_ratio above 1", ["kd_ratio", "1.5"], ["kd_ratio=1.5"]),
    Row("temperature 0", ["kd_loss.temperature", "> 0"], ["kd_loss.temperature=0.0"]),
    Row("kd_loss option typo", ["kd_loss.temprature", "did you mean"], ["kd_loss.temprature=2"]),
    Row("loss chunks 0", ["loss.num_output_chunks", "0"], ["loss.num_output_chunks=0"]),
    Row(
        "chunk counts differ",
        ["kd_loss.num_output_chunks = 8", "loss.num_output_chunks = 4"],
        ["kd_loss.num_output_chunks=8"],
    ),
    Row("kd_loss reduction sum", ["kd_loss.reduction", "'sum'"], ["kd_loss.reduction=sum"]),
    Row("batch_size 0", ["batch_size", ">= 1"], ["batch_size=0"]),
    Row("dtype fp16", ["dtype", "fp16"], ["dtype=fp16"]),
    Row("unknown key", ["unknown key 'kd_ratioo'", "did you mean 'kd_ratio'"], ["kd_ratioo=0.3"]),
    Row("teacher without checkpointer", ["teacher_checkpointer"], ["teacher_checkpointer=null"]),
    Row("on_policy fraction 2", ["on_policy.fraction"], ["on_policy={fraction: 2.0}"]),
    Row(
        "offloading on cpu",
        ["enable_activation_offloading", "cpu"],
        ["enable_activation_offloading=true", "enable_activation_checkpointing=true"],
    ),
    Row(
        "adapter-only save of a full student",
        ["save_adapter_weights_only = true", "LoRA/DoRA student"],
        ["save_adapter_weights_only=true"],
    ),
    Row(
        "fewer batches than accumulation steps",
        ["gradient_accumulation_steps = 4", "24 training samples", "lower batch_size"],
        ["batch_size=16", "gradient_accumulation_steps=4", "max_steps_per_epoch=null"],
    ),
    Row(
        "off-policy steps without answers",
        ["dataset has 24 record(s) without an answer", "on_policy.fraction: 1.0"],
        ["on_policy={fraction: 0.5, max_new_tokens: 4}"],
        prepare=data_records(lambda rs: [{**r, "output": ""} for r in rs]),
    ),
    Row("lora_rank 0", ["model.lora_rank = 0", ">= 1"], ["model.lora_rank=0"], config=LORA),
    Row("lora_alpha negative", ["model.lora_alpha", "-1"], ["model.lora_alpha=-1"], config=LORA),
    Row("lora_dropout 1.5", ["model.lora_dropout", "1.5"], ["model.lora_dropout=1.5"], config=LORA),
    Row(
        "lora unknown module",
        ["model.lora_attn_modules", "x_proj"],
        ["model.lora_attn_modules=[q_proj,x_proj]"],
        config=LORA,
    ),
    Row(
        "lora without adapters",
        ["model.lora_attn_modules", "no adapters"],
        ["model.lora_attn_modules=[]", "model.apply_lora_to_mlp=false"],
        config=LORA,
    ),
    # --- models: builders, vocabularies, tokenizer ----------------------------------------------
    Row("student vocab 0", ["model:", "cannot be built", "vocab_size"], ["model.vocab_size=0"]),
    Row("student vocab 520", ["520", "512", "vocab_columns"], ["model.vocab_size=520"]),
    Row("vocab_columns too large", ["kd_loss.vocab_columns = 600"], ["kd_loss.vocab_columns=600"]),
    Row(
        "tokenizer beyond the vocab",
        ["ids up to", "vocab size 256"],
        ["model.vocab_size=256", "teacher_model.vocab_size=256"],
    ),
    Row("tokenizer file missing", ["tokenizer.path", "does not exist"], ["tokenizer.path=/no/tok"]),
    Row(
        "special tokens not JSON",
        ["tokenizer:", "cannot be built"],
        prepare=bad_special_tokens,
    ),
    # --- checkpoints ------------------------------------------------------------------------------
    Row(
        "checkpoint dir missing",
        ["checkpointer.checkpoint_dir", "/no/student"],
        ["checkpointer.checkpoint_dir=/no/student"],
    ),
    Row(
        "checkpoint file missing",
        ["checkpointer.checkpoint_files", "missing.safetensors"],
        ["checkpointer.checkpoint_files=[missing.safetensors]"],
    ),
    Row(
        "unknown model_type",
        ["checkpointer.model_type = 'LLAMA9'", "LLAMA3"],
        ["checkpointer.model_type=LLAMA9"],
    ),
    Row(
        "teacher config.json missing",
        ["teacher_checkpointer.checkpoint_files", "config.json"],
        prepare=hf_config("teacher"),
    ),
    Row(
        "student head count",
        ["student/config.json", "num_attention_heads = 8", "(the builder: 4)"],
        prepare=hf_config("student", num_attention_heads=8),
    ),
    Row(
        "student layer count",
        ["checkpointer.checkpoint_dir", "num_hidden_layers = 3", "(the builder: 2)"],
        prepare=hf_config("student", num_hidden_layers=3),
    ),
    Row(
        "student kv heads",
        ["num_key_value_heads = 4", "(the builder: 2)"],
        prepare=hf_config("student", num_key_value_heads=4),
    ),
    Row(
        "teacher hidden size",
        ["teacher_checkpointer.checkpoint_dir", "hidden_size = 96", "(the builder: 128)"],
        prepare=hf_config("teacher", hidden_size=96),
    ),
    Row(
        "teacher intermediate size",
        ["teacher/config.json", "intermediate_size = 512", "(the builder: 384)"],
        prepare=hf_config("teacher", intermediate_size=512),
    ),
    Row(
        "teacher vocab in config.json",
        ["teacher/config.json", "vocab_size = 1024", "(the builder: 512)"],
        prepare=hf_config("teacher", vocab_size=1024),
    ),
    Row(
        "config.json not JSON",
        ["student/config.json", "not valid JSON"],
        prepare=hf_config("student", text="{oops"),
    ),
    Row(
        "teacher_cache missing",
        ["teacher_cache", "/no/cache", "kdtune cache-teacher"],
        ["teacher_cache=/no/cache"],
    ),
    Row(
        "teacher_cache manifest broken",
        ["cache/manifest.json is not valid JSON", "kdtune cache-teacher --config"],
        prepare=damaged_cache(lambda cache: truncate_file(cache / "manifest.json")),
        config=CACHED,
    ),
    Row(
        "teacher_cache shard missing",
        [f"cache/{shard_name(1)} is missing", "teacher_cache=", "damaged shards"],
        prepare=damaged_cache(lambda cache: (cache / shard_name(1)).unlink()),
        config=CACHED,
    ),
    Row(
        "teacher_cache shard truncated",
        [f"cache/{shard_name(2)} has 1000 bytes", "kdtune cache-teacher --config"],
        prepare=damaged_cache(lambda cache: truncate_file(cache / shard_name(2))),
        config=CACHED,
    ),
    # --- data ---------------------------------------------------------------------------------
    Row(
        "data file missing",
        ["dataset.data_files", "/no/train.json"],
        ["dataset.data_files=/no/train.json"],
    ),
    Row("data file empty", ["dataset.data_files", "data.json", "is empty"], prepare=data_text("")),
    Row(
        "data empty list",
        ["dataset.data_files", "data.json", "holds no records"],
        prepare=data_text("[]"),
    ),
    Row(
        "data malformed JSON",
        ["dataset.data_files", "data.json", "not valid JSON", "line 2"],
        prepare=data_text('[{"instruction": "a", "input": "", "output": "b"},\n{"instr'),
    ),
    Row(
        "data malformed JSON lines",
        ["dataset.data_files", "data.jsonl", "line 3"],
        prepare=data_text('{"instruction": "a"}\n{"instruction": "b"}\n{oops\n', name="data.jsonl"),
    ),
    Row(
        "data missing columns",
        ["dataset: record 0, 1, 2 and 21 more", "no column 'instruction'", "dataset.column_map"],
        prepare=data_records(lambda rs: [{"question": r["instruction"]} for r in rs]),
    ),
    Row(
        "column_map to a missing column",
        ["dataset: record 0", "no column 'prompt'", "dataset.column_map"],
        ["dataset.column_map={instruction: prompt}"],
        prepare=data_records(lambda rs: rs),
    ),
    Row(
        "validation data malformed",
        ["validation_dataset.data_files", "val.json", "not valid JSON"],
        prepare=data_text("[{", key="validation_dataset", name="val.json"),
    ),
    Row(
        "second dataset of a list malformed",
        ["dataset[1].data_files", "second.json", "not valid JSON"],
        prepare=list_dataset,
    ),
    Row(
        "sample longer than the context",
        ["dataset: record 3 of", "dataset.json", "longer than the models' context (512"],
        ["tokenizer.max_seq_len=null"],
        prepare=data_records(long_record),
    ),
    Row(
        "tokenizer.max_seq_len above the context",
        ["record 3", "tokenizer.max_seq_len = 1024", "tokenizer.max_seq_len: 512"],
        ["tokenizer.max_seq_len=1024"],
        prepare=data_records(long_record),
    ),
    # --- quantisation-aware training ------------------------------------------------------
    Row(
        "quantizer unknown class",
        ["quantizer._component_", "cannot be imported", "No module named 'nope'"],
        ["quantizer._component_=nope.Quant"],
    ),
    Row(
        "quantizer not a QAT quantiser",
        [
            "quantizer._component_ = torchtune.training.quantization.Int8DynActInt4WeightQuantizer",
            "not a QAT quantiser",
            "GGUFQ4_0QATQuantizer",
        ],
        ["quantizer._component_=torchtune.training.quantization.Int8DynActInt4WeightQuantizer"],
    ),
    Row(
        "quantizer group size not dividing a width",
        ["layers.0.attn.q_proj", "input width 64", "group size 48"],
        [
            "quantizer._component_=torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer",
            "quantizer.groupsize=48",
        ],
    ),
    Row(
        "quantizer torchao with a LoRA student",
        ["layers.0.attn.q_proj", "Int8DynActInt4WeightQATQuantizer", "GGUFQ4_0QATQuantizer"],
        [
            "quantizer._component_=torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer",
            "quantizer.groupsize=32",
        ],
        config=LORA,
    ),
    Row(
        "quantizer GGUF with LoRA dropout",
        ["lora_dropout 0.1", "model.lora_dropout=0.0"],
        [
            "quantizer._component_=kdtune.quantization.qat.GGUFQ4_0QATQuantizer",
            "model.lora_dropout=0.1",
        ],
        config=LORA,
    ),
    Row(
        "fake_quant_after_n_steps without a quantizer",
        ["fake_quant_after_n_steps", "quantizer is null"],
        ["fake_quant_after_n_steps=3"],
    ),
    Row(
        "no target token",
        ["dataset: no sample", "has a target token", "tokenizer.max_seq_len = 8"],
        ["tokenizer.max_seq_len=8"],
    ),
]


def test_the_table_has_at_least_40_distinct_rows():
    assert len(TABLE) >= 40
    assert len({row.id for row in TABLE}) == len(TABLE)


# --------------------------------------------------------------------------------------------
# The two paths


@pytest.fixture(scope="module")
def small_data(tiny_assets, tmp_path_factory) -> Path:
    """24 training and 8 validation records of the tiny data (fast scans)."""
    folder = tmp_path_factory.mktemp("small_data")
    (folder / "train.json").write_text(json.dumps(_records(tiny_assets.root)))
    val = json.loads((tiny_assets.root / "data" / "val.json").read_text())[:8]
    (folder / "val.json").write_text(json.dumps(val))
    return folder


def tiny_config(assets_root: Path, data: Path, out: Path, name: str) -> DictConfig:
    cfg = OmegaConf.load(CONFIG_DIR / "tiny" / f"{name}.yaml")
    cfg.assets_dir = str(assets_root)
    cfg.output_dir = str(out)
    cfg.dataset.data_files = str(data / "train.json")
    cfg.validation_dataset.data_files = str(data / "val.json")
    return cfg


def apply(cfg: DictConfig, overrides: list[str]) -> None:
    for override in overrides:
        key, value = override.split("=", 1)
        parsed = OmegaConf.from_dotlist([f"x={value}"]).x
        OmegaConf.update(cfg, key, parsed, force_add=True, merge=False)


def bad_config(row: Row, assets_root: Path, data: Path, folder: Path) -> DictConfig:
    cfg = tiny_config(assets_root, data, folder / "out", row.config)
    apply(cfg, row.overrides)
    if row.prepare is not None:
        row.prepare(cfg, folder, assets_root)
    return cfg


def forbid_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a checkpoint or building a real model fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded (or a model built) before the error")

    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", forbidden)
    monkeypatch.setattr(recipe_module, "load_weights", forbidden)
    monkeypatch.setattr(recipe_module, "build_model", forbidden)


def recipe_error(cfg: DictConfig) -> str:
    with pytest.raises(ValueError) as error:
        recipe = recipe_module.KDRecipe(cfg)
        try:
            recipe.setup(cfg)
        finally:
            recipe.cleanup()
    return str(error.value)


def validate_report(cfg: DictConfig, folder: Path, capsys: pytest.CaptureFixture) -> str:
    path = folder / "bad.yaml"
    OmegaConf.save(cfg, path)
    capsys.readouterr()
    status = kdtune_main(["validate", "--config", str(path)])
    captured = capsys.readouterr()
    assert status == 1, captured.out
    assert "INVALID" in captured.err
    return captured.err


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.id)
def test_bad_input_is_named_before_any_weights_load(
    row, tiny_assets, small_data, tmp_path, monkeypatch, capsys
):
    cfg = bad_config(row, tiny_assets.root, small_data, tmp_path)
    report = validate_report(cfg, tmp_path, capsys)
    forbid_weights(monkeypatch)
    message = recipe_error(cfg)
    for word in row.words:
        assert word in message, (word, message)
        assert word in report, (word, report)


def test_the_table_config_itself_is_valid(tiny_assets, small_data, tmp_path, monkeypatch, capsys):
    """Without a row's change the same config passes both paths (the rows' errors are theirs)."""
    for name in ("full_chunked", LORA):
        cfg = tiny_config(tiny_assets.root, small_data, tmp_path / name, name)
        OmegaConf.save(cfg, tmp_path / "ok.yaml")
        assert kdtune_main(["validate", "--config", str(tmp_path / "ok.yaml")]) == 0
        assert "OK" in capsys.readouterr().out


def test_validate_lists_problems_of_every_phase_at_once(tiny_assets, small_data, tmp_path, capsys):
    """Config values, a LoRA option, a checkpoint's config.json, a data file and the data's
    content: one report with each problem, none hidden behind another phase."""
    cfg = tiny_config(tiny_assets.root, small_data, tmp_path / "out", LORA)
    apply(cfg, ["optimizer.lr=fast", "kd_ratio=1.5", "model.lora_dropout=2.0"])
    hf_config("teacher", num_hidden_layers=6)(cfg, tmp_path, tiny_assets.root)
    data_records(lambda rs: [{"question": r["instruction"]} for r in rs])(
        cfg, tmp_path, tiny_assets.root
    )
    data_text("{", key="validation_dataset", name="val.json")(cfg, tmp_path, tiny_assets.root)
    report = validate_report(cfg, tmp_path, capsys)
    expected = [
        "optimizer.lr = 'fast'",
        "kd_ratio",
        "model.lora_dropout = 2.0",
        "teacher/config.json",
        "num_hidden_layers = 6",
        "no column 'instruction'",
        "validation_dataset.data_files",
    ]
    for words in expected:
        assert words in report, (words, report)
    assert f"{len(expected) - 1} config problem(s)" in report, report
