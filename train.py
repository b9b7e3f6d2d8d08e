"""Fine-tune (or train from scratch) a Llama model. One config, one loop.

    python train.py                                   # tiny model, built-in arithmetic, ~25 s on CPU
    torchrun --nproc_per_node=2 train.py              # the same on 2 processes (gloo on CPU, NCCL on GPU)
    python train.py --model=path/to/hf_llama --data=alpaca.json --seq_len=1024 --lr=2e-5
    python train.py --help                            # every flag, its default and what it does

main() is setup (model, engine, optimizer, data, resume), train_loop and finish. The loop, top to
bottom: take grad_accum micro-batches, count their target tokens across all ranks, forward +
backward each through the engine (ddp.Replicated, or fsdp.Sharded under --fsdp: the same
interface; loss = summed token losses / that global count, so every token weighs the same whatever
the micro-batch or rank it lands on), clip, stop on a non-finite loss or norm, step, log, and now
and then evaluate and checkpoint. Outputs in --out_dir: metrics.jsonl (one JSON line per step and
per eval), checkpoint/ (resumable: a step folder made current by one rename) and hf/ (the trained
model as a Hugging Face folder).
"""

import dataclasses
import datetime
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

import build as B
import checkpoint as C
import curves
import data as D
import ddp
import dpo
import fsdp as F
import kernels as K
import lora as L
import model as M
import optim as O
import plan as P
import quant as Q


@dataclass
class Config:
    # model
    model: str = "tiny"  # a preset from model.MODELS (random init) or a Hugging Face Llama folder to load
    tokenizer: str = ""  # folder with tokenizer.json; '' = the model folder's, or bytes for a preset
    train_type: str = "full"  # full | lora | qlora (LoRA on a quantized base, --quant) | dora | qdora (DoRA on a quantized base) | llama_pro (train only --expand_blocks new blocks)
    expand_blocks: int = 0  # --train_type=llama_pro: copies of evenly spaced blocks to insert (their o_proj, down_proj zeroed)
    quant: str = "nf4"  # the base's format for qlora / qdora: nf4 (bitsandbytes-compatible) | hqq | int8 (per channel) | ternary (BitNet b1.58)
    quant_bits: int = 4  # --quant=hqq: bits per weight, 2 | 3 | 4 | 8
    quant_group: int = 64  # weights per scale for nf4 (its blocksize), hqq and ternary
    lora_rank: int = 8  # r of the adapters
    lora_alpha: float = 16.0  # adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target: str = "all-linear"  # Linear layers to adapt: all-linear (all but lm_head) or e.g. q_proj,v_proj
    # data
    objective: str = "sft"  # sft | dpo (preference pairs {"prompt", "chosen", "rejected"}; with adapters the reference is the base with them off, else a frozen copy)
    dpo_beta: float = 0.1  # DPO: the strength of the pull towards the reference model
    data: str = "arith"  # 'arith' (built-in sums), or a .txt / .jsonl / .json file (text, Alpaca or chat records)
    chat_format: str = "auto"  # alpaca | chatml | llama3 | template (the checkpoint's own, with jinja2); auto = template if there is one, else from the tokenizer's special tokens
    seq_len: int = 66  # tokens per row (66: six fixed-width arith sums of 11 tokens fill a row exactly)
    batch_size: int = 16  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    pack: bool = True  # pack documents into full rows with document masks (else one padded document per row, length-grouped); DPO: a batch's answers
    eval_frac: float = 0.05  # the last fraction of documents is held out for eval and never trained on
    data_cache: str = ""  # folder for tokenized, memory-mapped data files; '' = <out_dir>/token_cache
    # optimization
    max_steps: int = 360  # optimizer steps
    lr: float = 5e-3  # peak learning rate
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 30  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.5  # AdamW decay, applied to matrices only (not norms, biases); 0.5 makes the default run generalize sooner
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # adamw | galore (full fine-tuning with AdamW state in a low-rank projection of each block matrix's gradient; not with --fsdp)
    galore_rank: int = 128  # GaLore: rank of the gradient projection
    galore_gap: int = 200  # GaLore: steps between renewals of the projection (an SVD of the gradient)
    galore_scale: float = 0.25  # GaLore: the projected-back update is multiplied by this
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    nan_policy: str = "stop"  # stop (at the first step whose loss or gradient norm is not finite, saving nothing) | skip (drop such steps; stop after --nan_skips in a row)
    nan_skips: int = 5  # with --nan_policy=skip: consecutive non-finite steps before stopping
    # system
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with AMX / AVX512-BF16, else fp32) | bf16 | fp32 | fp16 (autocast with dynamic loss scaling: GPUs without bf16)
    compile: bool = False  # torch.compile each transformer block
    grad_checkpointing: bool = False  # recompute each block in backward instead of storing activations
    offload_activations: bool = False  # with grad_checkpointing: the block inputs it keeps wait in (pinned) CPU memory
    loss_chunk: int = 0  # >0: cross-entropy over this many tokens at a time (never all [tokens, vocab] logits)
    threads: int = 0  # CPU threads per process; 0 = cores / processes on this machine
    timeout: int = 600  # seconds a collective waits for the other ranks before the job stops with an error
    kernels: str = "triton"  # triton (Triton kernels where they can run: CUDA; else the reference) | torch (every reference) | interpret (Triton on CPU too, under TRITON_INTERPRET=1: tests of the GPU path)
    kernels_off: str = ""  # comma list of Triton kernels to replace by their reference: nf4,nf4_matmul,rmsnorm,swiglu,linear_ce,rope,lora
    # sharding (fsdp.py)
    fsdp: bool = False  # shard weights, gradients and optimizer state over ranks (else plain data parallel)
    shard: str = "full"  # full (ZeRO-3) | grad_op (ZeRO-2: weights gathered for the whole step) | hybrid (HSDP: shard within --shard_group ranks, all-reduce across groups)
    shard_group: int = 0  # ranks per shard group for --shard=hybrid (e.g. GPUs per node)
    prefetch: int = 1  # units whose all-gather is issued ahead of the one computing
    reduce_dtype: str = "fp32"  # fp32 | bf16: dtype gradients are reduce-scattered in
    reduce_every_micro: bool = True  # reduce-scatter after every micro-batch (false: only the last; keeps full grads)
    offload: str = "none"  # none | frozen (frozen shards, e.g. the NF4 base, in pinned CPU memory) | all (every shard, gradient and AdamW state; the optimizer steps on the CPU)
    dry_run: bool = False  # print the per-rank memory plan (meta device, nothing allocated) and exit
    plan_world: int = 0  # world size for --dry_run; 0 = this launch's
    # logging, eval, saving
    out_dir: str = "out"
    log_every: int = 10  # print a log line every N steps (metrics.jsonl gets every step)
    eval_every: int = 60  # held-out loss (and accuracy) every N steps, and at the start and end
    eval_batches: int = 20  # at most this many held-out batches per eval
    eval_samples: int = 100  # held-out prompts answered greedily for accuracy; 0 = off
    eval_metric: str = "auto"  # exact | last_number (GSM8K); auto = exact for arith, last_number otherwise
    max_new_tokens: int = 8  # generation length for accuracy and samples
    samples: int = 3  # held-out prompts answered (--temperature, --top_k) and printed at the end
    save_every: int = 0  # write the resumable checkpoint every N steps; 0 = only at the end
    save_hf: bool = True  # write the trained model to <out_dir>/hf at the end
    hf_dtype: str = "bf16"  # bf16 | fp32: dtype of the <out_dir>/hf export
    # asking a model (no training)
    ask: str = ""  # answer this prompt with --model (+ --adapter; quantized base with --train_type=qlora) and exit
    adapter: str = ""  # a PEFT LoRA adapter folder to put on --model for --ask
    temperature: float = 0.0  # for --ask and the end-of-run samples: 0 = greedy
    top_k: int = 0  # for --ask and the samples: sample from the k most likely tokens; 0 = all
    overwrite: bool = False  # start afresh in an --out_dir that holds a previous run (else refused; --resume continues it)
    compare: str = ""  # comma list of --out_dir folders: overlay their metrics.jsonl into compare.svg, print their final figures, exit
    log_to: str = ""  # wandb | tensorboard: also send every metrics.jsonl row there (the package must be installed)
    resume: bool = False  # continue from the newest complete <out_dir>/checkpoint/step-N (also at another world size)


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
    for name, allowed in (("schedule", ("cosine", "linear", "constant")), ("precision", ("auto", "bf16", "fp32", "fp16")),
                          ("eval_metric", ("auto", "exact", "last_number")),
                          ("train_type", ("full", "lora", "qlora", "dora", "qdora", "llama_pro")), ("reduce_dtype", ("fp32", "bf16")),
                          ("chat_format", ("auto", "alpaca", "chatml", "llama3", "template")), ("hf_dtype", ("bf16", "fp32")),
                          ("kernels", ("triton", "torch", "interpret")), ("nan_policy", ("stop", "skip")), ("offload", F.OFFLOAD), ("shard", F.STRATEGIES),
                          ("quant", Q.FORMATS), ("optimizer", ("adamw", "galore")), ("objective", ("sft", "dpo"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"flag --{name}={getattr(cfg, name)} is not one of {', '.join(allowed)}")
    if cfg.offload != "none" and not (cfg.fsdp or cfg.dry_run):
        raise ValueError(f"flag --offload={cfg.offload} needs --fsdp (it offloads the shards)")
    if cfg.quant == "hqq" and cfg.quant_bits not in (2, 3, 4, 8):
        raise ValueError(f"flag --quant_bits={cfg.quant_bits}: hqq takes 2, 3, 4 or 8 bits")
    if cfg.quant == "nf4" and cfg.quant_group not in [2**k for k in range(5, 13)]:
        raise ValueError(f"flag --quant_group={cfg.quant_group}: nf4 blocks are a power of 2 from 32 to 4096 (bitsandbytes' sizes)")
    if cfg.log_to not in ("", "wandb", "tensorboard"):
        raise ValueError(f"flag --log_to={cfg.log_to} is not one of wandb, tensorboard")
    if cfg.log_to and importlib.util.find_spec(cfg.log_to) is None:
        raise ValueError(f"flag --log_to={cfg.log_to}: the {cfg.log_to} package is not installed (pip install {cfg.log_to})")
    if cfg.objective == "dpo" and cfg.data == "arith":
        raise ValueError("flag --objective=dpo needs --data=<file of preference pairs> ({\"prompt\", \"chosen\", \"rejected\"})")
    if cfg.offload_activations and not cfg.grad_checkpointing:
        raise ValueError("flag --offload_activations moves the block inputs that --grad_checkpointing keeps: pass both")
    if cfg.offload_activations and cfg.fsdp:  # fsdp.Sharded keeps every block's input itself, for its backward
        raise ValueError("flag --offload_activations does not save memory under --fsdp yet (the sharded schedule "
                         "keeps each block's input on the GPU for its backward); drop one of them")
    if cfg.optimizer == "galore" and (cfg.fsdp or cfg.train_type not in ("full", "llama_pro")):
        raise ValueError("flag --optimizer=galore projects whole weight matrices: it needs --train_type=full (or "
                         "llama_pro) and no --fsdp (which hands the optimizer flat shards)")
    if (cfg.train_type == "llama_pro") != (cfg.expand_blocks > 0):
        raise ValueError("flags --train_type=llama_pro and --expand_blocks=N (N >= 1) go together")
    if cfg.shard == "hybrid" and cfg.shard_group < 1:
        raise ValueError("flag --shard=hybrid needs --shard_group=N (ranks per shard group, e.g. GPUs per node)")
    if cfg.kernels == "interpret" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise ValueError("flag --kernels=interpret needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
    off = [k for k in cfg.kernels_off.split(",") if k]
    if any(k not in K.NAMES for k in off):
        raise ValueError(f"flag --kernels_off: unknown kernel {next(k for k in off if k not in K.NAMES)!r}; "
                         f"kernels are {', '.join(K.NAMES)}")
    for name, (ok, expected) in RANGES.items():  # at parse time, before anything is loaded
        if not ok(getattr(cfg, name)):
            raise ValueError(f"flag --{name} must be {expected}, got {getattr(cfg, name)}")
    return cfg


def at_least(n):
    return (lambda v: v >= n), f"at least {n}"


def within(lo, hi, closed=False):
    return (lambda v: lo <= v <= hi if closed else lo <= v < hi), f"in [{lo}, {hi}{']' if closed else ')'}"


RANGES = {**{k: at_least(1) for k in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every",
                                      "eval_batches", "lora_rank", "nan_skips", "max_new_tokens", "timeout", "quant_group",
                                      "galore_rank", "galore_gap")},
          **{k: at_least(0) for k in ("warmup_steps", "save_every", "eval_samples", "samples", "prefetch", "threads",
                                      "plan_world", "shard_group", "loss_chunk", "top_k", "expand_blocks")},
          **{k: ((lambda v: 0 < v < math.inf), "a positive finite number") for k in ("lr", "lora_alpha", "galore_scale", "dpo_beta")},
          **{k: ((lambda v: 0 <= v < math.inf), "a finite number >= 0") for k in ("weight_decay", "grad_clip", "temperature")},
          "eval_frac": within(0, 1), "lora_dropout": within(0, 1), "beta1": within(0, 1), "beta2": within(0, 1),
          "min_lr_ratio": within(0, 1, closed=True)}


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


def init_distributed(threads=0, timeout=600) -> Dist:
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout))  # a stuck rank ends the job
    return Dist(rank, local_rank, world, device)


def all_reduce_sum(values, d: Dist):
    """Sum a list of floats across ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# Pieces of the loop


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, cfg, d, eval_data, eval_docs, tok):
    """Held-out loss over up to eval_batches batches, and accuracy on up to eval_samples prompts.
    Under --fsdp every rank must run the same forwards (they gather weights together), so a rank
    with less work repeats a batch or prompt and ignores the result."""
    model = engine.model
    model.eval()
    loader = D.Batches(eval_data, eval_docs, cfg.seq_len, cfg.batch_size, tok.pad_id, pack=cfg.pack, shuffle=False)
    n_batches = min(len(loader.plan(0)), cfg.eval_batches)
    loss_sum, n_tok = 0.0, 0
    for i in range(d.rank, math.ceil(n_batches / d.world) * d.world if cfg.fsdp else n_batches, d.world):
        loader.index = min(i, n_batches - 1)
        batch = to_device(next(loader), d.device)
        batch.pop("num_tokens")
        s, n = engine.forward(**batch)
        if i < n_batches:
            loss_sum, n_tok = loss_sum + s.item(), n_tok + n
    correct, asked = 0, 0
    prompts = [(eval_data.prompts[j], eval_data.references[j]) for j in eval_docs if eval_data.prompts[j] is not None]
    prompts = prompts[:cfg.eval_samples]
    mine = prompts[d.rank::d.world]
    n_chunks = math.ceil(math.ceil(len(prompts) / d.world) / 32) if cfg.fsdp else math.ceil(len(mine) / 32)
    for i in range(0, 32 * n_chunks, 32):
        chunk = mine[i:i + 32] or prompts[:1]  # an empty share repeats a prompt (fsdp)
        outs = generate(engine, cfg, tok, [p for p, _ in chunk], temperature=0.0)
        for out, (_, ref) in zip(outs, mine[i:i + 32]):
            correct += D.score_answer(tok.decode(out), ref, cfg.eval_metric)
            asked += 1
    loss_sum, n_tok, correct, asked = all_reduce_sum([loss_sum, n_tok, correct, asked], d)
    model.train()
    result = {"eval_loss": loss_sum / max(n_tok, 1)}
    if asked:
        result["accuracy"] = correct / asked
    return result


def generate(engine, cfg, tok, prompts, temperature, top_k=0, generator=None):
    """New tokens for each text prompt, through engine.forward (sharded: every rank takes the same
    steps). Autocast here too: the KV cache takes the autocast dtype."""
    with ddp.autocast(engine.d.device, engine.amp_dtype):
        return M.generate(engine.model, [tok.encode(p, bos=True) for p in prompts], cfg.max_new_tokens, temperature,
                          top_k, eos_id=tok.eos_id, generator=generator, stop_early=not cfg.fsdp, forward=engine.forward)


# -----------------------------------------------------------------------------
# Setup and the loop


def dry_run(cfg: Config, d: Dist):
    """Print what each rank would hold on the GPU at its peak (and on the CPU with --offload), from the
    model built on the meta device, quantized and with adapters as configured: plan.print_plan."""
    amp = B.amp_dtype(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    model = B.meta_model(cfg, amp)
    reference = B.reference_bytes(model, cfg, amp) if cfg.objective == "dpo" and not B.has_adapters(cfg) else 0
    P.print_plan(model, cfg, cfg.plan_world or d.world, amp, reference)


def ask(cfg: Config, d: Dist):
    """Print --model's answer to --ask, formatted as training formats a user turn."""
    cfg = dataclasses.replace(cfg, fsdp=False)
    model, tok, _ = B.build_model(cfg, d, with_adapters=False)
    if cfg.adapter:
        L.load_adapter(model, cfg.adapter)
    fmt = D.chat_format(cfg, tok)
    text = D.chat_prompt([("user", cfg.ask)], fmt, tok) if fmt != "alpaca" else D.alpaca_prompt(cfg.ask)
    ids = tok.encode(text, bos=True)
    if len(ids) + cfg.max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"--ask: a prompt of {len(ids)} tokens plus --max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the context of {cfg.model} ({model.args.max_seq_len} tokens)")
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
    out = generate(B.make_engine(model, cfg, d), cfg, tok, [text], cfg.temperature, cfg.top_k, gen)
    answer = tok.decode(out[0])
    print(answer)
    return answer


def setup(cfg: Config, d: Dist, log):
    """The model, its engine and optimizer, the data, and the resumed state: what the loop needs."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir={cfg.out_dir} is a file, expected a folder (or a path to create one at)")
    used = [f for f in ("checkpoint", "metrics.jsonl") if os.path.exists(os.path.join(cfg.out_dir, f))]
    if used and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out_dir={cfg.out_dir} holds a previous run ({', '.join(used)}): pass --resume to continue "
                         f"it or --overwrite to replace it")
    if cfg.overwrite and d.main:
        shutil.rmtree(os.path.join(cfg.out_dir, "checkpoint"), ignore_errors=True)
    try:  # before the model loads: a run that cannot save its results should not start
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, f".write-test-{d.rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror})") from None
    model, tok, source_files = B.build_model(cfg, d)
    reference = B.dpo_reference(cfg, d, model) if cfg.objective == "dpo" and not B.has_adapters(cfg) else None
    model.gradient_checkpointing, model.offload_activations = cfg.grad_checkpointing, cfg.offload_activations
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    engine = B.make_engine(model, cfg, d)
    trainable, adapters = engine.counts()
    log(f"model {cfg.model} ({cfg.train_type}): " + (f"{trainable / 1e6:.3f}M trainable" if cfg.fsdp else P.describe(model))
        + (f", {adapters / 1e6:.3f}M of them in adapters" if adapters else "")
        + f"; {model.args.n_layers} layers, dim {model.args.dim}, world {d.world} on {d.device.type}")
    if cfg.fsdp:
        groups = [g for u in engine.units for g in u.groups]
        frozen = sum(g.numel * g.shard.element_size() for g in groups if not g.trainable)
        log(f"fsdp: {cfg.shard} sharding over {engine.shard_world} ranks, {len(engine.units)} units; frozen tensors "
            f"{frozen / 2**20:.1f} MiB in all; {engine.held_bytes() / 2**20:.1f} MiB of shards on this rank; prefetch "
            f"{cfg.prefetch}, checkpointing {cfg.grad_checkpointing}, reduce in {cfg.reduce_dtype}")

    if reference is not None:
        log(f"dpo: the reference is a frozen copy of the starting model, {reference.held_bytes() / 2**20:.1f} "
            f"MiB {'of shards ' if cfg.fsdp else ''}on this rank")
    dataset, eval_docs, loader = D.load_for_training(cfg, tok, d.rank, d.world, log, dist.barrier)
    if cfg.eval_metric == "auto":
        cfg.eval_metric = "exact" if cfg.data == "arith" else "last_number"
    hf_files = B.export_files(source_files, tok, D.chat_format(cfg, tok), chat_data=not dataset.split_long)

    preference = dpo.DPO(cfg.dpo_beta, reference) if cfg.objective == "dpo" else None
    opt = O.make_optimizer(engine, cfg)
    ckpt_path, start, base = os.path.join(cfg.out_dir, "checkpoint"), 0, C.base_fingerprint(cfg.model)
    scaler = O.LossScaler(cfg.precision == "fp16")
    if cfg.resume:
        state = C.load_checkpoint(ckpt_path, engine, opt, check=lambda saved, where: C.same_run(saved, where, cfg, d.world, base))
        loader.load_state_dict(state["data"])
        C.set_rng(state["rng"])
        if state["config"].get("precision") == cfg.precision == "fp16":  # else the scale starts afresh
            scaler.load_state_dict(state["loss_scale"])
        start = state["step"]
        if start > cfg.max_steps:
            raise ValueError(f"--max_steps={cfg.max_steps} is below the step of the checkpoint in {ckpt_path} "
                             f"({start}); pass --max_steps above it to train on")
        log(f"resumed from {ckpt_path} at step {start}, data epoch {loader.epoch} batch {loader.index}")
    return types.SimpleNamespace(model=model, tok=tok, hf_files=hf_files, engine=engine, opt=opt, dataset=dataset,
                                 eval_docs=eval_docs, loader=loader, ckpt_path=ckpt_path, start=start, step=start,
                                 adapters=adapters, base=base, scaler=scaler, dpo=preference)


def train_loop(cfg: Config, d: Dist, r, log, record):
    """Steps r.start .. max_steps: micro-batches, clip, AdamW, log; eval and save now and then."""
    engine, opt, loader = r.engine, r.opt, r.loader
    # llama_pro: the new blocks' weight gradients are not counted (MFU errs low, by 2 FLOPs per new weight)
    flops_tok = P.flops_per_token(r.model.args, cfg.seq_len, cfg.train_type != "full", r.adapters)
    peak = P.peak_flops(d.device)
    t_start, t_last, tokens_since, skipped = time.time(), time.time(), 0, 0
    for step in range(r.start, cfg.max_steps):
        r.step = step + 1  # named if a collective times out
        lr = O.lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        n_real = sum(b.pop("num_tokens") for b in micro)
        # What the loss averages over: target tokens (SFT) or pairs (DPO), across micro-batches and ranks
        targets = sum(b["num_pairs"] if r.dpo else int((b["labels"] != D.IGNORE).sum()) for b in micro)
        n_target, n_real = all_reduce_sum([targets, n_real], d)
        if n_target == 0:  # the same on every rank: all stop
            raise ValueError(f"step {step + 1}: no trainable token in this step's batches ({loader.stats['untrainable']:,} "
                             f"of {loader.stats['docs']:,} documents have none within --seq_len={cfg.seq_len}: their "
                             f"prompts fill the row); raise --seq_len or shorten the prompts")
        loss_sum = 0.0
        for k, b in enumerate(micro):
            sync = k == len(micro) - 1 or (cfg.fsdp and cfg.reduce_every_micro)
            s_, _ = engine.forward_backward(to_device(b, d.device), loss_scale=r.scaler.scale / max(n_target, 1), sync=sync,
                                            loss_fn=r.dpo)
            loss_sum += s_.item()
        # On scaled gradients: clipping at grad_clip * scale is clipping at grad_clip once unscaled.
        gnorm = engine.clip_grad_norm_(cfg.grad_clip * r.scaler.scale if cfg.grad_clip > 0 else float("inf")).item()
        gnorm /= r.scaler.scale
        loss = all_reduce_sum([loss_sum], d)[0] / max(n_target, 1)
        if r.scaler.overflowed(gnorm):
            log(f"step {step + 1}: fp16 gradients overflowed; step skipped, loss scale now {r.scaler.scale:g}")
            record({"step": step + 1, "skipped": "fp16 overflow", "loss_scale": r.scaler.scale})
            opt.zero_grad(set_to_none=True)
            if r.dpo:
                r.dpo.metrics(d)  # drop the skipped step's pairs from the next row's means
            continue
        r.scaler.unscale_(opt)
        bad = next(((name, v) for name, v in (("loss", loss), ("gradient norm", gnorm)) if not math.isfinite(v)), None)
        # Every rank sees the same loss and global norm, so all take the same branch.
        skipped = skipped + 1 if bad else 0
        if bad and (cfg.nan_policy == "stop" or skipped > cfg.nan_skips):
            raise ValueError(f"step {step + 1}: the {bad[0]} is {bad[1]}" + (f" for {skipped} steps in a row" if skipped > 1 else "")
                             + "; stopped without saving this state (lower --lr, keep --grad_clip, check the data and "
                             "--precision; the last checkpoint, if any, is intact)")
        if bad:
            log(f"step {step + 1}: the {bad[0]} is {bad[1]}; step skipped ({skipped} in a row, --nan_policy=skip)")
            record({"step": step + 1, "skipped": bad[0]})
            opt.zero_grad(set_to_none=True)
            if r.dpo:
                r.dpo.metrics(d)
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)

        now = time.time()
        tokens_since += n_real
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": n_real / (now - t_last),
               **(r.dpo.metrics(d) if r.dpo else {})}
        if peak:
            row["mfu"] = row["tokens_per_s"] * flops_tok / (peak * d.world)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        t_last = now
        record(row)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            done = step + 1 - r.start
            eta = (now - t_start) / done * (cfg.max_steps - step - 1)
            extra = f" | mfu {row['mfu']:.1%} | mem {row['peak_mem_gib']:.1f}GiB" if peak else ""
            extra += f" | reward acc {row['reward_accuracy']:.0%}" if r.dpo else ""
            log(f"step {step + 1:>5}/{cfg.max_steps} {100 * (step + 1) // cfg.max_steps:>3}% | loss {loss:.4f} | "
                f"lr {lr:.2e} | gnorm {gnorm:.2f} | {tokens_since / (now - t_start):,.0f} tok/s{extra} | "
                f"eta {int(eta) // 60}:{int(eta) % 60:02d}")
        if (step + 1) % cfg.eval_every == 0 and step + 1 != cfg.max_steps:
            run_eval(cfg, d, r, log, record, step + 1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(cfg, d, r, step + 1)
    log(f"trained {cfg.max_steps - r.start} steps in {time.time() - t_start:.1f}s")


def run_eval(cfg: Config, d: Dist, r, log, record, step):
    if cfg.eval_frac <= 0:
        return
    if r.dpo:
        result = dpo.evaluate(r.engine, r.dpo, cfg, d, r.dataset, r.eval_docs, r.tok)
    else:
        result = evaluate(r.engine, cfg, d, r.dataset, r.eval_docs, r.tok)
    log(f"eval step {step}: loss {result['eval_loss']:.4f}"
        + (f" | accuracy {result['accuracy']:.1%}" if "accuracy" in result else "")
        + (f" | reward accuracy {result['eval_reward_accuracy']:.1%}, margin {result['eval_reward_margin']:.3f}"
           if "eval_reward_accuracy" in result else ""))
    record({"step": step, **result})


def save(cfg: Config, d: Dist, r, step):
    """The resumable checkpoint: the engine's state, optimizer, data position, every rank's RNG."""
    C.save_checkpoint(r.ckpt_path, r.engine, r.opt, step,
                      {"data": r.loader.state_dict(), "rng": C.rng_state(), "config": dataclasses.asdict(cfg),
                       "base": r.base, "loss_scale": r.scaler.state_dict()})


def finish(cfg: Config, d: Dist, r, log, record):
    """The last eval, a few samples, the checkpoint, and the exports (HF folder, PEFT adapter)."""
    run_eval(cfg, d, r, log, record, cfg.max_steps)
    prompts = [r.dataset.prompts[j] for j in r.eval_docs if r.dataset.prompts[j] is not None][:cfg.samples]
    if prompts and (d.main or cfg.fsdp):  # sharded: every rank takes part in the gathers
        gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
        for p, out in zip(prompts, generate(r.engine, cfg, r.tok, prompts, cfg.temperature, cfg.top_k, gen)):
            log(f"sample: {p!r} -> {r.tok.decode(out)!r}")
    save(cfg, d, r, cfg.max_steps)
    log(f"saved {r.ckpt_path}")
    base_name = cfg.model if os.path.isdir(cfg.model) else ""
    if B.has_adapters(cfg):
        r.engine.export_adapter(os.path.join(cfg.out_dir, "adapter"), base_name)
        log(f"saved the adapter (PEFT layout) to {os.path.join(cfg.out_dir, 'adapter')}")
    if cfg.save_hf:  # adapters merged into dense weights (dequantized when quantized)
        r.engine.export_hf(os.path.join(cfg.out_dir, "hf"), r.hf_files,
                           torch.float32 if cfg.hf_dtype == "fp32" else torch.bfloat16)
        log(f"saved {os.path.join(cfg.out_dir, 'hf')}" + (" (merged)" if B.has_adapters(cfg) else ""))


def main(argv):
    cfg = parse_args(argv)
    K.DISABLED.clear()
    K.DISABLED.update(K.NAMES if cfg.kernels == "torch" else [k for k in cfg.kernels_off.split(",") if k])
    K.FORCE = cfg.kernels == "interpret"
    if cfg.compare:
        return print(curves.compare(cfg.compare.split(","), "compare.svg"))
    if cfg.ask:
        return ask(cfg, init_distributed(cfg.threads))
    if cfg.dry_run:
        return dry_run(cfg, Dist(0, 0, int(os.environ.get("WORLD_SIZE", 1)), torch.device("meta")))
    d = init_distributed(cfg.threads, cfg.timeout)
    log = print if d.main else (lambda *a, **k: None)
    r = setup(cfg, d, log)
    if d.device.type == "cpu":  # after loading, whose blocks of every size would fragment a heap that keeps them
        B.keep_freed_memory()
    metrics = C.open_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), r.start) if d.main else None
    send = curves.external_logger(cfg) if d.main else None

    def record(row):
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if send:
            send({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, row["step"])
        if metrics and "eval_loss" in row:  # the picture follows the evals
            curves.write_svg(os.path.join(cfg.out_dir, "curves.svg"), {cfg.out_dir: curves.read_rows(cfg.out_dir)})

    if r.start == 0:
        run_eval(cfg, d, r, log, record, 0)
    try:
        train_loop(cfg, d, r, log, record)
    except RuntimeError as e:  # gloo / NCCL: a peer that stopped answering, or died
        if not any(k in str(e) for k in ("Timed out", "timed out", "Connection closed by peer", "NCCL")):
            raise
        raise ValueError(f"step {r.step}: a collective waited more than --timeout={cfg.timeout} s or lost a rank (one is "
                         f"stuck, swapped out or dead): {str(e).splitlines()[0][:160]}") from None
    finish(cfg, d, r, log, record)
    if metrics:
        metrics.close()
        curves.write_svg(os.path.join(cfg.out_dir, "curves.svg"), {cfg.out_dir: curves.read_rows(cfg.out_dir)})
    if d.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
