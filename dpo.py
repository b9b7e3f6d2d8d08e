"""Direct preference optimization (Rafailov et al. 2023): the loss the engines take as loss_fn,
and its held-out evaluation.

Per pair, -log sigmoid(r_chosen - r_rejected), with the reward r = beta * (log pi(answer) -
log ref(answer)) and log-probabilities summed over the answer's tokens. A batch (data.PairBatches)
holds whole pairs, packed into rows with document masks (or one padded answer per row); its seq_ids
say which answer each token belongs to: 2k pair k's chosen one, 2k + 1 its rejected one. The
reference is the trained model itself with its adapters switched off (lora.adapters_disabled: no
second copy of the weights), or under full fine-tuning a frozen copy of the starting model behind
an engine of its own (build.dpo_reference; sharded like the model under --fsdp).

An engine's forward_backward(batch, loss_scale, sync, loss_fn=dpo) calls dpo.prepare(engine, batch)
first (the reference log-probabilities, through the engine: under fsdp.Sharded every rank gathers
together), then runs its usual forward and, where the language-model loss would be, dpo.head(model,
x, batch) on the last block's output.
"""

import torch
import torch.nn.functional as F

from data import PairBatches, to_device
from lora import adapters_disabled
from model import row_logprobs
from distributed import all_reduce_sum, turns


class DPO:
    def __init__(self, beta, reference=None, chunk=4096):
        """reference: None (adapters off) or an engine (ddp.Replicated, fsdp.Sharded) over a frozen copy;
        chunk: answer tokens through the head at a time (model.row_logprobs)."""
        self.beta, self.reference, self.ref, self.chunk = beta, reference, None, chunk
        self.sums = [0.0] * 5  # pairs, correct, margin, chosen reward, rejected reward: for the log

    @torch.no_grad()
    def prepare(self, engine, batch):
        """The reference log-probabilities, through an engine (sharded: every rank gathers together)."""
        forward = lambda e: e.forward(batch["input_ids"], position_ids=batch.get("position_ids"),  # noqa: E731
                                      doc_ids=batch.get("doc_ids"), head=lambda m, x: self.logprobs(m, x, batch))
        if self.reference is not None:
            self.ref = forward(self.reference)
        else:
            with adapters_disabled(engine.model):
                self.ref = forward(engine)

    def logprobs(self, model, x, batch):
        """Each answer's summed log-probability: 2k pair k's chosen one, 2k + 1 its rejected one."""
        return row_logprobs(model, x, batch["labels"], batch.get("seq_ids"), 2 * batch["num_pairs"], chunk=self.chunk)

    def head(self, model, x, batch):
        return self.loss(self.logprobs(model, x, batch))

    def loss(self, policy):
        chosen, rejected = self.beta * (policy[0::2] - self.ref[0::2]), self.beta * (policy[1::2] - self.ref[1::2])
        losses = -F.logsigmoid(chosen - rejected)
        c, r = chosen.detach(), rejected.detach()
        for k, v in enumerate([len(losses), (c > r).sum().item(), (c - r).sum().item(), c.sum().item(), r.sum().item()]):
            self.sums[k] += v
        return losses.sum(), len(losses)

    def metrics(self, d):
        """Means over the pairs since the last call, across ranks; then the sums restart."""
        n, correct, margin, chosen, rejected = all_reduce_sum(self.sums, d)
        self.sums, n = [0.0] * 5, max(n, 1)
        return {"reward_accuracy": correct / n, "reward_margin": margin / n, "chosen_reward": chosen / n,
                "rejected_reward": rejected / n}


@torch.no_grad()
def evaluate(engine, dpo, cfg, d, *, data, eval_docs, tok):
    """Held-out pairs (eval_docs: their chosen documents): DPO's loss, reward accuracy, margin and
    rewards over up to --eval_batches batches, every forward through the engine. Ranks take turns
    over one plan; under --fsdp every rank must run the same forwards, so a rank with no batch left
    repeats the last and ignores it (as train.evaluate does)."""
    engine.model.eval()
    loader = PairBatches(data, [j // 2 for j in eval_docs], cfg.seq_len, cfg.batch_size, tok.pad_id, pack=cfg.pack,
                           shuffle=False)
    n_batches = min(len(loader.plan(0)), cfg.eval_batches)
    training_sums, dpo.sums, loss_sum = dpo.sums, [0.0] * 5, 0.0
    for i in turns(n_batches, d, engine.lockstep):
        loader.index = min(i, n_batches - 1)
        batch = to_device(next(loader), d.device)
        kept = list(dpo.sums)
        dpo.prepare(engine, batch)
        policy = engine.forward(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch.get("doc_ids"),
                                head=lambda m, x: dpo.logprobs(m, x, batch))
        loss = dpo.loss(policy)[0].item()
        if i < n_batches:
            loss_sum += loss
        else:
            dpo.sums = kept
    n = dpo.sums[0]
    result = dpo.metrics(d)
    loss_sum, n = all_reduce_sum([loss_sum, n], d)
    dpo.sums = training_sums
    engine.model.train()
    return {"eval_loss": loss_sum / max(n, 1), **{"eval_" + k: v for k, v in result.items()}}
