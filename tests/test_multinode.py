"""Two nodes on one machine: two torchrun launches (--nnodes=2, --node_rank=0|1, 2 processes each)
rendezvous on 127.0.0.1 and must train exactly as one launch of 4 processes; a node that dies
stops the other within --timeout; its checkpoint resumes at another node count; a folder that is
not shared by every node is refused at startup."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_close

FAST = ["--seq_len=32", "--batch_size=2", "--eval_samples=4", "--samples=0", "--save_hf=false", "--log_every=1",
        "--warmup_steps=2", "--lr=3e-3", "--precision=fp32", "--eval_every=3", "--max_steps=6"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(args, per_node=None, nodes=2):
    """One torchrun per node, each with 2 processes; per_node[k]: extra flags for node k."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={k}",
                              "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
                              *args, *(per_node[k] if per_node else [])],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for k in range(nodes)]


def finish(procs, timeout=300):
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]


def one_node(args, n=4):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in open(os.path.join(out, "metrics.jsonl"))]


def text_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i:02d}+{i % 9:02d}={i + i % 9:03d}. " * 2}) + "\n" for i in range(99)))
    return str(path)


def test_two_nodes_train_exactly_like_one_node_of_four_with_hybrid_sharding_by_node(tmp_path):
    args = FAST + [f"--data={text_data(tmp_path)}", "--fsdp", "--shard=hybrid", "--adapter=lora", "--quant=nf4"]
    caches = [tmp_path / "cache0", tmp_path / "cache1"]  # node-local disks: each node tokenizes once, for itself
    results = finish(start_nodes(args + [f"--out_dir={tmp_path / 'two'}"],
                                 per_node=[[f"--data_cache={c}"] for c in caches]))
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    one_node(args + ["--shard_group=2", f"--out_dir={tmp_path / 'one'}"])  # groups of a node's 2 ranks
    assert rows(tmp_path / "two") == rows(tmp_path / "one")
    assert all(len(os.listdir(c)) == 1 and not str(os.listdir(c)[0]).endswith(".tmp") for c in caches)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--adapter=lora"], ["--adapter=lora", "--quant=nf4", "--fsdp"],
                                   ["--fsdp", "--shard=grad_op"], ["--fsdp"]])
def test_two_nodes_equal_one_node_for_each_kind_and_sharding(tmp_path, flags):
    results = finish(start_nodes(FAST + flags + [f"--out_dir={tmp_path / 'two'}"]))
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:]
    one_node(FAST + flags + [f"--out_dir={tmp_path / 'one'}"])
    assert rows(tmp_path / "two") == rows(tmp_path / "one")


@pytest.mark.slow
def test_an_out_dir_that_the_nodes_do_not_share_is_refused_at_startup(tmp_path):
    results = finish(start_nodes(FAST, per_node=[[f"--out_dir={tmp_path / f'node{k}'}"] for k in range(2)]))
    assert all(rc != 0 for rc, _ in results)
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error: ")]
    assert any("is not one folder shared by every node: rank 2 on" in e for e in errors), errors
    assert not os.path.exists(tmp_path / "node0" / "checkpoint") and not os.path.exists(tmp_path / "node0" / ".lock")


def same_run_as(whole, resumed, saved):
    """Up to the checkpoint the very same rows; after it the same run at another world size: world 4
    and world 2 with 2 micro-batches sum the same gradients in another order, so the losses agree to
    rounding for the next steps (and then drift apart slowly, as any two summation orders do)."""
    assert all(resumed[s] == whole[s] for s in whole if s <= saved)
    after = [s for s in sorted(whole) if saved < s <= saved + 5]
    assert_close([resumed[s] for s in after], [whole[s] for s in after], ulps=4096)  # 5e-4 of the loss


@pytest.mark.slow
def test_a_lost_node_stops_the_other_within_the_timeout_and_its_checkpoint_resumes_at_another_node_count(tmp_path):
    args = FAST + ["--max_steps=400", "--save_every=20", "--eval_every=1000", "--eval_samples=0", "--timeout=30"]
    out = tmp_path / "cut"
    procs = start_nodes(args + [f"--out_dir={out}"])
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 50):
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True).stdout.split()
    for pid in [procs[1].pid, *map(int, workers)]:  # node 1: its torchrun and its workers (in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    start = time.time()
    rc, err = procs[0].wait(timeout=120), procs[0].stderr.read()
    took = time.time() - start
    procs[1].wait()
    errors = [line for line in err.splitlines() if "error: step " in line]
    assert rc != 0 and took < 30 and errors, err[-3000:]
    assert all("lost a rank" in e for e in errors), errors
    saved = int(sorted(os.listdir(out / "checkpoint"))[-1].split("-")[1])
    assert 20 <= saved < 400
    # 2 nodes -> 1 node (world 4 -> 2, the global batch kept by --grad_accum=2), against an uninterrupted 2-node run
    results = finish(start_nodes(args + [f"--out_dir={tmp_path / 'whole'}"]))
    assert all(rc == 0 for rc, _ in results)
    one_node(args + ["--resume", "--grad_accum=2", f"--out_dir={out}"], n=2)
    whole = {r["step"]: r["loss"] for r in rows(tmp_path / "whole") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in rows(out) if "loss" in r}
    assert sorted(resumed) == sorted(whole)
    same_run_as(whole, resumed, saved)
    # and 1 node -> 2 nodes: a one-node run preempted (SIGTERM saves at the next step), resumed on two nodes
    small = args + ["--max_steps=60", "--save_every=0"]
    one = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", *small, "--grad_accum=2", f"--out_dir={tmp_path / 'small'}"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ((tmp_path / "small" / "metrics.jsonl").exists()
               and len((tmp_path / "small" / "metrics.jsonl").read_text().splitlines()) >= 20):
        time.sleep(0.1)
    one.send_signal(signal.SIGTERM)
    one.wait(timeout=120)
    preempted = int(sorted(os.listdir(tmp_path / "small" / "checkpoint"))[-1].split("-")[1])
    assert 20 <= preempted < 60
    results = finish(start_nodes(small + ["--resume", f"--out_dir={tmp_path / 'small'}"]))
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:]
    one_node(small + ["--grad_accum=2", f"--out_dir={tmp_path / 'small_whole'}"], n=2)
    grown = {r["step"]: r["loss"] for r in rows(tmp_path / "small") if "loss" in r}
    whole = {r["step"]: r["loss"] for r in rows(tmp_path / "small_whole") if "loss" in r}
    assert sorted(grown) == sorted(whole) == list(range(1, 61))
    same_run_as(whole, grown, preempted)


@pytest.mark.slow
def test_the_slurm_example_launches_a_run_through_torchrun_rendezvous(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # scontrol show hostnames: the head node
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')  # one task, here
    for f in ("scontrol", "srun"):
        os.chmod(fake / f, 0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               SLURM_GPUS_ON_NODE="2", SLURM_JOB_ID="7", MASTER_PORT=str(free_port()))
    r = subprocess.run(["bash", "examples/slurm.sh", *FAST, "--max_steps=2", f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["step"] for row in rows(tmp_path / "out") if "loss" in row] == [1, 2]
    assert os.path.isdir(tmp_path / "out" / "adapter")  # QLoRA, as the example says


def test_the_dry_run_plans_hybrid_sharding_for_nodes_of_8_gpus(capsys):
    import train
    base = ["--dry_run", "--model=llama3-8b", "--adapter=lora", "--quant=nf4", "--fsdp", "--plan_world=16",
            "--batch_size=1", "--seq_len=2048"]
    train.main(base + ["--shard=hybrid"])
    hybrid = capsys.readouterr().out
    train.main(base + ["--shard=hybrid", "--shard_group=8"])
    assert capsys.readouterr().out == hybrid and "--shard=hybrid (shard groups of 8, replicated 2x)" in hybrid
    train.main(base)  # sharded over all 16: smaller shards than over a node's 8
    full = capsys.readouterr().out
    shards = [float(out.split("weight shards")[1].split()[0]) for out in (hybrid, full)]
    assert shards[0] > shards[1]
