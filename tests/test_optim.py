"""GaLore (optim.py) against its update written out here, its state size, and its training."""
import json
import math

import pytest
import torch

import model as M
import optim as O
import plan as P
import train


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide: left projection", "tall: right projection"])
def test_galore_step_is_the_projected_adam_update_written_out(shape):
    torch.manual_seed(0)
    w0, g = torch.randn(shape), torch.randn(shape)
    w = w0.clone().requires_grad_(True)
    w.grad = g.clone()
    lr, wd, scale, b1, b2, eps = 0.1, 0.01, 0.25, 0.9, 0.999, 1e-8
    O.GaLoreAdamW([{"params": [w], "rank": 2, "gap": 5, "scale": scale, "weight_decay": wd}], lr=lr, betas=(b1, b2),
                  eps=eps).step()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    tall = shape[0] >= shape[1]
    r = g @ vh[:2].t() if tall else u[:, :2].t() @ g  # the gradient in the top-2 singular directions
    m, v = (1 - b1) * r, (1 - b2) * r * r
    adam = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    back = (adam @ vh[:2] if tall else u[:, :2] @ adam) * scale
    assert torch.allclose(w.detach(), w0 * (1 - lr * wd) - lr * back, atol=1e-6)


def test_galore_state_bytes_scale_with_the_rank_and_the_plan_counts_them():
    def state_bytes(rank):
        torch.manual_seed(0)
        model = M.Llama(M.MODELS["tiny"])
        mats = [p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]
        opt = O.GaLoreAdamW([{"params": mats, "rank": rank, "gap": 10, "scale": 0.25}], lr=1e-3)
        for p in mats:
            p.grad = torch.randn_like(p)
        opt.step()
        got = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        want = sum(4 * rank * (2 * max(p.shape) + min(p.shape)) for p in mats)
        planned = P.plan_memory(model, 1, 1, 8, galore_rank=rank)[0]["optimizer"]
        rest = sum(8 * p.numel() for n, p in model.named_parameters() if not (p.dim() == 2 and ".layers." in n))
        assert got == want and planned == want + rest
        return got
    assert state_bytes(16) == 2 * state_bytes(8)
    adamw = sum(8 * p.numel() for n, p in M.Llama(M.MODELS["tiny"]).named_parameters() if p.dim() == 2 and ".layers." in n)
    assert state_bytes(16) < adamw / 2


@pytest.mark.slow
def test_galore_trains_the_tiny_preset_about_as_well_as_adamw(tmp_path):
    common = ["--max_steps=40", "--eval_every=40", "--eval_samples=0", "--samples=0", "--save_hf=false", "--log_every=40",
              "--precision=fp32", "--warmup_steps=5"]
    finals = {}
    for opt in ("adamw", "galore"):
        train.main(common + [f"--optimizer={opt}", "--galore_rank=16", "--galore_gap=20", f"--out_dir={tmp_path / opt}"])
        evals = [json.loads(line)["eval_loss"] for line in open(tmp_path / opt / "metrics.jsonl") if "eval_loss" in line]
        finals[opt] = evals
    assert finals["galore"][-1] < finals["galore"][0] / 3 and math.isfinite(finals["galore"][-1])
    assert finals["galore"][-1] < 1.3 * finals["adamw"][-1]


def test_galore_with_fsdp_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"--optimizer=galore projects whole weight matrices: .* no --fsdp"):
        train.parse_args(["--optimizer=galore", "--fsdp"])
