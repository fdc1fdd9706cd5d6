"""`vllm-surgery`: refine an adapter offline, inspect its spectrum, turn recorded traffic into
calibration data, clean the refined-version store, or run the refinement worker beside a vLLM server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from .config import SurgeryConfig
from .errors import SurgeryError
from .gate import STATISTICS
from .names import InvalidAdapterName


def build_parser() -> argparse.ArgumentParser:
    """The `vllm-surgery` command line (docs/cli.md shows its synopsis; a test keeps them equal)."""
    p = argparse.ArgumentParser(prog="vllm-surgery", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("refine", help="refine a PEFT LoRA adapter by Spectral Surgery")
    r.add_argument(
        "--base-model", required=True, help="transformers model directory the adapter was trained on"
    )
    r.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory (safetensors)")
    r.add_argument("--calibration", required=True, help="JSONL: {prompt, completion} or {messages} per line")
    r.add_argument("--output", required=True, help="new directory for the refined adapter")
    _add_config_options(r)
    r.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="accept an adapter whose base_model_name_or_path names another model (shapes are still checked)",
    )
    r.add_argument("--report", default=None, help="write the full JSON report here")
    r.add_argument("--plot", default=None, help="write a PNG of the spectra and candidates here")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="per-module rank, singular values, energy and effective rank")
    i.add_argument("adapter")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    db_help = (
        "traffic database, a SQLite path or a postgresql:// URL (default: the serving settings' database, "
        "VLLM_SURGERY_DATABASE or beside the store)"
    )
    t = sub.add_parser("traffic", help="recorded traffic of the vLLM plugin")
    tsub = t.add_subparsers(dest="traffic_command", required=True)
    ts = tsub.add_parser(
        "stats", help="records, rated, corrected and usable examples per adapter and version"
    )
    ts.add_argument("adapter", nargs="?", default=None)
    ts.add_argument("--db", default=None, help=db_help)
    ts.add_argument("--json", action="store_true", help="machine-readable output")

    c = sub.add_parser("calibration", help="calibration data from recorded traffic")
    csub = c.add_subparsers(dest="calibration_command", required=True)
    ce = csub.add_parser("export", help="write an adapter's calibration set as the JSONL `refine` reads")
    ce.add_argument("adapter")
    ce.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    ce.add_argument(
        "--since", default=None, help="only traffic since: 7d, 12h, 30m, or an ISO 8601 date/time"
    )
    ce.add_argument(
        "--include-unrated",
        action="store_true",
        help="also use completions nobody rated (weak targets: the adapter's own unreviewed output)",
    )
    ce.add_argument("--db", default=None, help=db_help)

    st = sub.add_parser("store", help="the refined-version store")
    stsub = st.add_subparsers(dest="store_command", required=True)
    sg = stsub.add_parser(
        "gc",
        help="delete what interrupted writes left in the store (uploads without a manifest) after "
        "VLLM_SURGERY_STORE_GC_GRACE_HOURS",
    )
    sg.add_argument(
        "--store", default=None, help="the store, a directory or s3:// URL (default: VLLM_SURGERY_STORE)"
    )
    sg.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    sg.add_argument("--json", action="store_true", help="machine-readable output")

    from . import worker

    w = sub.add_parser(
        "worker",
        help="run refinement jobs beside a vLLM server (long-lived; see its --help for sizing)",
        description=worker.DESCRIPTION,
        epilog=worker.SIZING_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_arguments(w)
    return p


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per SurgeryConfig field that has CLI metadata; help and default come from the field."""
    for f in fields(SurgeryConfig):
        if f.name == "policy_params":
            parser.add_argument(
                "--policy-param",
                action="append",
                default=[],
                metavar="NAME=VALUE",
                help="override a policy parameter, e.g. eta_s=1.0 (with auto: grad_direction.eta_s=1.0)",
            )
        if "cli" not in f.metadata:
            continue
        options = dict(f.metadata["cli"])
        flag = options.pop("flag", "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, default=f.default, help=f.metadata["help"], **options)


def _config(args: argparse.Namespace) -> SurgeryConfig:
    """The SurgeryConfig of a parsed `refine` command line (validated by SurgeryConfig itself)."""
    settings = {f.name: getattr(args, f.name) for f in fields(SurgeryConfig) if "cli" in f.metadata}
    return SurgeryConfig(
        **settings, policy_params=_policy_params(args.policy_param, args.policy), progress=not args.quiet
    )


def _policy_params(items: Sequence[str], policy: str) -> dict:
    """--policy-param NAME=VALUE items as overrides ({POLICY: {NAME: value}} with auto); VALUE a number."""
    params: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SurgeryError(f"--policy-param expects NAME=VALUE, got {item!r}")
        try:
            value = float(text)
        except ValueError:
            raise SurgeryError(f"--policy-param {item!r}: VALUE must be a number") from None
        if policy == "auto":
            name, dot, key = key.partition(".")
            if not dot:
                raise SurgeryError(f"with --policy auto, write POLICY.NAME=VALUE, got {item!r}")
            params.setdefault(name, {})[key] = value
        else:
            params[key] = value
    return params


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _refine(args: argparse.Namespace) -> int:
    from .refine import refine

    result = refine(
        args.base_model,
        args.adapter,
        args.calibration,
        args.output,
        _config(args),
        allow_base_mismatch=args.allow_base_mismatch,
    )
    report = result.to_dict()
    if args.report:
        _write_json_atomic(args.report, report)
    if args.plot:
        from .plotting import plot_report

        plot_report(report, args.plot)
    print(f"decision: {result.decision}")
    print(f"reason:   {result.reason}")
    if result.quality_before is not None:
        print(f"held-out answer loss: original {result.quality_before.loss:.4f}")
        for policy, row in result.candidates.items():
            mark = "*" if policy == result.policy else " "
            tested = f"p = {row['p_value']:.4g}" if row.get("tested") else "not tested"
            chosen = ", ".join(f"{k} {v:g}" for k, v in (row.get("chosen") or {}).items())
            selection = (
                "" if row.get("selection_loss") is None else f"; selection loss {row['selection_loss']:.4f}"
            )
            print(
                f"  {mark} {policy:<15} {row['loss']:.4f}  ({100 * row['relative_improvement']:+.2f}% "
                f"± {100 * row['relative_improvement_se']:.2f}% SE, {tested}{selection}"
                f"{'; ' + chosen if chosen else ''})"
            )
        gate = result.gate
        flips = "all" if gate["exact"] else "random"
        print(
            f"gate: {gate['test']} on {STATISTICS[gate['statistic']]}; {gate['candidates']} candidate(s), {gate['heldout_examples']} held-out "
            f"examples, {gate['sign_flips']} {flips} sign flips; accept if gain >= "
            f"{100 * gate['min_improvement']:.2f}%, loss reduction >= {gate['min_loss_reduction']:g} "
            f"nats/token and p <= {gate['max_false_accept']:g}"
        )
    print(
        f"modules edited: {len(result.modules)}; calibration: {result.calibration['examples']} examples, "
        f"{result.calibration['heldout_examples']} held out, {result.calibration['truncated']} truncated"
    )
    print(f"output: {result.output_path if result.output_path else 'nothing written (original kept)'}")
    return 0 if result.decision != "keep_original" else 3


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_adapter

    spectra = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps([s.to_dict() for s in spectra], indent=2))
        return 0
    print(
        f"{'module':<48} {'r':>3} {'scale':>6} {'sigma_1':>9} {'sigma_r':>9} {'top1':>6} {'top25%':>7} {'eff.rank':>8}"
    )
    for s in spectra:
        print(
            f"{s.name:<48} {s.rank:>3} {s.scaling:>6.2f} {s.sigma[0]:>9.4f} {s.sigma[-1]:>9.4f} "
            f"{s.energy_top1:>6.1%} {s.energy_top_quarter:>7.1%} {s.effective_rank:>8.2f}"
        )
    return 0


def _open_traffic(db: str | None) -> tuple[object, object]:
    """(database, serving settings): --db, else the database the serving settings name."""
    from .settings import ServingSettings
    from .storage import open_database

    settings = ServingSettings.from_env()
    return open_database(db or settings.database_path, create=False), settings


def _traffic_stats(args: argparse.Namespace) -> int:
    db, _ = _open_traffic(args.db)
    try:
        rows = db.stats(args.adapter)
    finally:
        db.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    from .storage import COUNTED

    print(f"traffic database: {db.path}")
    labels = {"unrated_usable": "+unrated"}  # what --include-unrated would add
    header = [labels.get(c, c) for c in COUNTED]
    print(f"{'adapter':<24} {'version':<40} " + " ".join(f"{h:>9}" for h in header))
    for r in rows:
        print(f"{r.adapter:<24} {r.version:<40} " + " ".join(f"{getattr(r, c):>9}" for c in COUNTED))
    if not rows:
        print("(no records" + (f" for adapter {args.adapter!r})" if args.adapter else ")"))
    return 0


def _calibration_export(args: argparse.Namespace) -> int:
    from .names import validate_adapter_name
    from .traffic import TrafficPolicy, export_calibration, parse_since, registered_files

    validate_adapter_name(args.adapter)
    since = parse_since(args.since) if args.since else None
    db, settings = _open_traffic(args.db)
    policy = TrafficPolicy(settings).for_adapter(args.adapter)
    files = registered_files(settings.calibration_dir, policy.calibration_files, args.adapter)
    try:  # streamed: written while read, in bounded memory whatever the set's size
        data = export_calibration(
            db,
            args.adapter,
            args.output,
            since=since,
            include_unrated=args.include_unrated or policy.include_unrated,
            static_files=files,
        )
    finally:
        db.close()
    print(data.summary())
    print(f"output: {args.output}")
    return 0


def _store_gc(args: argparse.Namespace) -> int:
    import time

    from .settings import ServingSettings
    from .storage import open_store

    settings = ServingSettings.from_env()
    store = open_store(args.store or settings.store, settings.cache_dir, settings.cache_max_bytes)
    grace_h = settings.store_gc_grace_hours
    now = time.time()
    found = store.collect_garbage(grace_h * 3600.0, now=now, dry_run=args.dry_run)
    if args.json:
        print(
            json.dumps(
                {
                    "store": store.location,
                    "grace_hours": grace_h,
                    "dry_run": args.dry_run,
                    "orphans": [o.to_dict() for o in found],
                },
                indent=2,
            )
        )
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"store: {store.location}; left by interrupted writes, {grace_h:g} h or more ago:")
    for o in found:
        print(
            f"  {verb} {o.name}/{o.entry}: {o.files} file(s), {o.bytes} bytes, the newest "
            f"{(now - o.newest) / 3600:.1f} h old"
        )
    print(f"{verb} {len(found)}, {sum(o.bytes for o in found)} bytes" if found else "nothing to delete")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .worker import run_from_args

    return run_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done (refined adapter written, inspect, traffic, export, store gc, worker stopped),
    3 original kept, 2 bad input (or a store that cannot be reached)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {
        "refine": _refine,
        "inspect": _inspect,
        "traffic": _traffic_stats,
        "calibration": _calibration_export,
        "store": _store_gc,
        "worker": _worker,
    }
    try:
        return commands[args.command](args)
    except (SurgeryError, InvalidAdapterName) as e:
        print(f"vllm-surgery: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
