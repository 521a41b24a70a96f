"""Mixed-adapter generation of this checkout against an earlier commit, on the same machine and day.

Ratios measured on different days are not comparable here (this machine's speed has varied 2x
from one day to the next). This script checks out ``--against`` into a temporary git worktree and
runs the same measurement alternately with that commit's ``src/`` and with this checkout's, each in
a fresh process: per process, `AdapterModel.generate` with flora ``auto`` over 16 prompts of 32
tokens (32 new greedy tokens, LoRA r8 on every linear layer) at 1, 4 and 16 distinct adapters,
each call paired with a call of the bare model (``harness.measure``). A figure is the median over
processes of each process's paired ratio to the bare model. Usage:

    python benchmarks/generation_ab.py --against 6b72010 --json benchmarks/results/generation_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="the earlier commit (any git revision)")
    parser.add_argument("--model", default="smollm2-135m", help="random:NAME only against commits that have it")
    parser.add_argument("--processes", type=int, default=2, help="processes per tree, alternated")
    parser.add_argument("--distinct", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=5, help="paired calls per system in one process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one process's measurement
    args = parser.parse_args()
    distincts = [int(d) for d in args.distinct.split(",")]
    if args.measure:
        print(json.dumps(measure_here(args.model, distincts, args.rounds)))
        return
    if not args.against:
        parser.error("--against REV is required")
    try:
        against = git("rev-parse", "--verify", f"{args.against}^{{commit}}")
    except subprocess.CalledProcessError:
        parser.error(f"--against {args.against!r} is not a commit of this repository (expected a git revision)")
    head = git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "against"
        git("worktree", "add", "--detach", str(tree), against)
        try:
            runs = []
            for process in range(args.processes):
                for label, src in (("against", tree / "src"), ("head", REPO / "src")):
                    ratios = run_process(src, args)
                    print(f"{label} process {process + 1}: {ratios}")
                    runs.append({"tree": label, "process": process, "ratio_to_base": ratios})
        finally:
            git("worktree", "remove", "--force", str(tree))
    summary = {
        label: {d: round(statistics.median(r["ratio_to_base"][str(d)] for r in runs if r["tree"] == label), 4)
                for d in distincts}
        for label in ("against", "head")
    }  # fmt: skip
    print(summary)
    if args.json:
        from harness import write_json

        write_json(args.json, {"benchmark": "generation_ab", "model": args.model, "against": against, "head": head,
                               "rows": 16,
                               "prompt_tokens": 32, "new_tokens": 32, "rank": 8, "rounds": args.rounds,
                               "runs": runs, "median_ratio_to_base": summary})  # fmt: skip


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def run_process(src: Path, args: argparse.Namespace) -> dict[str, float]:
    """One measuring process importing flora from ``src``; its paired ratios by distinct adapters."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)])}
    command = [sys.executable, __file__, "--measure", "--model", args.model, "--distinct", args.distinct,
               "--rounds", str(args.rounds)]  # fmt: skip
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_here(model_name: str, distincts: list[int], rounds: int) -> dict[str, float]:
    import torch
    from harness import Case, assignment, measure, randomize, token_rows

    from flora import AdapterModel, LoraConfig, load_base

    torch.manual_seed(0)
    base, tokenizer = load_base(model_name)
    model = AdapterModel(load_base(model_name)[0], tokenizer)
    for i in range(max(distincts)):
        model.add_adapter(f"lora{i}", LoraConfig(r=8, alpha=16))
        randomize(model.adapter_parameters(f"lora{i}"), seed=i)
    ids = token_rows(tokenizer, 16, 32)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    bare = Case({}, lambda: base.generate(ids, attention_mask=mask, **gen))
    cases = {}
    for distinct in distincts:
        names = assignment(16, distinct, "lora")
        cases[distinct] = Case({}, lambda names=names: model.generate(ids, attention_mask=mask, adapter_names=names,
                                                                      **gen), reference=bare)  # fmt: skip
    measure([bare, *cases.values()], rounds)
    return {str(d): round(case.ratio_to_reference, 4) for d, case in cases.items()}


if __name__ == "__main__":
    main()
