"""Fine-tune (or train from scratch) a Llama model. One config, one loop.

    python train.py                                   # tiny model, built-in arithmetic, ~25 s on CPU
    torchrun --nproc_per_node=2 train.py              # the same on 2 processes (gloo on CPU, NCCL on GPU)
    python train.py --model=path/to/hf_llama --data=alpaca.json --seq_len=1024 --lr=2e-5
    python train.py --help                            # every flag, its default and what it does

The Config and its command line are config.py's; the distributed state (Dist) is distributed.py's;
the --out_dir (its lock, metrics.jsonl) is run_dir.py's; evaluation is evaluate.py's. main() claims
the out_dir, then runs setup (model, engine, optimizer, data, resume), train_loop and finish; a
SIGTERM or SIGUSR1 makes every rank save at the next step and stop. The loop, top to
bottom: take grad_accum micro-batches, count their target tokens across all ranks, forward +
backward each through the engine (ddp.Replicated, or fsdp.Sharded under --fsdp: the same
interface; loss = summed token losses / that global count, so every token weighs the same whatever
the micro-batch or rank it lands on), clip, stop on a non-finite loss or norm, step, log, and now
and then evaluate and checkpoint. Outputs in --out_dir: metrics.jsonl (one JSON line per step and
per eval), checkpoint/ (resumable: a step folder made current by one rename) and hf/ (the trained
model as a Hugging Face folder).
"""

import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import build
import checkpoint
import curves
import data
import dpo
import kernels
import lora
import optim
import plan
import run_dir
from config import Config, parse_args
from distributed import LOST_RANK, Dist, Preempted, all_reduce_sum, any_rank, init_distributed, preemption_signals
from evaluate import evaluate, generate


# -----------------------------------------------------------------------------
# Setup and the loop


def dry_run(cfg: Config, d: Dist):
    """Print what each rank would hold on the GPU at its peak (and on the CPU with --offload), from the
    model built on the meta device, quantized and with adapters as configured: plan.print_plan."""
    amp = build.amp_dtype(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    model = build.meta_model(cfg, amp)
    reference = build.reference_bytes(model, cfg, amp) if cfg.objective == "dpo" and not build.has_adapters(cfg) else 0
    plan.print_plan(model, cfg, cfg.plan_world or d.world, amp, reference, kind=build.kind(cfg))


def ask(cfg: Config, d: Dist):
    """Print --model's answer to --ask, formatted as training formats a user turn."""
    cfg = dataclasses.replace(cfg, fsdp=False)
    model, tok, _, _ = build.build_model(cfg, d, with_adapters=False)
    if cfg.adapter_path:
        if os.path.isdir(cfg.model):
            lora.refuse_if_merged(cfg.model, cfg.adapter_path)
        lora.load_adapter(model, cfg.adapter_path)
    fmt = data.chat_format(cfg, tok)
    text = data.chat_prompt([("user", cfg.ask)], fmt, tok) if fmt != "alpaca" else data.alpaca_prompt(cfg.ask)
    ids = tok.encode(text, bos=True)
    if len(ids) + cfg.max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"--ask: a prompt of {len(ids)} tokens plus --max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the context of {cfg.model} ({model.args.max_seq_len} tokens)")
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed)
    out = generate(build.make_engine(model, cfg, d), cfg, tok, [text], temperature=cfg.temperature, top_k=cfg.top_k,
                   generator=gen)
    answer = tok.decode(out[0])
    print(answer)
    return answer


@dataclasses.dataclass
class Run:
    """What setup makes and the loop, eval, saves and exports use."""
    model: torch.nn.Module
    tok: object  # data.ByteTokenizer or data.HFTokenizer
    source_files: dict  # name -> path: what the hf/ export carries from the source folder
    fmt: str  # the resolved chat format
    engine: object  # distributed.Engine
    opt: torch.optim.Optimizer
    dataset: data.TokenData  # every document; eval_docs are the held-out ones
    eval_docs: list
    loader: data.Batches  # this rank's training batches (resumable position)
    ckpt_path: str
    start: int  # the step training starts from (the checkpoint's, on resume)
    step: int  # the step in progress, named if a collective times out
    adapters: int  # adapter parameters, for MFU
    inputs: dict  # what the run is made from: base weights, data contents, tokenizer, chat format (checkpoint.run_inputs)
    scaler: optim.LossScaler
    dpo: object  # dpo.DPO, or None (SFT)
    signals: list = dataclasses.field(default_factory=list)  # preemption signals received (main's handlers)


def setup(cfg: Config, d: Dist, log):
    """The model, its engine and optimizer, the data, and the resumed state: what the loop needs."""
    recompute, refusal = build.check_memory(cfg, d)
    refusal = refusal if cfg.memory_check else None
    if any_rank(d, refusal):  # free memory differs between ranks: all stop if one must
        raise refusal or ValueError(f"--model={cfg.model}: does not fit another rank's free memory (its error says why)")
    recompute = any_rank(d, recompute)  # and all recompute if one must
    if cfg.grad_checkpointing == "auto" and recompute:
        log("--grad_checkpointing=auto: full (the activations of every block do not fit beside the rest)")
    model, tok, source_files, load = build.build_model(cfg, d)
    reference = build.dpo_reference(cfg, d, model, streamed=load is not None) \
        if cfg.objective == "dpo" and not build.has_adapters(cfg) else None
    model.gradient_checkpointing, model.offload_activations = recompute, cfg.offload_activations
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    engine = build.make_engine(model, cfg, d, load=load)
    for line in build.describe(engine, d, name=cfg.model, what=build.kind(cfg), reference=reference):
        log(line)
    fmt = data.chat_format(cfg, tok, log)
    dataset, eval_docs, loader = data.load_for_training(cfg, tok, d.rank, d.world, log, dist.barrier, fmt=fmt,
                                                           local_rank=d.local_rank)
    if cfg.eval_metric == "auto":
        cfg.eval_metric = "exact" if cfg.data == "arith" else "last_number"

    preference = dpo.DPO(cfg.dpo_beta, reference, chunk=cfg.loss_chunk or 4096) if cfg.objective == "dpo" else None
    opt = optim.make_optimizer(engine, cfg)
    ckpt_path, start, inputs = os.path.join(cfg.out_dir, "checkpoint"), 0, checkpoint.run_inputs(cfg, tok, fmt)
    scaler = optim.LossScaler(cfg.precision == "fp16")
    if cfg.resume:
        state = checkpoint.load_checkpoint(ckpt_path, engine, opt, check=lambda saved, where: checkpoint.same_run(saved, where, cfg, d.world, inputs))
        loader.load_state_dict(state["data"])
        checkpoint.set_rng(state["rng"])
        if state["config"].get("precision") == cfg.precision == "fp16":  # else the scale starts afresh
            scaler.load_state_dict(state["loss_scale"])
        start = state["step"]
        if start > cfg.max_steps:
            raise ValueError(f"--max_steps={cfg.max_steps} is below the step of the checkpoint in {ckpt_path} "
                             f"({start}); pass --max_steps above it to train on")
        log(f"resumed from {ckpt_path} at step {start}, data epoch {loader.epoch} batch {loader.index}")
    if cfg.overwrite and d.main:  # every check has passed and the run is loaded: only now does the old one step aside
        run_dir.set_previous_run_aside(cfg.out_dir, log)
    return Run(model=model, tok=tok, source_files=source_files, fmt=fmt, engine=engine, opt=opt, dataset=dataset,
               eval_docs=eval_docs, loader=loader, ckpt_path=ckpt_path, start=start, step=start,
               adapters=engine.counts()[1], inputs=inputs, scaler=scaler, dpo=preference)


def gradients(cfg: Config, d: Dist, r, micro, step):
    """Forward and backward over one step's micro-batches, then clip: (loss, gradient norm, real
    tokens), the same on every rank. The loss averages over target tokens (SFT) or pairs (DPO)
    across micro-batches and ranks, so each weighs the same wherever it lands."""
    n_real = sum(b.pop("num_tokens") for b in micro)
    targets = sum(b["num_pairs"] if r.dpo else int((b["labels"] != data.IGNORE).sum()) for b in micro)
    n_target, n_real = all_reduce_sum([targets, n_real], d)
    if n_target == 0:  # the same on every rank: all stop
        stats = r.loader.stats
        raise ValueError(f"step {step + 1}: no trainable token in this step's batches ({stats['untrainable']:,} "
                         f"of {stats['docs']:,} documents have none within --seq_len={cfg.seq_len}: their "
                         f"prompts fill the row); raise --seq_len or shorten the prompts")
    loss_sum = 0.0
    for k, b in enumerate(micro):
        sync = k == len(micro) - 1 or r.engine.reduce_every_micro
        s_, _ = r.engine.forward_backward(data.to_device(b, d.device), loss_scale=r.scaler.scale / max(n_target, 1), sync=sync,
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
    flops_tok = plan.flops_per_token(r.model.args, cfg.seq_len, build.frozen_base(cfg), r.adapters)
    peak = plan.peak_flops(d.device)
    t_start, t_last, tokens_since, skipped = time.time(), time.time(), 0, 0
    for step in range(r.start, cfg.max_steps):
        r.step = step + 1  # named if a collective times out
        lr = optim.lr_at(step, cfg)
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
        if any_rank(d, r.signals):  # every rank stops at this step, whichever got the signal
            stop_for_signal(cfg, d, r, step + 1)
    log(f"trained {cfg.max_steps - r.start} steps in {time.time() - t_start:.1f}s")


def stop_for_signal(cfg: Config, d: Dist, r, step):
    if not (cfg.save_every and step % cfg.save_every == 0):  # else just saved
        save(cfg, d, r, step)
    name = signal.Signals(r.signals[0]).name if r.signals else "a signal (on another rank)"
    raise Preempted(f"step {step}: {name} received; saved {r.ckpt_path} at step {step} and stopped (continue with "
                    f"--resume)", r.signals[0] if r.signals else signal.SIGTERM, d.main)


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
    checkpoint.save_checkpoint(r.ckpt_path, r.engine, r.opt, step,
                      {"data": r.loader.state_dict(), "rng": checkpoint.rng_state(), "config": dataclasses.asdict(cfg),
                       "inputs": r.inputs, "loss_scale": r.scaler.state_dict()})


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
    if build.has_adapters(cfg):
        r.engine.export_adapter(os.path.join(cfg.out_dir, "adapter"), base_name)
        log(f"saved the adapter (PEFT layout) to {os.path.join(cfg.out_dir, 'adapter')}")
    if cfg.save_hf:  # adapters merged into dense weights (dequantized when quantized)
        # the source folder's files and the chat template trained in: read now, by the rank that writes
        files = build.export_files(r.source_files, r.tok, r.fmt, chat_data=not r.dataset.split_long) if d.main else None
        if files is not None and build.has_adapters(cfg):  # what is merged in, so that it is not put on again
            files[lora.MERGED] = lora.merged_record(os.path.join(cfg.out_dir, "adapter"), files.get(lora.MERGED, b""))
        r.engine.export_hf(os.path.join(cfg.out_dir, "hf"), files, torch.float32 if cfg.hf_dtype == "fp32" else torch.bfloat16)
        log(f"saved {os.path.join(cfg.out_dir, 'hf')}" + (" (merged)" if build.has_adapters(cfg) else ""))
    if d.main:
        run_dir.drop_previous_run(cfg.out_dir)


def main(argv):
    cfg = parse_args(argv)
    kernels.select(cfg.kernels, off=[k for k in cfg.kernels_off.split(",") if k])
    if cfg.compare:
        return print(curves.compare(cfg.compare.split(","), "compare.svg"))
    if cfg.ask:
        return ask(cfg, init_distributed(cfg.threads))
    if cfg.dry_run:
        return dry_run(cfg, Dist(0, 0, int(os.environ.get("WORLD_SIZE", 1)), torch.device("meta")))
    d = init_distributed(cfg.threads, cfg.timeout)
    log = print if d.main else (lambda *a, **k: None)
    lock = run_dir.claim(cfg.out_dir, d, resume=cfg.resume, overwrite=cfg.overwrite, log=log)
    try:
        with preemption_signals() as signals:  # noted, not fatal: the loop saves at the next step and stops
            run(cfg, d, log, signals)
    finally:
        run_dir.release(lock)
    if d.world > 1:
        dist.barrier()  # every rank is done with every group before any is torn down
        dist.destroy_process_group()


def run(cfg: Config, d: Dist, log, signals):
    """Setup, the step-0 eval, the loop and finish, logging to metrics.jsonl on rank 0."""
    r = setup(cfg, d, log)
    r.signals = signals
    if d.device.type == "cpu":  # after loading, whose blocks of every size would fragment a heap that keeps them
        build.keep_freed_memory()
    metrics = run_dir.Metrics(cfg.out_dir, r.start, curves.external_logger(cfg)) if d.main else None
    record = metrics or (lambda row: None)
    if r.start == 0:
        run_eval(cfg, d, r, log, record, 0)
    try:
        train_loop(cfg, d, r, log, record)
        finish(cfg, d, r, log, record)
    except RuntimeError as e:  # gloo / NCCL: a peer that stopped answering, or died
        if not any(k in str(e) for k in LOST_RANK):
            raise
        raise ValueError(f"step {r.step}: a collective waited more than --timeout={cfg.timeout} s or lost a rank (one is "
                         f"stuck, swapped out or dead): {str(e).splitlines()[0][:160]}") from None
    finally:
        if metrics:
            metrics.close()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        if e.main:
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)  # as if the signal had ended it, for the scheduler
