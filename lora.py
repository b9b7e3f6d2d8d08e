"""LoRA and DoRA adapters on any nn.Linear or quantized quant.QuantLinear (NF4, HQQ, int8, ternary), saved in PEFT's layout.

    add_lora(model, rank=8, alpha=16, targets="all-linear", dora=False)  # freeze the base, wrap targets
    save_adapter(model, "out/adapter")     # adapter_config.json + adapter_model.safetensors
    load_adapter(model, "out/adapter")     # onto a freshly loaded base (plain or quantized)
    merge_and_unload(model)                # a plain dense model again, ready for save_pretrained

LoRA (Hu et al. 2021): the frozen W gets a trainable low-rank update,
    y = W x + (alpha / r) * B A dropout(x),     A: [r, in] Kaiming-uniform,  B: [out, r] zeros,
so a fresh adapter changes nothing and only r * (in + out) numbers per layer train.

DoRA (Liu et al. 2024) splits the updated weight into a direction and a learned per-row
magnitude m (initialised to the row norms of W):
    W' = m * (W + s B A) / ||W + s B A||_row,        s = alpha / r
As in the paper (section 4.3) and PEFT, the norm is treated as a constant in backward, which saves
keeping a dense [out, in] tensor for the gradient. It is computed from the dequantized weight
when the base is 4-bit (QDoRA).

The wrapper keeps PEFT's module names (`base_layer`, `lora_A`, `lora_B`,
`lora_magnitude_vector`), so `base_model.model.` + our state-dict key is PEFT's key, and an adapter
trained here loads in PEFT (and the other way round).
"""

import contextlib
import hashlib
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
from kernels.lora import lora_add
from quant import QuantLinear, dequantize_model


class LoRALinear(nn.Module):
    def __init__(self, base_layer, rank, alpha, dropout=0.0, dora=False, generator=None):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = base_layer.weight.device
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters train in fp32 whatever the base's dtype; autocast casts them for the matmuls.
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        a = torch.empty(rank, base_layer.in_features)  # drawn on the CPU: the same numbers on every device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own init, as PEFT
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if dora:
            self.lora_magnitude_vector = nn.Parameter(self.dense_weight().norm(dim=1))
        self.merged = False
        self.disabled = False  # True: the base layer alone (DPO's reference model; see adapters_disabled)

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def base_weight(self, dtype=torch.float32):
        b = self.base_layer
        return b.dequantize(dtype) if isinstance(b, QuantLinear) else b.weight.to(dtype)

    @torch.no_grad()
    def dense_weight(self):
        """W + s B A in fp32 (times m / ||.|| for DoRA): what the layer computes, as one matrix."""
        w = self.base_weight(torch.float32) + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        if self.lora_magnitude_vector is not None:
            w = w * (self.lora_magnitude_vector.float() / w.norm(dim=1))[:, None]
        return w

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        xd = self.lora_dropout(x)
        if self.lora_magnitude_vector is None:  # y + s * B A x, one pass over y (kernels/lora.py)
            return lora_add(y, self.lora_A(xd), self.lora_B.weight, self.scaling)
        lora = self.lora_B(self.lora_A(xd)) * self.scaling
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            w = self.base_weight(torch.float32)
            norm = (w + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).norm(dim=1)
        g = self.lora_magnitude_vector / norm  # gradient flows to m only; the norm is a constant
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            wx = y if self.base_layer.bias is None else y - self.base_layer.bias
        else:  # W x on the same dropped-out input the adapter saw, as PEFT does
            wx = F.linear(xd, w.to(xd.dtype))
        return (y + (g - 1) * wx + g * lora).to(y.dtype)

    # In-place merge for a dense base (a quantized base cannot hold W + BA exactly: use merge_and_unload).

    @torch.no_grad()
    def merge(self):
        if isinstance(self.base_layer, QuantLinear):
            raise ValueError("merge: a quantized base cannot hold the merged weight; use lora.merge_and_unload(model)")
        if not self.merged:
            w = self.base_layer.weight
            self._unmerged = w.detach().clone() if self.lora_magnitude_vector is not None else None
            w.copy_(self.dense_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base_layer.weight
            if self._unmerged is not None:  # DoRA's row scaling is not cheaply invertible: restore the copy
                w.copy_(self._unmerged)
            else:
                w.sub_((self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).to(w.dtype))
            self.merged, self._unmerged = False, None


def linear_names(model):
    """Leaf names of the Linear layers LoRA can target ('all-linear' = these, lm_head excluded as PEFT does)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, QuantLinear)) and n and not n.endswith("lm_head") and ".lora_" not in n})


def add_lora(model, *, rank=8, alpha=16.0, dropout=0.0, targets="all-linear", dora=False, generator=None):
    """Freeze every parameter, then wrap the target Linear layers in LoRALinear. Returns the wrapped names.
    generator: draws the A matrices (the global RNG if None)."""
    if rank < 1:
        raise ValueError(f"--lora_rank must be at least 1, got {rank}")
    available = linear_names(model)
    wanted = available if targets in ("all-linear", ["all-linear"]) else \
        [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in wanted if t not in available]
    if unknown or not wanted:
        raise ValueError(f"--lora_target: no Linear layer named {unknown[0] if unknown else '(empty)'!r}; "
                         f"choose from {','.join(available)} or all-linear")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, QuantLinear)) and name.rsplit(".", 1)[-1] in wanted and not name.endswith("lm_head"):
            model.set_submodule(name, LoRALinear(module, rank, alpha, dropout, dora, generator))
            wrapped.append(name)
    return wrapped


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model, without a second copy of its weights: every adapter is skipped meanwhile."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise ValueError("adapters_disabled: unmerge the adapters first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


# -----------------------------------------------------------------------------
# PEFT layout


def adapter_state_dict(model):
    """PEFT's keys: base_model.model.<our name>, e.g. ...q_proj.lora_A.weight, ...q_proj.lora_magnitude_vector."""
    return {"base_model.model." + k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def adapter_config(model, base_model_name_or_path=""):
    """PEFT's adapter_config.json, read off the adapted layers themselves (every one has the same settings)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("adapter_config: the model has no adapters")
    names, m = sorted({n.rsplit(".", 1)[-1] for n, _ in layers}), layers[0][1]
    dropout = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": m.rank, "lora_alpha": m.alpha, "lora_dropout": dropout, "target_modules": names,
            "use_dora": m.lora_magnitude_vector is not None, "use_rslora": False, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None}


def save_adapter(model, path, base_model_name_or_path="", state=None):
    """adapter_config.json + adapter_model.safetensors, written to a temp folder and renamed into place.
    state: the PEFT-named tensors when the model cannot list them itself (fsdp.export_adapter)."""
    from safetensors.torch import save_file
    tmp = path.rstrip("/") + ".tmp"
    state = {k: v.to("cpu").contiguous() for k, v in (state or adapter_state_dict(model)).items()}
    with hf.writing(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config(model, base_model_name_or_path), f, indent=2)
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "adapter_model.safetensors"), 0o644)  # as the rest of the folder
    hf.replace_dir(tmp, path.rstrip("/"))


# An HF export with adapters merged in lists them here (the SHA-256 of each adapter_model.safetensors),
# so that the same adapter is not put on top of it again (it would apply twice).
MERGED = "merged_adapters.json"


def adapter_digest(path):
    digest = hashlib.sha256()
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        for piece in iter(lambda: f.read(2**20), b""):
            digest.update(piece)
    return digest.hexdigest()


def merged_record(path, before=b""):
    """merged_adapters.json for an export that merges the adapter in folder `path`, after those of
    `before` (the source folder's own record, if it was itself a merged export)."""
    digests = json.loads(before or b'{"adapter_model.safetensors sha256": []}')["adapter_model.safetensors sha256"]
    return json.dumps({"adapter_model.safetensors sha256": digests + [adapter_digest(path)]}, indent=2).encode()


def refuse_if_merged(model_dir, path):
    record = os.path.join(model_dir, MERGED)
    if os.path.isfile(record) and adapter_digest(path) in json.load(open(record))["adapter_model.safetensors sha256"]:
        raise ValueError(f"--adapter_path={path} is already merged into --model={model_dir} ({record} lists it): "
                         f"it would apply twice; ask the model alone, or put the adapter on the base it was trained on")


def load_adapter(model, path, dropout=None):
    """Wrap the model as adapter_config.json says and load the adapter's tensors (names and shapes checked)."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no adapter_config.json (expected a PEFT LoRA adapter folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}, only LORA adapters are supported")
    for key in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key}=true is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: per-layer rank/alpha patterns, modules_to_save and trained biases are not supported")
    if not lora_layers(model):
        add_lora(model, rank=cfg["r"], alpha=cfg["lora_alpha"],
                 dropout=cfg.get("lora_dropout", 0.0) if dropout is None else dropout, targets=cfg["target_modules"],
                 dora=cfg.get("use_dora", False))
    file = os.path.join(path, "adapter_model.safetensors")
    state = load_file(file)
    mine = dict(model.named_parameters())
    expected = {k for k, v in mine.items() if v.requires_grad}
    for key, t in state.items():
        name = key.removeprefix("base_model.model.").replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor {key!r} for this model and adapter_config.json")
        if t.shape != mine[name].shape:
            raise ValueError(f"{file}: {key} has shape {list(t.shape)}, the model expects {list(mine[name].shape)}")
        with torch.no_grad():
            mine[name].copy_(t)
        expected.discard(name)
    if expected:
        raise ValueError(f"{file}: missing {len(expected)} adapter tensors, first {sorted(expected)[0]!r}")
    return model


@torch.no_grad()
def merge_and_unload(model, dtype=torch.float32):
    """Replace every LoRALinear by a dense nn.Linear holding its merged weight, and every remaining
    QuantLinear by its dequantized weight: a plain model that save_pretrained writes as an HF folder."""
    for name, module in lora_layers(model):
        module.unmerge()
        base = module.base_layer
        dense = nn.Linear(module.in_features, module.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=dtype)
        dense.weight.copy_(module.dense_weight())
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        dense.requires_grad_(False)
        model.set_submodule(name, dense)
    dequantize_model(model, dtype)
    return model


def dense_tensors(prefix, module):
    """HF name -> dense tensor for the leaves under `module`: adapters merged, NF4 dequantized."""
    if isinstance(module, LoRALinear):
        yield prefix + ".weight", module.dense_weight()
        if module.base_layer.bias is not None:
            yield prefix + ".bias", module.base_layer.bias
        return
    if isinstance(module, QuantLinear):
        yield prefix + ".weight", module.dequantize(torch.float32)
        if module.bias is not None:
            yield prefix + ".bias", module.bias
        return
    children = list(module.named_children())
    if not children:
        for k in ("weight", "bias"):
            t = getattr(module, k, None)
            if isinstance(t, torch.Tensor):
                yield f"{prefix}.{k}", t
    for name, child in children:
        yield from dense_tensors(f"{prefix}.{name}", child)
