"""Direct preference optimization (Rafailov et al. 2023): the loss the engines take as loss_fn,
and its held-out evaluation. In its own file because train.py, which drives it, is already past its
reading length.

Per pair, -log sigmoid(r_chosen - r_rejected), with the reward r = beta * (log pi(answer) -
log ref(answer)) and log-probabilities summed over the answer's tokens. Rows come as chosen_0,
rejected_0, chosen_1, ... (data.PairBatches). The reference is a frozen copy of the starting model
(full fine-tuning, plain or data parallel), or the trained model itself with its adapters switched
off (lora.adapters_disabled): no second copy of the weights, and it works sharded too.

An engine's forward_backward(batch, loss_scale, sync, loss_fn=dpo) calls dpo.prepare(engine, batch)
first (the reference log-probabilities, through the engine: under fsdp.Sharded every rank gathers
together), then runs its usual forward and, where the language-model loss would be, dpo.head(model,
x, batch) on the last block's output.
"""

import torch
import torch.nn.functional as F

import data as D
import ddp
import lora as L
import model as M


class DPO:
    def __init__(self, beta, reference=None):
        self.beta, self.reference, self.ref = beta, reference, None
        self.sums = [0.0] * 5  # pairs, correct, margin, chosen reward, rejected reward: for the log

    @torch.no_grad()
    def prepare(self, engine, batch):
        ids, labels, pos = batch["input_ids"], batch["labels"], batch.get("position_ids")
        if self.reference is not None:
            with ddp.autocast(ids.device, engine.amp_dtype):
                self.ref = M.sequence_logprobs(self.reference, ids, labels, pos)
        else:  # through the engine (sharded: every rank gathers together), one row's logits at a time
            with L.adapters_disabled(engine.model):
                self.ref = engine.forward(ids, position_ids=pos, head=lambda m, x: M.row_logprobs(m, x, labels))

    def head(self, model, x, batch):
        return self.loss(M.row_logprobs(model, x, batch["labels"]))

    def loss(self, policy):
        chosen, rejected = self.beta * (policy[0::2] - self.ref[0::2]), self.beta * (policy[1::2] - self.ref[1::2])
        losses = -F.logsigmoid(chosen - rejected)
        c, r = chosen.detach(), rejected.detach()
        for k, v in enumerate([len(losses), (c > r).sum().item(), (c - r).sum().item(), c.sum().item(), r.sum().item()]):
            self.sums[k] += v
        return losses.sum(), len(losses)

    def metrics(self, d):
        """Means over the pairs since the last call, across ranks; then the sums restart."""
        t = torch.tensor(self.sums, dtype=torch.float64, device=d.device)
        if d.world > 1:
            torch.distributed.all_reduce(t)
        n, correct, margin, chosen, rejected = t.tolist()
        self.sums, n = [0.0] * 5, max(n, 1)
        return {"reward_accuracy": correct / n, "reward_margin": margin / n, "chosen_reward": chosen / n,
                "rejected_reward": rejected / n}


@torch.no_grad()
def evaluate(engine, dpo, cfg, d, data, eval_docs, tok):
    """Held-out pairs (eval_docs: their chosen documents): DPO's loss, reward accuracy, margin and
    rewards over up to --eval_batches batches, every forward through the engine. Ranks take turns
    over one plan; under --fsdp every rank must run the same forwards, so a rank with no batch left
    repeats the last and ignores it (as train.evaluate does)."""
    engine.model.eval()
    loader = D.PairBatches(data, [j // 2 for j in eval_docs], cfg.seq_len, cfg.batch_size, tok.pad_id, shuffle=False)
    n_batches = min(len(loader.plan(0)), cfg.eval_batches)
    training_sums, dpo.sums, loss_sum = dpo.sums, [0.0] * 5, 0.0
    for i in range(d.rank, -(-n_batches // d.world) * d.world if cfg.fsdp else n_batches, d.world):
        loader.index = min(i, n_batches - 1)
        batch = {k: (v.to(d.device) if torch.is_tensor(v) else v) for k, v in next(loader).items()}
        kept = list(dpo.sums)
        dpo.prepare(engine, batch)
        policy = engine.forward(batch["input_ids"], position_ids=batch["position_ids"],
                                head=lambda m, x: M.row_logprobs(m, x, batch["labels"]))
        loss = dpo.loss(policy)[0].item()
        if i < n_batches:
            loss_sum += loss
        else:
            dpo.sums = kept
    n = dpo.sums[0]
    result = dpo.metrics(d)
    t = torch.tensor([loss_sum, n], dtype=torch.float64, device=d.device)
    if d.world > 1:
        torch.distributed.all_reduce(t)
    dpo.sums = training_sums
    engine.model.train()
    return {"eval_loss": t[0].item() / max(t[1].item(), 1), **{"eval_" + k: v for k, v in result.items()}}
