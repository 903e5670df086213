"""The ``mlpfuse`` command. Exit codes: 0 ok, 2 bad input (nothing cached), 1 failure."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from mlpfuse import __version__
from mlpfuse.core.errors import InputError
from mlpfuse.orchestrator.job import run_job
from mlpfuse.orchestrator.spec import PipelineSpec, load_spec
from mlpfuse.orchestrator.store import ArtifactStore

DEMO = "smollm2-demo.yaml"


def demo_spec() -> Path:
    """The shipped demo spec (package data of ``mlpfuse.examples``: a checkout or an installed wheel)."""
    from importlib.resources import files

    return Path(str(files("mlpfuse.examples") / DEMO))


def _setup_logging(args: argparse.Namespace, spec: PipelineSpec | None = None) -> None:
    """Driver-side progress at ``--log-level`` on stderr, and every record also in OUTPUT/run.log."""
    level = getattr(logging, str(getattr(args, "log_level", "INFO")).upper())
    root = logging.getLogger("mlpfuse")
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(logging.Formatter("mlpfuse: %(message)s"))
    root.handlers = [console]
    if spec is not None:
        out = spec.output_dir()
        out.mkdir(parents=True, exist_ok=True)
        log = logging.FileHandler(out / "run.log")
        log.setLevel(logging.DEBUG)
        log.setFormatter(fmt)
        root.addHandler(log)


def _error(text: str) -> None:
    """A run's last word: on stderr, and in OUTPUT/run.log when the run has one."""
    print(text, file=sys.stderr)
    for h in logging.getLogger("mlpfuse").handlers:
        if isinstance(h, logging.FileHandler) and h.stream is not None:
            h.stream.write(text + "\n")
            h.flush()


def _spec(args: argparse.Namespace) -> PipelineSpec:
    spec = load_spec(args.spec if args.spec is not None else demo_spec())
    updates = {}
    if getattr(args, "cache", None):
        updates["cache"] = args.cache
    if getattr(args, "output", None):
        updates["output"] = args.output
    if getattr(args, "address", None):
        updates["ray"] = spec.ray.model_copy(update={"address": args.address})
    return spec.model_copy(update=updates) if updates else spec


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    _setup_logging(args, spec)
    store = ArtifactStore(spec.cache)
    report, path = run_job(spec, store, set(args.force or []))
    for name, r in report["stages"].items():
        print(f"  {name:<40} {r['status']:<4} {r['seconds']:8.1f}s  {r['cache_key']}")
    base = report["base"]
    print(f"base: perplexity {base['perplexity']:.3f} on {base['eval_tokens']} tokens; "
          f"params {base['params']:,} (FF {base['ff_params']:,})")
    if "winner" in report:
        w = report["winner"]
        print(f"winner: {w['name']}: perplexity {w['perplexity']:.3f}, params {w['params']:,}")
        print(f"  {w['reason']}")
        print(f"export: {report['export']['path']}")
    print(f"report: {path} (and report.html)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mlpfuse.api import plan

    p = plan(_spec(args))
    for st in p.stages:
        print(f"  {st.name:<12} {'cached' if st.cached else 'to run':<7} {st.key}  inputs={st.inputs or {}}")
    cands, skipped, target = p.candidates, p.skipped, p.target
    if target is not None and "pending" in target:
        print(f"budget: {target.get('params', target.get('ff_params'))} over {', '.join(target['methods'])}: "
              f"{target['pending']}")
    elif target is not None:
        count = f" = {target['count']:,} of {target['base']:,} {target['kind']}"
        print(f"budget: {target.get('params', target.get('ff_params'))}{count}; {len(cands)} candidates")
        for c in cands:
            size = f"{c['predicted']:,} predicted" if c["predicted"] is not None else "sized when built"
            print(f"  {c['name']:<44} {c['family']:<11} {size}")
        for s in skipped:
            print(f"  not planned: {s['method']}: {s['why']}")
        if "damage" in target:
            print(f"  {target['damage']}")
    from mlpfuse.orchestrator.estimate import format_estimates

    print("\n".join(format_estimates(p.estimates, p.shape)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = ArtifactStore(args.cache)
    arts = store.list()
    staging = sorted(p.name for p in (store.local / "staging").iterdir())
    print(f"store {store.root}: {len(arts)} artifacts, {len(staging)} in progress")
    for a in arts:
        size = sum(f["size"] for f in a.manifest.get("files", {}).values())
        print(f"  {a.stage:<12} {a.key}  {size / 1e6:9.1f} MB  {a.manifest.get('seconds', 0):8.1f}s")
    for s in staging:
        print(f"  in progress: {s}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from mlpfuse.stages.registry import STAGES

    store = ArtifactStore(args.cache)
    older = args.older_than * 86400 if args.older_than is not None else None
    dead = store.unreachable({s.name: s.version for s in STAGES.values()}, older_than_s=older)
    total = 0
    for a in dead:
        size = sum(f["size"] for f in a.manifest.get("files", {}).values())
        total += size
        print(f"  {'would remove' if args.dry_run else 'removing':<12} {a.stage:<12} {a.key}  {size / 1e6:9.1f} MB")
        if not args.dry_run:
            store.remove(a.stage, a.key)
    print(f"{'would free' if args.dry_run else 'freed'} {total / 1e9:.2f} GB in {len(dead)} artifacts of {store.root}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from mlpfuse.cluster.submit import submit

    submit(Path(args.spec), args.address, wait=args.wait)
    return 0


def cmd_serve_check(args: argparse.Namespace) -> int:
    from mlpfuse.orchestrator.serve_check import main as serve_check

    return serve_check(args.export, args.python, args.max_tokens)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import json

    from mlpfuse.orchestrator.lm_eval_run import format_table, run_lm_eval

    results = run_lm_eval(args.model_dir, args.tasks.split(","), data=args.data, limit=args.limit,
                          batch_size=args.batch_size, device=args.device, include_path=args.include_path,
                          max_length=args.max_length)
    print(format_table(results))
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpfuse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mlpfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_spec(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="pipeline YAML")
        p.add_argument("--cache", help="artifact store (overrides the spec's cache:)")
        p.add_argument("--output", help="output directory (overrides the spec's output:)")
        p.add_argument("--address", help="join this Ray cluster (default: embedded local Ray)")

    p = sub.add_parser("run", help="run a pipeline; cached stages are reused")
    with_spec(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="driver-side progress shown on stderr (OUTPUT/run.log keeps every level)")
    p.add_argument("--force", action="append", metavar="STAGE", help="recompute STAGE (repeatable)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("plan", help="show each stage: cached or to run, with its key")
    with_spec(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("status", help="list the artifact store")
    p.add_argument("--cache", default="~/.cache/mlpfuse")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("gc", help="remove artifacts no run can use again (stale stage versions, "
                       "missing inputs), and with --older-than those unused for that long")
    p.add_argument("--cache", default="~/.cache/mlpfuse")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="also remove artifacts unused (not hit) for DAYS days (local stores)")
    p.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("demo", help=f"run the shipped {DEMO} (SmolLM2-135M and Shakespeare on local Ray)")
    p.add_argument("--cache")
    p.add_argument("--output")
    p.add_argument("--force", action="append", metavar="STAGE")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_run, spec=None, address=None)
    p = sub.add_parser("submit", help="submit a pipeline to a Ray cluster through Ray Jobs")
    p.add_argument("spec")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    p.add_argument("--wait", action="store_true", help="stream the job's logs as they come, until it ends")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("serve-check", help="vLLM (CPU build, its own venv: scripts/setup_vllm.sh) serves a "
                       "stock export: greedy tokens and log-probabilities against transformers")
    p.add_argument("export", help="an export's model directory (the stock form)")
    p.add_argument("--python", help="the vLLM venv's Python (default: $MLPFUSE_VLLM_PYTHON or .venv-vllm)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.set_defaults(func=cmd_serve_check)
    p = sub.add_parser("lm-eval", help="lm-eval-harness on an exported model, offline (default task: "
                       "perplexity of the held-out documents)")
    p.add_argument("model_dir", help="a model directory (an export's model/)")
    p.add_argument("--tasks", default="mlpfuse_heldout",
                   help="comma-separated lm-eval tasks (default: mlpfuse_heldout, shipped)")
    p.add_argument("--data", help="mlpfuse_heldout's documents: a bundled corpus (shakespeare, the default) "
                   "or corpus directory -> its held-out split; a .txt/.jsonl/.parquet file -> all of it")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--include-path", help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--max-length", type=int, help="window length in tokens (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write the results as JSON here")
    p.set_defaults(func=cmd_lm_eval)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except InputError as e:
        _error(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted; finished work is cached, re-run to resume")
        return 1
    except OSError as e:
        if e.errno == errno.ENOSPC:
            _error(f"error: No space left on device writing {e.filename or 'the cache'}; free disk space and "
                   "re-run: finished work is cached")
        else:
            _error(f"error: {e}; finished work is cached, re-run to resume")
        return 1
    except Exception as e:
        import ray.exceptions

        if not isinstance(e, ray.exceptions.RayError):
            raise
        _error(f"error: a stage's worker failed ({type(e).__name__}: {e}); finished work is cached, "
               "re-run to resume")
        return 1


if __name__ == "__main__":
    sys.exit(main())

