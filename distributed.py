"""The distributed state, made once at startup and passed down: Dist (rank, world size, device), the
process group (gloo on CPU, NCCL on GPU; a plain `python train.py` is world 1), the small
all-reduces by which ranks agree (float sums, "did any rank fail"), preemption signals (each
rank notes them; the loop stops every rank at the same step), autocast, and `Engine`: the
interface both engines (ddp.Replicated, fsdp.Sharded) give the loop, so that it has no branch on
which one it drives.

Named distributed.py, not dist.py: every engine already calls torch.distributed `dist`.
"""

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    local_world: int = 1  # processes on this machine (they share its memory and cores)

    @property
    def main(self):
        return self.rank == 0


def init_distributed(threads=0, timeout=600) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Processes sharing a CPU would oversubscribe it with one thread per core each.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout))  # a stuck rank ends the job
    return Dist(rank, local_rank, world, device, local_world)


# How gloo and NCCL report a rank that stopped answering (hung: a timeout) or died (its sockets closed).
LOST_RANK = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL")


def all_reduce_sum(values, d: Dist):
    """Sum a list of floats across ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(t)
    return t.tolist()


class Engine(Protocol):
    """What train.py, dpo.py and checkpoint.py call on an engine; ddp.Replicated and fsdp.Sharded
    implement it (build.make_engine picks one)."""

    model: torch.nn.Module  # the Llama (under --fsdp its Linear weights are views into gathered units)
    d: Dist
    amp_dtype: object  # the autocast dtype, or None
    lockstep: bool  # every forward involves every rank (Sharded): ranks must run the same forwards
    reduce_every_micro: bool  # the loop passes sync=True for every micro-batch, not only the last

    def forward_backward(self, batch, loss_scale=1.0, sync=True, loss_fn=None):
        """(summed loss, target count) of one micro-batch, backward done; sync: reduce gradients now."""

    def forward(self, input_ids, labels=None, position_ids=None, doc_ids=None, cache=None, loss_chunk=0, *, head=None):
        """Llama.forward without gradients (eval, generation); head(model, x) replaces lm_head."""

    def param_groups(self, weight_decay):
        """The optimizer's parameter groups: decay on matrices only."""

    def clip_grad_norm_(self, max_norm):
        """Clip the global gradient norm; returns it (before clipping)."""

    def held_bytes(self):
        """Bytes of weights this rank keeps."""

    def counts(self):
        """(trainable parameters, of them in adapters)."""

    def checkpoint_state(self, opt):
        """This rank's part of a resumable checkpoint."""

    def load_checkpoint_state(self, old, opt, path):
        """Load the parts `old` (every saved rank's, in order), at this run's world size."""

    def export_hf(self, path, extra_files=None, dtype=torch.bfloat16):
        """The trained model as an HF folder (adapters merged, quantized weights dequantized)."""

    def export_adapter(self, path, base_model_name_or_path=""):
        """The adapters in the PEFT layout."""


def turns(n, d: Dist, lockstep):
    """The indices of n items (eval batches, prompts) this rank takes: rank, rank + world, ...
    lockstep (an engine whose forwards gather weights from every rank, fsdp.Sharded): every rank
    takes as many turns as the busiest, a rank past the end taking min(i, n - 1) again and
    ignoring what it gets (i >= n)."""
    return range(d.rank, -(-n // d.world) * d.world if lockstep else n, d.world)


def autocast(device, dtype):
    """A fresh autocast context (an instance must not be entered twice at once): dtype None = off."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def any_rank(d, flag):
    """True on every rank if `flag` is true on any: how ranks agree that a write failed somewhere."""
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=d.device)
    if d.world > 1:
        dist.all_reduce(t, group=dist.group.WORLD)
    return bool(t.item())


class Preempted(Exception):
    """A preemption signal arrived: the run saved its checkpoint at a step boundary and stopped."""

    def __init__(self, message, signum, main=True):
        super().__init__(message)
        self.signum, self.main = signum, main  # main: the rank that says so


@contextlib.contextmanager
def preemption_signals(signums=(signal.SIGTERM, signal.SIGUSR1)):
    """SIGTERM (what schedulers and torchrun send before stopping a job) and SIGUSR1 (slurm's
    --signal) are noted in the yielded list instead of ending the process. The loop asks
    any_rank(d, signals) at each step boundary, so every rank saves and stops at the same step,
    whichever ranks got the signal."""
    got = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signums}
    try:
        yield got
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
