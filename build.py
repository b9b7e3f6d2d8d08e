"""From the Config to what the loop trains: the precision (and the CPU's allocator), the model (a
preset or a Hugging Face folder; quantized base, adapters or Llama-Pro blocks), its engine (plain
data parallel or sharded), DPO's frozen reference, and the files an hf/ export carries over (the
source folder's non-weight files and the chat template the run trained in).

    model, tok, files, load = build_model(cfg, d)   # d: distributed.Dist; files: name -> path, for exports
    engine = make_engine(model, cfg, d, load=load)  # ddp.Replicated or fsdp.Sharded
"""

import copy
import ctypes
import dataclasses
import json
import os
import platform
import re
from typing import Callable, NamedTuple, Optional

import torch

import ddp
import distributed
import fsdp
import hf
import plan
import quant
from data import format_template, load_tokenizer
from lora import add_lora, linear_names
from model import MODELS, Llama, expand_blocks, random_init_by_unit, rope_frequencies


def native_bf16_cpu():
    """Does this CPU multiply bf16 natively (AMX or AVX512-BF16)? From torch's cpuinfo probe, and only
    while ATen dispatches its AVX-512 kernels: under ATEN_CPU_CAPABILITY=avx2 (how an AVX2-only CPU
    is reproduced) bf16 is emulated there too."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16")) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def keep_freed_memory():
    """On a CPU, have glibc keep freed memory for reuse. By default every block over 32 MiB (logits,
    gradients, activations) is mmap-ed and returned to the OS when freed, so each step page-faults
    it in afresh: a SmolLM2 full fine-tuning step on 2 cores ran 1.32x faster without that
    (bench/compare.py). The process's memory then stays at its peak, which a training run reaches
    at every step anyway; train.py sets it once the model and data are loaded."""
    if platform.libc_ver()[0] != "glibc":  # macOS, musl, Windows: another allocator, nothing to tune
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve every block from the heap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's free top back


def uses_bf16(cfg, device_type):
    """--precision=auto means bf16 autocast (fp32 master weights) on CUDA and on a CPU with native
    bf16 matmul, where it is 1.5-2x faster than fp32; fp32 on other CPUs, where bf16 is emulated."""
    native = device_type == "cuda" or (device_type == "cpu" and native_bf16_cpu())
    return cfg.precision == "bf16" or (cfg.precision == "auto" and native)


def amp_dtype(cfg, device_type):
    """The autocast dtype (None: fp32 throughout). Master weights and optimizer state stay fp32."""
    return torch.float16 if cfg.precision == "fp16" else torch.bfloat16 if uses_bf16(cfg, device_type) else None


class Built(NamedTuple):
    model: torch.nn.Module
    tok: object  # data.Tokenizer
    files: dict  # name -> path: the source folder's files an export carries
    load: Optional[Callable]  # --fsdp: load(modules) reads or draws those modules' weights (the model is on meta)


def build_model(cfg, d, with_adapters=True) -> Built:
    """The model, its tokenizer, the files exports carry, and (--fsdp from a folder) the loader
    fsdp.Sharded calls unit by unit. With --quant each Linear but lm_head is
    quantized as the checkpoint streams in; with --adapter the base is then frozen and the
    --lora_target layers get adapters; --expand_blocks inserts Llama-Pro's new blocks."""
    quantize = quantizer(cfg)
    # A frozen base can live in the autocast dtype; what trains (full weights, adapters, new blocks) stays fp32.
    amp = amp_dtype(cfg, d.device.type)
    base_dtype = amp if frozen_base(cfg) and amp is not None else torch.float32
    if cfg.model in MODELS:
        args = dataclasses.replace(MODELS[cfg.model])
        tok = load_tokenizer(cfg.tokenizer or None)
        if tok.vocab_size > args.vocab_size:  # e.g. a preset with a real tokenizer: grow to a multiple of 64
            args.vocab_size = (tok.vocab_size + 63) // 64 * 64
        args.bos_token_id, args.eos_token_id = tok.bos_id, tok.eos_id
        torch.manual_seed(cfg.seed)  # the weights, and what else draws from the global generator (dropout)
        if cfg.fsdp and not cfg.expand_blocks:  # meta model now; each unit gets its weights as it is sharded
            with torch.device("meta"):
                model = Llama(args)
        else:
            with torch.device(d.device):
                model = Llama(args)
                model.init_weights()
            if quantize:
                quantize(model)
            to_dtype([model], base_dtype)
    elif os.path.isdir(cfg.model):
        if quant.is_prequantized(cfg.model):
            if cfg.quant != "nf4":
                raise ValueError(f"--model={cfg.model} holds 4-bit bitsandbytes weights: pass --quant=nf4 (with "
                                 f"--adapter=lora or dora)")
            model = quant.load_prequantized(cfg.model, d.device, base_dtype)
        elif cfg.fsdp and not cfg.expand_blocks:  # meta model now; each unit is read, quantized and sharded in turn (fsdp.Sharded)
            model = hf.empty_from_pretrained(cfg.model, prepare=quantize)
        else:
            model = hf.from_pretrained(cfg.model, d.device, base_dtype, prepare=quantize)
        tok_dir = cfg.tokenizer or cfg.model
        tok = load_tokenizer(tok_dir, eos_id=model.args.eos_token_id, bos_id=model.args.bos_token_id)
    else:
        raise ValueError(f"--model={cfg.model}: neither a preset ({', '.join(MODELS)}) nor a folder")
    extra = source_files(cfg.model if os.path.isdir(cfg.model) else "", cfg.tokenizer)
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"{getattr(tok, 'path', 'the tokenizer')}: token ids up to {tok.vocab_size - 1} do not fit the "
                         f"model's vocab_size {model.args.vocab_size} (config.json); pass the model's own --tokenizer")
    if cfg.seq_len > model.args.max_seq_len:
        raise ValueError(f"--seq_len={cfg.seq_len} exceeds the model's context of {model.args.max_seq_len} tokens")
    if not with_adapters:
        return Built(model, tok, extra, None)
    if cfg.expand_blocks:  # the whole model is loaded (not streamed): the copies need their originals
        expand_for_llama_pro(model, cfg)
        return Built(model, tok, extra, None)
    gen = torch.Generator().manual_seed(cfg.seed)  # adapters start the same on every rank, sharded or not
    if model.inv_freq.is_meta:  # --fsdp: adapters are added unit by unit as it loads
        load = unit_loader(model, cfg.model, device=d.device, dtype=base_dtype, seed=cfg.seed,
                           then=lambda modules: add_adapters(modules, cfg, gen), quantize=quantize)
        return Built(model, tok, extra, load)
    add_adapters([model], cfg, gen)
    return Built(model, tok, extra, None)


def to_dtype(modules, dtype):
    """A preset's parameters in `dtype`, as a folder's load in it (the quantized codes are buffers)."""
    if dtype != torch.float32:
        for p in {id(p): p for m in modules for p in m.parameters()}.values():
            p.data = p.data.to(dtype)


def unit_loader(model, source, *, device, dtype, seed, then, quantize=None):
    """For a model on the meta device, the materialize(modules) fsdp.Sharded calls unit by unit: it
    reads those modules' weights from the HF folder `source` in `dtype` or, for a preset, draws the
    random weights the whole model would have had from `seed` (model.random_init_by_unit), quantizes
    them (a folder's quantize as they stream in) and casts the rest to `dtype`, then calls then(modules)."""
    if os.path.isdir(source):
        load = hf.stream_from_pretrained(model, source, device, dtype, then=then)
    else:
        init = random_init_by_unit(model, device, seed)

        def load(modules):
            init(modules)
            for module in modules:
                if quantize and module is not model.lm_head:
                    quantize(module)
            to_dtype(modules, dtype)
            then(modules)
    model.inv_freq = rope_frequencies(model.args, device)
    return load


# What an HF folder holds besides its config.json and weights: tokenizer files, generation config,
# chat template, README, license. An export carries all of them over.
NOT_CARRIED = re.compile(r"^config\.json$|\.index\.json$|\.ckpt\.(index|data-.*)$|"
                         r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|onnx_data|ot|tflite|pb|npz)$")
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                             r"chat_template.*|.*\.tiktoken|.*\.model)$")


def source_files(model_dir, tokenizer_dir=""):
    """name -> path of the files an export of this run carries: the model folder's, but with a
    --tokenizer folder every tokenizer file (vocabulary, merges, special tokens, chat template)
    comes from there alone, so that no file of the other tokenizer travels with it."""
    files = {}
    for folder, keep in ((model_dir, lambda n: not (tokenizer_dir and TOKENIZER_FILES.match(n))),
                         (tokenizer_dir, lambda n: TOKENIZER_FILES.match(n))):
        for name in sorted(os.listdir(folder)) if folder else ():
            if (os.path.isfile(os.path.join(folder, name)) and not name.startswith(".") and not NOT_CARRIED.search(name)
                    and keep(name)):
                files[name] = os.path.join(folder, name)
    return files


def export_files(files, tok, fmt, chat_data):
    """name -> bytes for the hf/ export: the source folder's files, and the chat template the run
    trained in (chat_data: its records were instructions or chats, not plain text), so that
    transformers' apply_chat_template (vLLM, llama.cpp's converter) gives the tokens it trained on."""
    out = {name: open(path, "rb").read() for name, path in files.items()}
    if "tokenizer.json" not in out or not chat_data:  # the byte tokenizer, or no turns to render
        return out
    bos = tok.bos_id is not None and tok.bos_id in tok.encode("", bos=True)  # the tokenizer adds it itself
    template = tok.chat_template if fmt == "template" else format_template(fmt, bos, tok.eos_token)
    config = json.loads(out.get("tokenizer_config.json", b"{}"))
    config["chat_template"] = template  # both places: tools read one or the other
    if bos and fmt != "template":
        config["bos_token"] = tok.tok.id_to_token(tok.bos_id)
    if tok.eos_token:
        config.setdefault("eos_token", tok.eos_token)
    out["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    out["chat_template.jinja"] = template.encode()
    return out


def expand_for_llama_pro(model, cfg):
    """Insert --expand_blocks identity-initialised blocks (model.expand_blocks); only they train."""
    model.requires_grad_(False)
    for block in expand_blocks(model, cfg.expand_blocks):
        block.requires_grad_(True)


def has_adapters(cfg):
    return cfg.adapter != "none"


def frozen_base(cfg):
    """Does the base stay frozen (adapters, or Llama-Pro's new blocks train instead)?"""
    return cfg.adapter != "none" or cfg.expand_blocks > 0


def kind(cfg):
    """What trains, for the log: full, lora, lora on nf4, dora on hqq4, llama_pro +2 blocks."""
    base = f" on {cfg.quant}{cfg.quant_bits if cfg.quant == 'hqq' else ''}" if cfg.quant != "none" else ""
    return f"llama_pro +{cfg.expand_blocks} blocks" if cfg.expand_blocks else \
        ("full" if cfg.adapter == "none" else cfg.adapter) + base


def quantizer(cfg):
    """With --quant, what turns a model's Linears (but lm_head) into --quant Linears; else None."""
    if cfg.quant == "none":
        return None
    return lambda model: quant.quantize_model(model, cfg.quant, cfg.quant_bits, cfg.quant_group)


def add_adapters(modules, cfg, generator):
    """Freeze and wrap the --lora_target layers of these modules (nothing without --adapter)."""
    if not has_adapters(cfg):
        return
    for module in modules:
        if linear_names(module):
            add_lora(module, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target,
                       dora=cfg.adapter == "dora", generator=generator)
        else:  # embedding, final norm, head: frozen
            module.requires_grad_(False)


def meta_model(cfg, amp):
    """The model of --model on the meta device (no memory), as build_model makes it: quantized, with
    adapters (or expanded), a frozen base in the autocast dtype `amp`. What --dry_run plans for."""
    if cfg.model in MODELS:
        with torch.device("meta"):
            model = Llama(dataclasses.replace(MODELS[cfg.model]))
        if quantizer(cfg):
            quantizer(cfg)(model)
    else:
        model = hf.empty_from_pretrained(cfg.model, quantizer(cfg))
    add_adapters([model], cfg, torch.Generator().manual_seed(0))
    if cfg.expand_blocks:
        expand_for_llama_pro(model, cfg)
    if amp is not None and frozen_base(cfg):
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(amp)
    return model


def make_engine(model, cfg, d, *, load=None) -> distributed.Engine:
    """Plain data parallelism (ddp.Replicated) or sharding (fsdp.Sharded), behind the same interface.
    load: build_model's, for a model still on the meta device (Sharded loads it unit by unit)."""
    amp = amp_dtype(cfg, d.device.type)
    if not cfg.fsdp:
        return ddp.Replicated(model, d, amp_dtype=amp, loss_chunk=cfg.loss_chunk)
    return fsdp.Sharded(model, d, prefetch=cfg.prefetch, param_dtype=amp or torch.float32,
                        reduce_dtype=torch.bfloat16 if cfg.reduce_dtype == "bf16" else torch.float32, offload=cfg.offload,
                        strategy=cfg.shard, shard_group=cfg.shard_group or d.local_world, amp_dtype=amp, loss_chunk=cfg.loss_chunk,
                        materialize=load, reduce_every_micro=cfg.reduce_every_micro)


def describe(engine, d, *, name, what, reference=None):
    """Log lines: the model `name` and `what` trains (kind()); under sharding, what this rank holds;
    DPO's frozen reference."""
    model, (trainable, adapters), sharded = engine.model, engine.counts(), isinstance(engine, fsdp.Sharded)
    lines = [f"model {name} ({what}): " + (f"{trainable / 1e6:.3f}M trainable" if sharded else plan.describe(model))
             + (f", {adapters / 1e6:.3f}M of them in adapters" if adapters else "")
             + f"; {model.args.n_layers} layers, dim {model.args.dim}, world {d.world} on {d.device.type}"]
    if sharded:
        lines.append(engine.describe())
    if reference is not None:
        lines.append(f"dpo: the reference is a frozen copy of the starting model, {reference.held_bytes() / 2**20:.1f} "
                     f"MiB {'of shards ' if sharded else ''}on this rank")
    return lines


def check_memory(cfg, d):
    """(recompute, refusal) from the planned peak per rank (plan.plan_run: what --dry_run prints)
    against the memory free for it: a GPU's free memory (and host memory for what is offloaded); on
    a CPU, MemAvailable shared by this machine's ranks, within ulimit -v. recompute: whether blocks
    are recomputed in backward (--grad_checkpointing=auto: only where the plan without it does not
    fit); refusal: a ValueError saying what does not fit, or None."""
    amp = amp_dtype(cfg, d.device.type)
    model = meta_model(cfg, amp)
    reference = reference_bytes(model, cfg, amp) if cfg.objective == "dpo" and not has_adapters(cfg) else 0
    free_device, free_host = plan.available_bytes(d.device, d.local_world)

    def need(recompute):  # (device bytes, host bytes) per rank
        gpu, cpu = plan.plan_run(model, cfg, d.world if cfg.fsdp else 1, amp, reference_bytes=reference,  # replicated
                                 kernels=d.device.type == "cuda" and plan.triton_keeps_less(cfg),
                                 shard_group=cfg.shard_group or d.local_world, checkpointing=recompute)
        return (gpu["total"], sum(cpu.values())) if d.device.type == "cuda" else (0, gpu["total"] + sum(cpu.values()))

    def fits(bytes_):
        return all(free is None or n <= free for n, free in zip(bytes_, (free_device, free_host)))
    recompute = cfg.grad_checkpointing == "full" or cfg.offload_activations or \
        (cfg.grad_checkpointing == "auto" and not fits(need(False)))
    on_device, on_host = need(recompute)
    for n, free, where in ((on_device, free_device, f"free on {d.device}"),
                           (on_host, free_host, f"available in host memory for each of this machine's {d.local_world} "
                                                f"process(es) (MemAvailable, ulimit -v)")):
        if free is not None and n > free:
            return recompute, ValueError(
                f"--model={cfg.model}: each rank needs about {n / 2**30:.1f} GiB at its peak (the plan --dry_run "
                f"prints) but {free / 2**30:.1f} GiB are {where}; use --adapter=lora --quant=nf4, --fsdp over more "
                f"ranks, --grad_checkpointing=full, a smaller --batch_size or --seq_len (or --memory_check=false to "
                f"try anyway)")
    return recompute, None


def dpo_reference(cfg, d, model, *, streamed):
    """DPO's reference under full fine-tuning: the starting model (so also after a resume), frozen,
    behind an engine of its own (sharded like the model under --fsdp, where a folder streams into it
    a second time). It holds in the autocast dtype what the policy computes with in that dtype, so
    that at step 0 both give the same numbers: under --fsdp every weight (the policy's are gathered
    in it), else the Linear weights (autocast casts them; embeddings and norms stay fp32). RoPE's
    inv_freq stays fp32 in both."""
    dtype = amp_dtype(cfg, d.device.type) or torch.float32
    load = None
    if streamed:  # --fsdp: the model exists only as it loads
        with torch.device("meta"):
            ref = Llama(dataclasses.replace(model.args))
        load = unit_loader(ref, cfg.model, device=d.device, dtype=dtype, seed=cfg.seed,
                           then=lambda modules: [m.requires_grad_(False) for m in modules])
    else:
        ref = copy.deepcopy(model)
        for p in reference_casts(ref, cfg.fsdp):
            p.data = p.data.to(dtype)
    return make_engine(ref.requires_grad_(False).eval(), cfg, d, load=load)


def reference_casts(model, fsdp):
    """The parameters DPO's frozen copy holds in the autocast dtype (dpo_reference): every one under
    --fsdp, else those of the Linear layers but a head tied to the embedding (which stays fp32)."""
    tied_head = model.lm_head if model.args.tie_embeddings else None
    return [p for m in model.modules() if fsdp or (isinstance(m, torch.nn.Linear) and m is not tied_head)
            for p in m.parameters(recurse=False)]


def reference_bytes(model, cfg, amp):
    """The bytes of DPO's frozen copy of `model` (whole, before any sharding), for --dry_run."""
    cast = {id(p) for p in reference_casts(model, cfg.fsdp)} if amp is not None else set()
    params = {id(p): p for p in model.parameters()}.values()  # a tied head once
    return sum(p.numel() * (torch.finfo(amp).bits // 8 if id(p) in cast else p.element_size()) for p in params)
