"""Run by tests/test_fsdp.py under torchrun: sharded training of small models, results to a file.

    torchrun --nproc_per_node=W tests/fsdp_worker.py OUT_FILE
    torchrun --nproc_per_node=4 tests/fsdp_worker.py OUT_FILE --strategies   # full, grad_op, hybrid (2 x 2)
"""
import itertools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp  # noqa: E402
import fsdp as F  # noqa: E402
import lora as L  # noqa: E402
import quant as Q  # noqa: E402
from conftest import small_model  # noqa: E402
from train import Dist  # noqa: E402

CONFIGS = list(itertools.product(["full", "lora", "qlora"], [1, 2], [False, True]))  # type, micro-batches, checkpointing
STEPS, B, T = 3, 2, 12


def build(train_type, tie=False):
    m = small_model(seed=0, tie_embeddings=tie)
    if train_type == "qlora":
        Q.quantize_model(m)
    if train_type != "full":
        torch.manual_seed(1)
        L.add_lora(m, rank=4, alpha=8, targets="all-linear", dora=False)
    return m


def batch(step, micro, rank):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, 50, (B, T), generator=g)
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    return ids, labels


def n_targets(step, accum, world):
    return sum(int((batch(step, k, r)[1] != -100).sum()) for k in range(accum) for r in range(world))


def fsdp2_losses(d):
    """The same full fine-tuning with PyTorch's own FSDP2 (fully_shard), for comparison."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (d.world,))
    m = build("full", tie=True)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    params = list(m.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    losses = []
    for step in range(STEPS):
        n = n_targets(step, 1, d.world)
        ids, labels = batch(step, 0, d.rank)
        s, _ = m(ids, labels=labels)
        (s / n * d.world).backward()  # FSDP2 averages gradients over ranks; ours sums
        dist.all_reduce(s := s.detach().clone())
        losses.append(s.item() / n)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def train_sharded(d, train_type, accum, ckpt, sync_every=False, **kw):
    """STEPS optimizer steps of Sharded: (losses, the Sharded object)."""
    model = build(train_type, tie=train_type == "full")
    model.gradient_checkpointing = ckpt
    sharded = F.Sharded(model, d, prefetch=1, **kw)
    opt = torch.optim.AdamW(sharded.param_groups(0.1), lr=1e-2)
    losses = []
    for step in range(STEPS):
        n = n_targets(step, accum, d.world)
        total = torch.zeros(())
        for k in range(accum):
            ids, labels = batch(step, k, d.rank)
            s, _ = sharded.forward_backward({"input_ids": ids, "labels": labels}, loss_scale=1 / n,
                                            sync=sync_every or k == accum - 1)
            total += s
        dist.all_reduce(total)
        losses.append(total.item() / n)
        sharded.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, sharded


STRATEGY_CONFIGS = [("full", 2, True), ("qlora", 1, False)]


def strategies(d):
    """Each strategy on each config: losses and this rank's shard bytes; then two collective checks."""
    results = {}
    for strategy in ("full", "grad_op", "hybrid"):
        for config in STRATEGY_CONFIGS:
            losses, sharded = train_sharded(d, *config, strategy=strategy, shard_group=2)
            results[(strategy, config)] = {"losses": losses, "shard_bytes": sum(
                g.shard.numel() * g.shard.element_size() for u in sharded.units for g in u.groups)}
    # grad_op reducing every micro-batch still gathers each unit once per optimizer step.
    losses, sharded = train_sharded(d, "full", 2, True, sync_every=True, strategy="grad_op", log_events=True)
    results["grad_op_every_micro"] = {"losses": losses, "gathers": sum(e[0] == "gather" for e in sharded.events)}
    # A rank whose batch gave a group no gradient still joins its reduce-scatter (with zeros).
    sharded = F.Sharded(build("lora"), d)
    unit = next(u for u in sharded.units if u.trainable)
    for g in unit.groups:
        g.full.grad = torch.ones_like(g.full) if d.rank % 2 == 0 else None
    sharded.reduce(unit, sync=True)
    sharded.finish_reduces()
    results["zero_filled"] = [g.shard.grad[:g.numel - g.rank * g.shard_numel].unique().tolist()
                              for g in unit.groups if g.trainable]
    # Plain data parallelism issues its all-reduces while backward is still running.
    engine = ddp.Replicated(build("full", tie=True), d, bucket_bytes=4096)
    inside, issue = [], dist.all_reduce

    def logged(*a, **kw):
        inside.append(torch._C._current_graph_task_id() != -1)  # -1: no backward running
        return issue(*a, **kw)
    F.dist.all_reduce = logged
    ids, labels = batch(0, 0, d.rank)
    engine.forward_backward({"input_ids": ids, "labels": labels})
    F.dist.all_reduce = issue
    results["dp_overlap"] = (sum(inside), len(inside), len(engine.buckets))
    return results


def main(out):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    d = Dist(dist.get_rank(), dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    if "--strategies" in sys.argv:
        results = strategies(d)
        if d.rank == 0:
            torch.save(results, out)
        dist.barrier()  # every rank done with every group before any tears them down (a gloo abort otherwise)
        dist.destroy_process_group()
        return
    results = {}
    for train_type, accum, ckpt in CONFIGS:
        losses, sharded = train_sharded(d, train_type, accum, ckpt, log_events=True)
        shard_bytes = sum(g.shard.numel() * g.shard.element_size() for u in sharded.units for g in u.groups)
        padded = sum(g.shard_numel * d.world * g.shard.element_size() for u in sharded.units for g in u.groups)
        results[(train_type, accum, ckpt)] = {"losses": losses, "state": sharded.trainable_state(),
                                              "events": sharded.events, "shard_bytes": shard_bytes, "padded_bytes": padded}
        if (train_type, accum, ckpt) == ("qlora", 1, True):
            sharded.export_hf(out + ".hf", dtype=torch.float32)
            sharded.export_adapter(out + ".adapter")
    results["fsdp2"] = fsdp2_losses(d)
    if d.rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
