"""Training curves as plain SVG (no plotting library): loss and held-out accuracy against step, from
the rows of one or more runs' metrics.jsonl (train.py writes <out_dir>/curves.svg at every eval
and at the end), and the --log_to hand-off of those rows to wandb or tensorboard.

    python train.py --compare=out/a,out/b     # one SVG of both runs (compare.svg) and a table of final figures
    write_svg(path, {"run": rows, ...})       # rows: metrics.jsonl's dicts

Left panel: training loss (thin), its exponential moving average (thick), held-out loss (dashed,
with points). Right panel: held-out accuracy (SFT, by generation) or reward accuracy (DPO), in %.
"""

import dataclasses
import html
import json
import math
import os

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
W, H, PAD = 420, 280, 52  # one panel, and the room for its axis labels


def read_rows(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {out_dir} a run's --out_dir?)")
    return [json.loads(line) for line in open(path) if line.strip()]


def smoothed(points, beta=0.9):
    """Exponential moving average with bias correction, as TensorBoard's smoothing."""
    out, avg = [], 0.0
    for k, (x, y) in enumerate(points, 1):
        avg = beta * avg + (1 - beta) * y
        out.append((x, avg / (1 - beta**k)))
    return out


def series(rows):
    """(train loss, eval loss, accuracy %, accuracy's name) as lists of (step, value)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    key = "eval_reward_accuracy" if any("eval_reward_accuracy" in r for r in rows) else "accuracy"
    acc = [(r["step"], 100 * r[key]) for r in rows if key in r]
    return train, evals, acc, "reward accuracy (%)" if key == "eval_reward_accuracy" else "held-out accuracy (%)"


def ticks(lo, hi, n=5):
    """About n round numbers spanning [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def panel(x0, title, ylabel, lines, xmax):
    """One chart at horizontal offset x0: lines are (color, points, width, dashed, dots)."""
    ys = [y for _, pts, *_ in lines for _, y in pts] or [0.0, 1.0]
    lo, hi = min(ys), max(ys)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    sx = lambda x: x0 + PAD + (W - PAD - 10) * x / max(xmax, 1)  # noqa: E731
    sy = lambda y: 30 + (H - 30 - PAD) * (hi - y) / (hi - lo)  # noqa: E731
    out = [f'<text x="{x0 + W / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<line x1="{sx(0)}" y1="{sy(lo)}" x2="{sx(xmax)}" y2="{sy(lo)}" stroke="black"/>',
           f'<line x1="{sx(0)}" y1="{sy(lo)}" x2="{sx(0)}" y2="{sy(hi)}" stroke="black"/>',
           f'<text x="{x0 + W / 2}" y="{H - 8}" text-anchor="middle">step</text>',
           f'<text x="{x0 + 12}" y="{sy((lo + hi) / 2)}" text-anchor="middle" '
           f'transform="rotate(-90 {x0 + 12} {sy((lo + hi) / 2)})">{ylabel}</text>']
    for t in ticks(lo, hi):
        out.append(f'<text x="{sx(0) - 4}" y="{sy(t) + 4}" text-anchor="end" font-size="10">{t:g}</text>')
        out.append(f'<line x1="{sx(0)}" y1="{sy(t)}" x2="{sx(xmax)}" y2="{sy(t)}" stroke="#ddd"/>')
    for t in ticks(0, xmax):
        out.append(f'<text x="{sx(t)}" y="{sy(lo) + 14}" text-anchor="middle" font-size="10">{t:g}</text>')
    for color, pts, width, dashed, dots in lines:
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"'
                   + (' stroke-dasharray="5,3"' if dashed else "") + "/>")
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts] if dots else []
    return out


def write_svg(path, runs):
    """runs: {name: metrics rows}. Written to a temp name and renamed: a reader never sees half a file."""
    parts, legend, xmax, acc_name = [], [], 1, "held-out accuracy (%)"
    loss_lines, acc_lines = [], []
    for k, (name, rows) in enumerate(runs.items()):
        color = COLORS[k % len(COLORS)]
        train, evals, acc, acc_name = series(rows)
        xmax = max([xmax] + [x for x, _ in train + evals + acc])
        loss_lines += [(color, train, 0.6, False, False), (color, smoothed(train), 2, False, False),
                       (color, evals, 1.5, True, True)]
        acc_lines.append((color, acc, 2, False, True))
        legend.append(f'<text x="{PAD + 140 * k}" y="{H + 16}" fill="{color}">&#9632; {html.escape(name)}</text>')
    parts += panel(0, "loss (thin: train, thick: smoothed, dashed: held out)", "loss", loss_lines, xmax)
    parts += panel(W, acc_name.replace(" (%)", ""), acc_name, acc_lines, xmax)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 24}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>' + "".join(parts + legend) + "</svg>\n")
    with open(path + ".tmp", "w") as f:
        f.write(svg)
    os.replace(path + ".tmp", path)


def compare(dirs, out="compare.svg"):
    """Overlay the runs in `dirs` into one SVG and return a table of their final figures."""
    runs = {d.rstrip("/"): read_rows(d) for d in dirs}
    write_svg(out, runs)
    lines = [f"{'run':<28}{'steps':>7}{'train loss':>12}{'eval loss':>11}{'accuracy':>10}"]
    for name, rows in runs.items():
        train, evals, acc, _ = series(rows)
        last = lambda pts, fmt: format(pts[-1][1], fmt) if pts else "-"  # noqa: E731
        lines.append(f"{name[-28:]:<28}{(train[-1][0] if train else 0):>7}{last(smoothed(train), '.4f'):>12}"
                     f"{last(evals, '.4f'):>11}{last(acc, '.1f'):>10}")
    return "\n".join(lines) + f"\nwrote {out}"


def external_logger(cfg):
    """--log_to: a function(values, step) that sends one metrics row to wandb or tensorboard."""
    if cfg.log_to == "wandb":
        import wandb
        run = wandb.init(dir=cfg.out_dir, config=dataclasses.asdict(cfg))
        return lambda values, step: run.log(values, step=step)
    if cfg.log_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

        def send(values, step):
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return send
    return None
