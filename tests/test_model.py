import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, small_args, small_model

import hf
import model as M

# -----------------------------------------------------------------------------
# A written-out Llama forward: one position and one head at a time, RoPE as explicit 2-D rotations.


def reference_logits(m: M.Llama, ids):
    a = m.args
    sd = {k: v.double() for k, v in m.state_dict().items()}
    hd, T = a.head_dim, len(ids)
    inv = [a.rope_theta ** (-2 * i / hd) for i in range(hd // 2)]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean() + a.norm_eps)

    def proj(name, h, heads):  # a projection, its bias (Qwen2: q, k, v), each head normed (Qwen3: q, k)
        out = (sd[name + ".weight"] @ h + sd.get(name + ".bias", 0)).view(heads, hd)
        norm = name.replace("_proj", "_norm") + ".weight"
        return torch.stack([rms(o, sd[norm]) for o in out]) if norm in sd else out

    def rope(vec, p):  # HF layout: coordinate i pairs with i + hd/2
        out = vec.clone()
        for i in range(hd // 2):
            c, s = math.cos(p * inv[i]), math.sin(p * inv[i])
            out[i] = vec[i] * c - vec[i + hd // 2] * s
            out[i + hd // 2] = vec[i + hd // 2] * c + vec[i] * s
        return out

    xs = [sd["model.embed_tokens.weight"][t] for t in ids]
    for l in range(a.n_layers):
        p = f"model.layers.{l}."
        hs = [rms(x, sd[p + "input_layernorm.weight"]) for x in xs]
        q = [proj(p + "self_attn.q_proj", h, a.n_heads) for h in hs]
        k = [proj(p + "self_attn.k_proj", h, a.n_kv_heads) for h in hs]
        v = [proj(p + "self_attn.v_proj", h, a.n_kv_heads) for h in hs]
        new = []
        for t in range(T):
            heads = []
            for h in range(a.n_heads):
                g = h // (a.n_heads // a.n_kv_heads)  # the KV head this query head shares
                qt = rope(q[t][h], t)
                seen = range(max(0, t - a.sliding_window + 1) if a.sliding_window else 0, t + 1)  # Mistral's window
                scores = torch.stack([qt @ rope(k[s][g], s) for s in seen]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                heads.append(sum(w[i] * v[s][g] for i, s in enumerate(seen)))
            x = xs[t] + sd[p + "self_attn.o_proj.weight"] @ torch.cat(heads) + sd.get(p + "self_attn.o_proj.bias", 0)
            h2 = rms(x, sd[p + "post_attention_layernorm.weight"])
            gate, up = sd[p + "mlp.gate_proj.weight"] @ h2, sd[p + "mlp.up_proj.weight"] @ h2
            new.append(x + sd[p + "mlp.down_proj.weight"] @ (gate * torch.sigmoid(gate) * up))
        xs = new
    head = sd["model.embed_tokens.weight"] if a.tie_embeddings else sd["lm_head.weight"]
    return torch.stack([head @ rms(x, sd["model.norm.weight"]) for x in xs])


@pytest.mark.parametrize("tie", [False, True])
def test_gqa_and_rope_match_written_out_reference(tie):
    m = small_model(tie_embeddings=tie)
    ids = torch.randint(0, 50, (7,))
    got = m(ids[None])[0].double()
    want = reference_logits(m, ids.tolist())
    assert_close(got, want)


def test_llama3_rope_scaling_matches_meta_formula():
    args = small_args(head_dim=64, dim=64, n_heads=1, n_kv_heads=1, rope_theta=500000.0, rope_scaling=M._LLAMA3_SCALING)
    got = M.rope_frequencies(args)
    base = [500000.0 ** (-i / 64) for i in range(0, 64, 2)]
    want = []  # apply_scaling from Meta's llama-models reference code, written out
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(f)
        elif wavelen > 8192 / 1:
            want.append(f / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want.append((1 - smooth) * f / 8 + smooth * f)
    assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got[0] == base[0] and abs(got[-1] - base[-1] / 8) < 1e-12  # high kept, low divided


def test_linear_rope_scaling_divides_positions():
    plain = small_args()
    scaled = small_args(rope_scaling={"rope_type": "linear", "factor": 4.0})
    pos = torch.tensor([[0, 4, 8, 12]])
    c1, s1 = M.rope_cos_sin(M.rope_frequencies(scaled), pos, torch.float32)
    c2, s2 = M.rope_cos_sin(M.rope_frequencies(plain), pos // 4, torch.float32)
    assert_close(c1, c2)
    assert_close(s1, s2)


def test_packed_row_gives_each_document_its_own_logits():
    m = small_model()
    docs = [torch.randint(0, 50, (n,)) for n in (5, 9, 3)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = m(ids, position_ids=pos, doc_ids=doc)[0]
    alone = torch.cat([m(d[None])[0] for d in docs])
    assert_close(packed, alone)


def test_flex_block_mask_equals_dense_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    doc = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 50 + [-1] * 14])
    q, k, v = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    # eager flex_attention (the compiled one is for CUDA) with the very BlockMask model.py builds
    got = flex.flex_attention(q, k, v, block_mask=M.document_mask(doc, use_flex=True).block,
                               enable_gqa=True)
    want = M.attend(q, k, v, M.document_mask(doc, use_flex=False))
    assert_close(got, want)


def test_attention_falls_back_to_dense_masks_when_flex_attention_fails(monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention")
    doc = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 50 + [-1] * 14])
    q, k, v = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)

    def no_kernel(*a, **kw):  # what inductor raises when no Triton config fits the GPU
        raise RuntimeError("NoValidChoicesError: No choices to select")
    monkeypatch.setattr(M, "_flex_attention", no_kernel)
    monkeypatch.setattr(M, "flex_failed", None)
    with pytest.warns(UserWarning, match="dense document masks"):
        got = M.attend(q, k, v, M.document_mask(doc, use_flex=True))
    want = M.attend(q, k, v, M.document_mask(doc, use_flex=False))
    assert_close(got, want, ulps=0)  # the same dense path
    assert M.flex_failed is not None


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_equals_plain_loss(chunk):
    m = small_model()
    ids = torch.randint(0, 50, (3, 20))
    labels = torch.randint(0, 50, (3, 20))
    labels[0, :5] = -100
    labels[2] = -100
    want = F.cross_entropy(m(ids).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum")
    g_want = torch.autograd.grad(want, m.lm_head.weight)[0]
    got, n = m(ids, labels=labels, loss_chunk=chunk)
    g_got = torch.autograd.grad(got, m.lm_head.weight)[0]
    assert n == int((labels != -100).sum())
    assert_close(got, want)
    assert_close(g_got, g_want)


def test_chunked_loss_never_holds_all_logits():
    m = small_model(vocab_size=5000)
    ids = torch.randint(0, 5000, (1, 256))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        m(ids, labels=ids, loss_chunk=32)
    assert max(saved) < 256 * 5000 / 4  # with chunk=0 the fp32 logits (256 x 5000) would be saved


def test_generate_with_kv_cache_equals_without():
    m = small_model()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    cached = M.generate(m, prompts, 6)
    plain = M.generate(m, prompts, 6, use_cache=False)
    single = [M.generate(m, [p], 6)[0] for p in prompts]  # no padding at all
    assert cached == plain == single


def test_generate_stops_at_eos_and_sampling_is_seeded():
    m = small_model()
    greedy = M.generate(m, [[1, 2, 3]], 8)[0]
    eos = greedy[2]
    assert M.generate(m, [[1, 2, 3]], 8, eos_id=eos)[0] == greedy[:greedy.index(eos) + 1]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = M.generate(m, [[1, 2, 3]], 8, temperature=1.0, top_k=5, generator=g1)
    assert s1 == M.generate(m, [[1, 2, 3]], 8, temperature=1.0, top_k=5, generator=g2)


def test_prompt_longer_than_context_is_refused():
    m = small_model(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        M.generate(m, [list(range(14))], 4)


def test_gradient_checkpointing_gives_same_gradients():
    m = small_model()
    ids = torch.randint(0, 50, (2, 12))
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        m(ids, labels=ids)[0].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, ulps=0)  # recompute runs the same operations: bit for bit


@pytest.mark.parametrize("tie,shard_bytes", [(False, 1 << 30), (True, 1 << 30), (False, 20_000)])
def test_hf_checkpoint_round_trip(tmp_path, tie, shard_bytes):
    m = small_model(tie_embeddings=tie)
    hf.save_pretrained(m, str(tmp_path / "hf"), dtype=torch.float32, max_shard_bytes=shard_bytes)
    files = os.listdir(tmp_path / "hf")
    assert ("model.safetensors.index.json" in files) == (shard_bytes < 1 << 30)
    loaded = hf.from_pretrained(str(tmp_path / "hf"))
    ids = torch.randint(0, 50, (2, 10))
    assert torch.equal(m(ids), loaded(ids))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie


def test_checkpoint_shape_mismatch_is_a_clear_error(tmp_path):
    m = small_model()
    hf.save_pretrained(m, str(tmp_path / "hf"), dtype=torch.float32)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape "
                                         r"\[32, 48\], config.json implies \[32, 64\]"):
        hf.from_pretrained(str(tmp_path / "hf"))


def test_non_llama_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type is 'gpt2', expected one of llama, mistral, qwen2, qwen3"):
        hf.from_pretrained(str(tmp_path))


def test_rope_parameters_config_form_is_read():
    hf = small_args().to_hf_config()
    hf.pop("rope_theta"), hf.pop("rope_scaling")
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    args = M.ModelArgs.from_hf_config(hf)
    assert args.rope_theta == 500000.0 and args.rope_scaling["rope_type"] == "llama3"


def test_presets_have_the_published_sizes():
    # parameter counts published with the models (billions, rounded)
    for name, billions in (("llama2-7b", 6.74), ("llama2-13b", 13.0), ("llama2-70b", 69.0), ("llama3-8b", 8.03),
                           ("llama3-70b", 70.6), ("tinyllama-1.1b", 1.10)):
        assert abs(M.MODELS[name].num_params() / 1e9 - billions) / billions < 0.01, name
    with torch.device("meta"):
        assert sum(p.numel() for p in M.Llama(M.MODELS["llama3-8b"]).parameters()) == M.MODELS["llama3-8b"].num_params()


def test_logits_match_transformers_on_random_and_real_checkpoints(tmp_path, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    m = small_model(rope_scaling=dict(M._LLAMA3_SCALING, original_max_position_embeddings=16), rope_theta=50.0)
    hf.save_pretrained(m, str(tmp_path / "hf"), dtype=torch.float32)
    for path in (str(tmp_path / "hf"), smollm2_dir):
        ours = hf.from_pretrained(path)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = torch.randint(0, ours.args.vocab_size, (2, 40))
        with torch.no_grad():
            a, b = ours(ids), theirs(ids).logits
        assert ((a - b).norm() / b.norm()) < 1e-4, path


def test_llama_pro_expansion_computes_exactly_what_the_original_did():
    m = small_model(n_layers=4)
    ids = torch.randint(0, 50, (2, 9))
    before = m(ids)
    greedy = M.generate(m, [[1, 5, 7]], 4, temperature=0.0)
    added = M.expand_blocks(m, 2)
    assert m.args.n_layers == 6 and [list(m.model.layers).index(b) for b in added] == [2, 5]  # after blocks 1 and 3
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == list(range(6))
    assert torch.equal(m(ids), before)  # the copies add exact zeros to the residual stream
    assert M.generate(m, [[1, 5, 7]], 4, temperature=0.0) == greedy  # through the KV cache, one slot per block
    assert all(b.self_attn.o_proj.weight.abs().sum() == 0 and b.mlp.down_proj.weight.abs().sum() == 0 for b in added)
    assert torch.equal(added[0].self_attn.q_proj.weight, m.model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match=r"--expand_blocks=7: expected 1 to the model.s 6 blocks"):
        M.expand_blocks(m, 7)
