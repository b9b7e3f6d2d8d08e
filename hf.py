"""Hugging Face model folders in and out: config.json and safetensors weights (one file, or shards
with an index), read one tensor at a time and checked against the config's shapes, and written to a
temp folder that one rename puts in place, so that no reader ever sees a half-written folder.

    model = from_pretrained("path/to/hf_llama_folder")           # the whole model, on a device
    model = empty_from_pretrained(path); load = stream_from_pretrained(model, path, device, dtype)
    save_pretrained(model, "out/hf", extra_files={"tokenizer.json": b"..."})

A module may take its own tensors (`load_tensor`) and list its own expected names and shapes
(`checkpoint_shapes`): that is how quant.py's Linear4bit loads bitsandbytes' packed NF4 weights or
quantizes a dense weight as it arrives, so that peak memory is the finished model plus one tensor.
`writing` and `replace_dir` are the atomic writes every export uses (lora.py's adapter too).
"""

import contextlib
import json
import os
import shutil

import torch
import torch.nn as nn

from model import Llama, ModelArgs, rope_frequencies



def read_json(path):
    """A JSON file; text that is not JSON is a one-line error naming the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_hf_config(path) -> ModelArgs:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not found, expected a Hugging Face model folder with config.json")
    cfg = read_json(cfg_path)
    args = ModelArgs.from_hf_config(cfg, cfg_path)
    gen_path = os.path.join(path, "generation_config.json")  # eos for chat models often lives here
    if os.path.isfile(gen_path):
        eos = read_json(gen_path).get("eos_token_id")
        if eos is not None:
            args.eos_token_id = eos[0] if isinstance(eos, list) else eos
    return args


def safetensors_files(path):
    """{tensor name: file} for model.safetensors or a sharded folder with model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return {k: os.path.join(path, v) for k, v in read_json(index)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def open_safetensors(file):
    """safe_open, with a truncated or garbage file as a one-line error naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, "pt")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def iter_checkpoint(path, expected_shapes, only=None):
    """Yield (name, tensor) from an HF folder, one file open at a time, checking names and shapes.
    only: a set of names to read (the rest is checked but not loaded): one shard unit's tensors."""
    where = safetensors_files(path)
    missing = [k for k in expected_shapes if k not in where]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors the config implies, first {missing[0]!r}")
    by_file = {}
    for name, file in where.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older exports save this buffer; it is recomputed from the config
        if name not in expected_shapes:
            raise ValueError(f"{file}: unexpected tensor {name!r} for a Llama model of this config")
        if only is None or name in only:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if expected_shapes[name] is not None and shape != tuple(expected_shapes[name]):
                    raise ValueError(f"{os.path.basename(file)}: tensor {name} has shape {list(shape)}, "
                                     f"config.json implies {list(expected_shapes[name])}")
                yield name, f.get_tensor(name)


def checkpoint_shapes(model: Llama):
    """Name -> shape of every tensor the checkpoint must hold. A module may list its own (quant.py's
    Linear4bit expects bitsandbytes' tensors); None means "any shape" (checked by the module)."""
    shapes = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if hasattr(module, "checkpoint_shapes"):
            shapes.update(module.checkpoint_shapes(prefix))
        else:
            shapes.update({prefix + k: tuple(p.shape) for k, p in module.named_parameters(recurse=False)})
    if model.args.tie_embeddings:
        shapes.pop("lm_head.weight")  # stored once, as the embedding
    return shapes


def owner_of(model: nn.Module, name):
    """'model.layers.0.mlp.up_proj.weight.absmax' -> (the up_proj module, 'weight.absmax')."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            return model.get_submodule(".".join(parts[:i])), ".".join(parts[i:])
        except AttributeError:
            continue
    raise ValueError(f"no module owns tensor {name!r}")


def from_pretrained(path, device="cpu", dtype=torch.float32, prepare=None) -> Llama:
    """Build on the meta device (no memory), then load the checkpoint one tensor at a time.

    prepare(model) may swap modules of the meta model first: quant.quantize_model turns Linear into
    Linear4bit. A module with a `load_tensor` method takes its own tensors (Linear4bit quantizes
    each weight as it arrives), so peak memory is the finished model plus one tensor in flight.
    """
    model = empty_from_pretrained(path, prepare)
    load_tensors(model, path, device, dtype)
    model.inv_freq = rope_frequencies(model.args, device)
    return model


def empty_from_pretrained(path, prepare=None) -> Llama:
    """The model of an HF folder's config.json on the meta device: shapes, no memory."""
    with torch.device("meta"):
        model = Llama(read_hf_config(path))
    if prepare is not None:
        prepare(model)
    return model


def load_tensors(model: Llama, path, device, dtype, only=None, shapes=None):
    """Assign checkpoint tensors (all, or the names in `only`) to a meta-device model, one at a time.
    shapes: checkpoint_shapes(model) taken before anything was loaded (fsdp.py loads unit by unit)."""
    for name, t in iter_checkpoint(path, shapes or checkpoint_shapes(model), only):
        module, leaf = owner_of(model, name)
        if hasattr(module, "load_tensor"):
            module.load_tensor(leaf, t, device, dtype, where=path)
        else:
            setattr(module, leaf, nn.Parameter(t.to(device, dtype)))
        if name == "model.embed_tokens.weight" and model.args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight


def stream_from_pretrained(model: Llama, path, device, dtype, then=None):
    """A `materialize` for fsdp.Sharded: read just the given modules' tensors from the HF folder (NF4
    targets quantize as they arrive), then call then(modules) (e.g. to add adapters)."""
    shapes = checkpoint_shapes(model)  # taken now: sharded modules stop listing their parameters
    names = {id(mod): name for name, mod in model.named_modules()}

    def materialize(modules):
        prefixes = tuple(names[id(mod)] + "." for mod in modules)
        load_tensors(model, path, device, dtype, only={k for k in shapes if k.startswith(prefixes)}, shapes=shapes)
        if then is not None:
            then(modules)
    return materialize


@contextlib.contextmanager
def writing(tmp, what):
    """Around the writing of a temp folder: if it fails (disk full, read-only, quota), remove what
    was written and say so in one line; whatever `what` replaces stays as it was."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{what}: could not write it ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                         f"removed {tmp}, nothing was replaced") from None


def replace_dir(tmp, final):
    """Swap a fully written temp folder into place so readers never see a half-written one."""
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: Llama, path, dtype=torch.bfloat16, max_shard_bytes=5 * 2**30, extra_files=None):
    """Write config.json + model.safetensors (or shards + index), plus `extra_files` (name -> bytes,
    e.g. the tokenizer's files)."""
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight")  # HF stores a tied head once, as the embedding
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v.contiguous().clone()
        size += nbytes
    shards.append(current)
    write_hf_folder(path, model.args, shards, len(shards), dtype, extra_files)


def write_hf_folder(path, args: ModelArgs, shards, n_shards, dtype, extra_files=None):
    """config.json and the weights: `shards` yields n_shards name -> tensor dicts, each written as it
    comes (model.safetensors if there is one, else numbered files and an index); everything goes to
    a temp folder that is renamed into place at the end."""
    from safetensors.torch import save_file
    tmp = path.rstrip("/") + ".tmp"
    with writing(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        cfg = args.to_hf_config()
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes 0600; the rest of the folder is 0644
            weight_map.update({k: name for k in shard})
            total += sum(v.numel() * v.element_size() for v in shard.values())
        if n_shards > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
    replace_dir(tmp, path.rstrip("/"))
