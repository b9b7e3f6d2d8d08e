"""Resumable checkpoints, for either engine (ddp.Replicated or fsdp.Sharded), and what a resume checks.

    save_checkpoint(path, engine, opt, step, extra)   # every rank, at the same step
    state = load_checkpoint(path, engine, opt, check)  # -> this rank's `extra` (data position, RNG, ...)

A save is a folder: every rank writes rank<r>.pt into <path>/step-N.tmp, and once all have
finished rank 0 renames it to step-N. That rename is the commit, so a kill at any moment leaves
the previous step folder loadable; a write that fails (disk full) removes the .tmp folder on every
rank. A load may be at another world size: the engine re-shards from the memory-mapped rank files.
Before any tensor is loaded, `same_run` refuses a resume whose settings (the Config's fixed()
fields, the global batch, the base model's fingerprint) differ from the run that saved.
"""

import glob
import hashlib
import os
import random
import shutil

import torch
import torch.distributed as dist

import hf
import config
import data
import distributed


def latest_checkpoint(path):
    """The newest complete step folder under `path` (a save in progress ends in .tmp), or None."""
    done = sorted(p for p in glob.glob(os.path.join(path, "step-*")) if not p.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(path, engine, opt, step, extra):
    """Every rank writes rank<r>.pt (its shards or, replicated, rank 0 the model; the optimizer;
    `extra`: data position, RNG, ...) into <path>/step-<step>.tmp; after all have finished, rank 0
    renames the folder to step-<step>: that one rename makes it current, so a kill at any moment
    leaves the previous checkpoint loadable. Older step folders are then removed."""
    d = engine.d
    tmp = os.path.join(path, f"step-{step:08d}.tmp")
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if d.world > 1:
        dist.barrier(group=dist.group.WORLD)
    state = {**engine.checkpoint_state(opt), **extra, "step": step, "world": d.world, "engine": type(engine).__name__}
    file = os.path.join(tmp, f"rank{d.rank}.pt")
    try:
        torch.save(state, file)
        error = None
    except (OSError, RuntimeError) as e:  # disk full, quota: torch.save reports a failed write as RuntimeError
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if distributed.any_rank(d, error is not None):  # every rank's file is complete, or every rank learns that one is not
        if d.world > 1:
            dist.barrier(group=dist.group.WORLD)  # all have stopped writing before the folder goes
        if d.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{tmp}: could not write the checkpoint of step {step} ({error or 'on another rank'}); removed "
                         f"it, the previous checkpoint is kept")
    if d.rank == 0:
        final = tmp.removesuffix(".tmp")
        if os.path.exists(final):  # the same step saved again: keep a complete copy until the commit
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)  # <- the commit
        for old in glob.glob(os.path.join(path, "step-*")):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier(group=dist.group.WORLD)


RANK_FILE_KEYS = ("step", "world", "engine", "data", "rng", "config")  # what every rank file holds


def read_rank_file(file):
    """A rank file as data: torch's weights_only unpickler admits tensors, numbers, strings and
    containers and refuses anything else (a crafted file's code never runs), and the file must
    hold what a save writes."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip, EOF and unpickling errors alike, and weights_only's refusal of a global
        reason = "it holds code or objects other than tensors and plain data" if "weights_only" in str(e) else \
            f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        raise ValueError(f"{file}: not a readable checkpoint ({reason}); refused") from None
    missing = [k for k in RANK_FILE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{file}: not a checkpoint this trainer wrote (no {', '.join(missing)})")
    return state


def load_checkpoint(path, engine, opt, check=None):
    """Restore the engine and the optimizer from the newest complete save; returns this rank's
    rest (step, data, rng, ...). Saved at another world size, the model and optimizer are
    re-sharded from memory-mapped rank files, the data position becomes the same global position
    (index * old_world / new_world), and a new rank takes the RNG state of the old rank with its
    number (or rank 0's). check(rank 0's saved state, folder) may refuse first."""
    folder = latest_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint to --resume from")
    world = len(glob.glob(os.path.join(folder, "rank*.pt")))
    old = [read_rank_file(os.path.join(folder, f"rank{r}.pt")) for r in range(world)]
    if old[0]["world"] != world:
        raise ValueError(f"{folder}: holds {world} rank files, saved at world size {old[0]['world']}")
    if old[0]["engine"] != type(engine).__name__:
        raise ValueError(f"{folder}: saved by {old[0]['engine']}, resuming with {type(engine).__name__} "
                         f"(--fsdp must match the run that saved it)")
    if check is not None:  # e.g. that the run's settings match the saved ones, before any tensor is loaded
        check(old[0], folder)
    engine.load_checkpoint_state(old, opt, folder)
    state = dict(old[engine.d.rank if engine.d.rank < world else 0])
    if world != engine.d.world:
        state["data"] = dict(state["data"], index=state["data"]["index"] * world // engine.d.world)
    return state


# -- what the trainer saves beside the engine's state, and checks on resume --------------------


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng(rng):
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    random.setstate(rng["python"])




def base_fingerprint(model):
    """A preset's name, or a hash of an HF folder's safetensors files: each header (names, shapes,
    dtypes, offsets) and the first MiB of its weights, which tells a base from its fine-tune."""
    if not os.path.isdir(model):
        return model
    digest = hashlib.sha1()
    for file in sorted(set(hf.safetensors_files(model).values())):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            digest.update(f.read(n + 2**20))
    return digest.hexdigest()[:16]


def same_run(saved, where, cfg, world, inputs):
    """Refuse, in one line, a resume whose settings differ where the checkpoint depends on them: the
    Config's fixed() fields (the model's tensors, the data and how it is cut into batches), the
    global batch, and `inputs` (run_inputs: the base model's weights, the data file's contents, the
    tokenizer, the resolved chat format)."""
    old, defaults = dict(saved["config"]), type(cfg)()  # a setting added since that save had its default then
    if "adapter_path" not in old and old.get("train_type"):  # saved before --adapter and --quant: its --train_type
        adapter, quantized = config.TRAIN_TYPES[old["train_type"]]
        old.update(adapter=adapter, quant=old.get("quant", "nf4") if quantized else "none")
    for name in config.fixed_names():
        if old.setdefault(name, getattr(defaults, name)) != getattr(cfg, name):
            raise ValueError(f"{where}: saved with --{name}={old[name]}, resuming with --{name}={getattr(cfg, name)}; "
                             f"it must match (max_steps, lr, schedule, eval and logging flags may change)")
    rows, now = old["batch_size"] * old["grad_accum"] * saved["world"], cfg.batch_size * cfg.grad_accum * world
    if rows != now:
        raise ValueError(f"{where}: saved with a global batch of {rows} rows (--batch_size x --grad_accum x world), "
                         f"resuming with {now}; keep it (e.g. scale --grad_accum with the world size)")
    then = saved.get("inputs") or {"base": saved.get("base")}  # saves before the others were recorded: the base only
    if "inputs" not in saved and old.get("chat_format", "auto") != cfg.chat_format:  # then, the flag was compared
        raise ValueError(f"{where}: saved with --chat_format={old['chat_format']}, resuming with "
                         f"--chat_format={cfg.chat_format}; it must match")
    changed = next((k for k in ("base", "data", "tokenizer", "chat_format") if k in then and then[k] != inputs[k]), None)
    what = {"base": f"another base model than --model={cfg.model} (its weights differ)",
            "data": f"other contents of --data={cfg.data} (the file changed since: the saved position indexes "
                    f"another plan)",
            "tokenizer": f"another tokenizer than {cfg.tokenizer or cfg.model}'s (its vocabulary, chat template or "
                         f"eos differ)",
            "chat_format": f"chat format {then.get('chat_format')}, resuming with {inputs.get('chat_format')} "
                           f"(--chat_format={cfg.chat_format} resolves differently now)"}.get(changed)
    if changed:
        raise ValueError(f"{where}: saved from {what}; resume with what the run started with, or start afresh")


def file_fingerprint(path):
    """A data file's (or a datasets folder's files') size and the SHA-1 of the contents, read in 1 MiB pieces."""
    files = data.source_files(path)
    if not files:
        return path  # 'arith': built in
    digest = hashlib.sha1()
    for file in files:
        with open(file, "rb") as f:
            for piece in iter(lambda: f.read(2**20), b""):
                digest.update(piece)
    return f"{sum(os.path.getsize(f) for f in files)}-{digest.hexdigest()[:16]}"


def run_inputs(cfg, tok, fmt):
    """What a checkpoint's run was made from beyond its flags, for same_run."""
    sources = ",".join(f"{file_fingerprint(path)}:{weight:g}" for path, weight in data.parse_mixture(cfg.data))
    return {"base": base_fingerprint(cfg.model), "data": sources, "tokenizer": tok.fingerprint(), "chat_format": fmt}
