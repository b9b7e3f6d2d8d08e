"""A Llama-style decoder in one file, with the Hugging Face parameter names.

    model = Llama(MODELS["tiny"])                       # random init from a preset
    model.init_weights()
    loss_sum, n_tokens = model(input_ids, labels)       # summed cross-entropy over labels != -100

What is inside, top to bottom:
- `ModelArgs` and its presets (tiny, llama2-7b/13b/70b, llama3-8b/70b, llama3.1-8b, tinyllama-1.1b).
- RMSNorm, rotary embeddings (default, "linear" position interpolation, Llama 3.1 "llama3" scaling)
  in Hugging Face's rotate-half convention, so HF checkpoints load with no permutation.
- Attention with grouped-query heads through `scaled_dot_product_attention`. Packed rows carry a
  document id per token; a token attends only to earlier tokens of its own document. On CUDA that
  mask is a flex_attention BlockMask (O(T) to describe, blocks that are fully masked are skipped);
  on CPU it is a dense [B, 1, T, S] boolean mask.
- The loss: cross-entropy over labels != -100, optionally in chunks of rows that are recomputed in
  backward, so the [tokens, vocab] fp32 logits never exist at once (at Llama 3's 128k vocabulary and
  8k tokens they are 4 GiB, the largest tensor of a fine-tune).
- `generate()` with a KV cache, for batches of prompts of different lengths (left padding, masked
  out by the same document-id rule).

Hugging Face folders (config.json, safetensors) are read and written by hf.py.

model.py knows nothing of distribution, quantization or adapters: quant.py and lora.py swap
`nn.Linear` modules in place, fsdp.py wraps `model.model.layers[i]` as units.
"""

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import use_triton
from kernels.linear_ce import linear_cross_entropy_triton
from kernels.rmsnorm import rms_norm
from kernels.rope import rope
from kernels.swiglu import swiglu

# -----------------------------------------------------------------------------
# Shapes


@dataclass
class ModelArgs:
    dim: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    vocab_size: int = 32000
    ffn_dim: int = 11008  # SwiGLU intermediate size
    head_dim: int = 0  # 0: dim // n_heads (SmolLM2 and Gemma-style models set it explicitly)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF's dict: {"rope_type": "llama3" | "linear", "factor": ...}
    max_seq_len: int = 4096  # the context the model was trained for; longer prompts are refused
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # biases on q, k, v and o_proj (Llama's, Qwen3's attention_bias)
    mlp_bias: bool = False
    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3: the family, a few flags below, not a subclass
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2 / Qwen2.5)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before RoPE (Qwen3)
    sliding_window: int = 0  # > 0: a token attends to the last sliding_window positions only (Mistral)
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    initializer_range: float = 0.02  # std of the random init (HF's name); presets train from it
    hf_extra: dict = field(default_factory=dict)  # config.json's other keys, written back on export

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_hf_config(cls, cfg: dict, path: str = "config.json") -> "ModelArgs":
        """Map a Hugging Face config dict (Llama, Mistral, Qwen2, Qwen3) to ModelArgs."""
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"{path}: model_type is {family!r}, expected one of {', '.join(FAMILIES)}")
        if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            raise ValueError(f"{path}: use_sliding_window=true (sliding attention on some layers only) is not supported")
        try:
            # Newer transformers write rope settings under rope_parameters; hub checkpoints have them at top level.
            rope = dict(cfg.get("rope_parameters") or {})
            scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
            eos = cfg.get("eos_token_id")
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab_size=cfg["vocab_size"],
                ffn_dim=cfg["intermediate_size"],
                head_dim=cfg.get("head_dim") or 0,
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                rope_scaling=scaling or None,
                max_seq_len=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=cfg.get("attention_bias", False) and family in ("llama", "qwen3"),
                mlp_bias=cfg.get("mlp_bias", False) and family == "llama",
                model_type=family,
                qkv_bias=family == "qwen2",
                qk_norm=family == "qwen3",
                sliding_window=(cfg.get("sliding_window") or 0) if family == "mistral" else 0,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                initializer_range=cfg.get("initializer_range", 0.02),
                hf_extra={k: v for k, v in cfg.items() if k not in HF_KEYS},
            )
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e.args[0]!r}, expected in a {family} config") from None

    def to_hf_config(self) -> dict:
        """The config.json of an export: the family's keys, and the source's other keys unchanged."""
        cfg = {
            **self.hf_extra,
            "architectures": [FAMILIES[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.ffn_dim,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
            "torch_dtype": "bfloat16",
        }
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window or None
        kinds = cfg.get("layer_types")
        if kinds and len(set(kinds)) == 1:  # one kind per layer: as many as the layers now (Llama-Pro adds some)
            cfg["layer_types"] = kinds[:1] * self.n_layers
        return cfg

    def num_params(self) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * (2 * q + 2 * kv) + (q + 2 * kv) * (self.qkv_bias or self.attention_bias)
        attn += self.dim * self.attention_bias + 2 * self.head_dim * self.qk_norm
        layer = attn + 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim) * self.mlp_bias + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * layer + self.vocab_size * self.dim + head + self.dim


# The families config.json may name, and the architecture an export declares for each.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
# The keys from_hf_config reads or to_hf_config writes; the rest of a config.json is carried as is.
HF_KEYS = {"architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "vocab_size", "intermediate_size", "head_dim", "hidden_act", "rms_norm_eps",
           "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
           "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "initializer_range",
           "torch_dtype", "dtype", "quantization_config"}

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

MODELS = {
    # ~0.5M parameters; vocab fits the byte-level tokenizer of data.py (256 bytes + specials, padded to 64).
    # Tuned for the default run (two-digit sums): 2 layers of 8 heads learn them steadily where 4 layers
    # of 4 heads stalled on the units digit for some seeds; rope_theta 100 spreads the rotary
    # frequencies over the 10-token span of a sum (theta 10000 leaves 2 of 8 pairs turning there),
    # and an init of 0.06 (not 0.02) shortens the first plateau. >= 94% held out in 360 steps for
    # seeds 0-5, fp32 and bf16 (README).
    "tiny": ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=320, ffn_dim=344, max_seq_len=1024,
                      rope_theta=100.0, initializer_range=0.06),
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                           rope_theta=500000.0, max_seq_len=8192, bos_token_id=128000, eos_token_id=128001),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
                            rope_theta=500000.0, max_seq_len=8192, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768,
                            model_type="mistral", sliding_window=4096),
    "qwen2.5-7b": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064,
                            rope_theta=1e6, norm_eps=1e-6, max_seq_len=32768, model_type="qwen2", qkv_bias=True,
                            bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=12288, vocab_size=151936,
                          rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960, model_type="qwen3", qk_norm=True,
                          bos_token_id=151643, eos_token_id=151645),
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                             rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, max_seq_len=131072,
                             bos_token_id=128000, eos_token_id=128001),
}

# -----------------------------------------------------------------------------
# Rotary embeddings


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/hd), rescaled per args.rope_scaling. Shape (head_dim // 2,), fp32."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    s = args.rope_scaling
    kind = (s or {}).get("rope_type", (s or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # position interpolation: position p is treated as p / factor
        return inv_freq / s["factor"]
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low frequencies by `factor`, and blend
        # smoothly in between (wavelength measured against the original context length).
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen < old_ctx / hi, inv_freq, torch.where(wavelen > old_ctx / lo, inv_freq / factor, scaled))
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r}, expected 'linear' or 'llama3'")


def rope_cos_sin(inv_freq, position_ids, dtype):
    """position_ids (B, T) -> cos, sin (B, T, head_dim) in `dtype`, computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: the two halves of a head rotate together
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); rotate pairs (x[i], x[i + hd/2]): x * cos + rotate_half(x) * sin, written
    out in kernels/rope.py (in place on CUDA)."""
    return rope(x, cos, sin)


# -----------------------------------------------------------------------------
# Attention masks: "tokens attend to earlier tokens of their own document"

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _flex_attention = torch.compile(flex_attention, dynamic=False)
except ImportError:  # older torch: dense masks everywhere
    create_block_mask = None


class FlexMask(NamedTuple):
    block: object  # flex_attention's BlockMask
    doc_ids: torch.Tensor  # what it was made from: attend's dense fallback if flex_attention fails
    window: int


def document_mask(doc_ids, use_flex: bool, window=0):
    """doc_ids (B, T), equal ids = same document, -1 = padding. Returns what `attend` takes.
    window > 0 (a sliding window): a token sees itself and the window - 1 tokens before it, no more.

    use_flex: a FlexMask, whose BlockMask takes O(T^2 / 128^2) bits instead of O(T^2) bools; and
    flex_attention skips blocks that are fully masked, so packing many short documents also saves compute.
    """
    if use_flex:
        def same_doc_causal(b, h, q, kv):
            near = (q - kv < window) if window else True
            return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv) & near
        B, T = doc_ids.shape
        # _compile: eager construction would evaluate the mask at all B*T*T points before reducing
        # it to blocks, which is the very tensor we are avoiding; compiled, it works block by block.
        block = create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda)
        return FlexMask(block, doc_ids, window)
    return dense_mask(doc_ids, doc_ids, torch.arange(doc_ids.shape[1], device=doc_ids.device), window)


def dense_mask(q_doc, k_doc, q_slot, window=0):
    """Boolean (B, 1, Tq, S): key slot j <= query slot (and > query slot - window), same document id."""
    k_slot = torch.arange(k_doc.shape[1], device=k_doc.device)[None, :]
    causal = k_slot <= q_slot[:, None]  # (Tq, S)
    if window:
        causal = causal & (k_slot > q_slot[:, None] - window)
    return (causal[None] & (q_doc[:, :, None] == k_doc[:, None, :]))[:, None]


# FORCE_USE_FLEX_ATTENTION: for queries shorter than 128 tokens inductor otherwise picks its decoding
# kernel, which found no valid config for the default run's 66-token rows on an H200 (torch 2.11).
FLEX_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}
flex_failed = None  # the first error flex_attention raised; from then on every mask is dense


def attend(q, k, v, mask):
    """q (B, H, T, hd), k/v (B, Hkv, S, hd). mask: None (plain causal), a bool tensor, or a FlexMask."""
    global flex_failed
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if not isinstance(mask, torch.Tensor):
        if flex_failed is None:
            try:
                return _flex_attention(q, k, v, block_mask=mask.block, enable_gqa=True, kernel_options=FLEX_OPTIONS)
            except torch.OutOfMemoryError:
                raise  # dense masks would need more memory still
            except Exception as e:  # noqa: BLE001 - inductor found no kernel for this GPU (e.g. too little shared memory)
                flex_failed = e
                warnings.warn(f"flex_attention failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "attention uses dense document masks from here on (O(T^2) memory)")
        doc = mask.doc_ids
        mask = dense_mask(doc, doc, torch.arange(doc.shape[1], device=doc.device), mask.window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


# -----------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In fp32 (the mean of squares overflows/underflows in bf16), cast back, then the weight:
        # kernels/rmsnorm.py holds the PyTorch reference and the Triton kernel used on CUDA.
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Per-layer keys/values (B, n_kv, max_len, hd) plus the document id of every slot."""

    def __init__(self, args: ModelArgs, batch, max_len, dtype, device):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.doc = torch.full((batch, max_len), -2, dtype=torch.long, device=device)
        self.pos = 0  # slots filled so far; advanced once per model forward

    def update(self, layer, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv_heads, self.head_dim = layer_idx, args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.attention_bias)
        if args.qk_norm:  # Qwen3: each head of q and k normalised on its own
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd) with S = slots so far
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack (HF's LlamaModel): embed_tokens, layers, norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Llama(nn.Module):
    """HF's LlamaForCausalLM: `model` (the stack) and `lm_head`, so state-dict keys match HF."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward (set by train.py)
        self.offload_activations = False  # with it: keep each block's input on the CPU until then

    def init_weights(self, std=None):
        init_parameters(self.named_parameters(), self.args, std)
        self.inv_freq = rope_frequencies(self.args, self.inv_freq.device)

    def rope_and_mask(self, input_ids, position_ids=None, doc_ids=None, cache=None, dtype=torch.float32):
        """What every block needs besides x: RoPE cos/sin for each token, and the attention mask."""
        B, T = input_ids.shape
        if position_ids is None:
            start = cache.pos if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, dtype)
        window = self.args.sliding_window if self.args.sliding_window < (cache.k[0].shape[2] if cache else T) else 0
        if cache is not None:
            cache.doc[:, cache.pos:cache.pos + T] = 0 if doc_ids is None else doc_ids
            q_slot = torch.arange(cache.pos, cache.pos + T, device=input_ids.device)
            mask = dense_mask(cache.doc[:, cache.pos:cache.pos + T], cache.doc[:, :cache.pos + T], q_slot, window)
        elif doc_ids is not None or window:  # a window shorter than the row needs a mask too
            doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids
            mask = document_mask(doc_ids, use_flex=input_ids.is_cuda and create_block_mask is not None, window=window)
        else:
            mask = None
        return cos, sin, mask

    # The forward in three pieces, which `forward` composes and fsdp.py's schedule calls one unit
    # at a time: embed (+ RoPE and mask), each block, and norm + head (+ loss).

    def embed(self, input_ids, position_ids=None, doc_ids=None, cache=None):
        """input_ids (B, T) -> (x, ctx): token embeddings, and what every block needs besides x.

        position_ids: per-token RoPE positions (restart at 0 for every packed document).
        doc_ids: per-token document id; None means one document per row (plain causal mask).
        cache: a KVCache; tokens go into slots cache.pos .. cache.pos + T - 1.
        """
        x = self.model.embed_tokens(input_ids)
        return x, self.rope_and_mask(input_ids, position_ids, doc_ids, cache, x.dtype)

    def block(self, i, x, ctx, cache=None):
        """Block i. The one place of activation checkpointing: when training with it on, only x is
        kept and the block is recomputed (same dropout masks) in backward. Offloaded, x goes to the
        CPU (a non-blocking copy into pinned memory on CUDA) and its gradient comes back the same way."""
        layer = self.model.layers[i]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            if self.offload_activations:  # x waits in (pinned) CPU memory until the recompute brings it back
                device = x.device
                return checkpoint(lambda kept, *c: layer(kept.to(device, non_blocking=True), *c),
                                  x.to("cpu", non_blocking=True), *ctx, use_reentrant=False)
            return checkpoint(layer, x, *ctx, use_reentrant=False)
        return layer(x, *ctx, cache)

    def head(self, x, labels=None, loss_chunk=0, cache=None):
        """Final norm, then fp32 logits (B, T, vocab), or with labels (summed loss, number of target
        tokens). The cache's filled slots advance here, once all blocks have written theirs."""
        if cache is not None:
            cache.pos += x.shape[1]
        h = self.model.norm(x)
        if labels is None:
            return self.lm_head(h).float()
        return cross_entropy_sum(h, self.lm_head, labels, loss_chunk)

    def forward(self, input_ids, labels=None, position_ids=None, doc_ids=None, cache=None, loss_chunk=0):
        """Without labels: fp32 logits (B, T, vocab). With labels: (summed loss, number of target tokens).

        Labels are already aligned (labels[t] is the target for position t, -100 = no loss), which
        lets packing decide where documents end. The sum (not mean) lets the trainer divide by the
        token count of the whole global batch across micro-steps and ranks.
        """
        return self.head(self.hidden(input_ids, position_ids, doc_ids, cache), labels, loss_chunk, cache)

    def hidden(self, input_ids, position_ids=None, doc_ids=None, cache=None):
        """The last block's output: embed, then every block (what head, or DPO's row_logprobs, takes)."""
        x, ctx = self.embed(input_ids, position_ids, doc_ids, cache)
        for i in range(len(self.model.layers)):
            x = self.block(i, x, ctx, cache)
        return x


@torch.no_grad()
def init_parameters(named, args: ModelArgs, std=None):
    """Random weights for (name, parameter) pairs, in that order: norms 1, biases 0, the rest normal."""
    std = std or args.initializer_range
    for name, p in named:
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:  # GPT-2's scaled init for the projections that write into the residual stream
            scale = 1 / math.sqrt(2 * args.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
            nn.init.normal_(p, std=std * scale)


def random_init_by_unit(model: Llama, device, seed):
    """For a model on the meta device, a materialize(modules) for fsdp.Sharded: it gives those
    modules the weights `torch.manual_seed(seed)`, `Llama(args)` on `device` and `init_weights()`
    would have given them, without the whole model ever existing. Call it on the modules in the
    model's order (embedding, blocks, norm + head). The draws continue from call to call on a
    generator state of their own: what runs in between (adapters' construction) does not shift them.
    The first call replays the constructor's draws on throwaway modules, one at a time: briefly the
    fp32 embedding or one fp32 block on `device`, as big as the largest unit it then builds."""
    args, names, state = model.args, {id(mod): name for name, mod in model.named_modules()}, []
    cuda = device.type == "cuda"
    get_state = (lambda: torch.cuda.get_rng_state(device)) if cuda else torch.get_rng_state
    set_state = (lambda s: torch.cuda.set_rng_state(s, device)) if cuda else torch.set_rng_state

    def materialize(modules):
        with torch.random.fork_rng(devices=[device] if cuda else []):
            if not state:  # Llama(args) draws from the generator before init_weights does: the same
                torch.manual_seed(seed)  # draws, one throwaway module at a time
                with torch.device(device):
                    nn.Embedding(args.vocab_size, args.dim)
                    for i in range(args.n_layers):
                        Block(args, i)
                    nn.Linear(args.dim, args.vocab_size, bias=False)
            else:
                set_state(state.pop())
            tied = model.lm_head if args.tie_embeddings else None
            for mod in modules:
                if mod is not tied:
                    mod.to_empty(device=device)
            if tied is not None and any(mod is tied for mod in modules):
                tied.weight = model.model.embed_tokens.weight
            init_parameters([(names[id(mod)] + "." + n, p) for mod in modules if mod is not tied
                             for n, p in mod.named_parameters()], args)
            state.append(get_state())
    return materialize


def _ce_chunk(h, head, labels):
    return F.cross_entropy(head(h).float(), labels, reduction="sum")


def cross_entropy_sum(h, head, labels, chunk=0):
    """Sum of token cross-entropies over labels != -100, and the number of such tokens.

    chunk > 0: rows are processed `chunk` at a time under activation checkpointing, so only one
    chunk's [chunk, vocab] fp32 logits exist at a time, in forward and in backward.
    """
    keep = labels.reshape(-1) != -100
    h, labels = h.reshape(-1, h.shape[-1])[keep], labels.reshape(-1)[keep]  # prompt tokens cost nothing
    n = labels.numel()
    if use_triton("linear_ce", h) and type(head) is nn.Linear and head.bias is None:  # kernels/linear_ce.py
        return linear_cross_entropy_triton(h, head.weight, labels, chunk if chunk > 0 else 4096), n
    if chunk <= 0 or n <= chunk:
        return _ce_chunk(h, head, labels), n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + checkpoint(_ce_chunk, h[i:i + chunk], head, labels[i:i + chunk], use_reentrant=False)
    return total, n


def _logprob_chunk(h, head, labels):
    return -F.cross_entropy(head(h).float(), labels, reduction="none")


def row_logprobs(model: Llama, x, labels, seq_ids=None, n_seqs=None, chunk=4096):
    """The summed log-probability of each sequence's target tokens (labels != -100), from the last
    block's output x, as DPO needs: per row, or with seq_ids ([B, T], the sequence each token belongs
    to, -1 for none) per sequence, n_seqs of them. As cross_entropy_sum's chunked path: only target
    tokens go through the head, `chunk` of them at a time under checkpointing, so one chunk's
    [chunk, vocab] fp32 logits exist at a time, in forward and in backward."""
    keep = labels != -100
    h, targets = model.model.norm(x)[keep], labels[keep]
    grad = torch.is_grad_enabled()
    token = torch.cat([checkpoint(_logprob_chunk, h[i:i + chunk], model.lm_head, targets[i:i + chunk], use_reentrant=False)
                       if grad else _logprob_chunk(h[i:i + chunk], model.lm_head, targets[i:i + chunk])
                       for i in range(0, targets.numel(), chunk)] or [h.new_zeros(0, dtype=torch.float32)])
    if seq_ids is None:  # per row
        owner, n_seqs = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep], labels.shape[0]
    else:
        owner = seq_ids[keep]
        n_seqs = int(seq_ids.max()) + 1 if n_seqs is None else n_seqs  # given: an empty last sequence still counts
    return token.new_zeros(n_seqs).index_add(0, owner[owner >= 0], token[owner >= 0])


def expand_blocks(model: Llama, n):
    """Llama-Pro block expansion (Wu et al. 2024): after each of n evenly spaced blocks insert a copy
    of it whose o_proj and down_proj are zero, so the copy adds nothing to the residual stream and
    the expanded model computes exactly what the original did. Returns the new blocks (fp32), which
    are the ones to train; the config and every block's cache index follow the new depth."""
    layers = list(model.model.layers)
    if not 1 <= n <= len(layers):
        raise ValueError(f"--expand_blocks={n}: expected 1 to the model's {len(layers)} blocks")
    after = {round((i + 1) * len(layers) / n) - 1 for i in range(n)}
    expanded, added = [], []
    for i, layer in enumerate(layers):
        expanded.append(layer)
        if i in after:
            new = copy.deepcopy(layer).float()
            with torch.no_grad():
                for out in (new.self_attn.o_proj, new.mlp.down_proj):
                    out.weight.zero_()
                    if out.bias is not None:
                        out.bias.zero_()
            expanded.append(new)
            added.append(new)
    for i, layer in enumerate(expanded):
        layer.self_attn.layer_idx = i
    model.model.layers = nn.ModuleList(expanded)
    model.args.n_layers = len(expanded)
    return added


# -----------------------------------------------------------------------------
# Generation


def left_pad(prompts, pad_id, device):
    """Token lists -> input_ids, position_ids, doc_ids (B, P); padding gets doc id -1."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    doc = torch.full_like(ids, -1)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[b, P - len(p):] = torch.arange(len(p))
        doc[b, P - len(p):] = 0
    return ids.to(device), pos.to(device), doc.to(device)


def sample(logits, temperature, top_k, generator=None):
    """logits (B, vocab) -> (B,) token ids. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Llama, prompts, max_new_tokens, *, temperature=0.0, top_k=0, eos_id=None,
             use_cache=True, generator=None, stop_early=True, forward=None):
    """Continue each prompt (a list of token ids); returns the new tokens of each, cut after eos.

    use_cache=False recomputes the whole sequence every step: slow, and the reference the cached
    path is tested against. stop_early=False runs all max_new_tokens steps even when every row has
    ended, so that sharded ranks (fsdp.py), which gather weights together, take the same steps.
    forward: what computes the logits, model's own forward by default (fsdp.Sharded.forward gathers
    each unit once per step, with prefetching).
    """
    forward = forward or model
    was_training = model.training
    model.eval()
    device = model.inv_freq.device
    max_len = max(len(p) for p in prompts) + max_new_tokens
    if max_len > model.args.max_seq_len:
        raise ValueError(f"generate: prompt + max_new_tokens = {max_len} tokens exceeds the model's context "
                         f"max_seq_len={model.args.max_seq_len}")
    ids, pos, doc = left_pad(prompts, eos_id if eos_id is not None else 0, device)
    B = ids.shape[0]
    # Under autocast, keys and values come out in the autocast dtype: store them so, not in fp32.
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else model.model.embed_tokens.weight.dtype)
    cache = KVCache(model.args, B, max_len, dtype, device) if use_cache else None
    out = torch.empty((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_pos, step_doc = ids, pos, doc
    for _ in range(max_new_tokens):
        if use_cache:
            logits = forward(step_ids, position_ids=step_pos, doc_ids=step_doc, cache=cache)[:, -1]
        else:
            all_ids, all_pos = torch.cat([ids, out], 1), torch.cat([pos, pos[:, -1:] + 1 + torch.arange(out.shape[1], device=device)], 1)
            all_doc = torch.cat([doc, torch.zeros_like(out)], 1)
            logits = forward(all_ids, position_ids=all_pos, doc_ids=all_doc)[:, -1]
        nxt = sample(logits, temperature, top_k, generator)
        if eos_id is not None:
            nxt = torch.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], 1)
        step_ids, step_pos, step_doc = nxt[:, None], step_pos[:, -1:] + 1, torch.zeros_like(nxt[:, None])
        if stop_early and done.all():
            break
    model.train(was_training)
    result = []
    for row in out.tolist():
        result.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return result
