"""Qwen2 / Qwen2.5, Qwen3 and Mistral: each a few ModelArgs flags (q/k/v biases, per-head q/k norms,
a sliding window). Each family's piece against the written-out forward, against transformers where
it is installed (their folders in, ours out), and trained with every adapter and quantized base,
plain and sharded."""
import json
import os

import pytest
import torch
from conftest import assert_close, small_args
from test_model import reference_logits

import hf
import model as M
import train

FAMILIES = {  # small shapes with each family's distinguishing piece
    "qwen2": dict(model_type="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=16),  # head_dim != dim / heads
    "mistral": dict(model_type="mistral", sliding_window=5),
}
FAST = ["--seq_len=32", "--batch_size=4", "--eval_samples=0", "--samples=0", "--save_hf=false", "--log_every=1",
        "--warmup_steps=1", "--lr=1e-2", "--precision=fp32", "--eval_frac=0", "--max_steps=3"]


def family_model(family, seed=0):
    torch.manual_seed(seed)
    m = M.Llama(small_args(**FAMILIES[family]))
    m.init_weights(std=0.2)
    for name, p in m.named_parameters():  # biases and norm weights away from their init, so that they count
        if name.endswith(("bias", "q_norm.weight", "k_norm.weight")):
            p.data.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_matches_the_written_out_forward(family):
    m = family_model(family)
    ids = torch.randint(0, 50, (11,))  # longer than Mistral's window of 5
    assert_close(m(ids[None])[0].double(), reference_logits(m, ids.tolist()))
    names = {n.split("layers.0.")[-1] for n, _ in m.named_parameters() if "layers.0." in n}
    expected = {"qwen2": {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"},
                "qwen3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}, "mistral": set()}[family]
    assert expected <= names and "self_attn.o_proj.bias" not in names
    assert sum(p.numel() for p in m.parameters()) == m.args.num_params()  # what --dry_run counts


def test_the_sliding_window_holds_in_packed_rows_and_in_generation():
    m = family_model("mistral")
    docs = [torch.randint(0, 50, (n,)) for n in (9, 4, 12)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = m(ids, position_ids=pos, doc_ids=doc)[0]
    assert_close(packed, torch.cat([m(d[None])[0] for d in docs]))  # each document alone, windowed
    prompt = torch.randint(0, 50, (8,)).tolist()
    cached = M.generate(m, [prompt, prompt[:3]], 6, temperature=0.0)
    for p, got in zip((prompt, prompt[:3]), cached):  # greedy by full forwards, no cache
        seq = list(p)
        for _ in range(6):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert got == seq[len(p):]


def test_the_presets_have_their_published_sizes():
    for name, billions in (("qwen2.5-7b", 7.62), ("qwen3-8b", 8.19), ("mistral-7b", 7.24)):
        args = M.MODELS[name]
        assert abs(args.num_params() / 1e9 - billions) / billions < 0.01, (name, args.num_params())
        with torch.device("meta"):
            assert sum(p.numel() for p in M.Llama(args).parameters()) == args.num_params()


def test_another_model_type_is_refused_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'mixtral', expected one of llama, mistral, "
                                         r"qwen2, qwen3$"):
        hf.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# transformers' own folders in, ours out


TRANSFORMERS_CONFIGS = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_folders_load_with_their_logits_and_our_export_loads_back_in_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    name, extra = TRANSFORMERS_CONFIGS[family]
    config = getattr(transformers, name)(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         **extra)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = hf.from_pretrained(str(tmp_path / "theirs"))
    ids = torch.randint(0, 64, (2, 20))  # longer than Mistral's window
    with torch.no_grad():
        want, got = theirs(ids).logits, ours(ids)
    assert ((got - want).norm() / want.norm()) < 1e-4
    hf.save_pretrained(ours, str(tmp_path / "ours"), dtype=torch.float32)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == family and saved["architectures"] == [type(theirs).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert ((back(ids).logits - want).norm() / want.norm()) < 1e-6


# -----------------------------------------------------------------------------
# Training: every adapter and quantized base, plain and sharded


def family_folder(tmp_path, family):
    """An HF folder of the family with a character tokenizer, as train.py loads it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{chr(i): i - 30 for i in range(32, 79)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    path = tmp_path / family
    hf.save_pretrained(family_model(family), str(path), dtype=torch.float32,
                       extra_files={"tokenizer.json": tok.to_str().encode()})
    return str(path)


def text_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i:02d}+{i % 7:02d}={i + i % 7:03d}. " * 3}) + "\n" for i in range(64)))
    return str(path)


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if "loss" in line]


TRAINING = {"full": [], "lora": ["--adapter=lora"], "dora": ["--adapter=dora"],
            **{f"qlora-{q}": ["--adapter=lora", f"--quant={q}"] for q in ("nf4", "hqq", "int8", "ternary")},
            "llama_pro": ["--expand_blocks=1"]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", TRAINING)
def test_every_training_type_trains_each_family_and_sharding_gives_the_same_losses(tmp_path, family, kind):
    folder, data = family_folder(tmp_path, family), text_data(tmp_path)
    common = FAST + [f"--model={folder}", f"--data={data}", *TRAINING[kind]]
    train.main(common + [f"--out_dir={tmp_path / 'plain'}"])
    plain = losses(tmp_path / "plain")
    assert len(plain) == 3 and all(map(torch.isfinite, torch.tensor(plain)))
    if kind in ("full", "lora", "qlora-nf4", "llama_pro"):  # sharded at world 1: biases and norms in the units
        train.main(common + ["--fsdp", f"--out_dir={tmp_path / 'sharded'}"])
        assert_close(losses(tmp_path / "sharded"), plain, ulps=256)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_adapter_loads_in_peft_and_the_merged_export_in_transformers(tmp_path, family):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    folder, data = family_folder(tmp_path, family), text_data(tmp_path)
    out = tmp_path / "out"
    train.main(FAST + [f"--model={folder}", f"--data={data}", "--adapter=lora", "--save_hf=true", "--hf_dtype=fp32",
                       f"--out_dir={out}"])
    ids = torch.randint(0, 49, (2, 12))
    ours = hf.from_pretrained(folder)
    import lora
    lora.load_adapter(ours, str(out / "adapter"))
    with torch.no_grad():
        want = ours(ids)
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        assert_close(with_adapter(ids).logits, want)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
        assert_close(merged(ids).logits, want)
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == family


@pytest.mark.slow  # 2 x 2 launches; world 1 --fsdp runs by default above
@pytest.mark.parametrize("family,flags", [("qwen2", []), ("qwen3", ["--adapter=lora"])])
def test_sharding_at_world_2_gives_the_data_parallel_losses_with_biases_and_head_norms(tmp_path, family, flags):
    import subprocess
    import sys
    folder, data = family_folder(tmp_path, family), text_data(tmp_path)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *FAST,
              f"--model={folder}", f"--data={data}", "--batch_size=2", *flags]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        r = subprocess.run(launch + extra + [f"--out_dir={tmp_path / name}"], cwd=root, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), ulps=256)


def test_llama_pro_on_a_transformers_qwen2_folder_exports_a_folder_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "theirs")
    ours = hf.from_pretrained(str(tmp_path / "theirs"))
    M.expand_blocks(ours, 1)
    hf.save_pretrained(ours, str(tmp_path / "ours"), dtype=torch.float32)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert back.config.num_hidden_layers == 3 == len(json.loads((tmp_path / "ours" / "config.json").read_text())["layer_types"])
