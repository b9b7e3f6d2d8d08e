"""Plain data parallelism (`Replicated`): every rank holds the whole model and computes on its own
micro-batches; the gradients are summed across ranks by all-reduce, in buckets issued as backward
makes them ready, so the communication overlaps the rest of the backward. It offers the same small
interface as fsdp.Sharded, so train.py's loop, checkpointing and export have no branch on --fsdp:

    engine = Replicated(model, d, amp_dtype=torch.bfloat16)
    loss_sum, n = engine.forward_backward(batch, loss_scale=1 / n_global, sync=True)
    engine.clip_grad_norm_(1.0); opt.step()      # opt = AdamW(engine.param_groups(weight_decay))
    engine.forward(input_ids, labels=...)         # eval and generation
    engine.export_hf(path) / engine.export_adapter(path)
"""

import torch
import torch.distributed as dist

import hf
from lora import lora_layers, merge_and_unload, save_adapter
from distributed import autocast


class Replicated:
    """Plain data parallelism behind the same interface: every rank holds the whole model, and the
    gradients are all-reduced in buckets issued as they become ready in backward (overlapping it)."""

    lockstep = False  # each rank's forwards are its own: eval and generation split the work freely
    reduce_every_micro = False  # gradients accumulate locally; one all-reduce on the last micro-batch

    def __init__(self, model, d, *, amp_dtype=None, loss_chunk=0, bucket_bytes=25 * 2**20):
        self.model, self.d, self.loss_chunk, self.amp_dtype = model, d, loss_chunk, amp_dtype
        named = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}  # a tied head once
        self.named = list(named.values())
        self.buckets, size = [[]], 0  # in reverse registration order: roughly the order backward finishes them
        for _, p in reversed(self.named):
            if size and size + p.numel() * 4 > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * 4
        self.bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b}
        self.syncing, self.works = False, []
        if d.world > 1:
            for _, p in self.named:
                p.register_post_accumulate_grad_hook(self._ready)

    def amp(self):
        return autocast(self.d.device, self.amp_dtype)

    def _ready(self, p):
        if self.syncing:
            self.waiting[self.bucket_of[id(p)]] -= 1
            self._issue_ready()

    def _issue_ready(self):
        """Issue complete buckets strictly in order, so every rank issues the same all-reduces."""
        while self.next < len(self.buckets) and self.waiting[self.next] <= 0:
            params = self.buckets[self.next]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            self.works.append((params, flat, dist.all_reduce(flat, group=dist.group.WORLD, async_op=True)))
            self.next += 1

    def forward_backward(self, batch, loss_scale=1.0, sync=True, loss_fn=None):
        """As Sharded's: loss_fn.prepare(self, batch), then loss_fn.head(model, x, batch) for the loss."""
        if loss_fn is not None:
            loss_fn.prepare(self, batch)
        self.syncing = sync and self.d.world > 1
        self.waiting, self.next, self.works = [len(b) for b in self.buckets], 0, []
        with self.amp():
            if loss_fn is None:
                loss, n = self.model(**batch, loss_chunk=self.loss_chunk)
            else:
                x = self.model.hidden(batch["input_ids"], batch.get("position_ids"), batch.get("doc_ids"))
                loss, n = loss_fn.head(self.model, x, batch)
        (loss * loss_scale).backward()
        if self.syncing:
            self.waiting = [0] * len(self.buckets)  # parameters this batch did not reach: zeros
            self._issue_ready()
            for params, flat, work in self.works:
                work.wait()  # <- all-reduces waited for
                for p, piece in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = piece.view_as(p).to(p.dtype)
            self.syncing, self.works = False, []  # the grads own the buckets now: zero_grad frees them
        return loss.detach(), n

    def forward(self, input_ids, labels=None, position_ids=None, doc_ids=None, cache=None, loss_chunk=0, *, head=None):
        with torch.no_grad(), self.amp():
            if head is None:
                return self.model(input_ids, labels, position_ids, doc_ids, cache, loss_chunk or self.loss_chunk)
            # as Sharded.forward: head(model, x) on the last block's output
            return head(self.model, self.model.hidden(input_ids, position_ids, doc_ids))

    __call__ = forward

    def param_groups(self, weight_decay):
        params = [p for _, p in self.named]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def clip_grad_norm_(self, max_norm):
        return torch.nn.utils.clip_grad_norm_([p for _, p in self.named], max_norm)

    def held_bytes(self):
        """Bytes of weights this rank keeps: the whole model's parameters (a tied head once)."""
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())

    def counts(self):
        return sum(p.numel() for _, p in self.named), sum(p.numel() for n, p in self.named if ".lora_" in n)

    def model_state(self):
        """All of the model, or with adapters only the trainable tensors (the frozen base is
        reloaded from --model on resume)."""
        if lora_layers(self.model):
            return {n: p.detach() for n, p in self.named}
        return self.model.state_dict()

    def checkpoint_state(self, opt):
        return {"model": self.model_state(), "optimizer": opt.state_dict()} if self.d.rank == 0 else {}

    def load_checkpoint_state(self, old, opt, path):
        state = old[0]
        missing, unexpected = self.model.load_state_dict(state["model"], strict=not lora_layers(self.model))
        lacking = {n for n, _ in self.named} - set(state["model"])
        if unexpected or lacking:
            raise ValueError(f"{path}: saved with a different --adapter, --expand_blocks or --lora_target "
                             f"({len(unexpected)} unexpected, {len(lacking)} missing tensors)")
        opt.load_state_dict(state["optimizer"])

    def export_hf(self, path, extra_files=None, dtype=torch.bfloat16):
        if self.d.rank == 0:  # adapters folded into dense weights (dequantized when quantized)
            model = merge_and_unload(self.model) if lora_layers(self.model) else self.model
            hf.save_pretrained(model, path, dtype=dtype, extra_files=extra_files)

    def export_adapter(self, path, base_model_name_or_path=""):
        if self.d.rank == 0:
            save_adapter(self.model, path, base_model_name_or_path)
