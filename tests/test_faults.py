"""Faults and bad input: nothing silent, nothing lost. Each test provokes one fault and checks the
one-line error (or the correct handling) the trainer gives it."""
import dataclasses
import json
import math
import os

import pytest
import torch

import hf
import checkpoint as C
import ddp
import fsdp as F
import optim as O
import train

FAST = ["--seq_len=32", "--batch_size=4", "--eval_samples=0", "--samples=0", "--save_hf=false", "--log_every=1",
        "--warmup_steps=2", "--lr=1e-3", "--precision=fp32", "--eval_every=100"]


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"^step (\d+): the (loss|gradient norm) is (nan|inf); stopped without saving") as e:
        train.main(FAST + ["--lr=1e20", "--grad_clip=0", "--max_steps=6", "--save_every=1", f"--out_dir={tmp_path}"])
    bad_step = int(e.value.args[0].split(":")[0].split()[1])
    folder = C.latest_checkpoint(str(tmp_path / "checkpoint"))
    assert folder.endswith(f"step-{bad_step - 1:08d}")  # the state before the bad step, never the bad one
    state = torch.load(os.path.join(folder, "rank0.pt"), weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows(tmp_path) if "loss" in r)


def poison(monkeypatch, steps):
    """Make the loss of the given (1-based) optimizer steps NaN, as a bad batch would."""
    real, calls = ddp.Replicated.forward_backward, {"n": 0}

    def forward_backward(self, batch, loss_scale=1.0, sync=True, loss_fn=None):
        calls["n"] += 1
        loss, n = real(self, batch, loss_scale, sync, loss_fn)
        return (loss * float("nan") if calls["n"] in steps else loss), n
    monkeypatch.setattr(ddp.Replicated, "forward_backward", forward_backward)


def test_nan_policy_skip_drops_the_bad_step_and_counts_it(tmp_path, monkeypatch):
    poison(monkeypatch, {2})
    train.main(FAST + ["--max_steps=4", "--nan_policy=skip", f"--out_dir={tmp_path}"])
    steps = [r for r in rows(tmp_path) if "eval_loss" not in r]
    assert [(r["step"], "skipped" in r) for r in steps] == [(1, False), (2, True), (3, False), (4, False)]


def test_nan_policy_skip_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    poison(monkeypatch, {2, 3, 4})
    with pytest.raises(ValueError, match=r"^step 4: the loss is nan for 3 steps in a row; stopped without saving"):
        train.main(FAST + ["--max_steps=6", "--nan_policy=skip", "--nan_skips=2", f"--out_dir={tmp_path}"])


def test_a_used_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    train.main(FAST + ["--max_steps=2", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=rf"^--out_dir={tmp_path} holds a previous run \(checkpoint, metrics.jsonl\): "
                                         r"pass --resume to continue it or --overwrite to replace it$"):
        train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    train.main(FAST + ["--max_steps=1", "--overwrite", f"--out_dir={tmp_path}"])
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1]
    assert C.latest_checkpoint(str(tmp_path / "checkpoint")).endswith("step-00000001")


def test_resume_below_the_saved_step_is_refused_in_one_line(tmp_path):
    train.main(FAST + ["--max_steps=3", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"^--max_steps=2 is below the step of the checkpoint in .* \(3\); pass --max_steps"):
        train.main(FAST + ["--max_steps=2", "--resume", f"--out_dir={tmp_path}"])


def test_metrics_after_a_resume_hold_each_step_once(tmp_path, monkeypatch):
    """Killed after step 4 with the last checkpoint at step 2: the resumed run rewrites steps 3-4."""
    args = FAST + ["--max_steps=5", "--save_every=2", f"--out_dir={tmp_path}"]
    save = torch.save

    def dies_at_step_4(obj, f, *a, **kw):
        if "step-00000004" in str(f):
            raise KeyboardInterrupt("killed")
        return save(obj, f, *a, **kw)
    monkeypatch.setattr(F.torch, "save", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(F.torch, "save", save)
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    train.main(args + ["--resume"])
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("record, field, got", [({"text": None}, "text", "null"),
                                                 ({"instruction": "a", "output": None}, "output", "null"),
                                                 ({"instruction": "a", "output": ["x", "y"]}, "output", "list"),
                                                 ({"instruction": 3, "output": "b"}, "instruction", "int"),
                                                 ({"prompt": "a", "completion": 1.5}, "completion", "float")])
def test_a_null_or_wrongly_typed_field_is_an_error_naming_the_record(tmp_path, record, field, got):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: field '{field}' must be a string, got {got}$"):
        train.main(FAST + ["--max_steps=1", f"--data={path}", f"--out_dir={tmp_path / 'out'}"])


@pytest.mark.parametrize("flag, message", [("--eval_frac=1.5", "must be in [0, 1), got 1.5"),
                                            ("--eval_frac=-0.5", "must be in [0, 1), got -0.5"),
                                            ("--eval_batches=0", "must be at least 1, got 0"),
                                            ("--lr=nan", "must be a positive finite number, got nan"),
                                            ("--threads=-1", "must be at least 0, got -1")])
def test_out_of_range_numbers_are_refused_when_parsed(flag, message):
    with pytest.raises(ValueError, match=rf"^flag {flag.split('=')[0]} {message.replace('[', '.').replace(')', '.')}$"):
        train.parse_args([flag])


def test_a_text_file_is_split_into_paragraphs_so_the_default_eval_works(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: " + "words and more words. " * 3 for i in range(40)) + "\n")
    train.main(FAST + ["--max_steps=2", f"--data={path}", f"--out_dir={tmp_path / 'out'}"])
    evals = [r for r in rows(tmp_path / "out") if "eval_loss" in r]
    assert len(evals) == 2 and all(math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in evals)


def test_exported_weights_are_readable_by_everyone_like_the_rest_of_the_folder(tmp_path):
    train.main(FAST + ["--max_steps=1", "--save_hf=true", f"--out_dir={tmp_path}"])
    modes = {f: os.stat(tmp_path / "hf" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "hf")}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644, modes


def test_data_whose_prompts_fill_seq_len_stops_with_the_reason(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p" * 60 + str(i), "completion": "ok"}) + "\n" for i in range(200)))
    # (with a held-out set the step-0 eval refuses first: test_a_held_out_set_without_a_trainable_token_...)
    with pytest.raises(ValueError, match=r"^step 1: no trainable token in this step's batches \(200 of 200 documents have "
                                         r"none within --seq_len=32: their prompts fill the row\)"):
        train.main(FAST + ["--max_steps=2", "--eval_frac=0", f"--data={path}", f"--out_dir={tmp_path / 'out'}"])
    assert "200 documents with no trainable token within --seq_len" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ("--batch_size=2", r"saved with a global batch of 4 rows \(--batch_size x --grad_accum x world\), resuming with 2"),
    ("--seq_len=48", r"saved with --seq_len=32, resuming with --seq_len=48; it must match"),
    ("--lora_rank=4", r"saved with --lora_rank=8, resuming with --lora_rank=4; it must match")])
def test_resume_with_settings_the_checkpoint_depends_on_changed_is_refused(tmp_path, change, message):
    args = FAST + ["--train_type=lora", f"--out_dir={tmp_path}"]
    train.main(args + ["--max_steps=1"])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/checkpoint/step-00000001: {message}"):
        train.main(args + ["--max_steps=2", "--resume", change])
    train.main(args + ["--max_steps=2", "--resume", "--lr=5e-4", "--eval_every=1"])  # these may change


def test_resume_onto_another_base_model_is_refused(tmp_path):
    from conftest import small_model
    for seed in (0, 1):
        hf.save_pretrained(small_model(seed=seed), str(tmp_path / f"m{seed}"), dtype=torch.float32)
    a, b = C.base_fingerprint(str(tmp_path / "m0")), C.base_fingerprint(str(tmp_path / "m1"))
    assert a != b and a == C.base_fingerprint(str(tmp_path / "m0"))
    cfg = train.Config(model=str(tmp_path / "m1"))
    saved = {"config": dataclasses.asdict(cfg), "world": 1, "base": a}
    with pytest.raises(ValueError, match=rf"^ckpt: saved from another base model than --model={tmp_path}/m1 "):
        C.same_run(saved, "ckpt", cfg, 1, {"base": b})


def test_resume_checks_the_data_contents_tokenizer_chat_format_and_objective(tmp_path, hf_folder):
    records = [{"text": f"SAY {w} {w} {w}."} for w in "ABCDEFGHIJKLMNOPQRSTUVWX"]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    args = FAST + [f"--model={hf_folder}", f"--data={data}", "--max_steps=2", "--chat_format=auto",
                   f"--out_dir={tmp_path / 'run'}"]
    train.main(args)
    data.write_text(json.dumps(records[::-1]))  # the same size, shuffled: another plan
    with pytest.raises(ValueError, match=r"checkpoint/step-00000002: saved from other contents of --data=.*d\.json"):
        train.main(args + ["--resume", "--max_steps=3"])
    data.write_text(json.dumps(records))
    other = tmp_path / "other_tok"
    other.mkdir()
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<unk>"], tok["model"]["vocab"]["!"] = tok["model"]["vocab"]["!"], 0  # two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"saved from another tokenizer than"):
        train.main(args + ["--resume", "--max_steps=3", f"--tokenizer={other}"])
    with pytest.raises(ValueError, match=r"saved from chat format alpaca, resuming with chatml"):
        train.main(args + ["--resume", "--max_steps=3", "--chat_format=chatml"])
    train.main(args + ["--resume", "--max_steps=3"])  # the same inputs: resumes
    saved = {"config": dataclasses.asdict(train.Config()), "world": 1}
    with pytest.raises(ValueError, match=r"^ckpt: saved with --objective=sft, resuming with --objective=dpo"):
        C.same_run(saved, "ckpt", train.Config(objective="dpo"), 1, {})


@pytest.fixture
def hf_folder(tmp_path):
    """A small HF folder with a character tokenizer, to break in different ways."""
    from conftest import small_model
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{chr(i): i - 30 for i in range(32, 79)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf.save_pretrained(small_model(seed=0), str(tmp_path / "base"), dtype=torch.float32,
                      extra_files={"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()})
    return tmp_path / "base"


@pytest.mark.parametrize("broken, message", [
    ("config.json", r"config.json: not valid JSON \(Expecting property name"),
    ("model.safetensors", r"model.safetensors: not a readable safetensors file"),
    ("tokenizer.json", r"tokenizer.json: not a readable tokenizer.json")])
def test_a_corrupt_model_folder_file_is_a_one_line_error_naming_it(hf_folder, tmp_path, broken, message):
    path = hf_folder / broken
    path.write_bytes(path.read_bytes()[:40] if broken == "model.safetensors" else b"{not json")
    with pytest.raises(ValueError, match=rf"^{hf_folder}/{message}"):
        train.main(FAST + ["--max_steps=1", f"--model={hf_folder}", f"--out_dir={tmp_path / 'out'}"])


def test_a_garbage_checkpoint_file_is_a_one_line_error_naming_it(tmp_path):
    train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    rank0 = tmp_path / "checkpoint" / "step-00000001" / "rank0.pt"
    rank0.write_bytes(rank0.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=rf"^{rank0}: not a readable checkpoint \("):
        train.main(FAST + ["--max_steps=2", "--resume", f"--out_dir={tmp_path}"])


def test_non_utf8_data_and_an_out_dir_that_is_a_file_are_one_line_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"^{data}:2: not UTF-8 text \(byte 0xe9\)$"):
        train.main(FAST + ["--max_steps=1", f"--data={data}", f"--out_dir={tmp_path / 'out'}"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out_dir=.*file is a file, expected a folder"):
        train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path / 'file'}"])


def test_a_frozen_rank_ends_the_job_after_timeout_with_one_line_naming_the_step(tmp_path):
    """Rank 1 is stopped (SIGSTOP, as a stuck GPU or a swapped-out host would be) after step 1:
    rank 0's next collective gives up after --timeout seconds with one line, instead of hanging."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                             *FAST, "--max_steps=100000", "--timeout=4", f"--out_dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def rank_pids():
        pids = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            if str(tmp_path).encode() in cmd and b"train.py" in cmd and not cmd.startswith(sys.executable.encode() + b"\0-m"):
                rank = [e for e in env if e.startswith(b"RANK=")]
                if rank:
                    pids[int(rank[0][5:])] = int(pid)
        return pids

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(tmp_path / "metrics.jsonl")
                                              and '"loss"' in open(tmp_path / "metrics.jsonl").read()):
            time.sleep(0.2)
        pids = rank_pids()
        os.kill(pids[1], signal.SIGSTOP)
        while time.time() < deadline and os.path.exists(f"/proc/{pids[0]}") and \
                open(f"/proc/{pids[0]}/stat").read().split()[2] != "Z":
            time.sleep(0.2)
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: step ") and "--timeout=4 s" in lines[0], err[-2000:]
    assert "Traceback" not in err.split("error: step")[0][-300:]


def test_an_out_dir_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores modes: use a read-only mount instead
        folder = "/sys/kernel/fine-tune-out"
        try:
            os.mkdir(folder)
            os.rmdir(folder)
            pytest.skip("no read-only folder available to this user")
        except OSError:
            pass
    with pytest.raises(ValueError, match=rf"^--out_dir={folder}: cannot write there \("):
        train.main(FAST + ["--max_steps=1", f"--out_dir={folder}"])


def full_disk(monkeypatch, module, name, after=0):
    """The `after`+1-th call of module.name writes half a file, then fails as a full disk does."""
    real, calls = getattr(module, name), {"n": 0}

    def write(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] <= after:
            return real(obj, path, *a, **kw)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(module, name, write)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    full_disk(monkeypatch, torch, "save", after=1)  # the save at step 2 succeeds, the one at step 4 fails
    with pytest.raises(ValueError, match=r"step-00000004\.tmp: could not write the checkpoint of step 4 \(OSError: "
                                         r".*No space left on device\); removed it, the previous checkpoint is kept"):
        train.main(FAST + ["--max_steps=4", "--save_every=2", f"--out_dir={tmp_path}"])
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-00000002"]
    monkeypatch.undo()
    train.main(FAST + ["--max_steps=4", "--save_every=2", "--resume", f"--out_dir={tmp_path}"])  # resumes from step 2
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("train_type,folder", [("full", "hf"), ("lora", "adapter")])
def test_a_full_disk_during_an_export_leaves_no_half_folder(tmp_path, monkeypatch, train_type, folder):
    import safetensors.torch
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "earlier.txt").write_text("an earlier export")  # must survive the failed one
    full_disk(monkeypatch, safetensors.torch, "save_file")
    with pytest.raises(ValueError, match=rf"{folder}: could not write it \(OSError: .*No space left on device\); "
                                         rf"removed .*{folder}\.tmp, nothing was replaced"):
        train.main(FAST + ["--max_steps=1", "--save_hf=true", f"--train_type={train_type}", f"--out_dir={tmp_path}"])
    assert not (tmp_path / f"{folder}.tmp").exists() and (tmp_path / folder / "earlier.txt").exists()


def patched_run_at_world_2(tmp_path, patch, args, timeout=240):
    """torchrun --nproc_per_node=2 train.py with `patch` (Python source, e.g. a failing write on
    one rank) applied first in each process; one-line errors as train.py's __main__ prints them."""
    import subprocess
    import sys
    from conftest import ROOT
    script = tmp_path / "run.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n{patch}\nimport train\n"
                      "try:\n    train.main(sys.argv[1:])\nexcept ValueError as e:\n"
                      "    print(f'error: {e}', file=sys.stderr)\n    sys.exit(2)\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_a_full_disk_on_one_rank_of_a_sharded_save_stops_every_rank_with_the_same_line(tmp_path):
    """Rank 1's torch.save fails at the second save; rank 0's succeeded: both learn it from the
    same all-reduce (no rank waits for the other forever), and the step-2 checkpoint stays."""
    r = patched_run_at_world_2(tmp_path, """import torch
real, calls = torch.save, [0]
def save(obj, path, *a, **kw):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
    return real(obj, path, *a, **kw)
torch.save = save""", [*FAST, "--fsdp", "--max_steps=4", "--save_every=2", f"--out_dir={tmp_path / 'out'}"])
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(lines) == 2 and all(
        "step-00000004.tmp: could not write the checkpoint of step 4" in line for line in lines), r.stderr[-2000:]
    assert any("on another rank" in line for line in lines) and any("file write failed" in line for line in lines)
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint")) == ["step-00000002"]


def test_loss_scaler_halves_on_overflow_grows_after_good_steps_and_hands_over_at_one():
    s = O.LossScaler(True, scale=8.0, interval=3)
    assert [s.overflowed(g) for g in (1.0, math.inf, 1.0, 1.0, 1.0)] == [False, True, False, False, False]
    assert s.scale == 8.0  # 8 -> 4 at the overflow, -> 8 after three good steps
    for _ in range(3):
        assert s.overflowed(math.nan)
    assert s.scale == 1.0 and not s.overflowed(math.nan)  # at 1: a real NaN, --nan_policy decides
    assert not O.LossScaler(False).overflowed(math.inf) and O.LossScaler(False).scale == 1.0


def test_scaled_gradients_are_unscaled_and_clipped_exactly(tmp_path, monkeypatch):
    """fp32 with the scaler forced on at 2^10: products by a power of two are exact, so the run is
    the unscaled run, clipping included (FAST clips at 1.0), up to the 1e-6 that clip_grad_norm_
    adds to the norm, which does not scale."""
    train.main(FAST + ["--max_steps=4", f"--out_dir={tmp_path / 'plain'}"])
    real = O.LossScaler.__init__
    monkeypatch.setattr(O.LossScaler, "__init__", lambda self, enabled: real(self, True, scale=1024.0))
    train.main(FAST + ["--max_steps=4", f"--out_dir={tmp_path / 'scaled'}"])
    plain, scaled = rows(tmp_path / "plain"), rows(tmp_path / "scaled")
    assert [r["loss"] for r in scaled if "loss" in r] == pytest.approx([r["loss"] for r in plain if "loss" in r], rel=1e-6)
    assert [r["grad_norm"] for r in scaled if "loss" in r] == pytest.approx([r["grad_norm"] for r in plain if "loss" in r], rel=1e-6)


def test_fp16_skips_an_overflowing_step_on_every_rank_and_trains_on(tmp_path):
    """Rank 1 alone overflows at step 3 (its loss times inf); the global norm makes both ranks skip
    it and halve the scale, and the run goes on instead of stopping at a non-finite norm."""
    r = patched_run_at_world_2(tmp_path, """import fsdp as F
real, calls = F.Sharded.forward_backward, [0]
def forward_backward(self, batch, loss_scale=1.0, sync=True, loss_fn=None):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3:
        loss_scale = loss_scale * float("inf")
    return real(self, batch, loss_scale, sync, loss_fn)
F.Sharded.forward_backward = forward_backward""", [*[a for a in FAST if not a.startswith("--precision")],
                                                    "--precision=fp16", "--fsdp", "--max_steps=5",
                                                    f"--out_dir={tmp_path / 'out'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = rows(tmp_path / "out")
    skips = [x for x in got if x.get("skipped") == "fp16 overflow"]
    assert 3 in [x["step"] for x in skips] and "step 3: fp16 gradients overflowed; step skipped" in r.stdout
    at3 = next(x for x in skips if x["step"] == 3)
    trained = [x for x in got if "loss" in x]
    assert trained[-1]["step"] == 5 and all(math.isfinite(x["loss"]) for x in trained)
    assert at3["loss_scale"] < 2.0**16


@pytest.mark.slow
def test_a_full_disk_during_a_sharded_export_stops_every_rank_instead_of_hanging(tmp_path):
    r = patched_run_at_world_2(tmp_path, """import safetensors.torch as st
def save_file(*a, **kw):
    raise OSError(28, "No space left on device")
if os.environ["RANK"] == "0":
    st.save_file = save_file""", [*FAST, "--fsdp", "--max_steps=1", "--save_hf=true", f"--out_dir={tmp_path / 'out'}"],
                               timeout=120)
    # both ranks end with one line each (the two processes' lines may interleave on stderr)
    assert r.returncode != 0 and r.stderr.count("error: ") == 2, r.stderr[-2000:]
    assert "No space left on device" in r.stderr and "rank 0 could not write the export" in r.stderr
    assert not (tmp_path / "out" / "hf.tmp").exists() and not (tmp_path / "out" / "hf").exists()


class Payload:
    """What a crafted checkpoint carries: unpickling it would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_is_refused_in_one_line_and_its_code_never_runs(tmp_path):
    args = FAST + ["--max_steps=2", f"--out_dir={tmp_path}"]
    train.main(args)
    rank0 = os.path.join(C.latest_checkpoint(str(tmp_path / "checkpoint")), "rank0.pt")
    state = torch.load(rank0, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "data": Payload(str(marker))}, rank0)
    with pytest.raises(ValueError, match=r"rank0.pt: not a readable checkpoint \(it holds code or objects other than "
                                         r"tensors and plain data\); refused"):
        train.main(args + ["--max_steps=3", "--resume"])
    assert not marker.exists()
    torch.save({k: v for k, v in state.items() if k != "rng"}, rank0)  # data, but not a whole rank file
    with pytest.raises(ValueError, match=r"rank0.pt: not a checkpoint this trainer wrote \(no rng\)"):
        train.main(args + ["--max_steps=3", "--resume"])


def test_overwrite_removes_the_previous_run_only_once_the_new_one_has_finished(tmp_path):
    out = tmp_path / "run"
    train.main(FAST + ["--max_steps=2", "--save_hf=true", f"--out_dir={out}"])
    with pytest.raises(FileNotFoundError, match="nonexistent.json: data file not found"):  # a check fails: nothing lost
        train.main(FAST + ["--max_steps=1", "--overwrite", f"--data={tmp_path / 'nonexistent.json'}", f"--out_dir={out}"])
    assert C.latest_checkpoint(str(out / "checkpoint")).endswith("step-00000002") and (out / "hf").is_dir()
    with pytest.raises(ValueError, match=r"^flags --resume and --overwrite contradict each other"):
        train.parse_args(["--resume", "--overwrite"])
    train.main(FAST + ["--max_steps=1", "--overwrite", f"--out_dir={out}"])  # --save_hf=false: the old hf/ goes too
    assert sorted(p.name for p in out.iterdir() if p.name != "token_cache") == ["checkpoint", "curves.svg", "metrics.jsonl"]
    assert C.latest_checkpoint(str(out / "checkpoint")).endswith("step-00000001")


def test_overwrite_moves_a_symlinked_checkpoint_without_touching_its_target(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "kept"
    train.main(FAST + ["--max_steps=2", f"--out_dir={out}"])
    os.replace(out / "checkpoint", elsewhere)
    os.symlink(elsewhere, out / "checkpoint")
    train.main(FAST + ["--max_steps=1", "--overwrite", f"--out_dir={out}"])
    assert C.latest_checkpoint(str(elsewhere)).endswith("step-00000002")  # the link's target is intact
    assert not (out / "checkpoint").is_symlink() and C.latest_checkpoint(str(out / "checkpoint")).endswith("step-00000001")


def test_a_held_out_set_without_a_trainable_token_is_refused_not_logged_as_loss_0(tmp_path):
    records = [{"prompt": "1+1=", "completion": "2"}] * 18 + [{"prompt": "x" * 64, "completion": "y"}] * 2
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(ValueError, match=r"^eval: the 2 held-out documents have no trainable token within --seq_len=32"):
        train.main(FAST + ["--max_steps=2", f"--data={data}", "--eval_frac=0.1", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or "eval_loss" not in (tmp_path / "out" / "metrics.jsonl").read_text()


def test_a_second_run_into_a_folder_in_use_is_refused_and_its_files_are_untouched(tmp_path):
    import socket
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # a live owner
    with pytest.raises(ValueError, match=rf"^--out_dir={tmp_path} is in use by process {os.getpid()} on "):
        train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # the owner's lock stays; nothing was written


def test_a_lock_whose_process_is_gone_is_taken_over_and_released_at_the_end(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: the run that held the lock was killed
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    assert f"process {dead.pid} on {socket.gethostname()} is gone; taking the folder over" in capsys.readouterr().out
    assert not (tmp_path / ".lock").exists() and (tmp_path / "metrics.jsonl").exists()


def test_a_run_that_stops_on_an_error_releases_its_folder(tmp_path):
    with pytest.raises(ValueError, match="stopped without saving"):
        train.main(FAST + ["--lr=1e20", "--grad_clip=0", "--max_steps=4", f"--out_dir={tmp_path}"])
    assert not (tmp_path / ".lock").exists()
    train.main(FAST + ["--max_steps=1", "--overwrite", f"--out_dir={tmp_path}"])  # the folder is free again


def interrupt(cmd, out_dir, after_rows, sig):
    """Start a run, send it `sig` once metrics.jsonl has `after_rows` rows; (returncode, stderr)."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(train.__file__)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    while proc.poll() is None and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= after_rows):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    return proc.wait(timeout=120), proc.stderr.read()


@pytest.mark.parametrize("world,sig", [(1, "SIGTERM"), pytest.param(2, "SIGTERM", marks=pytest.mark.slow),
                                       pytest.param(1, "SIGUSR1", marks=pytest.mark.slow)])
def test_a_preemption_signal_saves_at_the_next_step_and_the_resumed_run_has_the_uninterrupted_losses(tmp_path, world, sig):
    import sys
    steps = 250 if world == 1 else 120
    args = FAST + [f"--max_steps={steps}", "--eval_frac=0"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "train.py"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    if world == 1:
        train.main(args + [f"--out_dir={whole}"])
        rc, err = interrupt([sys.executable, "train.py", *args, f"--out_dir={cut}"], cut, 20, sig)
        assert rc == 128 + {"SIGTERM": 15, "SIGUSR1": 10}[sig]
    else:
        import subprocess
        subprocess.run(launch + args + [f"--out_dir={whole}"], check=True, capture_output=True)
        rc, err = interrupt(launch + args + [f"--out_dir={cut}"], cut, 10, sig)  # torchrun passes SIGTERM on to each rank
    stops = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stops) == 1, err[-2000:]  # rank 0 says it, once
    step = int(stops[0].split()[2].rstrip(":"))
    assert stops[0] == f"stopped: step {step}: {sig} received; saved {cut}/checkpoint at step {step} and stopped " \
                       f"(continue with --resume)"
    assert C.latest_checkpoint(os.path.join(cut, "checkpoint")).endswith(f"step-{step:08d}") and step < steps
    if world == 1:
        train.main(args + [f"--out_dir={cut}", "--resume"])
    else:
        subprocess.run(launch + args + [f"--out_dir={cut}", "--resume"], check=True, capture_output=True)
    assert [r["loss"] for r in rows(cut)] == [r["loss"] for r in rows(whole)]  # every step once, as uninterrupted


def test_a_tokenizer_with_ids_past_the_vocabulary_is_refused_at_load(hf_folder, tmp_path):
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    tok["model"]["vocab"]["N"] = 70  # 48 tokens in all, but an id of 70: the count alone fits vocab_size 50
    (hf_folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"tokenizer.json: token ids up to 70 do not fit the model's vocab_size 50"):
        train.main(FAST + [f"--model={hf_folder}", "--max_steps=1", f"--out_dir={tmp_path / 'o'}"])


def test_a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    import build
    import plan
    monkeypatch.setattr(plan, "available_bytes", lambda device, local_world=1: (None, 2**20))  # a 1 MiB machine

    def no_model(*a, **kw):
        raise AssertionError("the model was built")
    monkeypatch.setattr(build, "build_model", no_model)
    with pytest.raises(ValueError, match=r"^--model=tiny: each rank needs about 0\.\d GiB at its peak \(the plan "
                                         r"--dry_run prints\) but 0\.0 GiB are available in host memory"):
        train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    with pytest.raises(AssertionError, match="the model was built"):  # --memory_check=false: it tries
        train.main(FAST + ["--max_steps=1", "--memory_check=false", f"--out_dir={tmp_path}"])


def test_the_memory_check_takes_the_address_space_limit_and_shares_the_host_between_processes(monkeypatch):
    import resource
    import plan
    _, host = plan.available_bytes(torch.device("cpu"))
    assert 0 < host <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert plan.available_bytes(torch.device("cpu"), local_world=4)[1] < host / 2  # four processes share it
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**30, resource.RLIM_INFINITY))  # ulimit -v 1048576
    assert plan.available_bytes(torch.device("cpu"))[1] == 2**30


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_after_a_minute(tmp_path, capsys):
    lock = tmp_path / ".lock"
    lock.write_text("")  # a crash between creating it and writing it
    with pytest.raises(ValueError, match=r"is in use: .*\.lock is being written by another launch \(delete it"):
        train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    os.utime(lock, (os.path.getmtime(lock) - 120,) * 2)
    train.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"])
    assert "unreadable for a minute; taking the folder over" in capsys.readouterr().out


def test_a_checkpoint_saved_before_inputs_were_recorded_still_checks_its_chat_format():
    saved = {"config": {**dataclasses.asdict(train.Config()), "chat_format": "auto"}, "world": 1, "base": "tiny"}
    with pytest.raises(ValueError, match=r"^ckpt: saved with --chat_format=auto, resuming with --chat_format=chatml"):
        C.same_run(saved, "ckpt", train.Config(chat_format="chatml"), 1, {"base": "tiny"})
