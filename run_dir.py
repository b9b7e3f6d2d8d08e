"""The run's folder, --out_dir: who may write there, what an earlier run left there, and the metrics
log. Every node must see the same folder (a checkpoint is one folder every rank writes its part
into): a rank that does not see rank 0's lock stops the run at startup. One run at a time owns a folder: rank 0 holds <out_dir>/.lock (its host and process id) from
before the model loads until the run ends, so a second launch into the same folder is refused
instead of interleaving checkpoints, and a lock whose process is gone (a crash, a kill -9) is taken
over. A folder that holds a run is refused unless --resume continues it or --overwrite replaces
it; --overwrite moves the old files aside only once the new run has loaded, and removes them only
once it has finished, so a run that stops early has lost nothing.

    lock = claim(out_dir, d, resume=False, overwrite=False, log=print)   # every rank, at startup
    metrics = Metrics(out_dir, start=0, send=None)                       # rank 0: metrics.jsonl
    ...
    release(lock)
"""

import json
import os
import shutil
import socket
import time

import curves
from distributed import Dist, any_rank

# What a run writes in --out_dir, and where --overwrite keeps the previous run's until this one ends.
RUN_FILES = ("checkpoint", "metrics.jsonl", "curves.svg", "hf", "adapter")
OVERWRITTEN = ".overwritten"
LOCK = ".lock"


def check_folder(out_dir, rank, *, resume, overwrite):
    """Refuse an --out_dir that is a file, holds a run (without --resume or --overwrite) or cannot be
    written, before the model loads: a run that cannot save its results should not start."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir={out_dir} is a file, expected a folder (or a path to create one at)")
    used = [f for f in ("checkpoint", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if used and not (resume or overwrite):
        raise ValueError(f"--out_dir={out_dir} holds a previous run ({', '.join(used)}): pass --resume to continue "
                         f"it or --overwrite to replace it")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir={out_dir}: cannot write there ({e.strerror})") from None


def alive(host, pid):
    """Is the lock's owner still running? Known only on its own host; elsewhere assume it is."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def take_lock(out_dir, log):
    """Create <out_dir>/.lock exclusively (O_EXCL: of two launches, one wins); a stale one, whose
    process is gone from this host, is replaced. Returns the lock's path."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
                host, pid = owner["host"], int(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):  # being written by a racing launch, or left empty by a crash
                if time.time() - os.path.getmtime(path) < 60:
                    raise ValueError(f"--out_dir={out_dir} is in use: {path} is being written by another launch (delete "
                                     f"it if no run is starting)") from None
                host, pid = socket.gethostname(), -1  # a minute old and still unreadable: gone
            if pid >= 0 and alive(host, pid):
                raise ValueError(f"--out_dir={out_dir} is in use by process {pid} on {host} ({path}); wait for it, "
                                 f"pick another --out_dir, or delete {path} if that run is gone") from None
            log(f"{path}: " + (f"process {pid} on {host} is gone" if pid >= 0 else "unreadable for a minute")
                + "; taking the folder over")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
        return path
    raise ValueError(f"--out_dir={out_dir}: another launch took {path} first")


def claim(out_dir, d: Dist, *, resume, overwrite, log):
    """Every rank checks the folder; rank 0 takes the lock. All ranks agree: if any refuses, all stop
    (rank 0 says why). Returns the lock's path on rank 0, else None."""
    error, lock = None, None
    try:
        check_folder(out_dir, d.rank, resume=resume, overwrite=overwrite)
        if d.main:
            lock = take_lock(out_dir, log)
    except ValueError as e:
        error = e
    if any_rank(d, error is not None):
        release(lock)
        raise error or ValueError(f"--out_dir={out_dir}: refused on rank 0 (its error says why)")
    # A checkpoint is one folder every rank writes its part into (checkpoint.py): all must see rank 0's files.
    unseen = not os.path.exists(os.path.join(out_dir, LOCK))
    if any_rank(d, unseen):
        release(lock)
        who = f"rank {d.rank} on {socket.gethostname()} does not" if unseen else "some ranks do not"
        raise ValueError(f"--out_dir={out_dir} is not one folder shared by every node: {who} see {LOCK}, which rank 0 "
                         f"wrote there; checkpoints need an --out_dir on a filesystem all nodes share")
    return lock


def release(lock):
    if lock and os.path.exists(lock):
        os.remove(lock)


def set_previous_run_aside(out_dir, log):
    """--overwrite, rank 0, once every check has passed and the new run is loaded: the previous run's
    files move into OVERWRITTEN (a symlink is moved as a link, its target untouched)."""
    aside = os.path.join(out_dir, OVERWRITTEN)
    moved = [f for f in RUN_FILES if os.path.lexists(os.path.join(out_dir, f))]
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
        os.makedirs(aside)
        for f in moved:
            os.replace(os.path.join(out_dir, f), os.path.join(aside, f))
        log(f"--overwrite: the previous run's {', '.join(moved)} wait in {aside} until this run finishes")


def drop_previous_run(out_dir):
    """This run has written its own files: an overwritten run's can go (rmtree unlinks a symlink)."""
    shutil.rmtree(os.path.join(out_dir, OVERWRITTEN), ignore_errors=True)


def open_metrics(path, start):
    """metrics.jsonl for appending. On resume the rows after the checkpoint's step (written by the
    run that was interrupted, and about to be written again) are dropped first."""
    rows = []
    if start and os.path.isfile(path):
        rows = [line for line in open(path) if json.loads(line).get("step", 0) <= start]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)
    return open(path, "a")


class Metrics:
    """Rank 0's log of the run: a JSON line per step and per eval in metrics.jsonl (flushed at once),
    the same numbers to --log_to's logger (send), and curves.svg redrawn after every eval."""

    def __init__(self, out_dir, start, send=None):
        self.out_dir, self.send = out_dir, send
        self.file = open_metrics(os.path.join(out_dir, "metrics.jsonl"), start)

    def __call__(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.send:
            self.send({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, row["step"])
        if "eval_loss" in row:  # the picture follows the evals
            self.draw()

    def draw(self):
        curves.write_svg(os.path.join(self.out_dir, "curves.svg"), {self.out_dir: curves.read_rows(self.out_dir)})

    def close(self):
        self.file.close()
        self.draw()
