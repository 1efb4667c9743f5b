"""`rlhf run`'s pieces without running the pipeline: the console that reads the local runner, helpers."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from rlhf.config import resolve
from rlhf.errors import ConfigError
from rlhf.pipeline import console, local, threads

RUNNER_LINES = """\
\x1b[0m01:00:00.000 - INFO - Executing task \x1b[96m'validate'\x1b[0m
01:00:00.001 - INFO - Streamed logs:
    [KFP Executor 2026-01-01 01:00:00,100 INFO]: Looking for component `validate`
    [KFP Executor 2026-01-01 01:00:01,000 INFO]: [validate] done: {"checks": 82}
    Traceback (most recent call last):
    rlhf.errors.ValidationFailed: data validation failed: 1 of 82 expectations; first: sft/train: at least 50 train rows
01:00:02.000 - ERROR - Task \x1b[96m'validate'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
Skipping task condition-branches-1: upstream task(s) ['validate'] failed.
"""


def test_console_turns_runner_output_into_stage_lines(tmp_path):
    out = io.StringIO()
    c = console.Console(tmp_path, out=out)
    c.write("01:00:00.000 - INFO - Executing task \x1b[96m'sft'\x1b[0m\n")
    for n in range(1, 301):
        c.write(f"    [KFP Executor 2026-01-01 01:00:01,000 INFO]: [sft] step {n}/300 loss=1.0\n")
    c.write("    12:00:00 WARNING rlhf: something odd\n")
    c.write("    [KFP Executor 2026-01-01 01:00:01,000 INFO]: [sft] checkpoint /x/step-10\n")
    c.write("01:00:09.000 - INFO - Task \x1b[96m'sft'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n")
    c.close_logs()
    text = out.getvalue()
    assert "sft       started" in text and "sft       finished in" in text
    shown = [line for line in text.splitlines() if "[sft] step" in line]
    assert 10 <= len(shown) <= 12 and "step 1/300" in shown[0] and "step 300/300" in shown[-1]
    assert "WARNING: something odd" in text and "checkpoint" not in text
    assert (tmp_path / "logs" / "sft.log").read_text().count("[sft] step") == 300


def test_console_reports_the_steps_own_error(tmp_path):
    out = io.StringIO()
    c = console.Console(tmp_path, out=out)
    c.write(RUNNER_LINES)
    c.close_logs()
    failed = c.failed
    assert failed.name == "validate" and failed.error_type == "ValidationFailed"
    assert failed.error.startswith("data validation failed: 1 of 82")
    assert "validate  FAILED" in out.getvalue() and "condition" not in out.getvalue()
    assert "done:" not in out.getvalue()


def test_branches_not_taken_and_the_exit_task_are_not_shown(tmp_path):
    out = io.StringIO()
    c = console.Console(tmp_path, out=out)
    c.write("Skipping conditional task condition-3 (condition evaluated to False)\n")  # the multi-node branch
    c.write("01:00:00.000 - INFO - Executing task 'evaluate'\n"
            "01:00:01.000 - INFO - Task 'evaluate' finished with status SUCCESS\n"
            "Skipping conditional task condition-6 (condition evaluated to False)\n"  # gate-passed
            "01:00:02.000 - INFO - Executing task 'register-2'\n"  # the gate-failed branch: challenger
            "01:00:03.000 - INFO - Task 'register-2' finished with status SUCCESS\n"
            "01:00:03.100 - INFO - Executing task 'finalize'\n"
            "01:00:04.000 - INFO - Task 'finalize' finished with status SUCCESS\n")
    c.close_logs()
    text = out.getvalue()
    assert "skipped" not in text and "finalize" not in text and "condition" not in text, text
    assert "register  started" in text and "register  finished" in text
    assert (tmp_path / "logs" / "finalize.log").exists(), "the exit task's log is kept"


def test_parameters_and_overrides_from_the_command_line():
    assert resolve.parse_assignments(["a=1", "b=x", "c={k: v}", "d=", "e=[1, 2]"]) == \
        {"a": 1, "b": "x", "c": {"k": "v"}, "d": "", "e": [1, 2]}
    assert resolve.dotted_overrides(["sft.max_steps=5", "sft.lr=0.1", "ppo.kl_coef=0"]) == \
        {"sft": {"max_steps": 5, "lr": 0.1}, "ppo": {"kl_coef": 0}}
    with pytest.raises(ConfigError):
        resolve.parse_assignments(["novalue"])
    with pytest.raises(ConfigError):
        resolve.dotted_overrides(["nodot=1"])
    with pytest.raises(ConfigError, match="unknown pipeline parameter"):
        local.check_parameters({"sft_max_step": 1}, {"sft_max_steps": 0})


def test_threads_follow_the_machine_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 6.0)
    n, note = threads.auto_threads()
    assert n == 1 and "busy" in note
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0.0)
    assert threads.auto_threads() == (None, "")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 6.0)
    assert threads.auto_threads()[0] == 10
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "busy_cpus", lambda: 9.0)
    assert threads.auto_threads() == (None, ""), "the user's choice wins"


def test_busy_cpus_reads_the_runnable_count_without_itself(tmp_path):
    f = tmp_path / "loadavg"
    f.write_text("0.10 0.20 0.30 4/321 12345\n")  # 1-minute load 0.1, but 4 threads runnable right now
    assert threads.busy_cpus(samples=3, interval=0, loadavg=str(f)) == 3.0


def test_busy_cpus_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads.busy_cpus() >= 1, "a process spinning on a CPU is counted"
    finally:
        spinner.kill()
        spinner.wait()


def test_stage_names_of_kfp_tasks():
    assert console.stage_of("sft") == "sft" and console.stage_of("sft-multinode") == "sft"
    assert console.stage_of("reward-multinode-2") == "reward" and console.stage_of("evaluate-2") == "evaluate"


def test_kfp_cron_and_pipeline_package(tmp_path):
    from rlhf.pipeline import kfp_client as client

    assert client.kfp_cron("0 3 * * *") == "0 0 3 * * *"
    assert client.kfp_cron("0 0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(client.KfpError):
        client.kfp_cron("daily")
    bad = tmp_path / "x.yaml"
    bad.write_text("a: 1\n")
    with pytest.raises(client.KfpError, match="not a compiled KFP pipeline"):
        client.load_pipeline_package(bad)


def test_overrides_name_known_sections_and_fields():
    with pytest.raises(ConfigError, match="unknown section 'sfft'"):
        resolve.dotted_overrides(["sfft.max_steps=5"])
    with pytest.raises(ConfigError, match="unknown field.*ppo.klcoef"):
        resolve.dotted_overrides(["ppo.klcoef=0.1"])
    assert resolve.dotted_overrides(["register.model_name=x"]) == {"register": {"model_name": "x"}}


def test_each_steps_time_is_split_into_start_up_compute_and_overhead(tmp_path, caplog):
    """The line a step logs (steps.log_timing) is what the console parses and the summary splits."""
    import logging

    from rlhf.pipeline import steps

    with caplog.at_level(logging.INFO, logger="rlhf"):
        steps.log_timing("sft", 7.94, 31.2, {"seconds": 24.04, "loss": 1.0})
        steps.log_timing("evaluate", 6.0, 20.0, {"policy_gold_mean": 1.0})
    produced = [r.getMessage() for r in caplog.records if "time:" in r.getMessage()]
    assert produced == ["[sft] time: start-up 7.9 s, stage 31.2 s, compute 24.0 s",
                        "[evaluate] time: start-up 6.0 s, stage 20.0 s"]
    out = io.StringIO()
    c = console.Console(tmp_path, out=out)
    for task, line in zip(("sft", "evaluate"), produced):
        c.write(f"01:00:00.000 - INFO - Executing task \x1b[96m'{task}'\x1b[0m\n")
        c.write(f"    [KFP Executor 2026-01-01 01:00:01,000 INFO]: {line}\n")
        c.write(f"01:00:09.000 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n")
    c.close_logs()
    assert "time:" not in out.getvalue()  # in the step's log, not on the console
    assert c.tasks["sft"].times == {"startup": 7.9, "stage": 31.2, "compute": 24.0}
    times = local.stage_times({"sft": 40.0, "evaluate": 27.0}, {stage: c.tasks[stage].times for stage in c.tasks})
    assert times["sft"] == {"wall": 40.0, "startup": 7.9, "stage": 31.2, "compute": 24.0, "overhead": 16.0}
    assert times["evaluate"]["overhead"] == 27.0 and "compute" not in times["evaluate"]
    r = local.RunResult(status="succeeded", run_dir=tmp_path, seconds=70.0, stage_seconds={"sft": 40.0, "evaluate": 27.0},
                        stage_times=times)
    text = local.format_summary(r)
    assert "steps 67s: compute 24s (training loops), overhead 43s" in text
    assert "sft 40s (start-up 8s, compute 24s, overhead 16s)" in text
    assert "evaluate 27s (start-up 6s, overhead 27s)" in text


def test_process_age_counts_the_start_up_before_the_stage():
    code = "import time; time.sleep(0.6); from rlhf import process; print(process.age())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert age >= 0.5
