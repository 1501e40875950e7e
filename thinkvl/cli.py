"""`thinkvl` command line: one sub-command per stage of the recipe.

    thinkvl demo [--out DIR] [--quick]
    thinkvl data synth --out DIR [--seed N] [--n-sft N] [--n-rl N] [--n-eval N] [--n-grounding N]
                       [--n-worked N]
                       [--answers direct|worked]
    thinkvl sft RECIPE.yaml [key=value ...]
    thinkvl distill RECIPE.yaml [key=value ...]
    thinkvl label RECIPE.yaml [key=value ...]
    thinkvl rl RECIPE.yaml [key=value ...]
    thinkvl eval --model DIR --data FILE [...]
    thinkvl pipeline RECIPE.yaml [key=value ...]
    thinkvl plot RUN_DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from thinkvl.config import ConfigError
from thinkvl.data.formats import DataError
from thinkvl.demo.tasks import ANSWER_STYLES
from thinkvl.train.checkpoint import CheckpointError


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def _cmd_synth(a: argparse.Namespace) -> None:
    from pathlib import Path

    from thinkvl.demo.tasks import synth

    paths = synth(Path(a.out), seed=a.seed, n_sft=a.n_sft, n_rl=a.n_rl, n_eval=a.n_eval,
                  n_grounding=a.n_grounding, answers=a.answers, n_worked=a.n_worked)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _cmd_sft(a: argparse.Namespace) -> None:
    from thinkvl.config import load_config
    from thinkvl.train.sft import SFTConfig, train

    run = train(load_config(SFTConfig, a.recipe, a.overrides))
    print(f"run directory: {run.path}\nfinal model: {run.final_dir}")


def _cmd_rl(a: argparse.Namespace) -> None:
    from thinkvl.config import load_config
    from thinkvl.rl.loop import RLConfig, train

    run = train(load_config(RLConfig, a.recipe, a.overrides))
    print(f"run directory: {run.path}\nfinal model: {run.final_dir}")


def _cmd_distill(a: argparse.Namespace) -> None:
    from thinkvl.config import load_config
    from thinkvl.distill.longcot import DistillConfig, build

    out = build(load_config(DistillConfig, a.recipe, a.overrides))
    print(f"warm-up set: {out}")


def _cmd_label(a: argparse.Namespace) -> None:
    from thinkvl.config import load_config
    from thinkvl.rl.difficulty import LabelConfig, label

    out = label(load_config(LabelConfig, a.recipe, a.overrides))
    print(f"labelled problems: {out}")


def _cmd_pipeline(a: argparse.Namespace) -> None:
    from thinkvl.pipeline import run_pipeline

    run_pipeline(a.recipe, a.overrides)


def _cmd_demo(a: argparse.Namespace) -> None:
    from thinkvl.pipeline import run_demo

    run_demo(out=a.out, quick=a.quick, seed=a.seed)


def _cmd_plot(a: argparse.Namespace) -> None:
    from thinkvl.report.plots import plot_run

    for path in plot_run(a.run_dir):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkvl", description="Kimi-VL post-training recipe: SFT -> long-CoT -> RL")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="the whole recipe on the built-in tiny model, on a CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke version")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("synth", help="synthetic verifiable tasks (text + image)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-sft", type=int, default=2000)
    p.add_argument("--n-rl", type=int, default=500)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--n-grounding", type=int, default=0,
                   help="'list the shapes' conversations for a perception stage (grounding.jsonl)")
    p.add_argument("--n-worked", type=int, default=0,
                   help="worked-solution conversations for the base stage (worked.jsonl)")
    p.add_argument("--answers", choices=ANSWER_STYLES, default="direct",
                   help="SFT answers: the result only, or worked (read the image row by row or write "
                        "the steps, then answer)")
    p.set_defaults(fn=_cmd_synth)

    for name, fn, help_ in [("sft", _cmd_sft, "joint SFT and long-CoT SFT"),
                            ("distill", _cmd_distill, "long-CoT warm-up set by rejection sampling"),
                            ("label", _cmd_label, "difficulty labels = pass rate of n samples"),
                            ("rl", _cmd_rl, "online policy mirror descent"),
                            ("pipeline", _cmd_pipeline, "all stages, each feeding the next")]:
        p = sub.add_parser(name, help=help_)
        _recipe_args(p)
        p.set_defaults(fn=fn)

    sub.add_parser("eval", help="pass@1, pass@k, response length (see `thinkvl eval --help`)")

    p = sub.add_parser("plot", help="PNG curves from a run's metrics.jsonl")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "urllib3", "transformers", "datasets"):  # httpx2: openai>=3
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":
        # eval has its own full argument parser; hand it everything after the sub-command.
        from thinkvl.eval.evaluate import main as eval_main

        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"thinkvl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
