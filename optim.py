"""Optimizer-side pieces train.py uses: the learning-rate schedule and the optimizer (`lr_at`,
`make_optimizer`, first), GaLore, and fp16's dynamic loss scaling (`LossScaler`, at the end).

GaLore (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
full fine-tuning whose AdamW state lives in a low-rank subspace of each weight matrix's gradient.

For a 2-D weight W (m x n) with gradient G, every `gap` steps the top-`rank` singular vectors of
the current G are taken as a projection: the right ones Q (rank x n) when m >= n, giving the
low-rank gradient R = G Q^T (m x rank), else the left ones P (m x rank), giving R = P^T G (rank x n).
Adam's two moments are kept in R's shape, so a matrix costs 4 * rank * (2 max(m, n) + min(m, n))
bytes of state (moments and projection, fp32) instead of AdamW's 8 * m * n. The Adam update of R
is projected back (R' Q or P R') and multiplied by `scale`; decoupled weight decay acts on the full
weight, as in AdamW. The moments carry over when the projection is renewed, as in the reference
implementation. Groups without "rank" (embeddings, norms, the head) are plain AdamW.

    opt = GaLoreAdamW([{"params": block_matrices, "rank": 128, "gap": 200, "scale": 0.25, "weight_decay": 0.0},
                       {"params": the_rest, "weight_decay": 0.0}], lr=1e-4)
"""

import math

import torch


def lr_at(step, cfg):
    """The learning rate of `step` (from 0): linear warmup, then --schedule down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def make_optimizer(engine, cfg):
    """AdamW over the engine's parameter groups (matrices decayed), or --optimizer=galore."""
    if cfg.optimizer == "galore":  # the blocks' matrices through GaLore, the rest as AdamW (optim.py)
        named = [(n, p) for n, p in engine.model.named_parameters() if p.requires_grad]
        low = [p for n, p in named if p.dim() == 2 and ".layers." in n]
        return GaLoreAdamW([{"params": low, "rank": cfg.galore_rank, "gap": cfg.galore_gap, "scale": cfg.galore_scale,
                               "weight_decay": cfg.weight_decay},
                              {"params": [p for n, p in named if p.dim() == 2 and ".layers." not in n],
                               "weight_decay": cfg.weight_decay},
                              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(engine.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=cfg.offload != "all")


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad.float()
                if not state:
                    state["step"] = 0
                low_rank = "rank" in group and p.dim() == 2
                if low_rank:
                    tall = g.shape[0] >= g.shape[1]
                    if state["step"] % group["gap"] == 0:  # renew the subspace from this step's gradient
                        u, _, vh = torch.linalg.svd(g, full_matrices=False)
                        state["projection"] = vh[:group["rank"]] if tall else u[:, :group["rank"]]
                    q = state["projection"]
                    g = g @ q.t() if tall else q.t() @ g
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if low_rank:
                    update = (update @ q if tall else q @ update) * group["scale"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])


class LossScaler:
    """fp16's dynamic loss scaling (what torch.amp.GradScaler does, written out so that it works on
    shards too): the loss is multiplied by `scale` so small gradients do not flush to zero in fp16;
    a step whose gradient norm overflows is skipped and the scale halved; after `interval` good steps
    in a row it doubles. The norm is global, so every rank skips the same steps. Disabled: scale 1."""

    def __init__(self, enabled, scale=2.0**16, interval=2000):
        self.enabled, self.scale, self.good, self.interval = enabled, scale if enabled else 1.0, 0, interval

    def overflowed(self, gnorm):
        """gnorm: the norm of the unscaled gradients. True: skip this step (the scale has been halved).
        A scale already down to 1 is not lowered further: the run's --nan_policy takes over."""
        if not self.enabled or (not math.isfinite(gnorm) and self.scale <= 1):
            return False
        if math.isfinite(gnorm):
            self.good += 1
            if self.good % self.interval == 0:
                self.scale *= 2
            return False
        self.scale, self.good = self.scale / 2, 0
        return True

    def unscale_(self, opt):
        if self.scale != 1:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(self.scale)

    def state_dict(self):
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state):
        self.scale, self.good = state["scale"], state["good"]
