# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Our training step at two commits, side by side: speed and peak memory, new over old.

    python -m benchmarks.compare_commits --old 8ae925a --shape small --methods lora full \
        --out benchmarks/results/cpu_small_commits

A refactor should cost nothing: this runs ``benchmarks.finetune``'s own worker (our side only,
its default levers for each method) from a checkout of ``--old`` (a temporary ``git worktree``)
and from this tree (or ``--new``), each in a fresh process with that tree first on
``PYTHONPATH``. Processes alternate old/new in ABBA order, ``--repeats`` pairs per method, so a
drift of the shared host over the run falls on both sides alike. Each process builds the same
weights and data from the same seed, takes ``--warmup`` untimed rounds, resets the peak RSS
and times ``--rounds`` rounds. Reported: the ratio of summed non-padding tokens over summed
seconds (new / old) and of the highest training peak memory.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the checkout being measured: only benchmarks.finetune's public pieces that both
# sides have (parse_args, DEFAULT_LEVERS, worker).
_DRIVER = """
import json, sys
from dataclasses import replace
from benchmarks import finetune as F
method, rounds, argv = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
args = F.parse_args(argv)
levers = replace(F.DEFAULT_LEVERS[method], data=args.data, cpu_heap=args.cpu_heap)
spec = {"side": "ours", "method": method, "levers": levers.to_dict(), "args": vars(args),
        "rounds": rounds}
print("RESULT " + json.dumps(F.worker(spec)))
"""


def _git(*cmd: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *cmd], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def run_side(tree: Path, method: str, rounds: int, argv: List[str]) -> Dict:
    """One fresh process of our step in ``tree``; its worker's result dict."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", _DRIVER, method, str(rounds), json.dumps(argv)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{tree} / {method} failed:\n{proc.stderr[-3000:]}")


def _peak_gib(result: Dict) -> float:
    peak = result["peak"]
    return peak.get("peak_rss_gib", peak.get("peak_allocated_gib"))


def compare(trees: Dict[str, Path], method: str, args, argv: List[str]) -> Dict:
    runs: Dict[str, List[Dict]] = {"old": [], "new": []}
    for i in range(args.repeats):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")  # ABBA
        for side in order:
            res = run_side(trees[side], method, args.rounds, argv)
            runs[side].append(res)
            print(
                f"{method} {side}: {res['tok_s_real']:.0f} non-pad tok/s, "
                f"peak {_peak_gib(res):.3f} GiB",
                flush=True,
            )
    out = {"method": method}
    for side, results in runs.items():
        tokens = sum(r["tok_s_real"] * r["s_per_step"] * r["steps"] for r in results)
        seconds = sum(r["s_per_step"] * r["steps"] for r in results)
        out[side] = {
            "tok_s_real": tokens / seconds,
            "per_process_tok_s_real": [r["tok_s_real"] for r in results],
            "peak_gib": max(_peak_gib(r) for r in results),
            # Identical processes differ by up to ~10% here: the highest is the one compared.
            "per_process_peak_gib": [_peak_gib(r) for r in results],
        }
    out["speed_new_over_old"] = out["new"]["tok_s_real"] / out["old"]["tok_s_real"]
    out["memory_new_over_old"] = out["new"]["peak_gib"] / out["old"]["peak_gib"]
    return out


def markdown(report: Dict) -> str:
    lines = [
        f"# Commits compared: {report['old']} (old) vs {report['new']} (new)",
        "",
        f"Command: `{report['command']}`",
        "",
        "| method | old non-pad tok/s | new non-pad tok/s | new / old speed | old peak GiB "
        "| new peak GiB | new / old memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['method']} | {r['old']['tok_s_real']:.0f} | {r['new']['tok_s_real']:.0f} "
            f"| {r['speed_new_over_old']:.3f}x | {r['old']['peak_gib']:.3f} "
            f"| {r['new']['peak_gib']:.3f} | {r['memory_new_over_old']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="git revision to compare against")
    p.add_argument("--new", default=None, help="git revision; default: this working tree")
    p.add_argument("--shape", default="small")
    p.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["lora", "full"])
    p.add_argument("--repeats", type=int, default=2, help="old/new process pairs per method")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches-per-window", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    worker_argv = ["--shape", args.shape, "--warmup", str(args.warmup)]
    worker_argv += ["--batches-per-window", str(args.batches_per_window)]
    worker_argv += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="tt_commits_") as tmp:
        trees = {"new": ROOT}
        revs = {"old": args.old, "new": args.new}
        for side, rev in revs.items():
            if rev is None:
                continue
            path = Path(tmp) / side
            _git("worktree", "add", "--detach", str(path), rev)
            trees[side] = path
        try:
            report = {
                "old": _git("rev-parse", "--short", args.old),
                "new": _git("rev-parse", "--short", args.new) if args.new else "working tree",
                "command": "python -m benchmarks.compare_commits " + " ".join(sys.argv[1:]),
                "results": [compare(trees, m, args, worker_argv) for m in args.methods],
            }
        finally:
            for side in revs:
                if trees.get(side, ROOT) != ROOT:
                    _git("worktree", "remove", "--force", str(trees[side]))
    print(markdown(report))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
        Path(args.out + ".md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
