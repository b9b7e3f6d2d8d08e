"""Held-out evaluation and generation through an engine (ddp.Replicated or fsdp.Sharded): the loss
over up to --eval_batches held-out batches, the accuracy of greedy answers to up to --eval_samples
held-out prompts, and text generation for those answers, --ask and the end-of-run samples.

Under a lockstep engine (fsdp.Sharded: every forward gathers weights from every rank) all ranks
must run the same forwards: distributed.turns gives each rank its share and has the less busy ones
repeat a batch whose result they ignore. DPO's held-out pairs are dpo.evaluate's.
"""

import math

import torch

import data
from distributed import all_reduce_sum, autocast, turns
from model import generate as model_generate


@torch.no_grad()
def evaluate(engine, cfg, d, eval_data, eval_docs, tok):
    """Held-out loss over up to eval_batches batches, and accuracy on up to eval_samples prompts.
    Under a lockstep engine (--fsdp) every rank runs the same forwards (distributed.turns); the
    prompts go 32 at a time, every rank taking as many chunks as the busiest."""
    model = engine.model
    model.eval()
    loader = data.Batches(eval_data, eval_docs, cfg.seq_len, cfg.batch_size, tok.pad_id, pack=cfg.pack, shuffle=False)
    n_batches = min(len(loader.plan(0)), cfg.eval_batches)
    loss_sum, n_tok = 0.0, 0
    for i in turns(n_batches, d, engine.lockstep):
        loader.index = min(i, n_batches - 1)
        batch = data.to_device(next(loader), d.device)
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
            correct += data.score_answer(tok.decode(out), ref, cfg.eval_metric)
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
        return model_generate(engine.model, [tok.encode(p, bos=True) for p in prompts], cfg.max_new_tokens,
                          temperature=temperature, top_k=top_k, eos_id=tok.eos_id, generator=generator,
                          stop_early=not engine.lockstep, forward=engine.forward)
