import json

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, small_model

import hf
import ddp
import lora as L
import optim
import quant as Q
import train

KINDS = [("lora", False, False), ("dora", False, True), ("qlora", True, False), ("qdora", True, True)]


def adapted(kind_quant, dora, seed=0, targets="all-linear", rank=4):
    m = small_model(seed=seed)
    if kind_quant:
        Q.quantize_model(m)
    L.add_lora(m, rank=rank, alpha=8, targets=targets, dora=dora)
    return m


def randomize_adapters(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in name else 0.05))


@pytest.mark.parametrize("kind,quantized,dora", KINDS)
def test_fresh_adapter_leaves_logits_unchanged(kind, quantized, dora):
    base = small_model(seed=0)
    if quantized:
        Q.quantize_model(base)
    x = torch.randint(0, 50, (2, 10))
    assert_close(adapted(quantized, dora)(x), base(x))


def test_lora_and_dora_follow_their_formulas():
    torch.manual_seed(0)
    W = torch.randn(6, 8)
    base = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        base.weight.copy_(W)
    x = torch.randn(3, 8)
    for dora in (False, True):
        layer = L.LoRALinear(base, rank=2, alpha=3.0, dora=dora)
        A, B = layer.lora_A.weight.detach(), torch.randn(6, 2)
        with torch.no_grad():
            layer.lora_B.weight.copy_(B)
        Wp = W + 1.5 * B @ A  # alpha / r = 1.5
        if dora:
            m = torch.rand(6) + 0.5
            with torch.no_grad():
                layer.lora_magnitude_vector.copy_(m)
            Wp = m[:, None] * Wp / Wp.norm(dim=1, keepdim=True)
        assert_close(layer(x), x @ Wp.T)


@pytest.mark.parametrize("kind,quantized,dora", KINDS)
def test_merged_model_equals_adapter_model(kind, quantized, dora):
    m = adapted(quantized, dora)
    randomize_adapters(m)
    x = torch.randint(0, 50, (2, 10))
    y = m(x)
    merged = L.merge_and_unload(m)
    assert not any(isinstance(mod, (L.LoRALinear, Q.Linear4bit)) for mod in merged.modules())
    assert_close(merged(x), y)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_restores_the_base(dora):
    m = adapted(False, dora)
    randomize_adapters(m)
    x = torch.randint(0, 50, (2, 10))
    y = m(x)
    before = m.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    for _, layer in L.lora_layers(m):
        layer.merge()
    assert_close(m(x), y)
    for _, layer in L.lora_layers(m):
        layer.unmerge()
    assert_close(m.model.layers[0].self_attn.q_proj.base_layer.weight, before)  # W + BA - BA: rounded twice
    assert_close(m(x), y)


@pytest.mark.parametrize("kind,quantized,dora", KINDS)
def test_adapter_save_load_round_trip(tmp_path, kind, quantized, dora):
    m = adapted(quantized, dora, targets="q_proj,v_proj,down_proj")
    randomize_adapters(m)
    L.save_adapter(m, str(tmp_path / "adapter"))
    fresh = small_model(seed=0)
    if quantized:
        Q.quantize_model(fresh)
    L.load_adapter(fresh, str(tmp_path / "adapter"))
    x = torch.randint(0, 50, (2, 10))
    assert torch.equal(fresh(x), m(x))


def test_adapter_files_use_peft_names(tmp_path):
    from safetensors import safe_open
    m = adapted(True, True, targets="q_proj,v_proj")
    L.save_adapter(m, str(tmp_path / "a"), "some/base")
    keys = set(safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt").keys())
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{p}.{t}"
                    for i in range(2) for p in ("q_proj", "v_proj")
                    for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["target_modules"],
            cfg["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM", 4, 8, True, ["q_proj", "v_proj"], "some/base")


def test_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = small_model(seed=5)
    hf.save_pretrained(base, str(tmp_path / "hf"), dtype=torch.float32)
    m = hf.from_pretrained(str(tmp_path / "hf"))
    L.add_lora(m, rank=4, alpha=8, targets="all-linear", dora=True)
    randomize_adapters(m)
    L.save_adapter(m, str(tmp_path / "adapter"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "adapter")).eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert_close(theirs(x).logits, m(x))


def test_only_adapters_train_and_get_optimizer_state():
    m = adapted(True, True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.endswith("lora_magnitude_vector") for n in trainable)
    engine = ddp.Replicated(m, train.Dist(0, 0, 1, torch.device("cpu")))
    opt = optim.make_optimizer(engine, train.Config())
    s, n = m(torch.randint(0, 50, (2, 10)), labels=torch.randint(0, 50, (2, 10)))
    s.backward()
    opt.step()
    assert {id(p) for p in opt.state} == {id(p) for n, p in m.named_parameters() if p.requires_grad}
    mag = m.model.layers[0].mlp.up_proj.lora_magnitude_vector
    assert mag.grad is not None and mag.grad.abs().sum() > 0


def test_unknown_lora_target_lists_the_choices():
    with pytest.raises(ValueError, match=r"--lora_target: no Linear layer named 'qproj'; choose from "
                                         r"down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj or all-linear"):
        adapted(False, False, targets="q_proj,qproj")
