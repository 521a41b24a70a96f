"""``flora study``: run a grid of training runs from a spec, resumably; show its status; write its report.

``flora study run SPEC --out DIR`` plans every trial of SPEC (a built-in name or a TOML file),
skips those DIR already holds finished, trains the rest (packed: several trials as adapters of
one model in one mixed batch) on this machine or on a Ray cluster, and writes the report. Running
it again after an interruption continues the study; a DIR holding another study is refused
unless ``--resume`` (the new spec then replaces the old one, keeping the finished trials it shares).
"""

from __future__ import annotations

import argparse
import json
import sys

_EPILOG = """examples:
  flora study run peft-instruction --profile smoke --output-dir runs/study-smoke
  flora study run peft-instruction --profile paper --data natural-instructions --output-dir runs/paper
  flora study run flora-domains --profile cpu --output-dir results/studies/flora-domains
  flora study run my_study.toml --output-dir runs/mine --backend ray --address ray://head:10001
  flora study run --output-dir runs/mine --resume            (continue with the stored spec)
  flora study status runs/mine
  flora study report runs/mine
  flora study list
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="run a study (a grid of trials) resumably; its status and report",
                              description=__doc__, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = p.add_subparsers(dest="study_command", required=True)

    run_p = commands.add_parser("run", help="run (or continue) a study")
    run_p.add_argument("spec", nargs="?", help="a built-in spec (flora study list) or a TOML file; "
                                               "omitted with --resume: the spec stored in --out")  # fmt: skip
    run_p.add_argument("--output-dir", "--out", dest="out", required=True,
                       help="the study directory (store, report, figures)")  # fmt: skip
    run_p.add_argument("--profile", help="a profile of the spec: smoke, cpu, paper (default: the spec's default)")
    run_p.add_argument("--backend", choices=("local", "ray"), default="local", help="where trials run (local)")
    run_p.add_argument("--address", help="Ray cluster address for --backend ray (default: a local Ray instance)")
    run_p.add_argument("--data", help="a Super-NaturalInstructions directory (sets data.source and data.path)")
    run_p.add_argument("--model", help="the base model of every trial (sets model.name and each experiment's model)")
    run_p.add_argument("--set", dest="overrides", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a spec value, e.g. training.max_steps=20 (value read as TOML); "
                            "repeatable")  # fmt: skip
    run_p.add_argument("--resume", action="store_true",
                       help="continue a study in --out even if the spec changed (finished shared trials "
                            "are kept)")  # fmt: skip
    run_p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run_p.add_argument("--no-report", dest="report", action="store_false", help="do not write the report at the end")
    run_p.set_defaults(func=run)

    status_p = commands.add_parser("status", help="trials done, running, failed; ETA")
    status_p.add_argument("directory")
    status_p.add_argument("--json", action="store_true", help="print the status as JSON")
    status_p.set_defaults(func=status)

    report_p = commands.add_parser("report", help="write report.md, figures/ and tables/ of a study")
    report_p.add_argument("directory")
    report_p.set_defaults(func=report)

    list_p = commands.add_parser("list", help="the built-in specs and their profiles")
    list_p.set_defaults(func=list_specs)


def _spec(args):
    from flora.study import StudySpec, load_spec, parse_override
    from flora.study.store import StudyStore

    overrides = dict(parse_override(text) for text in args.overrides or [])
    if args.data:
        overrides.update({"data.source": "superni", "data.path": args.data})
    if args.model:
        overrides["model.name"] = args.model
    if args.spec:
        spec = load_spec(args.spec, args.profile, overrides)
    else:
        if not args.resume:
            raise ValueError("give a SPEC (a built-in name or a TOML file), or --resume to continue the study in --out")
        if args.profile or overrides:
            raise ValueError("--profile, --data, --model and --set need a SPEC (the stored spec is used as it is)")
        store = StudyStore.open(args.out)
        try:
            spec = StudySpec.from_dict(store.spec()["spec"])
        finally:
            store.connection.close()
    if args.model:
        spec.experiments = [_with_model(e, args.model) for e in spec.experiments]
    return spec


def _with_model(experiment, model: str):
    import dataclasses

    return dataclasses.replace(experiment, model=(model,))


def run(args) -> int:
    from flora.study import run_study

    spec = _spec(args)
    print(f"flora study: {spec.name} (profile {spec.profile}) -> {args.out}", file=sys.stderr, flush=True)
    summary = run_study(spec, args.out, backend=args.backend, address=args.address, resume=args.resume,
                        progress=args.progress, report=args.report)  # fmt: skip
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.statuses.items()))
    print(f"{summary.trials} trials: {counts} ({summary.skipped} already finished, {summary.ran} run this time)")
    if summary.report:
        print(f"report: {summary.report}")
    return 1 if summary.failed else 0


def status(args) -> int:
    from flora.study import format_status, study_status

    result = study_status(args.directory)
    print(json.dumps(result, indent=1, default=str) if args.json else format_status(result))
    return 0


def report(args) -> int:
    from flora.study.report import write_report

    print(f"report: {write_report(args.directory)}")
    return 0


def list_specs(args) -> int:
    from flora.study.spec import builtin_specs, read_spec_file

    for name in builtin_specs():
        raw, _, _ = read_spec_file(name)
        profiles = ", ".join(raw.get("profiles", {}))
        print(f"{name}: {raw.get('description', '')} (profiles: {profiles}; default {raw.get('default_profile')})")
    return 0
