"""The GPU code paths end to end on CPU: train.py with every Triton kernel forced through Triton's
interpreter (--kernels=interpret under TRITON_INTERPRET=1, what tensor.is_cuda does on a GPU),
through training, eval, generation, checkpoint and export, against the same run on the PyTorch
references. Integration bugs of GPU-only branches (a kernel reading a weight that sharding freed)
show up here, not first on a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, small_model

import hf


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An HF folder: 2 blocks of dim 64 (NF4 blocks divide every row), a character tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    path = tmp_path_factory.mktemp("micro")
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    model = small_model(seed=0, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=128, max_seq_len=256)
    model.args.bos_token_id, model.args.eos_token_id = 1, 2
    hf.save_pretrained(model, str(path / "base"), dtype=torch.float32, extra_files={"tokenizer.json": (path / "tokenizer.json").read_bytes()})
    return path / "base"


def launch(base, out, kernels, train_type, world, fsdp):
    args = [f"--model={base}", f"--kernels={kernels}", f"--train_type={train_type}", "--seq_len=32", "--batch_size=2",
            "--max_steps=2", "--warmup_steps=1", "--lr=1e-2", "--eval_every=1", "--eval_batches=1", "--eval_samples=2",
            "--max_new_tokens=3", "--samples=1", "--log_every=1", "--precision=fp32", "--hf_dtype=fp32", f"--out_dir={out}"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                        "train.py", *args, *(["--fsdp"] if fsdp else [])], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return rows, [line for line in r.stdout.splitlines() if line.startswith("sample:")]


CASES = [("qlora", 2, True), ("full", 1, True), ("lora", 2, False),  # the default run: one of each kind
         pytest.param("qlora", 1, True, marks=pytest.mark.slow), pytest.param("qlora", 2, False, marks=pytest.mark.slow),
         pytest.param("lora", 1, True, marks=pytest.mark.slow), pytest.param("lora", 2, True, marks=pytest.mark.slow),
         pytest.param("full", 2, True, marks=pytest.mark.slow), pytest.param("full", 2, False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("train_type,world,fsdp", CASES)
def test_triton_kernels_through_the_interpreter_train_eval_generate_and_export_like_the_references(
        micro, tmp_path, train_type, world, fsdp):
    ref_rows, ref_samples = launch(micro, tmp_path / "ref", "torch", train_type, world, fsdp)
    rows, samples = launch(micro, tmp_path / "triton", "interpret", train_type, world, fsdp)
    assert [sorted(r) for r in rows] == [sorted(r) for r in ref_rows] and len(rows) == 2 + 3  # 2 steps, 3 evals
    for got, ref in zip(rows, ref_rows):
        for k in ("loss", "eval_loss", "grad_norm"):
            if k in ref:
                assert got[k] == pytest.approx(ref[k], rel=1e-4), (k, got, ref)
    assert samples == ref_samples and len(samples) == 1
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():  # the exports (merged / gathered unit by unit) hold the same weights
        torch.testing.assert_close(hf.from_pretrained(str(tmp_path / "triton" / "hf"))(x),
                                   hf.from_pretrained(str(tmp_path / "ref" / "hf"))(x), rtol=1e-3, atol=2e-3)
