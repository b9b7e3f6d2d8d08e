"""The run's configuration: one Config dataclass in sections (model, adapters, data, optimization,
system, sharding, logging, asking), each field's trailing comment its --help text; the command line
(--name=value for every field) and the checks that flags make sense alone and together, all at
parse time, before anything is loaded.

    cfg = parse_args(["--lr=2e-4", "--adapter=lora", "--quant=nf4"])   # QLoRA; --train_type=qlora says the same
"""

import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch

import data
import fsdp
import kernels
import quant


def fixed(default):
    """A setting the saved state depends on (the model's tensors, the data plan): a --resume must
    give it the value the run that saved had (checkpoint.same_run)."""
    return field(default=default, metadata={"fixed": True})


def fixed_names():
    return [f.name for f in dataclasses.fields(Config) if f.metadata.get("fixed")]


@dataclass
class Config:
    # model: the base, and what trains on it
    model: str = "tiny"  # a preset from model.MODELS (random init) or a Hugging Face Llama folder to load
    tokenizer: str = ""  # folder with tokenizer.json; '' = the model folder's, or bytes for a preset
    adapter: str = fixed("none")  # none (train every weight) | lora | dora: adapters on the frozen base's --lora_target layers
    quant: str = fixed("none")  # the frozen base's format under an adapter: none | nf4 (bitsandbytes-compatible; QLoRA) | hqq | int8 (per channel) | ternary (BitNet b1.58)
    expand_blocks: int = fixed(0)  # Llama-Pro: insert N copies of evenly spaced blocks (o_proj, down_proj zeroed) and train only them
    train_type: str = ""  # shorthand for the three above: full | lora | qlora (lora, nf4 unless --quant) | dora | qdora | llama_pro (with --expand_blocks)
    quant_bits: int = fixed(4)  # --quant=hqq: bits per weight, 2 | 3 | 4 | 8
    quant_group: int = fixed(64)  # weights per scale for nf4 (its blocksize), hqq and ternary
    lora_rank: int = fixed(8)  # r of the adapters
    lora_alpha: float = fixed(16.0)  # adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target: str = fixed("all-linear")  # Linear layers to adapt: all-linear (all but lm_head) or e.g. q_proj,v_proj
    # data
    objective: str = fixed("sft")  # sft | dpo (preference pairs {"prompt", "chosen", "rejected"}; with adapters the reference is the base with them off, else a frozen copy)
    dpo_beta: float = 0.1  # DPO: the strength of the pull towards the reference model
    data: str = fixed("arith")  # 'arith' (built-in sums), or a .txt / .jsonl / .json file (text, Alpaca or chat records)
    chat_format: str = "auto"  # alpaca | chatml | llama3 | template (the checkpoint's own, with jinja2); auto = template if there is one, else from the tokenizer's special tokens
    seq_len: int = fixed(66)  # tokens per row (66: six fixed-width arith sums of 11 tokens fill a row exactly)
    batch_size: int = 16  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    pack: bool = fixed(True)  # pack documents into full rows with document masks (else one padded document per row, length-grouped); DPO: a batch's answers
    eval_frac: float = fixed(0.05)  # the last fraction of documents is held out for eval and never trained on
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
    optimizer: str = fixed("adamw")  # adamw | galore (full fine-tuning with AdamW state in a low-rank projection of each block matrix's gradient; not with --fsdp)
    galore_rank: int = 128  # GaLore: rank of the gradient projection
    galore_gap: int = 200  # GaLore: steps between renewals of the projection (an SVD of the gradient)
    galore_scale: float = 0.25  # GaLore: the projected-back update is multiplied by this
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    nan_policy: str = "stop"  # stop (at the first step whose loss or gradient norm is not finite, saving nothing) | skip (drop such steps; stop after --nan_skips in a row)
    nan_skips: int = 5  # with --nan_policy=skip: consecutive non-finite steps before stopping
    # system
    seed: int = fixed(0)  # model init, adapters, data order and split
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with AMX / AVX512-BF16, else fp32) | bf16 | fp32 | fp16 (autocast with dynamic loss scaling: GPUs without bf16)
    compile: bool = False  # torch.compile each transformer block
    grad_checkpointing: str = "auto"  # full (recompute each block in backward instead of storing its activations) | none | auto (none where the plan says the activations fit the free memory, else full); a bare --grad_checkpointing (or =true) is full
    offload_activations: bool = False  # with grad_checkpointing: the block inputs it keeps wait in (pinned) CPU memory
    loss_chunk: int = 0  # >0: cross-entropy over this many tokens at a time (never all [tokens, vocab] logits)
    memory_check: bool = True  # refuse at startup a run whose planned peak per rank (--dry_run's plan) exceeds the free memory (GPU: free; CPU: MemAvailable per process, ulimit -v)
    threads: int = 0  # CPU threads per process; 0 = cores / processes on this machine
    timeout: int = 600  # seconds a collective waits for the other ranks before the job stops with an error
    kernels: str = "triton"  # triton (Triton kernels where they can run: CUDA; else the reference) | torch (every reference) | interpret (Triton on CPU too, under TRITON_INTERPRET=1: tests of the GPU path)
    kernels_off: str = ""  # comma list of Triton kernels to replace by their reference: nf4,nf4_matmul,rmsnorm,swiglu,linear_ce,rope,lora
    # sharding (fsdp.py)
    fsdp: bool = False  # shard weights, gradients and optimizer state over ranks (else plain data parallel)
    shard: str = "full"  # full (ZeRO-3) | grad_op (ZeRO-2: weights gathered for the whole step) | hybrid (HSDP: shard within --shard_group ranks, all-reduce across groups)
    shard_group: int = 0  # ranks per shard group for --shard=hybrid; 0 = the processes of one node (torchrun's LOCAL_WORLD_SIZE; --dry_run: 8)
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
    ask: str = ""  # answer this prompt with --model (+ --adapter_path; a quantized base with --quant) and exit
    adapter_path: str = ""  # a PEFT LoRA adapter folder to put on --model for --ask
    temperature: float = 0.0  # for --ask and the end-of-run samples: 0 = greedy
    top_k: int = 0  # for --ask and the samples: sample from the k most likely tokens; 0 = all
    overwrite: bool = False  # start afresh in an --out_dir that holds a previous run (else refused; --resume continues it); its files go only once this run has finished
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
    cfg, types, given = Config(), {f.name: f.type for f in dataclasses.fields(Config)}, set()
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
        if name == "grad_checkpointing" and (not eq or text.lower() in ("true", "false", "1", "0")):  # the old bool
            text, eq = ("none" if text.lower() in ("false", "0") else "full"), "="
        if not eq and types[name] is not bool:
            raise ValueError(f"flag --{name} needs a value: --{name}=...")
        setattr(cfg, name, parse_value(name, types[name], text) if eq else True)
        given.add(name)
    if cfg.adapter not in ADAPTERS and os.path.isdir(cfg.adapter):
        raise ValueError(f"flag --adapter={cfg.adapter} is a folder: --adapter is one of {', '.join(ADAPTERS)}; "
                         f"pass an adapter folder to --ask as --adapter_path")
    if cfg.train_type:
        expand_train_type(cfg, given)
    check_choices(cfg)
    check_combinations(cfg)
    return cfg


def check_choices(cfg):
    """Each flag alone: one of its values, or within its range (RANGES)."""
    for name, allowed in (("schedule", ("cosine", "linear", "constant")), ("grad_checkpointing", ("auto", "none", "full")), ("precision", ("auto", "bf16", "fp32", "fp16")),
                          ("eval_metric", ("auto", "exact", "last_number")),
                          ("adapter", ADAPTERS), ("quant", ("none",) + quant.FORMATS), ("reduce_dtype", ("fp32", "bf16")),
                          ("chat_format", ("auto", "alpaca", "chatml", "llama3", "template")), ("hf_dtype", ("bf16", "fp32")),
                          ("kernels", ("triton", "torch", "interpret")), ("nan_policy", ("stop", "skip")), ("offload", fsdp.OFFLOAD), ("shard", fsdp.STRATEGIES),
                          ("optimizer", ("adamw", "galore")), ("objective", ("sft", "dpo"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"flag --{name}={getattr(cfg, name)} is not one of {', '.join(allowed)}")
    for name, (ok, expected) in RANGES.items():  # at parse time, before anything is loaded
        if not ok(getattr(cfg, name)):
            raise ValueError(f"flag --{name} must be {expected}, got {getattr(cfg, name)}")


def check_combinations(cfg):
    """Flags that only make sense together, or not at all together."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("flags --resume and --overwrite contradict each other: --resume continues the run in --out_dir, "
                         "--overwrite replaces it; pass one")
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
    if len(data.parse_mixture(cfg.data)) > 1 and cfg.objective == "dpo":  # (the weights are checked there)
        raise ValueError("flag --data: a weighted mixture of sources is for --objective=sft; DPO takes one pairs file")
    if cfg.objective == "dpo" and cfg.data == "arith":
        raise ValueError("flag --objective=dpo needs --data=<file of preference pairs> ({\"prompt\", \"chosen\", \"rejected\"})")
    if cfg.offload_activations and cfg.grad_checkpointing == "none":
        raise ValueError("flag --offload_activations moves the block inputs that --grad_checkpointing keeps: drop "
                         "--grad_checkpointing=none")
    if cfg.offload_activations and cfg.fsdp:  # fsdp.Sharded keeps every block's input itself, for its backward
        raise ValueError("flag --offload_activations does not save memory under --fsdp yet (the sharded schedule "
                         "keeps each block's input on the GPU for its backward); drop one of them")
    if cfg.optimizer == "galore" and (cfg.fsdp or cfg.adapter != "none"):
        raise ValueError("flag --optimizer=galore projects whole weight matrices: it needs --adapter=none and no "
                         "--fsdp (which hands the optimizer flat shards)")
    if cfg.quant != "none" and cfg.adapter == "none" and not cfg.ask:
        raise ValueError(f"flag --quant={cfg.quant} makes the base frozen: pass --adapter=lora or dora to train "
                         f"adapters on it (QLoRA: --adapter=lora --quant=nf4)")
    if cfg.expand_blocks and cfg.adapter != "none":
        raise ValueError(f"flag --expand_blocks={cfg.expand_blocks} (Llama-Pro) trains the new blocks, not adapters: "
                         f"pass --adapter=none")
    if cfg.kernels == "interpret" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise ValueError("flag --kernels=interpret needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
    off = [k for k in cfg.kernels_off.split(",") if k]
    if any(k not in kernels.NAMES for k in off):
        raise ValueError(f"flag --kernels_off: unknown kernel {next(k for k in off if k not in kernels.NAMES)!r}; "
                         f"kernels are {', '.join(kernels.NAMES)}")


ADAPTERS = ("none", "lora", "dora")
# --train_type=X: (adapter, quantized base); llama_pro also needs --expand_blocks.
TRAIN_TYPES = {"full": ("none", False), "lora": ("lora", False), "qlora": ("lora", True), "dora": ("dora", False),
               "qdora": ("dora", True), "llama_pro": ("none", False)}


def expand_train_type(cfg, given):
    """--train_type, the shorthand, into --adapter and --quant; refused where a flag given with it
    says otherwise (--train_type=dora --quant=hqq would silently drop one of the two)."""
    if cfg.train_type not in TRAIN_TYPES:
        raise ValueError(f"flag --train_type={cfg.train_type} is not one of {', '.join(TRAIN_TYPES)}")
    adapter, quantized = TRAIN_TYPES[cfg.train_type]
    if "adapter" in given and cfg.adapter != adapter:
        raise ValueError(f"flags --train_type={cfg.train_type} and --adapter={cfg.adapter} contradict each other; pass one")
    if quantized and cfg.quant == "none":
        if "quant" in given:
            raise ValueError(f"flag --train_type={cfg.train_type} quantizes the base: --quant=none contradicts it")
        cfg.quant = "nf4"
    if not quantized and cfg.quant != "none":
        raise ValueError(f"flag --quant={cfg.quant} would be ignored by --train_type={cfg.train_type} (a base in full "
                         f"precision): pass --adapter=lora or dora with --quant={cfg.quant}")
    if cfg.expand_blocks and cfg.train_type != "llama_pro":
        raise ValueError(f"flags --train_type={cfg.train_type} and --expand_blocks={cfg.expand_blocks} contradict each "
                         f"other (Llama-Pro trains new blocks: --train_type=llama_pro, or --expand_blocks alone)")
    if cfg.train_type == "llama_pro" and not cfg.expand_blocks:
        raise ValueError("flags --train_type=llama_pro and --expand_blocks=N (N >= 1) go together")
    cfg.adapter = adapter


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
