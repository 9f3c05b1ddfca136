"""`sapo train | eval | report | compare`: the command line.

Exit codes: 0 done (or nothing to do); 1 a crash (an unexpected error, with its traceback); 2 a problem
the user fixes: config, data, another run holding output_dir, no intact checkpoint, storage (disk full,
read-only, not a folder), reward functions that all fail; 3 (EXIT_NONFINITE) stopped because too many
updates in a row were non-finite (the last checkpoint is clean; lower lr or check the rewards); 130 a
second Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from sapo.checkpoint import EXIT_NONFINITE
from sapo.config import ConfigError, build_config, help_text, parse_overrides, read_config_file
from sapo.storage import storage_cause


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapo", description="RL fine-tuning of language models with SAPO")
    sub = parser.add_subparsers(dest="command")
    for name, what in (("train", "run the RL loop (no arguments: the built-in CPU default)"),
                       ("eval", "evaluate a model: Pass@1 (avg@n), pass@k, greedy accuracy")):
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("--config", help="YAML file of config keys")
        p.add_argument("-h", "--help", action="store_true", help="list every config key with its default")
        p.add_argument("overrides", nargs="*", help="key=value pairs")
    rep = sub.add_parser("report", help="(re)write report.md and plots for a run folder")
    rep.add_argument("output_dir")
    # listed for --help only: main() hands `sapo compare ...` to sapo.compare.main with its own options
    sub.add_parser("compare", help="MoE stability study: objectives x lr x seeds (sapo compare --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from sapo.compare import main as compare_main

        return compare_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "report":
        from sapo.report import write_report

        print(write_report(args.output_dir))
        return 0
    if args.help:
        print(f"usage: sapo {args.command} [--config FILE.yaml] [key=value ...]\n")
        print(help_text())
        return 0
    try:
        overrides = parse_overrides(args.overrides)
        cfg = build_config(args.config, overrides)
        # resume=: the --config file's keys obey the same rule as the command line's (allowed keys
        # apply, others are refused), so they travel with the command-line keys
        given = {**(read_config_file(args.config) if args.config else {}), **overrides}
    except ConfigError as err:
        print(f"sapo {args.command}: config error: {err}", file=sys.stderr)
        return 2
    from sapo.checkpoint import CheckpointError
    from sapo.rewards.runner import RewardError
    from sapo.storage import StorageError

    try:
        if args.command == "train":
            from sapo import distributed
            from sapo.distributed import destroy
            from sapo.train import NonFiniteError, train

            try:
                result = train(cfg, given)
                if result.get("finished") and cfg.report and distributed.rank() == 0:
                    from sapo.report import write_report

                    write_report(cfg.resume or cfg.output_dir)
            except NonFiniteError as err:
                print(f"sapo train: stopped: {err}", file=sys.stderr)
                return EXIT_NONFINITE
            finally:
                destroy()  # leave the torchrun process group, if train joined one
        else:
            from sapo.evaluate import run_eval
            from sapo.resume import eval_model_source

            with eval_model_source(cfg) as eval_cfg:  # model=RUN/checkpoint-N works too
                run_eval(eval_cfg)
    except ConfigError as err:
        print(f"sapo {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except (StorageError, CheckpointError) as err:
        kind = "storage" if isinstance(err, StorageError) else "checkpoint"
        print(f"sapo {args.command}: {kind} error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RewardError as err:
        print(f"sapo {args.command}: reward error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk or read-only folder, however the library that wrote reported it
        cause = storage_cause(err)
        if cause is None:
            raise
        from sapo.resume import storage_error_line

        print(f"sapo {args.command}: storage error: {storage_error_line(cause, cfg.resume or cfg.output_dir)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sapo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
