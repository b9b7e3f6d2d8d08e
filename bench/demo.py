"""The README's first command, `torchrun --nproc_per_node=2 train.py`, for each seed and precision:
wall time (the whole command, startup included), held-out accuracy at each eval, and the final
held-out loss, as one table.

    python bench/demo.py                                  # seeds 0 1 2 x fp32, bf16
    python bench/demo.py --seeds=0,1,2,3,4 --precisions=fp32 --avx2=1

--avx2=1 runs every command with ATen and oneDNN held to AVX2 (ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2), as on an AVX2-only CPU; bf16 is then emulated (slow), which is why auto
picks fp32 there. Extra --name=value arguments go to train.py.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(seed, precision, avx2, extra):
    env = dict(os.environ)
    if avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", f"--seed={seed}", f"--precision={precision}", f"--out_dir={out}", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1]}
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [row for row in rows if "eval_loss" in row]
    return {"wall": wall, "curve": " -> ".join(f"{row['accuracy']:.0%}" for row in evals),
            "final": evals[-1]["accuracy"], "loss": evals[-1]["eval_loss"]}


def main(argv):
    opts = {"seeds": "0,1,2", "precisions": "fp32,bf16", "avx2": "0"}
    extra = []
    for arg in argv:
        name, _, value = arg.removeprefix("--").partition("=")
        if name in opts:
            opts[name] = value
        else:
            extra.append(arg)
    print("| precision | seed | wall | held-out accuracy at each eval | final loss |\n|---|---|---|---|---|")
    for precision in opts["precisions"].split(","):
        for seed in opts["seeds"].split(","):
            r = run(int(seed), precision, opts["avx2"] == "1", extra)
            if "error" in r:
                print(f"| {precision} | {seed} | - | {r['error']} | - |")
            else:
                print(f"| {precision} | {seed} | {r['wall']:.1f} s | {r['curve']} | {r['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
