"""The ``rlhf`` command line: one thin door into the stage functions of this package.

Every stage command reads its section of ``params.yaml`` (typed, validated),
calls the stage function, and prints its metrics. User mistakes print one line
and exit non-zero; see :mod:`rlhf.errors`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
import typer

from rlhf.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="RLHF pipeline: prepare -> validate -> sft -> reward -> ppo -> evaluate -> register.",
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file with one section per stage")


def _print_metrics(name: str, metrics: dict) -> None:
    typer.echo(f"{name}: " + json.dumps(metrics, sort_keys=True, default=str))


@app.command("demo-data")
def demo_data_cmd(
    out: Path = typer.Option(Path("data/raw"), help="directory to write the demo JSONL files to"),
    seed: int = typer.Option(0, help="generator seed (the committed data.dvc uses 0)"),
):
    """Generate the bundled demo data set (deterministic: same bytes every time)."""
    from rlhf import demo

    counts = demo.generate(out, seed=seed)
    _print_metrics(f"demo data written to {out}", counts)


@app.command("fetch-data")
def fetch_data_cmd(
    target: Path = typer.Option(Path("data.dvc"), help="the DVC pointer file of the raw data"),
):
    """Get data/raw on a fresh clone: dvc pull, or regenerate the demo data and check its hash."""
    from rlhf import versioning

    typer.echo(versioning.fetch_data(target))


@app.command("prepare")
def prepare_cmd(
    raw: Path = typer.Option(Path("data/raw"), help="raw data: a JSONL/JSON file or a directory of them"),
    out: Path = typer.Option(Path("artifacts/dataset"), help="output dataset directory"),
    params: Path = PARAMS,
):
    """Read raw data (JSONL, chat messages, HH-RLHF) into deduplicated Parquet train/eval splits."""
    from rlhf.config import PrepareConfig, load_stage
    from rlhf.data import prepare

    cfg = load_stage(PrepareConfig, "prepare", params)
    _print_metrics(f"prepared {out}", prepare(raw, out, cfg))


@app.command("validate")
def validate_cmd(
    dataset: Path = typer.Option(Path("artifacts/dataset"), help="prepared dataset directory"),
    out: Path = typer.Option(Path("artifacts/validation"), help="where the report is written"),
    params: Path = PARAMS,
):
    """Check the prepared dataset with Great Expectations; fail before training on any violation."""
    from rlhf.config import ValidateConfig, load_stage
    from rlhf.validate import validate

    cfg = load_stage(ValidateConfig, "validate", params)
    _print_metrics(f"validation passed, report in {out}", validate(dataset, out, cfg))


@app.command("sft")
def sft_cmd(
    dataset: Path = typer.Option(Path("artifacts/dataset"), help="prepared dataset directory"),
    out: Path = typer.Option(Path("artifacts/sft"), help="output policy directory"),
    params: Path = PARAMS,
):
    """Supervised fine-tuning of the policy on the demonstrations (loss on response tokens only)."""
    from rlhf.config import ModelConfig, SFTConfig, load_stage
    from rlhf.sft import train_sft

    metrics = train_sft(dataset, out, load_stage(SFTConfig, "sft", params), load_stage(ModelConfig, "model", params))
    _print_metrics(f"SFT policy written to {out}", metrics)


@app.command("reward")
def reward_cmd(
    dataset: Path = typer.Option(Path("artifacts/dataset"), help="prepared dataset directory"),
    sft: Path = typer.Option(Path("artifacts/sft"), help="SFT policy to initialise from"),
    out: Path = typer.Option(Path("artifacts/reward"), help="output reward-model directory"),
    params: Path = PARAMS,
):
    """Train the scalar reward model on the preference pairs (Bradley-Terry loss)."""
    from rlhf.config import ModelConfig, RewardConfig, load_stage
    from rlhf.reward import train_reward

    metrics = train_reward(dataset, sft, out, load_stage(RewardConfig, "reward", params),
                           load_stage(ModelConfig, "model", params))
    _print_metrics(f"reward model written to {out}", metrics)


@app.command("evaluate")
def evaluate_cmd(
    dataset: Path = typer.Option(Path("artifacts/dataset"), help="prepared dataset directory"),
    policy: Path = typer.Option(Path("artifacts/ppo"), help="candidate policy"),
    baseline: Path = typer.Option(Path("artifacts/sft"), help="baseline policy (the SFT policy)"),
    reward_model: Path = typer.Option(Path("artifacts/reward"), "--reward", help="reward model"),
    champion: Path | None = typer.Option(None, help="current champion policy directory, if any"),
    out: Path = typer.Option(Path("artifacts/evaluation"), help="where metrics, report and gate go"),
    params: Path = PARAMS,
):
    """Sample from the candidate, the SFT baseline (and champion); gold/RM/KL metrics, report, gate."""
    from rlhf.config import EvaluateConfig, ModelConfig, load_stage
    from rlhf.evaluate import evaluate

    metrics = evaluate(dataset, policy, baseline, reward_model, out, load_stage(EvaluateConfig, "evaluate", params),
                       load_stage(ModelConfig, "model", params), champion=champion)
    gate = "PASSED" if metrics["gate_passed"] else "FAILED"
    _print_metrics(f"evaluation in {out} (gate {gate}, report {out / 'report.html'})", metrics)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=os.environ.get("RLHF_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        typer.secho(f"error: {e.one_line()}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
