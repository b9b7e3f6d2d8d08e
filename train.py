"""Fine-tune (or train from scratch) a Llama model. One config, one loop.

    python train.py                                   # tiny model, built-in arithmetic, ~25 s on CPU
    torchrun --nproc_per_node=2 train.py              # the same on 2 processes (gloo on CPU, NCCL on GPU)
    python train.py --model=path/to/hf_llama --data=alpaca.json --seq_len=1024 --lr=2e-5
    python train.py --help                            # every flag, its default and what it does

The Config and its command line are config.py's; the distributed state (Dist) is distributed.py's.
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
import json
import math
import os
import shutil
import sys
import time
import types

import torch
import torch.distributed as dist

import build as B
import checkpoint as C
import curves
import data as D
import dpo
import kernels as K
import lora as L
import model as M
import optim as O
import plan as P
from config import Config, parse_args
from distributed import Dist, all_reduce_sum, autocast, init_distributed, turns


# -----------------------------------------------------------------------------
# Pieces of the loop


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, cfg, d, eval_data, eval_docs, tok):
    """Held-out loss over up to eval_batches batches, and accuracy on up to eval_samples prompts.
    Under a lockstep engine (--fsdp) every rank runs the same forwards (distributed.turns); the
    prompts go 32 at a time, every rank taking as many chunks as the busiest."""
    model = engine.model
    model.eval()
    loader = D.Batches(eval_data, eval_docs, cfg.seq_len, cfg.batch_size, tok.pad_id, pack=cfg.pack, shuffle=False)
    n_batches = min(len(loader.plan(0)), cfg.eval_batches)
    loss_sum, n_tok = 0.0, 0
    for i in turns(n_batches, d, engine.lockstep):
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
    n_chunks = math.ceil(len(turns(len(prompts), d, engine.lockstep)) / 32)
    for i in range(0, 32 * n_chunks, 32):
        chunk = mine[i:i + 32] or prompts[:1]  # an empty share repeats a prompt (fsdp)
        outs = generate(engine, cfg, tok, [p for p, _ in chunk], temperature=0.0)
        for out, (_, ref) in zip(outs, mine[i:i + 32]):
            correct += D.score_answer(tok.decode(out), ref, cfg.eval_metric)
            asked += 1
    loss_sum, n_tok, correct, asked = all_reduce_sum([loss_sum, n_tok, correct, asked], d)
    model.train()
    if n_batches and n_tok == 0:  # every rank sees the same count: all stop, before a loss of 0 is logged
        raise ValueError(f"eval: the {len(eval_docs):,} held-out documents have no trainable token within "
                         f"--seq_len={cfg.seq_len} (their prompts fill the row); raise --seq_len or --eval_frac")
    result = {"eval_loss": loss_sum / max(n_tok, 1)}
    if asked:
        result["accuracy"] = correct / asked
    return result


def generate(engine, cfg, tok, prompts, *, temperature, top_k=0, generator=None):
    """New tokens for each text prompt, through engine.forward (sharded: every rank takes the same
    steps). Autocast here too: the KV cache takes the autocast dtype."""
    with autocast(engine.d.device, engine.amp_dtype):
        return M.generate(engine.model, [tok.encode(p, bos=True) for p in prompts], cfg.max_new_tokens,
                          temperature=temperature, top_k=top_k, eos_id=tok.eos_id, generator=generator,
                          stop_early=not engine.lockstep, forward=engine.forward)


# -----------------------------------------------------------------------------
# Setup and the loop


def dry_run(cfg: Config, d: Dist):
    """Print what each rank would hold on the GPU at its peak (and on the CPU with --offload), from the
    model built on the meta device, quantized and with adapters as configured: plan.print_plan."""
    amp = B.amp_dtype(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    model = B.meta_model(cfg, amp)
    reference = B.reference_bytes(model, cfg, amp) if cfg.objective == "dpo" and not B.has_adapters(cfg) else 0
    P.print_plan(model, cfg, cfg.plan_world or d.world, amp, reference, kind=B.kind(cfg))


def ask(cfg: Config, d: Dist):
    """Print --model's answer to --ask, formatted as training formats a user turn."""
    cfg = dataclasses.replace(cfg, fsdp=False)
    model, tok, _ = B.build_model(cfg, d, with_adapters=False)
    if cfg.adapter_path:
        L.load_adapter(model, cfg.adapter_path)
    fmt = D.chat_format(cfg, tok)
    text = D.chat_prompt([("user", cfg.ask)], fmt, tok) if fmt != "alpaca" else D.alpaca_prompt(cfg.ask)
    ids = tok.encode(text, bos=True)
    if len(ids) + cfg.max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"--ask: a prompt of {len(ids)} tokens plus --max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the context of {cfg.model} ({model.args.max_seq_len} tokens)")
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
    out = generate(B.make_engine(model, cfg, d), cfg, tok, [text], temperature=cfg.temperature, top_k=cfg.top_k,
                   generator=gen)
    answer = tok.decode(out[0])
    print(answer)
    return answer


def claim_out_dir(cfg: Config, d: Dist):
    """Refuse an --out_dir that is a file, holds a run (without --resume or --overwrite) or cannot be
    written, before the model loads: a run that cannot save its results should not start."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir={cfg.out_dir} is a file, expected a folder (or a path to create one at)")
    used = [f for f in ("checkpoint", "metrics.jsonl") if os.path.exists(os.path.join(cfg.out_dir, f))]
    if used and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out_dir={cfg.out_dir} holds a previous run ({', '.join(used)}): pass --resume to continue "
                         f"it or --overwrite to replace it")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, f".write-test-{d.rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror})") from None


# What a run writes in --out_dir. --overwrite moves the previous run's into OVERWRITTEN once every
# check has passed and the new run is loaded, and removes them when the new run has finished: a
# run that stops before then has lost nothing (a symlink is moved as a link, its target untouched).
RUN_FILES = ("checkpoint", "metrics.jsonl", "curves.svg", "hf", "adapter")
OVERWRITTEN = ".overwritten"


def set_previous_run_aside(cfg: Config, d: Dist, log):
    aside = os.path.join(cfg.out_dir, OVERWRITTEN)
    moved = [f for f in RUN_FILES if os.path.lexists(os.path.join(cfg.out_dir, f))] if d.main else []
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
        os.makedirs(aside)
        for f in moved:
            os.replace(os.path.join(cfg.out_dir, f), os.path.join(aside, f))
        log(f"--overwrite: the previous run's {', '.join(moved)} wait in {aside} until this run finishes")


def setup(cfg: Config, d: Dist, log):
    """The model, its engine and optimizer, the data, and the resumed state: what the loop needs."""
    claim_out_dir(cfg, d)
    model, tok, source_files = B.build_model(cfg, d)
    reference = B.dpo_reference(cfg, d, model) if cfg.objective == "dpo" and not B.has_adapters(cfg) else None
    model.gradient_checkpointing, model.offload_activations = cfg.grad_checkpointing, cfg.offload_activations
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    engine = B.make_engine(model, cfg, d)
    for line in B.describe(cfg, d, engine, reference):
        log(line)
    fmt = D.chat_format(cfg, tok, log)
    dataset, eval_docs, loader = D.load_for_training(cfg, tok, d.rank, d.world, log, dist.barrier, fmt=fmt)
    if cfg.eval_metric == "auto":
        cfg.eval_metric = "exact" if cfg.data == "arith" else "last_number"

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
    if cfg.overwrite:  # every check has passed and the run is loaded: only now does the old one step aside
        set_previous_run_aside(cfg, d, log)
    return types.SimpleNamespace(model=model, tok=tok, source_files=source_files, fmt=fmt, engine=engine, opt=opt,
                                 dataset=dataset, eval_docs=eval_docs, loader=loader, ckpt_path=ckpt_path, start=start, step=start,
                                 adapters=engine.counts()[1], base=base, scaler=scaler, dpo=preference)


def gradients(cfg: Config, d: Dist, r, micro, step):
    """Forward and backward over one step's micro-batches, then clip: (loss, gradient norm, real
    tokens), the same on every rank. The loss averages over target tokens (SFT) or pairs (DPO)
    across micro-batches and ranks, so each weighs the same wherever it lands."""
    n_real = sum(b.pop("num_tokens") for b in micro)
    targets = sum(b["num_pairs"] if r.dpo else int((b["labels"] != D.IGNORE).sum()) for b in micro)
    n_target, n_real = all_reduce_sum([targets, n_real], d)
    if n_target == 0:  # the same on every rank: all stop
        stats = r.loader.stats
        raise ValueError(f"step {step + 1}: no trainable token in this step's batches ({stats['untrainable']:,} "
                         f"of {stats['docs']:,} documents have none within --seq_len={cfg.seq_len}: their "
                         f"prompts fill the row); raise --seq_len or shorten the prompts")
    loss_sum = 0.0
    for k, b in enumerate(micro):
        sync = k == len(micro) - 1 or r.engine.reduce_every_micro
        s_, _ = r.engine.forward_backward(to_device(b, d.device), loss_scale=r.scaler.scale / max(n_target, 1), sync=sync,
                                          loss_fn=r.dpo)
        loss_sum += s_.item()
    # On scaled gradients: clipping at grad_clip * scale is clipping at grad_clip once unscaled.
    gnorm = r.engine.clip_grad_norm_(cfg.grad_clip * r.scaler.scale if cfg.grad_clip > 0 else float("inf")).item()
    return all_reduce_sum([loss_sum], d)[0] / max(n_target, 1), gnorm / r.scaler.scale, n_real


def drop_step(d: Dist, r):
    """A skipped step leaves nothing behind: not its gradients, nor its DPO pairs in the next row's means."""
    r.opt.zero_grad(set_to_none=True)
    if r.dpo:
        r.dpo.metrics(d)


def train_loop(cfg: Config, d: Dist, r, log, record):
    """Steps r.start .. max_steps: micro-batches, clip, AdamW, log; eval and save now and then."""
    opt, loader = r.opt, r.loader
    # Llama-Pro: the new blocks' weight gradients are not counted (MFU errs low, by 2 FLOPs per new weight)
    flops_tok = P.flops_per_token(r.model.args, cfg.seq_len, B.frozen_base(cfg), r.adapters)
    peak = P.peak_flops(d.device)
    t_start, t_last, tokens_since, skipped = time.time(), time.time(), 0, 0
    for step in range(r.start, cfg.max_steps):
        r.step = step + 1  # named if a collective times out
        lr = O.lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, gnorm, n_real = gradients(cfg, d, r, [next(loader) for _ in range(cfg.grad_accum)], step)
        if r.scaler.overflowed(gnorm):
            log(f"step {step + 1}: fp16 gradients overflowed; step skipped, loss scale now {r.scaler.scale:g}")
            record({"step": step + 1, "skipped": "fp16 overflow", "loss_scale": r.scaler.scale})
            drop_step(d, r)
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
            drop_step(d, r)
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
        result = dpo.evaluate(r.engine, r.dpo, cfg, d, data=r.dataset, eval_docs=r.eval_docs, tok=r.tok)
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
    if prompts and (d.main or r.engine.lockstep):  # sharded: every rank takes part in the gathers
        gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
        outs = generate(r.engine, cfg, r.tok, prompts, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen)
        for p, out in zip(prompts, outs):
            log(f"sample: {p!r} -> {r.tok.decode(out)!r}")
    save(cfg, d, r, cfg.max_steps)
    log(f"saved {r.ckpt_path}")
    base_name = cfg.model if os.path.isdir(cfg.model) else ""
    if B.has_adapters(cfg):
        r.engine.export_adapter(os.path.join(cfg.out_dir, "adapter"), base_name)
        log(f"saved the adapter (PEFT layout) to {os.path.join(cfg.out_dir, 'adapter')}")
    if cfg.save_hf:  # adapters merged into dense weights (dequantized when quantized)
        # the source folder's files and the chat template trained in: read now, by the rank that writes
        files = B.export_files(r.source_files, r.tok, r.fmt, chat_data=not r.dataset.split_long) if d.main else None
        r.engine.export_hf(os.path.join(cfg.out_dir, "hf"), files, torch.float32 if cfg.hf_dtype == "fp32" else torch.bfloat16)
        log(f"saved {os.path.join(cfg.out_dir, 'hf')}" + (" (merged)" if B.has_adapters(cfg) else ""))
    if d.main:  # this run has written its own: an overwritten run's files can go (rmtree unlinks a symlink)
        shutil.rmtree(os.path.join(cfg.out_dir, OVERWRITTEN), ignore_errors=True)


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
