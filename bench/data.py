"""Peak memory while a large JSONL file is tokenized into the token cache: it should stay far below
the file's size, since records are read a line at a time and tokens are flushed to disk every ~1M.

    python bench/data.py --mb=1024 [--tokenizer=<folder with tokenizer.json>] [--keep=path]

Writes a JSONL file of `--mb` MiB of text records (random words), then, in a fresh process each,
measures the peak resident memory (ru_maxrss) of (1) Python and the imports alone and (2) reading
and tokenizing the whole file into the cache (data.write_token_cache), and prints a table.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
import data
tok = data.load_tokenizer({tok!r} or None)
t = time.time()
if {work}:
    data.write_token_cache({path!r}, tok, {cache!r})
    docs = data.open_token_cache({cache!r})
    print(len(docs), len(docs.tokens), time.time() - t)
else:
    print(0, 0, 0.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write_file(path, mb):
    rng, words = random.Random(0), [f"w{i}" for i in range(5000)]
    with open(path, "w") as f:
        while f.tell() < mb * 2**20:
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))}) + "\n")


def measure(path, tok, cache, work):
    code = CHILD.format(root=ROOT, tok=tok, path=path, cache=cache, work=work)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    docs, tokens, seconds = out[0].split()
    return int(docs), int(tokens), float(seconds), int(out[1])


def main():
    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    mb, tok = int(opts.get("mb", 256)), opts.get("tokenizer", "")
    with tempfile.TemporaryDirectory() as tmp:
        path = opts.get("keep") or os.path.join(tmp, "big.jsonl")
        if not os.path.exists(path):
            t = time.time()
            write_file(path, mb)
            print(f"wrote {path}: {os.path.getsize(path) / 2**20:.0f} MiB in {time.time() - t:.0f} s", flush=True)
        size = os.path.getsize(path)
        _, _, _, base = measure(path, tok, os.path.join(tmp, "cache0"), False)
        docs, tokens, seconds, peak = measure(path, tok, os.path.join(tmp, "cache"), True)
        print(f"bench/data.py: {size / 2**20:.0f} MiB JSONL, {docs:,} records, {tokens:,} tokens "
              f"({'tokenizer ' + tok if tok else 'byte tokenizer'}), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"| process | peak RSS | tokenizing time |\n|---|---|---|\n| Python + imports | {base / 2**20:.0f} MiB | - |\n"
              f"| read + tokenize + write the cache | {peak / 2**20:.0f} MiB | {seconds:.0f} s |")
        print(f"growth while tokenizing: {(peak - base) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file")


if __name__ == "__main__":
    main()
