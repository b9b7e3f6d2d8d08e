"""Fine-tune (or train from scratch) a Llama model. One config, one loop.

    python train.py                                   # tiny model, built-in arithmetic, ~40 s on CPU
    torchrun --nproc_per_node=2 train.py              # the same on 2 processes (gloo on CPU, NCCL on GPU)
    python train.py --model=path/to/hf_llama --data=alpaca.json --seq_len=1024 --lr=2e-5
    python train.py --help                            # every flag, its default and what it does

The loop, top to bottom: take grad_accum micro-batches, count their target tokens across all ranks,
forward + backward each (loss = summed token losses / that global count, so every token weighs the
same whatever the micro-batch or rank it lands on), all-reduce gradients (world > 1), clip, step,
log, and now and then evaluate and checkpoint. Outputs in --out_dir: metrics.jsonl (one JSON line
per step and per eval), checkpoint.pt (resumable, written atomically) and hf/ (the trained model as
a Hugging Face folder).
"""

import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data as D
import fsdp as F
import kernels as K
import lora as L
import model as M
import quant as Q


@dataclass
class Config:
    # model
    model: str = "tiny"  # a preset from model.MODELS (random init) or a Hugging Face Llama folder to load
    tokenizer: str = ""  # folder with tokenizer.json; '' = the model folder's, or bytes for a preset
    train_type: str = "full"  # full | lora | qlora (LoRA on an NF4 4-bit base) | dora | qdora (DoRA on NF4)
    lora_rank: int = 8  # r of the adapters
    lora_alpha: float = 16.0  # adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target: str = "all-linear"  # Linear layers to adapt: all-linear (all but lm_head) or e.g. q_proj,v_proj
    # data
    data: str = "arith"  # 'arith' (built-in sums), or a .txt / .jsonl / .json file (text, Alpaca or chat records)
    chat_format: str = "auto"  # alpaca | chatml | llama3; auto = from the tokenizer's special tokens
    seq_len: int = 64  # tokens per row
    batch_size: int = 16  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    pack: bool = True  # pack documents into full rows (else one padded document per row, length-grouped)
    eval_frac: float = 0.05  # the last fraction of documents is held out for eval and never trained on
    data_cache: str = ""  # folder for tokenized, memory-mapped data files; '' = <out_dir>/token_cache
    # optimization
    max_steps: int = 250  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 30  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decay, applied to matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # system
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile each transformer block
    grad_checkpointing: bool = False  # recompute each block in backward instead of storing activations
    loss_chunk: int = 0  # >0: cross-entropy over this many tokens at a time (never all [tokens, vocab] logits)
    threads: int = 0  # CPU threads per process; 0 = cores / processes on this machine
    kernels: str = "triton"  # triton (the Triton kernels where they can run: CUDA; else the reference) | torch (every PyTorch reference)
    kernels_off: str = ""  # comma list of Triton kernels to replace by their reference: nf4,nf4_matmul,rmsnorm,swiglu,linear_ce,rope,lora
    # sharding (fsdp.py)
    fsdp: bool = False  # shard weights, gradients and optimizer state over ranks (else plain data parallel)
    prefetch: int = 1  # units whose all-gather is issued ahead of the one computing
    reduce_dtype: str = "fp32"  # fp32 | bf16: dtype gradients are reduce-scattered in
    reduce_every_micro: bool = True  # reduce-scatter after every micro-batch (false: only the last; keeps full grads)
    offload: str = "none"  # none | frozen (frozen shards, e.g. the NF4 base, in pinned CPU memory) | all (every shard, gradient and AdamW state; the optimizer steps on the CPU)
    dry_run: bool = False  # print the per-rank memory plan (meta device, nothing allocated) and exit
    plan_world: int = 0  # world size for --dry_run; 0 = this launch's
    # logging, eval, saving
    out_dir: str = "out"
    log_every: int = 10  # print a log line every N steps (metrics.jsonl gets every step)
    eval_every: int = 50  # held-out loss (and accuracy) every N steps, and at the start and end
    eval_batches: int = 20  # at most this many held-out batches per eval
    eval_samples: int = 100  # held-out prompts answered greedily for accuracy; 0 = off
    eval_metric: str = "auto"  # exact | last_number (GSM8K); auto = exact for arith, last_number otherwise
    max_new_tokens: int = 8  # generation length for accuracy and samples
    samples: int = 3  # held-out prompts answered (temperature 0.7, top-k 50) and printed at the end
    save_every: int = 0  # write the resumable checkpoint every N steps; 0 = only at the end
    save_hf: bool = True  # write the trained model to <out_dir>/hf at the end
    hf_dtype: str = "bf16"  # bf16 | fp32: dtype of the <out_dir>/hf export
    # asking a model (no training)
    ask: str = ""  # answer this prompt with --model (+ --adapter; NF4 base with --train_type=qlora) and exit
    adapter: str = ""  # a PEFT LoRA adapter folder to put on --model for --ask
    temperature: float = 0.0  # for --ask: 0 = greedy
    top_k: int = 0  # for --ask: sample from the k most likely tokens; 0 = all
    resume: bool = False  # continue from <out_dir>/checkpoint.pt (--fsdp: <out_dir>/checkpoint/, any world size)


# -----------------------------------------------------------------------------
# Command line: --name=value for every Config field


def config_help():
    """Each field's trailing comment in the source above is its help text."""
    src = inspect.getsource(Config)
    notes = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, re.M))
    lines = ["usage: [torchrun --nproc_per_node=N] train.py [--name=value ...]", ""]
    for f in dataclasses.fields(Config):
        lines.append(f"  {'--' + f.name + '=' + str(f.default):<32} {notes.get(f.name, '')}")
    return "\n".join(lines)


def parse_value(name, typ, text):
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"flag --{name} expects true or false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"flag --{name} expects {typ.__name__}, got {text!r}") from None


def parse_args(argv) -> Config:
    cfg, types = Config(), {f.name: f.type for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help())
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; flags look like --name=value (see --help)")
        name, eq, text = arg[2:].partition("=")
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            raise ValueError(f"unknown flag --{name}" + (f"; did you mean --{close[0]}?" if close else " (see --help)"))
        if not eq and types[name] is not bool:
            raise ValueError(f"flag --{name} needs a value: --{name}=...")
        setattr(cfg, name, parse_value(name, types[name], text) if eq else True)
    for name, allowed in (("schedule", ("cosine", "linear", "constant")), ("precision", ("auto", "bf16", "fp32")),
                          ("eval_metric", ("auto", "exact", "last_number")),
                          ("train_type", ("full", "lora", "qlora", "dora", "qdora")), ("reduce_dtype", ("fp32", "bf16")),
                          ("chat_format", ("auto", "alpaca", "chatml", "llama3")), ("hf_dtype", ("bf16", "fp32")),
                          ("kernels", ("triton", "torch")), ("offload", F.OFFLOAD)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"flag --{name}={getattr(cfg, name)} is not one of {', '.join(allowed)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"flag --lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.offload != "none" and not (cfg.fsdp or cfg.dry_run):
        raise ValueError(f"flag --offload={cfg.offload} needs --fsdp (it offloads the shards)")
    off = [k for k in cfg.kernels_off.split(",") if k]
    if any(k not in K.NAMES for k in off):
        raise ValueError(f"flag --kernels_off: unknown kernel {next(k for k in off if k not in K.NAMES)!r}; "
                         f"kernels are {', '.join(K.NAMES)}")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"flag --{name} must be at least 1, got {getattr(cfg, name)}")
    return cfg


# -----------------------------------------------------------------------------
# Distributed state: made once here, passed down


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def init_distributed(threads=0) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        # Processes sharing a CPU would oversubscribe it with one thread per core each.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank, local_rank, world, device)


def all_reduce_sum(values, d: Dist):
    """Sum a list of floats across ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params, d: Dist):
    """Plain data parallelism: sum gradients over ranks in one flat buffer (fsdp.py replaces this)."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is None:  # e.g. a parameter this rank's batch did not reach: it still takes part
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


# -----------------------------------------------------------------------------
# Pieces of the loop


def uses_bf16(cfg: Config, device_type):
    """--precision=auto means bf16 autocast on CUDA and fp32 on CPU."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device_type == "cuda")


def lr_at(step, cfg: Config):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def make_optimizer(model, cfg: Config, device):
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head is one parameter, once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def flops_per_token(args: M.ModelArgs, seq_len, frozen_base=False, adapter_params=0):
    """Training FLOPs per token actually needed: per weight 2 forward + 2 for the input gradient
    + 2 for the weight gradient, where a frozen base weight (LoRA) skips the last 2; adapters cost
    the full 6. Plus attention scores and values, 6 * 2 * n_layers * seq_len * n_heads * head_dim
    (PaLM appendix B; causal halving ignored)."""
    n = args.num_params() - args.vocab_size * args.dim  # the embedding lookup is no matmul
    return (4 if frozen_base else 6) * n + 6 * adapter_params + 12 * args.n_layers * seq_len * args.n_heads * args.head_dim


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
                       ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, cfg, d, eval_data, eval_docs, tok, autocast):
    """Held-out loss over up to eval_batches batches, and accuracy on up to eval_samples prompts.
    Under --fsdp every rank must run the same forwards (they gather weights together), so a rank
    with less work repeats a batch or prompt and ignores the result."""
    model.eval()
    loader = D.Batches(eval_data, eval_docs, cfg.seq_len, cfg.batch_size, tok.pad_id, pack=cfg.pack, shuffle=False)
    n_batches = min(len(loader.plan(0)), cfg.eval_batches)
    loss_sum, n_tok = 0.0, 0
    for i in range(d.rank, math.ceil(n_batches / d.world) * d.world if cfg.fsdp else n_batches, d.world):
        loader.index = min(i, n_batches - 1)
        batch = to_device(next(loader), d.device)
        batch.pop("num_tokens")
        with autocast:
            s, n = model(**batch, loss_chunk=cfg.loss_chunk)
        if i < n_batches:
            loss_sum, n_tok = loss_sum + s.item(), n_tok + n
    correct, asked = 0, 0
    prompts = [(eval_data.prompts[j], eval_data.references[j]) for j in eval_docs if eval_data.prompts[j] is not None]
    prompts = prompts[:cfg.eval_samples]
    mine = prompts[d.rank::d.world]
    n_chunks = math.ceil(math.ceil(len(prompts) / d.world) / 32) if cfg.fsdp else math.ceil(len(mine) / 32)
    for i in range(0, 32 * n_chunks, 32):
        chunk = mine[i:i + 32] or prompts[:1]  # an empty share repeats a prompt (fsdp)
        with autocast:
            outs = M.generate(model, [tok.encode(p, bos=True) for p, _ in chunk], cfg.max_new_tokens, eos_id=tok.eos_id,
                              stop_early=not cfg.fsdp)
        for out, (_, ref) in zip(outs, mine[i:i + 32]):
            correct += D.score_answer(tok.decode(out), ref, cfg.eval_metric)
            asked += 1
    loss_sum, n_tok, correct, asked = all_reduce_sum([loss_sum, n_tok, correct, asked], d)
    model.train()
    result = {"eval_loss": loss_sum / max(n_tok, 1)}
    if asked:
        result["accuracy"] = correct / asked
    return result


def model_state(model):
    """What checkpoint.pt keeps of the model: all of it, or with adapters only the trainable tensors
    (the frozen base is reloaded from --model on resume)."""
    if L.lora_layers(model):
        return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    return model.state_dict()


def save_checkpoint(path, model, opt, step, loader, d: Dist, cfg):
    """Everything needed to continue exactly: weights, optimizer, step, data position, every rank's RNG."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None,
           "python": random.getstate()}
    rngs = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if d.main:
        state = {"model": model_state(model), "optimizer": opt.state_dict(), "step": step,
                 "data": loader.state_dict(), "rng": rngs, "config": dataclasses.asdict(cfg), "world": d.world}
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # never a half-written checkpoint under the real name
    if d.world > 1:
        dist.barrier()


def load_checkpoint(path, model, opt, loader, d: Dist):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint to --resume from")
    state = torch.load(path, map_location=d.device, weights_only=False)
    if state["world"] != d.world:
        raise ValueError(f"{path}: saved at world size {state['world']}, resuming at {d.world}; the data order "
                         f"and RNG streams would differ (re-sharding comes with fsdp.py)")
    missing, unexpected = model.load_state_dict(state["model"], strict=not L.lora_layers(model))
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    if unexpected or trainable - set(state["model"]):
        raise ValueError(f"{path}: saved with a different --train_type or --lora_target "
                         f"({len(unexpected)} unexpected, {len(trainable - set(state['model']))} missing tensors)")
    opt.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["data"])
    set_rng(state["rng"][d.rank])
    return state["step"]


def set_rng(rng):
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    random.setstate(rng["python"])


# -----------------------------------------------------------------------------
# Setup and the loop


def build_model(cfg: Config, d: Dist, with_adapters=True):
    """(model, tokenizer, hf files to copy into exports). For qlora/qdora each Linear but lm_head is
    quantized to NF4 as the checkpoint streams in; for every adapter type the base is then frozen
    and the --lora_target layers get adapters."""
    quantize = cfg.train_type in ("qlora", "qdora")
    # A frozen base can live in bf16 on a GPU; what trains (full weights, adapters) stays fp32.
    use_bf16 = uses_bf16(cfg, d.device.type)
    base_dtype = torch.bfloat16 if cfg.train_type != "full" and use_bf16 else torch.float32
    if cfg.model in M.MODELS:
        args = dataclasses.replace(M.MODELS[cfg.model])
        tok = D.load_tokenizer(cfg.tokenizer or None)
        if tok.vocab_size > args.vocab_size:  # e.g. a preset with a real tokenizer: grow to a multiple of 64
            args.vocab_size = (tok.vocab_size + 63) // 64 * 64
        args.bos_token_id, args.eos_token_id = tok.bos_id, tok.eos_id
        torch.manual_seed(cfg.seed)
        with torch.device(d.device):
            model = M.Llama(args)
            model.init_weights()
        if quantize:
            Q.quantize_model(model)
        extra = [os.path.join(cfg.tokenizer, "tokenizer.json")] if cfg.tokenizer else []
    elif os.path.isdir(cfg.model):
        if Q.is_prequantized(cfg.model):
            if not quantize:
                raise ValueError(f"--model={cfg.model} holds 4-bit bitsandbytes weights: use --train_type=qlora or qdora")
            model = Q.load_prequantized(cfg.model, d.device, base_dtype)
        elif cfg.fsdp:  # meta model now; each unit is read, quantized and sharded in turn (fsdp.Sharded)
            model = M.empty_from_pretrained(cfg.model, prepare=Q.quantize_model if quantize else None)
        else:
            model = M.from_pretrained(cfg.model, d.device, base_dtype, prepare=Q.quantize_model if quantize else None)
        tok_dir = cfg.tokenizer or cfg.model
        tok = D.load_tokenizer(tok_dir, eos_id=model.args.eos_token_id, bos_id=model.args.bos_token_id)
        extra = [os.path.join(tok_dir, f) for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
                 if os.path.isfile(os.path.join(tok_dir, f))]
    else:
        raise ValueError(f"--model={cfg.model}: neither a preset ({', '.join(M.MODELS)}) nor a folder")
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"--tokenizer: {tok.vocab_size} tokens do not fit the model's vocab_size {model.args.vocab_size}")
    if cfg.seq_len > model.args.max_seq_len:
        raise ValueError(f"--seq_len={cfg.seq_len} exceeds the model's context of {model.args.max_seq_len} tokens")
    if not with_adapters:
        return model, tok, extra
    gen = torch.Generator().manual_seed(cfg.seed)  # adapters start the same on every rank, sharded or not
    if model.inv_freq.is_meta:  # --fsdp from a folder: adapters are added unit by unit as it loads
        model.materialize = F.stream_from_pretrained(model, cfg.model, d.device, base_dtype,
                                                     then=lambda modules: add_adapters(modules, cfg, gen))
        model.inv_freq = M.rope_frequencies(model.args, d.device)
    else:
        add_adapters([model], cfg, gen)
    return model, tok, extra


def add_adapters(modules, cfg, generator):
    """Freeze and wrap the --lora_target layers of these modules (nothing for --train_type=full)."""
    if cfg.train_type == "full":
        return
    for module in modules:
        if L.linear_names(module):
            L.add_lora(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target,
                       dora=cfg.train_type in ("dora", "qdora"), generator=generator)
        else:  # embedding, final norm, head: frozen
            module.requires_grad_(False)


def describe(model):
    """One log line: parameters (a 4-bit weight counts as its in * out), trainable share, frozen bytes."""
    params = {id(p): p for p in model.parameters()}.values()  # a tied head once
    q_bytes, q_params, other = Q.base_bytes(model)
    total = sum(p.numel() for p in params) + q_params
    trainable = sum(p.numel() for p in params if p.requires_grad)
    line = f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable ({trainable / total:.2%})"
    if trainable < total:
        line += f"; frozen base {(q_bytes + other) / 2**20:.1f} MiB"
        if q_params:
            line += f" ({q_bytes / 2**20:.1f} MiB NF4 for {q_params / 1e6:.2f}M weights = {8 * q_bytes / q_params:.3f} bits each)"
    return line


def dry_run(cfg: Config, d: Dist):
    """Build the model on the meta device (quantized, with adapters, as configured) and print what
    each rank would hold on the GPU at its peak (and on the CPU with --offload)."""
    if cfg.model in M.MODELS:
        with torch.device("meta"):
            model = M.Llama(dataclasses.replace(M.MODELS[cfg.model]))
        if cfg.train_type in ("qlora", "qdora"):
            Q.quantize_model(model)
    else:
        model = M.empty_from_pretrained(cfg.model, Q.quantize_model if cfg.train_type in ("qlora", "qdora") else None)
    add_adapters([model], cfg, torch.Generator().manual_seed(0))
    world = cfg.plan_world or d.world
    use_bf16 = uses_bf16(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    if use_bf16 and cfg.train_type != "full":  # a frozen base is loaded in bf16 on the GPU (build_model)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    # The Triton kernels that keep less for backward, when they would run (a GPU, --kernels=triton).
    kernels = K.HAS_TRITON and cfg.kernels == "triton" and not {"rmsnorm", "swiglu", "linear_ce"} & set(cfg.kernels_off.split(","))
    gpu, cpu = F.plan_memory(model, world, cfg.batch_size, cfg.seq_len, cfg.prefetch, cfg.grad_checkpointing,
                             2 if use_bf16 else 4, cfg.reduce_every_micro, cfg.offload, cfg.loss_chunk, kernels)
    print(f"memory plan: {cfg.model} {cfg.train_type}, world {world}, batch {cfg.batch_size} x {cfg.seq_len}, "
          f"checkpointing {cfg.grad_checkpointing}, prefetch {cfg.prefetch}, offload {cfg.offload}, "
          f"loss_chunk {cfg.loss_chunk}, Triton kernels {'on' if kernels else 'off'}; {describe(model)}")
    print("per rank, GPU at the peak:" + "".join(f"\n  {k:<20}{v / 2**30:8.2f} GiB" for k, v in gpu.items()))
    if cpu:
        print("per rank, CPU (pinned):" + "".join(f"\n  {k:<20}{v / 2**30:8.2f} GiB" for k, v in cpu.items()))


def chat_format(cfg, tok):
    return D.detect_format(tok) if cfg.chat_format == "auto" else cfg.chat_format


def ask(cfg: Config, d: Dist):
    """Print --model's answer to --ask, formatted as training formats a user turn."""
    model, tok, _ = build_model(dataclasses.replace(cfg, fsdp=False), d, with_adapters=False)
    if cfg.adapter:
        L.load_adapter(model, cfg.adapter)
    fmt = chat_format(cfg, tok)
    text = D.chat_prompt([("user", cfg.ask)], fmt) if fmt != "alpaca" else D.alpaca_prompt(cfg.ask)
    ids = tok.encode(text, bos=True)
    if len(ids) + cfg.max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"--ask: a prompt of {len(ids)} tokens plus --max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the context of {cfg.model} ({model.args.max_seq_len} tokens)")
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
    use_bf16 = uses_bf16(cfg, d.device.type)
    with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = M.generate(model, [ids], cfg.max_new_tokens, cfg.temperature, cfg.top_k, eos_id=tok.eos_id, generator=gen)
    answer = tok.decode(out[0])
    print(answer)
    return answer


def main(argv):
    cfg = parse_args(argv)
    K.DISABLED.clear()
    K.DISABLED.update(K.NAMES if cfg.kernels == "torch" else [k for k in cfg.kernels_off.split(",") if k])
    if cfg.ask:
        return ask(cfg, init_distributed(cfg.threads))
    if cfg.dry_run:
        return dry_run(cfg, Dist(0, 0, int(os.environ.get("WORLD_SIZE", 1)), torch.device("meta")))
    d = init_distributed(cfg.threads)
    log = print if d.main else (lambda *a, **k: None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    model, tok, extra_files = build_model(cfg, d)
    model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    log(f"model {cfg.model} ({cfg.train_type}): " + ("" if hasattr(model, "materialize") else f"{describe(model)}; ")
        + f"{model.args.n_layers} layers, dim {model.args.dim}, world {d.world} on {d.device.type}")

    # Data: rank 0 tokenizes files into the cache first, the others then open the same files.
    cache = cfg.data_cache or os.path.join(cfg.out_dir, "token_cache")
    if d.world > 1 and not d.main:
        dist.barrier()  # wait for rank 0's cache
    fmt = chat_format(cfg, tok)
    dataset = D.load_documents(cfg.data, tok, cache, fmt)
    if d.world > 1 and d.main:
        dist.barrier()  # the cache is written: let the others in
    train_docs, eval_docs = D.split_documents(len(dataset), cfg.eval_frac)
    loader = D.Batches(dataset, train_docs, cfg.seq_len, cfg.batch_size, tok.pad_id, d.rank, d.world, cfg.seed, cfg.pack)
    loader.plan(0)
    s = loader.stats
    log(f"data {cfg.data} ({fmt}): {s['docs']} train docs, {len(eval_docs)} held out, {s['tokens']:,} tokens/epoch, "
        f"{'packing' if cfg.pack else 'padding'} efficiency {s['efficiency']:.1%}, "
        f"{s['cropped_tokens']:,} tokens cropped, {s['batches_per_rank']} batches/rank/epoch")
    if cfg.eval_metric == "auto":
        cfg.eval_metric = "exact" if cfg.data == "arith" else "last_number"

    use_bf16 = uses_bf16(cfg, d.device.type)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    sharded = None
    if cfg.fsdp:
        sharded = F.Sharded(model, d, cfg.prefetch, cfg.grad_checkpointing, torch.bfloat16 if use_bf16 else torch.float32,
                            torch.bfloat16 if cfg.reduce_dtype == "bf16" else torch.float32, cfg.offload,
                            materialize=getattr(model, "materialize", None))
        if cfg.train_type != "full":
            model.lora_config = next(mod.lora_config for mod in model.modules() if hasattr(mod, "lora_config"))
        opt = torch.optim.AdamW(sharded.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                fused=d.device.type == "cuda" and cfg.offload != "all")
        groups = [g for u in sharded.units for g in u.groups]
        trainable = sum(g.numel for g in groups if g.trainable)
        frozen = sum(g.numel * g.shard.element_size() for g in groups if not g.trainable)
        shard_bytes = sum(g.shard.numel() * g.shard.element_size() for g in groups)
        log(f"fsdp: {len(sharded.units)} units; {trainable / 1e6:.3f}M trainable parameters, frozen tensors "
            f"{frozen / 2**20:.1f} MiB in all; {shard_bytes / 2**20:.1f} MiB of shards on this rank; prefetch "
            f"{cfg.prefetch}, checkpointing {cfg.grad_checkpointing}, reduce in {cfg.reduce_dtype}")
    else:
        opt = make_optimizer(model, cfg, d.device)
    params = [p for g in opt.param_groups for p in g["params"]]
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint" if cfg.fsdp else "checkpoint.pt")
    start = 0
    def save(step):
        if sharded:
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
                   "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}
            F.save_sharded(ckpt_path, sharded, {"optimizer": opt.state_dict(), "step": step, "data": loader.state_dict(),
                                                "rng": rng, "config": dataclasses.asdict(cfg)})
        else:
            save_checkpoint(ckpt_path, model, opt, step, loader, d, cfg)

    if cfg.resume and cfg.fsdp:
        state = F.load_sharded(ckpt_path, sharded)
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["data"])
        set_rng(state["rng"])
        start = state["step"]
    elif cfg.resume:
        start = load_checkpoint(ckpt_path, model, opt, loader, d)
    if start:
        log(f"resumed from {ckpt_path} at step {start}, data epoch {loader.epoch} batch {loader.index}")
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a" if cfg.resume else "w") if d.main else None

    def record(row):
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def run_eval(step):
        if cfg.eval_frac <= 0:
            return
        r = evaluate(model, cfg, d, dataset, eval_docs, tok, autocast)
        log(f"eval step {step}: loss {r['eval_loss']:.4f}" + (f" | accuracy {r['accuracy']:.1%}" if "accuracy" in r else ""))
        record({"step": step, **r})

    if start == 0:
        run_eval(0)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    flops_tok = flops_per_token(model.args, cfg.seq_len, cfg.train_type != "full", adapter_params)
    peak = peak_flops(d.device)
    t_start, t_last, tokens_since = time.time(), time.time(), 0
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        n_real = sum(b.pop("num_tokens") for b in micro)
        n_target, n_real = all_reduce_sum([sum(int((b["labels"] != D.IGNORE).sum()) for b in micro), n_real], d)
        loss_sum = 0.0
        for k, b in enumerate(micro):
            b = to_device(b, d.device)
            if sharded:
                sync = cfg.reduce_every_micro or k == len(micro) - 1
                s_, _ = sharded.forward_backward(**b, loss_chunk=cfg.loss_chunk, loss_scale=1 / max(n_target, 1),
                                                 sync=sync, autocast=autocast)
            else:
                with autocast:
                    s_, _ = model(**b, loss_chunk=cfg.loss_chunk)
                (s_ / max(n_target, 1)).backward()
            loss_sum += s_.item()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if sharded:
            gnorm = sharded.clip_grad_norm_(max_norm).item()
        else:
            all_reduce_grads(params, d)
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = all_reduce_sum([loss_sum], d)[0] / max(n_target, 1)

        now = time.time()
        tokens_since += n_real
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": n_real / (now - t_last)}
        if peak:
            row["mfu"] = row["tokens_per_s"] * flops_tok / (peak * d.world)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        t_last = now
        record(row)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            done = step + 1 - start
            eta = (now - t_start) / done * (cfg.max_steps - step - 1)
            extra = f" | mfu {row['mfu']:.1%} | mem {row['peak_mem_gib']:.1f}GiB" if peak else ""
            log(f"step {step + 1:>5}/{cfg.max_steps} {100 * (step + 1) // cfg.max_steps:>3}% | loss {loss:.4f} | "
                f"lr {lr:.2e} | gnorm {gnorm:.2f} | {tokens_since / (now - t_start):,.0f} tok/s{extra} | "
                f"eta {int(eta) // 60}:{int(eta) % 60:02d}")
        if (step + 1) % cfg.eval_every == 0 and step + 1 != cfg.max_steps:
            run_eval(step + 1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)

    run_eval(cfg.max_steps)
    log(f"trained {cfg.max_steps - start} steps in {time.time() - t_start:.1f}s")
    prompts = [dataset.prompts[j] for j in eval_docs if dataset.prompts[j] is not None][:cfg.samples]
    if prompts and (d.main or cfg.fsdp):  # sharded: every rank takes part in the gathers
        gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
        with autocast:
            outs = M.generate(model, [tok.encode(p, bos=True) for p in prompts], cfg.max_new_tokens, temperature=0.7,
                              top_k=50, eos_id=tok.eos_id, generator=gen, stop_early=not cfg.fsdp)
        for p, out in zip(prompts, outs):
            log(f"sample: {p!r} -> {tok.decode(out)!r}")
    save(cfg.max_steps)
    log(f"saved {ckpt_path}")
    base_name = cfg.model if os.path.isdir(cfg.model) else ""
    hf_dtype = torch.float32 if cfg.hf_dtype == "fp32" else torch.bfloat16
    if sharded:  # gathered unit by unit; every rank joins, rank 0 writes
        if cfg.train_type != "full":
            F.export_adapter(sharded, os.path.join(cfg.out_dir, "adapter"), base_name)
        if cfg.save_hf:
            F.export_hf(sharded, os.path.join(cfg.out_dir, "hf"), extra_files, hf_dtype)
        saved = (["adapter"] if cfg.train_type != "full" else []) + (["hf"] if cfg.save_hf else [])
        if saved:
            log(f"saved {' and '.join(os.path.join(cfg.out_dir, s) for s in saved)}")
    elif d.main and cfg.train_type != "full":
        L.save_adapter(model, os.path.join(cfg.out_dir, "adapter"), base_name)
        log(f"saved the adapter (PEFT layout) to {os.path.join(cfg.out_dir, 'adapter')}")
    if d.main and cfg.save_hf and not sharded:
        if cfg.train_type != "full":  # the adapters folded into dense weights (dequantized when 4-bit)
            model = L.merge_and_unload(model)
        M.save_pretrained(model, os.path.join(cfg.out_dir, "hf"), dtype=hf_dtype, extra_files=extra_files)
        log(f"saved {os.path.join(cfg.out_dir, 'hf')}" + (" (merged)" if cfg.train_type != "full" else ""))
    if metrics:
        metrics.close()
    if d.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
