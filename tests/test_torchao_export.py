"""``kdtune export CHECKPOINT --format torchao``: torchao's converted model of a torchao QAT run.

A tiny student is trained by the real recipe with torchao's 8da4w (group 32) or int4
weight-only (group 32) fake quantisation, exported, and checked against the model the recipe
trained (its fake-quantised forward), not against the export's own rebuild:

- 8da4w: the converted logits equal the fake-quantised ones to 1e-5 in fp32. Both compute
  ``linear(dequant(quant_int8_per_token(x)), dequant(quant_int4_group(W)))`` with the same
  grids and fp32 scales; only the summation can differ (~1e-7 relative). One activation or
  weight landing on a neighbouring grid point moves a logit by at least a grid step times a
  weight (~1e-3 here), so 1e-5 fails on any grid disagreement;
- int4 weight-only: converted in bf16 (the int4 kernels' dtype), compared with the trained
  student cast to bf16: the CPU int4 kernel accumulates in its own order and both round to bf16
  after every layer, so they agree to a few bf16 steps at the largest logit (measured: 1 step,
  0.031 at |logit| 4.25); the tolerance is 4 steps, and a conversion with another group size
  (64 for 32) is shown to miss it (measured 0.70);
- the saved file reloads (:func:`load_torchao_export`) to the same logits, bit for bit;
- the file is smaller than the bf16 state dict saved the same way;
- errors before any weight is read: no quantiser, a GGUF quantiser, a bare model folder, a
  GGUF option with ``--format torchao``, an unknown ``--format``.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from kdtune.cli.main import main as kdtune_main
from kdtune.quantization.gguf_export import ExportError
from kdtune.quantization.torchao_export import (
    INFO_FILENAME,
    MANIFEST_FILENAME,
    WEIGHTS_FILENAME,
    export_torchao,
    load_torchao_export,
)
from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.checkpoint import layout
from kdtune.training.checkpoint.layout import latest_checkpoint

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
QUANTIZERS = {
    "8da4w": "quantizer={_component_: torchtune.training.quantization."
    "Int8DynActInt4WeightQATQuantizer, groupsize: 32}",
    "4w": "quantizer={_component_: torchtune.training.quantization.Int4WeightOnlyQATQuantizer, "
    "groupsize: 32, inner_k_tiles: 2}",
}
TOKENS = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))


def train(assets, output_dir: Path, *overrides: str) -> KDRecipe:
    """The tiny full student trained 2 steps by the KD recipe (fp32), checkpoint saved."""
    cfg = OmegaConf.load(CONFIG_DIR / "tiny" / "full_chunked.yaml")
    dotlist = [
        f"assets_dir={assets.root}",
        f"output_dir={output_dir}",
        "epochs=1",
        "max_steps_per_epoch=2",
        "validate_every_n_steps=null",
        *overrides,
    ]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    assert isinstance(cfg, DictConfig)
    threads = torch.get_num_threads()
    debug_mode = torch.get_deterministic_debug_mode()
    torch.set_num_threads(1)
    try:
        recipe = KDRecipe(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    finally:
        torch.set_num_threads(threads)
        torch.set_deterministic_debug_mode(debug_mode)
    recipe._student.set_num_output_chunks(0)
    return recipe


@pytest.fixture(scope="module", params=list(QUANTIZERS))
def trained(request, tiny_assets, tmp_path_factory):
    """``(name, trained fake-quantised student, checkpoint folder)`` per torchao quantiser."""
    name = request.param
    output_dir = tmp_path_factory.mktemp(f"torchao_{name}")
    recipe = train(tiny_assets, output_dir, QUANTIZERS[name])
    return name, recipe._student.eval(), latest_checkpoint(output_dir)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).float()


def bf16_steps(reference: torch.Tensor, steps: int = 4) -> float:
    """``steps`` bf16 spacings (8 significant bits) at ``reference``'s largest magnitude."""
    return steps * 2.0 ** (int(torch.log2(reference.abs().max()).floor()) - 7)


def saved_size(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def test_the_manifest_name_agrees_with_the_checkpoint_layout():
    assert MANIFEST_FILENAME == layout.MANIFEST_FILENAME


def test_converted_model_computes_what_was_trained_and_reloads(trained, tmp_path):
    name, student, checkpoint = trained
    out = tmp_path / "export"
    result = export_torchao(checkpoint, out)
    converted = load_torchao_export(out)
    layers = {type(m).__name__ for m in converted.modules()}
    expected_layer = "Int8DynActInt4WeightLinear" if name == "8da4w" else "WeightOnlyInt4Linear"
    assert expected_layer in layers
    assert not any("QAT" in layer or "FakeQuant" in layer for layer in layers)

    if name == "8da4w":
        torch.testing.assert_close(logits(converted), logits(student), rtol=0, atol=1e-5)
    else:
        reference = logits(student.to(torch.bfloat16))
        torch.testing.assert_close(logits(converted), reference, rtol=0, atol=bf16_steps(reference))
    # A second load of the file: the same logits, bit for bit.
    torch.testing.assert_close(logits(load_torchao_export(out)), logits(converted), rtol=0, atol=0)

    info = json.loads((out / INFO_FILENAME).read_text())
    assert info["groupsize"] == 32
    assert info["quantizer"]["_component_"].endswith(
        "Int8DynActInt4WeightQATQuantizer" if name == "8da4w" else "Int4WeightOnlyQATQuantizer"
    )
    assert info["precision"] == ("fp32" if name == "8da4w" else "bf16")
    assert info["size_bytes"] == (out / WEIGHTS_FILENAME).stat().st_size == result.size_bytes
    small_files = {p.name for p in (checkpoint / "model").iterdir() if "safetensors" not in p.name}
    assert "config.json" in small_files
    assert {p.name for p in out.iterdir()} == {*small_files, WEIGHTS_FILENAME, INFO_FILENAME}
    bf16_state = {k: v.to(torch.bfloat16) for k, v in student.state_dict().items()}
    assert info["bf16_bytes"] == 2 * sum(v.numel() for v in bf16_state.values())
    assert result.size_bytes < saved_size(bf16_state)


def test_int4_weight_only_tolerance_bites(trained, tmp_path):
    """The 4w tolerance is missed by a conversion with another group size (64 for 32)."""
    name, student, checkpoint = trained
    if name != "4w":
        pytest.skip("the 4w tolerance")
    copy = tmp_path / "step"
    shutil.copytree(checkpoint, copy)
    manifest = json.loads((copy / MANIFEST_FILENAME).read_text())
    manifest["fingerprints"]["config"]["quantizer"]["groupsize"] = 64
    (copy / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    export_torchao(copy, tmp_path / "export")
    wrong = logits(load_torchao_export(tmp_path / "export"))
    reference = logits(student.to(torch.bfloat16))
    assert (wrong - reference).abs().max() > bf16_steps(reference)


def test_cli_writes_beside_the_checkpoint(trained, capsys):
    name, _, checkpoint = trained
    if name != "8da4w":
        pytest.skip("one CLI run")
    assert kdtune_main(["export", str(checkpoint), "--format", "torchao"]) == 0
    assert (checkpoint / "torchao" / WEIGHTS_FILENAME).is_file()
    assert "x the bf16 weights" in capsys.readouterr().out


def fake_checkpoint(folder: Path, quantizer: dict | None) -> Path:
    """A checkpoint folder with a manifest and ``model/config.json`` and no weights at all."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fingerprints = {"config": {"quantizer": quantizer, "dtype": "fp32"}}
    (folder / MANIFEST_FILENAME).write_text(json.dumps({"fingerprints": fingerprints}))
    return folder


@pytest.mark.parametrize(
    ("quantizer", "message"),
    [
        (None, "the run had no quantizer"),
        ({"_component_": "kdtune.quantization.qat.GGUFQ4_0QATQuantizer"}, "--format gguf"),
    ],
    ids=["no_quantizer", "gguf_quantizer"],
)
def test_a_checkpoint_without_a_torchao_quantizer_is_refused_before_loading(
    quantizer, message, tmp_path, capsys
):
    checkpoint = fake_checkpoint(tmp_path / "step_1", quantizer)
    with pytest.raises(ExportError, match=message):
        export_torchao(checkpoint)
    assert kdtune_main(["export", str(checkpoint), "--format", "torchao"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and MANIFEST_FILENAME in error and "\n" not in error


def test_a_model_folder_and_gguf_options_are_refused(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "step_1", None)
    with pytest.raises(ExportError, match="needs a step checkpoint"):
        export_torchao(checkpoint / "model")
    argv = ["export", str(checkpoint), "--format", "torchao", "--quant", "q4_0"]
    assert kdtune_main(argv) == 2
    assert "--quant is a GGUF option" in capsys.readouterr().err


def test_an_unknown_format_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kdtune_main(["export", str(tmp_path), "--format", "onnx"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
