"""DPO (dpo.DPO, data.PairBatches, model.row_logprobs, lora.adapters_disabled) against
its formula written out, its starting point, and the trainer's resume and accumulation."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, small_model

import hf
import data as D
import ddp
import dpo
import lora as L
import train

FAST = ["--objective=dpo", "--train_type=lora", "--seq_len=48", "--batch_size=2", "--eval_frac=0.2", "--eval_batches=2",
        "--samples=0", "--save_hf=false", "--log_every=1", "--warmup_steps=1", "--lr=1e-2", "--precision=fp32",
        "--eval_every=100"]


def pairs_file(tmp_path, n=20):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7, i % 5
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return str(path)


def a_batch(tmp_path, n_pairs=3, pack=False, seq_len=48):
    tok = D.ByteTokenizer()
    data = D.in_memory(D.pair_records(D.read_records(pairs_file(tmp_path))), tok)
    return next(iter(D.PairBatches(data, range(n_pairs), seq_len, n_pairs, tok.pad_id, pack=pack, shuffle=False)))


def dpo_loss(model, batch, beta, reference=None):
    """Through the engine, as the trainer runs it: prepare (the reference), then the policy's head."""
    engine = ddp.Replicated(model, train.Dist(0, 0, 1, torch.device("cpu")))
    loss_fn = dpo.DPO(beta, reference)
    loss, n = engine.forward_backward(batch, loss_fn=loss_fn)
    return loss, n, loss_fn


def lora_model(seed=0):
    base = small_model(seed=seed, vocab_size=260)
    model = copy.deepcopy(base)
    L.add_lora(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(1))
    return base, model


def written_out_logps(model, batch):
    """Full logits, log-softmax, the label tokens' log-probabilities summed per row."""
    logits = model(batch["input_ids"], position_ids=batch["position_ids"]).float()
    logp = F.log_softmax(logits, dim=-1)
    keep = batch["labels"] != -100
    picked = logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(dim=1)


def test_dpo_loss_equals_the_formula_written_out(tmp_path):
    base, model = lora_model()
    with torch.no_grad():  # move the adapters off zero so the policy differs from the reference
        for _, m in L.lora_layers(model):
            m.lora_B.weight.normal_(std=0.3)
    batch = a_batch(tmp_path)
    beta = 0.5
    loss, n, _ = dpo_loss(model, batch, beta)
    pi, ref = written_out_logps(model, batch), written_out_logps(base, batch)
    margin = beta * ((pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2]))
    want = -F.logsigmoid(margin).sum()
    assert n == 3
    assert_close(loss, want)
    assert abs(loss.item() - 3 * math.log(2)) > 1e-3  # the policy has moved away from the reference
    assert not torch.allclose(pi, ref)


def test_packed_pairs_give_the_loss_and_gradients_of_one_padded_answer_per_row(tmp_path):
    _, model = lora_model()
    with torch.no_grad():
        for _, m in L.lora_layers(model):
            m.lora_B.weight.normal_(std=0.3)
    padded, packed = a_batch(tmp_path, 4), a_batch(tmp_path, 4, pack=True, seq_len=64)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # answers share rows
    assert packed["num_pairs"] == padded["num_pairs"] == 4
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, n, loss_fn = dpo_loss(model, batch, 0.5)
        results.append((loss, loss_fn.sums, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (a, sums_a, grads_a), (b, sums_b, grads_b) = results
    assert_close(a, b)
    terms = 0.5 * written_out_logps(model, padded).abs().sum().item()  # rewards: beta x differences of these
    for x, y, name in zip(sums_a, sums_b, ("pairs", "correct", "margin", "chosen", "rejected")):
        assert_close(x, y, scale=terms if name in ("margin", "chosen", "rejected") else None, msg=name)
    for x, y in zip(grads_a, grads_b):
        assert_close(x, y)


def test_at_step_0_the_rewards_are_zero_and_the_loss_is_log_2(tmp_path):
    _, model = lora_model()  # fresh adapters: B = 0, the policy is the reference
    loss, n, loss_fn = dpo_loss(model, a_batch(tmp_path), 0.1)
    assert loss.item() / n == pytest.approx(math.log(2), abs=1e-6)
    assert loss_fn.sums[2:] == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)  # margin, chosen and rejected rewards


def test_the_reference_under_lora_is_the_base_model(tmp_path):
    base, model = lora_model()
    with torch.no_grad():
        for _, m in L.lora_layers(model):
            m.lora_B.weight.normal_(std=0.3)
    ids = a_batch(tmp_path)["input_ids"]
    with L.adapters_disabled(model):
        assert_close(model(ids), base(ids), ulps=0)  # the same operations: bit for bit
    assert not torch.allclose(model(ids), base(ids), atol=1e-3)  # and the adapters are back afterwards


def losses(out_dir, key="loss"):
    return [json.loads(line)[key] for line in open(os.path.join(out_dir, "metrics.jsonl")) if f'"{key}"' in line]


def test_a_dpo_run_logs_rewards_and_accumulates_and_resumes_like_one_batch(tmp_path):
    data = f"--data={pairs_file(tmp_path)}"
    train.main(FAST + [data, "--max_steps=4", "--batch_size=4", f"--out_dir={tmp_path / 'one'}"])
    train.main(FAST + [data, "--max_steps=4", "--grad_accum=2", "--save_every=2", f"--out_dir={tmp_path / 'accum'}"])
    train.main(FAST + [data, "--max_steps=2", "--grad_accum=2", f"--out_dir={tmp_path / 'resumed'}"])
    train.main(FAST + [data, "--max_steps=4", "--grad_accum=2", "--resume", f"--out_dir={tmp_path / 'resumed'}"])
    one = losses(tmp_path / "one")
    assert one[0] == pytest.approx(math.log(2), abs=1e-6) and len(one) == 4
    assert losses(tmp_path / "accum") == pytest.approx(one, rel=1e-5)
    assert losses(tmp_path / "resumed") == pytest.approx(one, rel=1e-5)
    rows = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert all(0 <= r["reward_accuracy"] <= 1 and "reward_margin" in r for r in rows if "loss" in r)
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_reward_accuracy"] == 0.0 and "eval_chosen_reward" in evals[-1]


def test_dpo_without_a_pairs_file_or_with_a_bad_record_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="--objective=dpo needs --data=<file of preference pairs>"):
        train.parse_args(["--objective=dpo"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a preference record needs 'chosen' and 'rejected' "
                                         r"\(and 'prompt' or 'messages' unless they are message lists\), got \['chosen', 'prompt'\]"):
        train.main(FAST + [f"--data={bad}", "--max_steps=1", f"--out_dir={tmp_path / 'o'}"])


def test_dry_run_counts_the_frozen_reference_of_full_fine_tuning_sharded_under_fsdp(capsys):
    base = ["--dry_run", "--model=llama2-7b", "--batch_size=1", "--seq_len=512", "--precision=bf16"]
    train.main(base)
    plain = capsys.readouterr().out
    train.main(base + ["--objective=dpo", "--data=pairs.jsonl"])
    out = capsys.readouterr().out
    gib = lambda text, key: float(text.split(key)[1].split("GiB")[0])  # noqa: E731
    params = 6738415616  # Llama-2-7B
    fp32 = 32000 * 4096 + (2 * 32 + 1) * 4096  # its embedding and norms stay fp32 in the plain copy, as in the policy
    copy = (params - fp32) * 2 + fp32 * 4
    assert gib(out, "reference model") == pytest.approx(copy / 2**30, abs=0.01)
    assert gib(out, "total") == pytest.approx(gib(plain, "total") + copy / 2**30, abs=0.02)
    train.main(base + ["--objective=dpo", "--data=pairs.jsonl", "--fsdp", "--plan_world=8"])
    assert gib(capsys.readouterr().out, "reference model") == pytest.approx(params * 2 / 8 / 2**30, abs=0.01)  # sharded


def test_the_planned_reference_bytes_are_what_the_built_reference_holds():
    import build
    cfg = train.Config(objective="dpo", precision="bf16")
    d = train.Dist(0, 0, 1, torch.device("cpu"))
    for fsdp in (False, True):
        cfg.fsdp = fsdp
        model, _, _, load = build.build_model(cfg, d)
        held = build.dpo_reference(cfg, d, model, streamed=load is not None).held_bytes()
        planned = build.reference_bytes(build.meta_model(cfg, torch.bfloat16), cfg, torch.bfloat16)
        assert planned == held  # world 1: the shards are whole, no padding


def hf_folder(tmp_path):
    """A tiny HF folder with a character tokenizer (ids 3.. for printable characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = {chr(i): i - 29 for i in range(32, 127)}
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **chars}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = small_model(seed=0, vocab_size=100, tie_embeddings=True)  # as SmolLM2
    model.args.bos_token_id, model.args.eos_token_id = 1, 2
    hf.save_pretrained(model, str(tmp_path / "base"), dtype=torch.float32, extra_files={"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()})
    return tmp_path / "base"


def test_full_fine_tuning_dpo_under_fsdp_streams_a_sharded_reference_and_gives_the_plain_losses(tmp_path):
    args = FAST + [f"--data={pairs_file(tmp_path)}", "--train_type=full", "--lr=1e-3", "--max_steps=3",
                   f"--model={hf_folder(tmp_path)}"]
    train.main(args + [f"--out_dir={tmp_path / 'plain'}"])
    train.main(args + ["--fsdp", f"--out_dir={tmp_path / 'fsdp'}"])
    plain = losses(tmp_path / "plain")
    assert plain[-1] != pytest.approx(math.log(2), abs=1e-3)  # it moved away from the reference
    assert losses(tmp_path / "fsdp") == pytest.approx(plain, rel=1e-5)
    assert losses(tmp_path / "fsdp", "reward_margin") == pytest.approx(losses(tmp_path / "plain", "reward_margin"),
                                                                      rel=1e-4, abs=1e-6)


def test_the_full_fine_tuning_reference_in_bf16_equals_the_policy_at_step_0(tmp_path):
    """The frozen copy holds bf16 weights where the policy computes in bf16, so at step 0 every reward
    is exactly 0: plain and sharded, a copied preset (tied embeddings) and a streamed folder."""
    args = [a if a != "--precision=fp32" else "--precision=bf16" for a in FAST]
    args += [f"--data={pairs_file(tmp_path)}", "--train_type=full", "--max_steps=1"]
    for i, extra in enumerate(([], ["--fsdp"], [f"--model={hf_folder(tmp_path)}"], [f"--model={hf_folder(tmp_path)}", "--fsdp"])):
        train.main(args + extra + [f"--out_dir={tmp_path / str(i)}"])
        step0 = [json.loads(line) for line in open(tmp_path / str(i) / "metrics.jsonl")][0]
        assert step0["eval_loss"] == pytest.approx(math.log(2), abs=1e-7), extra
        assert step0["eval_reward_margin"] == 0.0 and step0["eval_chosen_reward"] == 0.0, extra


@pytest.mark.slow
@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_dpo_under_fsdp_at_world_2_gives_the_data_parallel_losses(tmp_path, train_type):
    import subprocess
    import sys
    from conftest import ROOT
    args = ["train.py", *FAST, f"--data={pairs_file(tmp_path)}", "--max_steps=3", "--eval_every=2",
            f"--train_type={train_type}", *(["--lr=1e-3"] if train_type == "full" else [])]
    for name, extra in (("dp", []), ("fsdp", ["--fsdp"])):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                            *extra, f"--out_dir={tmp_path / name}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "dp"), rel=1e-5)
    assert losses(tmp_path / "fsdp", "eval_loss") == pytest.approx(losses(tmp_path / "dp", "eval_loss"), rel=1e-5)
    assert losses(tmp_path / "fsdp", "reward_margin") == pytest.approx(losses(tmp_path / "dp", "reward_margin"), rel=1e-4, abs=1e-6)


def test_full_fine_tuning_dpo_resumes_against_the_starting_model(tmp_path):
    """The frozen reference is the model before training, also after --resume (not the checkpoint)."""
    args = FAST + [f"--data={pairs_file(tmp_path)}", "--train_type=full", "--lr=1e-3"]
    train.main(args + ["--max_steps=4", f"--out_dir={tmp_path / 'straight'}"])
    train.main(args + ["--max_steps=2", f"--out_dir={tmp_path / 'resumed'}"])
    train.main(args + ["--max_steps=4", "--resume", f"--out_dir={tmp_path / 'resumed'}"])
    straight = losses(tmp_path / "straight")
    assert straight[-1] != pytest.approx(math.log(2), abs=1e-3)  # it moved away from the reference
    assert losses(tmp_path / "resumed") == pytest.approx(straight, rel=1e-5)


def test_answer_log_probabilities_go_through_the_head_a_chunk_of_tokens_at_a_time():
    from conftest import bench, small_model
    cpu_allocation_peak = bench("memory").cpu_allocation_peak
    m = small_model(vocab_size=2048)
    T, chunk = 512, 64
    x = torch.randn(1, T, 32, requires_grad=True)
    labels = torch.randint(0, 2048, (1, T))
    labels[0, :100] = -100  # a prompt
    seq = torch.zeros(1, T, dtype=torch.long)
    seq[0, 300:] = 1  # two answers in the row
    want = torch.log_softmax(m.lm_head(m.model.norm(x)).float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = torch.stack([want[0, 100:300].sum(), want[0, 300:].sum()])
    import model as M
    got = M.row_logprobs(m, x, labels, seq, 2, chunk=chunk)
    assert_close(got, want, scale=want.abs().max().item())
    cpu_allocation_peak(lambda: M.row_logprobs(m, x, labels, seq, 2, chunk=chunk))  # the first profile's own setup
    peak = cpu_allocation_peak(lambda: M.row_logprobs(m, x, labels, seq, 2, chunk=chunk).sum().backward())
    assert peak < T * 2048 * 4  # under one row's fp32 logits: a chunk's, three times over at most
