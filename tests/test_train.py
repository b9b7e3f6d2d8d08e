import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import hf
import data as D
import checkpoint as C
import fsdp as F
import model as M
import quant as Q
import build
import optim
import train

FAST = ["--seq_len=32", "--batch_size=4", "--eval_samples=0", "--samples=0", "--save_hf=false", "--log_every=1",
        "--warmup_steps=2", "--lr=1e-3", "--precision=fp32"]


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def saved_model(out_dir):
    """The model state of the newest checkpoint in out_dir (rank 0's file holds it)."""
    folder = C.latest_checkpoint(os.path.join(out_dir, "checkpoint"))
    return torch.load(os.path.join(folder, "rank0.pt"), weights_only=False)["model"]


def eval_losses(out_dir):
    return [json.loads(line)["eval_loss"] for line in open(os.path.join(out_dir, "metrics.jsonl")) if '"eval_loss"' in line]


def rows(out_dir):
    """metrics.jsonl without its timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_unknown_flag_names_the_closest_one():
    with pytest.raises(ValueError, match=r"^unknown flag --lerning_rate \(see --help\)$"):  # nothing close enough
        train.parse_args(["--lerning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown flag --seqlen; did you mean --seq_len\?"):
        train.parse_args(["--seqlen=8"])
    with pytest.raises(ValueError, match=r"flag --lr expects float, got 'fast'"):
        train.parse_args(["--lr=fast"])
    with pytest.raises(ValueError, match=r"flag --schedule=wsd is not one of cosine, linear, constant"):
        train.parse_args(["--schedule=wsd"])
    with pytest.raises(ValueError, match=r"flag --offload=true is not one of none, frozen, all"):
        train.parse_args(["--offload=true", "--fsdp"])
    with pytest.raises(ValueError, match=r"flag --offload=frozen needs --fsdp"):
        train.parse_args(["--offload=frozen"])


def test_flags_parse_into_the_config():
    cfg = train.parse_args(["--lr=2e-4", "--pack=false", "--resume", "--model=llama3-8b"])
    assert (cfg.lr, cfg.pack, cfg.resume, cfg.model) == (2e-4, False, True, "llama3-8b")


@pytest.mark.parametrize("short,flags", [("full", []), ("lora", ["--adapter=lora"]), ("dora", ["--adapter=dora"]),
                                         ("qlora", ["--adapter=lora", "--quant=nf4"]),
                                         ("qdora", ["--adapter=dora", "--quant=nf4"])])
def test_train_type_is_shorthand_for_adapter_and_quant(short, flags):
    cfg, explicit = train.parse_args([f"--train_type={short}"]), train.parse_args(flags)
    assert (cfg.adapter, cfg.quant, cfg.expand_blocks) == (explicit.adapter, explicit.quant, explicit.expand_blocks)
    assert train.parse_args(["--train_type=qlora", "--quant=hqq"]).quant == "hqq"  # nf4 only by default
    pro = train.parse_args(["--train_type=llama_pro", "--expand_blocks=2"])
    assert (pro.adapter, pro.quant, pro.expand_blocks) == ("none", "none", 2) == \
        tuple(getattr(train.parse_args(["--expand_blocks=2"]), k) for k in ("adapter", "quant", "expand_blocks"))


@pytest.mark.parametrize("flags,message", [
    (["--train_type=dora", "--quant=hqq"], r"--quant=hqq would be ignored by --train_type=dora"),
    (["--train_type=qlora", "--quant=none"], r"--train_type=qlora quantizes the base: --quant=none contradicts it"),
    (["--train_type=lora", "--adapter=dora"], r"--train_type=lora and --adapter=dora contradict each other"),
    (["--quant=nf4"], r"--quant=nf4 makes the base frozen: pass --adapter=lora or dora"),
    (["--expand_blocks=2", "--adapter=lora"], r"--expand_blocks=2 \(Llama-Pro\) trains the new blocks, not adapters"),
    (["--adapter=/tmp"], r"--adapter=/tmp is a folder: .* --adapter_path"),
])
def test_adapter_and_quant_flags_that_contradict_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(flags)


def test_adapter_and_quant_flags_train_exactly_like_their_shorthand(tmp_path):
    common = FAST + ["--max_steps=3", "--eval_frac=0"]
    train.main(common + ["--train_type=qlora", f"--out_dir={tmp_path / 'short'}"])
    train.main(common + ["--adapter=lora", "--quant=nf4", f"--out_dir={tmp_path / 'long'}"])
    assert rows(tmp_path / "short") == rows(tmp_path / "long")


def test_a_checkpoint_saved_with_train_type_resumes_under_the_two_flags():
    saved = {"config": {**dataclasses.asdict(train.Config()), "train_type": "qlora", "adapter": "", "quant": "nf4"},
             "world": 1, "inputs": {"base": "tiny"}}
    del saved["config"]["adapter_path"]  # the old layout had no such field
    C.same_run(saved, "ckpt", train.parse_args(["--adapter=lora", "--quant=nf4"]), 1, {"base": "tiny"})
    with pytest.raises(ValueError, match=r"ckpt: saved with --adapter=lora, resuming with --adapter=dora"):
        C.same_run(saved, "ckpt", train.parse_args(["--adapter=dora", "--quant=nf4"]), 1, {"base": "tiny"})


def test_command_line_errors_are_one_line():
    r = subprocess.run([sys.executable, "train.py", "--seqlen=8"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: unknown flag --seqlen; did you mean --seq_len?\n"
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--seq_len=66" in r.stdout and "tokens per row" in r.stdout


def test_schedules_follow_their_formulas():
    cfg = train.Config(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert optim.lr_at(0, cfg) == pytest.approx(0.1) and optim.lr_at(9, cfg) == pytest.approx(1.0)
    assert optim.lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optim.lr_at(110, cfg) == pytest.approx(0.1)
    cfg.schedule = "linear"
    assert optim.lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.75)
    cfg.schedule = "constant"
    assert optim.lr_at(100, cfg) == 1.0


def test_seq_len_beyond_context_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--seq_len=2048 exceeds the model's context of 1024 tokens"):
        train.main(["--seq_len=2048", f"--out_dir={tmp_path}"])


@pytest.mark.parametrize("train_type", ["full", "qdora"])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch, train_type):
    args = FAST + ["--max_steps=6", "--save_every=3", "--grad_accum=2", f"--train_type={train_type}"]
    save = C.save_checkpoint

    def keep_step_3(path, engine, opt, step, extra):
        save(path, engine, opt, step, extra)
        if step == 3:
            shutil.copytree(path, str(tmp_path / "resumed" / "checkpoint"))

    monkeypatch.setattr(C, "save_checkpoint", keep_step_3)
    train.main(args + [f"--out_dir={tmp_path / 'full'}"])
    train.main(args + [f"--out_dir={tmp_path / 'resumed'}", "--resume"])
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)
    a, b = saved_model(tmp_path / "full"), saved_model(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_data_parallel_equals_one_process_with_accumulation(tmp_path):
    args = FAST + ["--max_steps=4", "--eval_every=2"]
    train.main(args + ["--grad_accum=2", f"--out_dir={tmp_path / 'one'}"])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *args, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert all(abs(one[s] - two[s]) <= 1e-5 * abs(one[s]) for s in one), (one, two)
    a, b = saved_model(tmp_path / "one"), saved_model(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_qlora_run_on_tiny_lowers_the_loss_on_a_4bit_base(tmp_path):
    cfg = train.parse_args(["--train_type=qlora"])
    model, *_ = build.build_model(cfg, train.Dist(0, 0, 1, torch.device("cpu")))
    q_bytes, q_params, _ = Q.base_bytes(model)
    assert q_params == 2 * (4 * 128 * 128 + 3 * 128 * 344)  # every Linear of the 2 blocks (q, k, v, o; the MLP)
    assert abs(8 * q_bytes / q_params / 4.127 - 1) < 0.05
    assert type(model.lm_head) is torch.nn.Linear  # the head stays dense, as in QLoRA
    train.main(FAST + ["--train_type=qlora", "--max_steps=30", "--lr=1e-2", "--eval_every=100", "--save_hf=true",
                       f"--out_dir={tmp_path}"])
    evals = eval_losses(tmp_path)
    assert evals[-1] < evals[0] - 0.5
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    merged = hf.from_pretrained(str(tmp_path / "hf"))  # the merged export is a plain dense folder
    assert not any(isinstance(m, Q.Linear4bit) for m in merged.modules())


def test_padding_mode_trains_and_exports(tmp_path):
    train.main(FAST + ["--max_steps=3", "--pack=false", "--save_hf=true", f"--out_dir={tmp_path}"])
    m = hf.from_pretrained(str(tmp_path / "hf"))
    assert m.args.vocab_size == 320 and len(losses(tmp_path)) == 3


@pytest.mark.slow  # full fine-tuning of the 135M model; QLoRA on it runs by default
def test_fine_tune_real_checkpoint_and_reload_export(tmp_path, smollm2_dir, gsm8k_path):
    """A few full fine-tuning steps on SmolLM2 + GSM8K: loss falls, the export keeps tied weights and loads."""
    train.main([f"--model={smollm2_dir}", f"--data={gsm8k_path}", "--seq_len=256", "--batch_size=2", "--max_steps=8",
                "--lr=2e-5", "--warmup_steps=1", "--eval_every=100", "--eval_batches=2", "--eval_samples=0",
                "--samples=1", "--max_new_tokens=4", "--schedule=constant", "--loss_chunk=128", f"--out_dir={tmp_path}"])
    evals = eval_losses(tmp_path)
    assert evals[-1] < evals[0]
    m = hf.from_pretrained(str(tmp_path / "hf"))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")
    tok = D.load_tokenizer(str(tmp_path / "hf"), eos_id=m.args.eos_token_id)
    assert tok.eos_id == 2


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # what AVX2 CPUs and AMX / AVX512-BF16 CPUs get
def test_default_two_process_run_learns_arithmetic(tmp_path, precision):
    """The README's first command: `torchrun --nproc_per_node=2 train.py`."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", f"--out_dir={tmp_path}", f"--precision={precision}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 4
    assert evals[-1]["accuracy"] >= 0.9  # the README's claim: >= 90% of held-out sums exactly right


@pytest.mark.parametrize("train_type", ["full", "qlora"])  # qlora: the base in NF4
def test_real_model_answers_the_capital_of_france(smollm2_dir, capsys, train_type):
    answer = train.main([f"--model={smollm2_dir}", "--ask=What is the capital of France?", "--max_new_tokens=10",
                         f"--train_type={train_type}"])
    assert "Paris" in answer and "Paris" in capsys.readouterr().out


def test_ask_refuses_a_prompt_longer_than_the_context(smollm2_dir):
    with pytest.raises(ValueError, match=r"--ask: a prompt of \d+ tokens plus --max_new_tokens=10 exceeds the "
                                         r"context of .* \(8192 tokens\)"):
        train.main([f"--model={smollm2_dir}", "--ask=" + "word " * 9000, "--max_new_tokens=10"])


def test_short_qlora_run_on_gsm8k_lowers_loss_and_exports_match(tmp_path, smollm2_dir, gsm8k_path):
    """QLoRA on the real model and real data (ChatML, detected from the tokenizer): the held-out loss
    falls; the adapter on the NF4 base and the merged fp32 export give the same logits; ties hold."""
    train.main([f"--model={smollm2_dir}", f"--data={gsm8k_path}", "--train_type=qlora", "--seq_len=128", "--batch_size=2",
                "--max_steps=12", "--lr=1e-3", "--warmup_steps=2", "--eval_every=100", "--eval_batches=2",
                "--eval_samples=0", "--samples=0", "--lora_rank=8", "--hf_dtype=fp32", f"--out_dir={tmp_path}"])
    evals = eval_losses(tmp_path)
    assert evals[-1] < evals[0]
    import lora as L
    base = hf.from_pretrained(smollm2_dir, prepare=Q.quantize_model)
    L.load_adapter(base, str(tmp_path / "adapter"))
    merged = hf.from_pretrained(str(tmp_path / "hf"))
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert base.lm_head.weight is base.model.embed_tokens.weight
    x = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), base(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "sharded"])
def test_a_save_killed_halfway_leaves_the_previous_checkpoint_to_resume_from(tmp_path, monkeypatch, fsdp):
    """The save at step 4 dies after writing half a rank file: the step-2 checkpoint is still the
    current one, and resuming from it gives the uninterrupted run's steps 3 and 4."""
    args = FAST + ["--max_steps=4", "--save_every=2", "--train_type=lora"] + (["--fsdp"] if fsdp else [])
    train.main(args + [f"--out_dir={tmp_path / 'whole'}"])
    save = torch.save

    def dies_at_step_4(obj, f, *a, **kw):
        if "step-00000004" in str(f):
            open(f, "wb").write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed during the save")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(F.torch, "save", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + [f"--out_dir={tmp_path / 'killed'}"])
    monkeypatch.setattr(F.torch, "save", save)
    assert C.latest_checkpoint(str(tmp_path / "killed" / "checkpoint")).endswith("step-00000002")
    train.main(args + [f"--out_dir={tmp_path / 'killed'}", "--resume"])
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert resumed[3] == whole[3] and resumed[4] == whole[4]
    assert C.latest_checkpoint(str(tmp_path / "killed" / "checkpoint")).endswith("step-00000004")


def test_precision_auto_trains_in_bf16_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    cfg = train.Config()
    for native in (True, False):
        monkeypatch.setattr(build, "native_bf16_cpu", lambda: native)
        assert build.uses_bf16(cfg, "cpu") is native
        assert build.uses_bf16(train.Config(precision="fp32"), "cpu") is False
        assert build.uses_bf16(train.Config(precision="bf16"), "cpu") is True


def test_llama_pro_trains_only_the_new_blocks_and_exports_a_deeper_hf_folder(tmp_path):
    train.main(FAST + ["--train_type=llama_pro", "--expand_blocks=2", "--max_steps=3", "--lr=1e-2", "--save_hf=true",
                       "--hf_dtype=fp32", f"--out_dir={tmp_path}"])
    cfg = train.parse_args(FAST + ["--train_type=llama_pro", "--expand_blocks=2"])
    original, *_ = build.build_model(dataclasses.replace(cfg, expand_blocks=0),
                                       train.Dist(0, 0, 1, torch.device("cpu")))
    exported = hf.from_pretrained(str(tmp_path / "hf"))
    assert exported.args.n_layers == 4
    new = exported.state_dict()
    for i, j in enumerate([0, 2]):  # the original 2 blocks sit at 0 and 2 and did not change
        for k, v in original.model.layers[i].state_dict().items():
            assert torch.equal(new[f"model.layers.{j}.{k}"], v), (j, k)
    for j in (1, 3):  # the new ones trained away from their zero start
        assert new[f"model.layers.{j}.self_attn.o_proj.weight"].abs().sum() > 0
    assert torch.equal(new["lm_head.weight"], original.lm_head.weight)


def test_offloaded_activations_train_exactly_like_kept_ones(tmp_path):
    args = FAST + ["--max_steps=3", "--grad_checkpointing", "--train_type=lora"]
    train.main(args + [f"--out_dir={tmp_path / 'kept'}"])
    train.main(args + ["--offload_activations", f"--out_dir={tmp_path / 'offloaded'}"])
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
              for d in ("kept", "offloaded")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_the_plan_moves_offloaded_activations_to_the_cpu():
    import plan as P
    import lora as L
    with torch.device("meta"):
        model = M.Llama(M.MODELS["tinyllama-1.1b"])
    L.add_lora(model, rank=8, alpha=16)  # a frozen base: activations decide the peak
    common = dict(batch_size=4, seq_len=4096, checkpointing=True, param_bytes=2)
    kept, _ = P.plan_memory(model, 1, **common)
    gpu, cpu = P.plan_memory(model, 1, **common, offload_activations=True)
    per_block = 4 * 4096 * 2 * model.args.dim  # one bf16 block input
    assert cpu["activations"] == model.args.n_layers * per_block
    assert kept["total"] - gpu["total"] >= (model.args.n_layers - 1) * per_block  # all but the one being recomputed


def test_offload_activations_without_checkpointing_or_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="--offload_activations moves the block inputs that --grad_checkpointing keeps"):
        train.parse_args(["--offload_activations", "--grad_checkpointing=none"])  # (auto recomputes with it)
    with pytest.raises(ValueError, match="--offload_activations does not save memory under --fsdp yet"):
        train.parse_args(["--offload_activations", "--grad_checkpointing", "--fsdp"])


def test_auto_precision_is_fp32_where_aten_runs_avx2_kernels_even_on_a_bf16_cpu(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU, reproduced) emulates bf16 in every kernel: auto
    must train in fp32 there, as it would on that CPU, not in an emulated bf16 5-10x slower."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    cfg = train.Config(precision="auto")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert build.amp_dtype(cfg, "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert build.amp_dtype(cfg, "cpu") is None
    assert build.amp_dtype(train.Config(precision="bf16"), "cpu") == torch.bfloat16  # asked for: given


def test_both_engines_implement_the_engine_interface_with_its_signatures():
    import inspect
    import ddp
    import distributed
    methods = [n for n, f in vars(distributed.Engine).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert len(methods) == 10
    for engine in (ddp.Replicated, F.Sharded):
        for name in methods:
            want = list(inspect.signature(getattr(distributed.Engine, name)).parameters)
            assert list(inspect.signature(getattr(engine, name)).parameters) == want, (engine.__name__, name)
        assert isinstance(engine.lockstep, bool)


def test_grad_checkpointing_auto_recomputes_only_where_the_activations_do_not_fit(tmp_path, monkeypatch, capsys):
    import plan
    assert [train.parse_args(a).grad_checkpointing for a in ([], ["--grad_checkpointing"], ["--grad_checkpointing=false"],
                                                               ["--grad_checkpointing=none"])] == ["auto", "full", "none", "none"]
    args = FAST + ["--max_steps=2", "--seq_len=256", "--batch_size=8", "--eval_frac=0"]
    d = train.Dist(0, 0, 1, torch.device("cpu"))
    kept = build.check_memory(train.parse_args(args + ["--grad_checkpointing=none"]), d)
    assert kept == (False, None)  # this machine holds the tiny model's activations: auto recomputes nothing
    cfg = train.parse_args(args)
    model = build.meta_model(cfg, None)
    without, _ = plan.plan_run(model, cfg, 1, None, checkpointing=False)
    with_, _ = plan.plan_run(model, cfg, 1, None, checkpointing=True)
    assert with_["total"] < without["total"]
    budget = (with_["total"] + without["total"]) // 2  # a machine where only recomputing fits
    monkeypatch.setattr(plan, "available_bytes", lambda device, local_world=1: (None, budget))
    train.main(args + [f"--out_dir={tmp_path / 'auto'}"])
    assert "--grad_checkpointing=auto: full" in capsys.readouterr().out
    train.main(args + ["--grad_checkpointing=full", f"--out_dir={tmp_path / 'full'}"])
    assert rows(tmp_path / "auto") == rows(tmp_path / "full")


def test_expand_blocks_with_an_adapter_shorthand_names_both_flags():
    with pytest.raises(ValueError, match=r"flags --train_type=lora and --expand_blocks=2 contradict each other"):
        train.parse_args(["--train_type=lora", "--expand_blocks=2"])
