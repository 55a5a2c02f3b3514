"""QAT of a student (``kdtune.quantization.qat``) on tiny torchtune Llamas.

The GGUF quantisers' forward is checked against a plain copy of the model whose weights were
replaced by the ``gguf`` package's own quantise -> dequantise (an independent reference), the
LoRA one against the merged weight quantised the same way; training with fake quantisation on
lowers the loss; ``fake_quant_after_n_steps`` leaves the forward unquantised before its step.
"""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
import torch.nn.functional as F
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules.peft import LoRALinear, get_merged_lora_ckpt
from torchtune.training.quantization import (
    Int4WeightOnlyQATQuantizer,
    Int8DynActInt4WeightQATQuantizer,
)

from kdtune.quantization.qat import (
    FakeQuantSchedule,
    GGUFFakeQuantEmbedding,
    GGUFFakeQuantLinear,
    GGUFQ4_0QATQuantizer,
    GGUFQ8_0QATQuantizer,
    build_quantizer,
    fake_quantized_output_weight,
    prepare_student,
)

TORCHTUNE_QAT = "torchtune.training.quantization"
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
DIMS = {"vocab_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64}
DIMS |= {"max_seq_len": 32, "intermediate_dim": 128}


def reference_dequant(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    array = weight.detach().float().numpy()
    blocks = gguf.quants.quantize(array, QTYPES[qtype])
    return torch.from_numpy(gguf.quants.dequantize(blocks, QTYPES[qtype]).reshape(array.shape))


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = llama3_2(**(DIMS | overrides))
    with torch.no_grad():  # torchtune initialises norms to 1 and the rest at random already
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)  # spread weights so quantisation is far above fp32 noise
    return model


def tiny_lora(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = lora_llama3_2(
        ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0,
        lora_dropout=dropout, **DIMS,
    )  # fmt: skip
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.weight.normal_(0, 0.1)  # non-zero adapters: the merge matters
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, DIMS["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed)
    )


def expected_merged(module: LoRALinear) -> torch.Tensor:
    state = {
        "m.weight": module.weight.detach().clone(),
        "m.lora_a.weight": module.lora_a.weight.detach(),
        "m.lora_b.weight": module.lora_b.weight.detach(),
    }
    return get_merged_lora_ckpt(state, rank=module.rank, alpha=module.alpha)["m.weight"]


def quantised_copy(model: torch.nn.Module, linear: str, embedding: str) -> torch.nn.Module:
    """A plain copy with every 2-D weight replaced by the gguf package's dequantised values
    (LoRA layers: the merged weight, adapters zeroed)."""
    plain = copy.deepcopy(model)
    adapters = [n for n, m in plain.named_modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        for name, module in plain.named_modules():
            if any(name.startswith(f"{prefix}.") for prefix in adapters):
                continue  # lora_a / lora_b: inside the merged weight
            if isinstance(module, LoRALinear):
                merged = expected_merged(module)  # what the merged model/ holds
                module.weight.copy_(reference_dequant(merged, linear))
                module.lora_b.weight.zero_()
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(reference_dequant(module.weight, linear))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(reference_dequant(module.weight, embedding))
    return plain


@pytest.mark.parametrize(
    ("quantizer", "linear", "embedding"),
    [
        (GGUFQ4_0QATQuantizer(), "q4_0", "q8_0"),
        (GGUFQ4_0QATQuantizer(embedding="q4_0"), "q4_0", "q4_0"),
        (GGUFQ8_0QATQuantizer(), "q8_0", "q8_0"),
    ],
)
def test_gguf_prepared_forward_is_the_gguf_quantised_model(quantizer, linear, embedding):
    model = tiny_model()
    expected = quantised_copy(model, linear, embedding)(tokens())
    names = list(model.state_dict())
    prepared = prepare_student(model, quantizer)
    assert list(prepared.state_dict()) == names  # checkpoints load and save as before
    assert isinstance(prepared.tok_embeddings, GGUFFakeQuantEmbedding)
    assert isinstance(prepared.layers[0].attn.q_proj, GGUFFakeQuantLinear)
    torch.testing.assert_close(prepared(tokens()), expected, rtol=0, atol=1e-5)
    plain = tiny_model()(tokens())
    assert (prepared(tokens()) - plain).abs().max() > 1e-2  # the quantisation is visible
    head = fake_quantized_output_weight(prepared, prepared.tok_embeddings.weight)
    assert torch.equal(head, reference_dequant(prepared.tok_embeddings.weight, embedding))


def test_lora_student_computes_with_the_quantised_merged_weight():
    model = tiny_lora()
    expected = quantised_copy(model, "q4_0", "q8_0")(tokens())
    prepared = prepare_student(model, GGUFQ4_0QATQuantizer())
    torch.testing.assert_close(prepared(tokens()), expected, rtol=0, atol=1e-5)
    q_proj = prepared.layers[0].attn.q_proj
    assert torch.equal(q_proj.merged_weight(), expected_merged(q_proj))  # bit for bit
    out = prepared(tokens())
    F.cross_entropy(out.flatten(0, 1), tokens(2).flatten()).backward()
    lora = prepared.layers[0].attn.q_proj
    assert type(lora.lora_a) is type(lora.lora_b) is torch.nn.Linear  # adapters stay plain
    assert lora.lora_a.weight.grad.abs().sum() > 0 and lora.lora_b.weight.grad.abs().sum() > 0


def train(model: torch.nn.Module, steps: int, schedule: FakeQuantSchedule | None = None):
    """Steps of AdamW on one fixed batch (next-token CE); the losses and the fake-quant states."""
    batch = tokens(3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, states = [], []
    for step in range(steps):
        if schedule is not None:
            states.append(schedule.apply(model, step))
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, states


@pytest.mark.parametrize("lora", [False, True])
def test_training_with_gguf_fake_quant_lowers_the_loss(lora):
    model = prepare_student(tiny_lora() if lora else tiny_model(), GGUFQ4_0QATQuantizer())
    losses, _ = train(model, 12)
    assert losses[-1] < 0.8 * losses[0], losses


def test_fake_quant_is_off_before_n_steps_then_on():
    model = prepare_student(tiny_model(), GGUFQ4_0QATQuantizer())
    schedule = FakeQuantSchedule(GGUFQ4_0QATQuantizer(), after_n_steps=2)
    assert [schedule.enabled_at(s) for s in range(4)] == [False, False, True, True]
    schedule.apply(model, 0)
    unquantised = copy.deepcopy(model)
    GGUFQ4_0QATQuantizer().convert(unquantised)
    assert not any(isinstance(m, GGUFFakeQuantLinear) for m in unquantised.modules())
    assert torch.equal(model(tokens()), unquantised(tokens()))  # off: the plain forward
    schedule.apply(model, 2)
    expected = quantised_copy(unquantised, "q4_0", "q8_0")(tokens())
    torch.testing.assert_close(model(tokens()), expected, rtol=0, atol=1e-5)
    _, states = train(prepare_student(tiny_model(), GGUFQ4_0QATQuantizer()), 4, schedule)
    assert states == [False, False, True, True]
    assert FakeQuantSchedule(None, None).enabled_at(0)


@pytest.mark.parametrize(
    ("node", "cls"),
    [
        ({"_component_": f"{TORCHTUNE_QAT}.Int8DynActInt4WeightQATQuantizer"}, "8da4w"),
        ({"_component_": f"{TORCHTUNE_QAT}.Int4WeightOnlyQATQuantizer", "inner_k_tiles": 2}, "4w"),
    ],
    ids=["8da4w", "4w"],
)
def test_torchao_quantizer_schedule_and_training(node, cls):
    """Off, then on, then training lowers the loss. 4w: torchao's own enable_fake_quant of its
    weight-only linear raises (it sets the absent activation quantiser); kdtune's toggle does not.
    """
    quantizer = build_quantizer(node | {"groupsize": 32})
    expected = Int8DynActInt4WeightQATQuantizer if cls == "8da4w" else Int4WeightOnlyQATQuantizer
    assert isinstance(quantizer, expected)
    plain = tiny_model()
    model = prepare_student(tiny_model(), quantizer, torch.float32)
    schedule = FakeQuantSchedule(quantizer, after_n_steps=1)
    schedule.apply(model, 0)
    assert torch.equal(model(tokens()), plain(tokens()))
    schedule.apply(model, 1)
    assert (model(tokens()) - plain(tokens())).abs().max() > 1e-3
    losses, states = train(model, 10, schedule)
    assert states[:2] == [False, True] and losses[-1] < 0.8 * losses[0]


def test_prepare_works_on_a_meta_model_before_loading():
    reference = tiny_model()
    with torch.device("meta"):
        model = llama3_2(**DIMS)
    prepare_student(model, GGUFQ4_0QATQuantizer())
    model.to_empty(device="cpu")  # as torchtune's recipes do, then load and re-init RoPE
    model.load_state_dict(reference.state_dict())
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    expected = quantised_copy(reference, "q4_0", "q8_0")(tokens())
    torch.testing.assert_close(model(tokens()), expected, rtol=0, atol=1e-5)


def test_group_size_that_does_not_divide_a_width_names_the_layer():
    quantizer = Int8DynActInt4WeightQATQuantizer(groupsize=256)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj: input width 64 .* 256"):
        prepare_student(tiny_model(), quantizer)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.w2: input width 48 .* group size 32"):
        prepare_student(tiny_model(intermediate_dim=48), GGUFQ4_0QATQuantizer())


def test_unknown_or_unsupported_quantizer_is_one_line():
    with pytest.raises(ValueError, match=r"quantizer\._component_ = kdtune\.nope\.Q: cannot build"):
        build_quantizer({"_component_": "kdtune.nope.Q"})
    with pytest.raises(ValueError, match=r"torch\.nn\.Identity is not a QAT quantiser"):
        build_quantizer({"_component_": "torch.nn.Identity"})
    with pytest.raises(ValueError, match="unknown GGUF quant type 'q3'"):
        build_quantizer(
            {"_component_": "kdtune.quantization.qat.GGUFQ4_0QATQuantizer", "embedding": "q3"}
        )
    assert build_quantizer(None) is None


def test_lora_dropout_is_refused():
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj: lora_dropout 0\.1.*=0\.0"):
        prepare_student(tiny_lora(dropout=0.1), GGUFQ4_0QATQuantizer())


def test_export_options_match_the_trained_quantisation():
    assert GGUFQ4_0QATQuantizer().export_options() == {"quant": "q4_0", "embedding_quant": "q8_0"}
    assert GGUFQ8_0QATQuantizer("none").export_options() == {
        "quant": "q8_0",
        "embedding_quant": "f16",
    }


@pytest.mark.parametrize("tied", [True, False])
def test_a_chunked_head_is_quantised_once_per_forward_with_the_same_result(tied, monkeypatch):
    """In chunked-output mode the output layer runs once per chunk: its weight is quantised once
    per ``model(...)`` call. The chunks' logits and every gradient equal those of a model that
    quantises per chunk; micro-batches without an optimizer step in between (gradient
    accumulation) and a step that changes the weight in place both start afresh."""
    import kdtune.quantization.qat as qat

    def prepared(keep: bool) -> torch.nn.Module:
        model = prepare_student(tiny_model(tie_word_embeddings=tied), GGUFQ4_0QATQuantizer())
        model.set_num_output_chunks(4)
        head = model.output.linear if tied else model.output
        if not keep:
            del head.__dict__["_quantized_this_forward"]  # the per-chunk behaviour
        return model

    calls = []
    original = qat.gguf_fake_quantize
    monkeypatch.setattr(
        qat,
        "gguf_fake_quantize",
        lambda w, q, name, dtype: calls.append(name) or original(w, q, name, dtype),
    )
    runs = {}
    for keep in (True, False):
        model, calls[:] = prepared(keep), []
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for micro_batch in (3, 4, 5):  # two accumulated micro-batches, then a step, then one more
            chunks = model(tokens(micro_batch)[:, :-1])
            logits = torch.cat(chunks, dim=1)
            loss = F.cross_entropy(logits.flatten(0, 1), tokens(micro_batch)[:, 1:].flatten())
            loss.backward()
            losses.append(loss.detach())
            if micro_batch == 4:
                optimizer.step()
        head_name = "output (tied)" if tied else "output"
        runs[keep] = (losses, [p.grad.clone() for p in model.parameters()], calls.count(head_name))
    assert runs[True][2] == 3 and runs[False][2] == 3 * 4  # once per forward vs once per chunk
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        assert torch.equal(a, b)
