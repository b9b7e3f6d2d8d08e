"""curves.svg, --compare and --log_to."""
import importlib.machinery
import importlib.util
import json
import sys
import types
import xml.etree.ElementTree as ET

import pytest

import curves
import train

FAST = ["--seq_len=32", "--batch_size=4", "--eval_samples=2", "--eval_batches=2", "--samples=0", "--save_hf=false",
        "--log_every=1", "--warmup_steps=2", "--lr=1e-2", "--precision=fp32", "--eval_every=2", "--max_steps=4",
        "--max_new_tokens=3"]
SVG = "{http://www.w3.org/2000/svg}"


def test_a_run_draws_its_losses_and_accuracy_into_curves_svg(tmp_path):
    train.main(FAST + [f"--out_dir={tmp_path}"])
    root = ET.parse(tmp_path / "curves.svg").getroot()
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "step" in texts and "loss" in texts and "held-out accuracy (%)" in texts
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    raw = root.findall(SVG + "polyline")[0]  # the first line: the raw training loss
    ys = [float(p.split(",")[1]) for p in raw.get("points").split()]
    assert len(ys) == len(losses) == 4
    # SVG's y grows downwards: a higher loss is drawn higher up, at every pair of steps
    assert all((a > b) == (ya < yb) for a, ya in zip(losses, ys) for b, yb in zip(losses, ys) if a != b)
    evals = root.findall(SVG + "polyline")[2]
    assert len(evals.get("points").split()) == len([r for r in rows if "eval_loss" in r]) == 3


def test_compare_overlays_runs_and_prints_their_final_figures(tmp_path, capsys, monkeypatch):
    for lr in ("1e-2", "1e-3"):
        train.main(FAST + [f"--lr={lr}", "--eval_samples=0", f"--out_dir={tmp_path / lr}"])
    monkeypatch.chdir(tmp_path)
    train.main([f"--compare={tmp_path / '1e-2'},{tmp_path / '1e-3'}"])
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.startswith("run"))):]
    for line, lr in zip(table[1:3], ("1e-2", "1e-3")):
        last_eval = [json.loads(x) for x in open(tmp_path / lr / "metrics.jsonl") if "eval_loss" in x][-1]["eval_loss"]
        assert line.split()[0].endswith(lr) and line.split()[3] == f"{last_eval:.4f}"
    legend = [t.text for t in ET.parse(tmp_path / "compare.svg").getroot().iter(SVG + "text") if t.text and "1e-" in t.text]
    assert len(legend) == 2
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        curves.compare([str(tmp_path / "nothing")])


def test_log_to_sends_every_metrics_row_and_needs_the_package(tmp_path, monkeypatch):
    sent = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: types.SimpleNamespace(log=lambda values, step: sent.append((step, values)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train.main(FAST + ["--log_to=wandb", f"--out_dir={tmp_path}"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in rows] == sent


def test_log_to_tensorboard_without_the_package_is_one_line():
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ValueError, match=r"^flag --log_to=tensorboard: the tensorboard package is not installed"):
        train.parse_args(["--log_to=tensorboard"])


def test_log_to_tensorboard_writes_every_metrics_row_as_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main(FAST + ["--log_to=tensorboard", f"--out_dir={tmp_path}"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for key in ("loss", "eval_loss", "accuracy", "grad_norm"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert len(got) == len(want) > 0 and all(s == ws and v == pytest.approx(wv, rel=1e-6)
                                                 for (s, v), (ws, wv) in zip(got, want))


def test_a_run_name_with_xml_characters_leaves_the_svg_well_formed(tmp_path):
    rows = [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 2.5}, {"step": 2, "loss": 1.5}]
    curves.write_svg(str(tmp_path / "c.svg"), {"runs/a&b<c>": rows})
    texts = [t.text for t in ET.parse(tmp_path / "c.svg").getroot().iter(SVG + "text")]
    assert any(t and t.endswith("runs/a&b<c>") for t in texts)
