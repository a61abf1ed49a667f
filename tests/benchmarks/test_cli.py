"""The benchmarks' command lines: what a user gives them is refused before the first measurement, in one line."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import alphas, http, load, memory, ops, overload, rebuild, switching
from benchmarks.cli import command, kept_if_stopped, run_child


def _measured(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the benchmark started measuring before checking what it was given")


# per benchmark: its main, its arguments before the output flag, the output flag, and what starts its measurement
OUTPUTS = {
    "alphas": (alphas.main, ["CHECKPOINT"], "--json", (alphas, "load_checkpoint")),
    "ops": (ops.main, ["CHECKPOINT", "--alpha", "0"], "--json", (ops, "build")),
    "memory": (memory.main, ["CHECKPOINT"], "--json", (memory, "load_checkpoint")),
    "switching": (switching.main, ["CHECKPOINT"], "--json", (switching, "run_child")),
    "load": (load.main, ["--checkpoint", "CHECKPOINT"], "--out", (load, "start_server")),
    "overload": (overload.main, ["--checkpoint", "CHECKPOINT"], "--out", (overload, "start_server")),
    "rebuild": (rebuild.main, ["--checkpoint", "CHECKPOINT"], "--out", (rebuild, "start_server")),
    "http": (http.main, ["--checkpoint", "CHECKPOINT"], "--json", (http.subprocess, "Popen")),
}


@pytest.mark.parametrize("name", OUTPUTS)
def test_an_output_path_no_file_can_be_written_to_is_refused_before_measuring(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main, before, flag, (owner, start) = OUTPUTS[name]
    if name == "ops":  # it names its default file after the alpha on the checkpoint's grid: it reads that first
        from tests.service.service_support import make_checkpoint

        ckpt = make_checkpoint(tmp_path, "structured").path
    else:
        ckpt = tmp_path / "model.safetensors"
        ckpt.write_bytes(b"")  # never read: the output path is refused first
    monkeypatch.setattr(owner, start, _measured)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "result.json"  # under a regular file: no folder can hold it
    argv = [name, *[str(ckpt) if a == "CHECKPOINT" else a for a in before], flag, str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    message = str(e.value.code)
    assert message.startswith(f"error: {flag} {out}") and "is a file, not a directory" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["ops", "memory", "switching"])
def test_the_results_folder_is_created_when_missing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked writable (its nearest existing folder is), so it must be writable: the folder is created."""
    from tests.service.service_support import make_checkpoint

    ckpt = make_checkpoint(tmp_path, "structured").path
    out = tmp_path / "new" / "folder" / "result.json"
    if name == "switching":  # its children time every alpha: faked, they give what a child gives
        monkeypatch.setattr(switching, "run_child", lambda *a: {"one_alpha_us": 1.0, "random_alphas_us": 2.0})
        argv = [name, str(ckpt), "--calls", "1"]
    elif name == "ops":
        argv = [name, str(ckpt), "--alpha", "0", "--batch", "1", "--threads", "1", "--runs", "1"]
    else:
        argv = [name, str(ckpt), "--alphas", "0", "--builds", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    {"ops": ops.main, "memory": memory.main, "switching": switching.main}[name]()
    assert out.is_file()


CHECKPOINT_FIRST = {  # the benchmarks that read the checkpoint themselves, with arguments that would run them
    "alphas": (alphas.main, []),
    "ops": (ops.main, ["--alpha", "0"]),
    "memory": (memory.main, []),
    "switching": (switching.main, []),
}


@pytest.mark.parametrize("problem", ["no such file", "a directory", "not a safetensors file"])
@pytest.mark.parametrize("name", CHECKPOINT_FIRST)
def test_a_checkpoint_that_cannot_be_read_is_refused_in_one_line(
    name: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main, rest = CHECKPOINT_FIRST[name]
    ckpt = tmp_path / "model.safetensors"
    if problem == "a directory":
        ckpt.mkdir()
    elif problem == "not a safetensors file":
        ckpt.write_text("hello")
    monkeypatch.setattr(switching, "run_child", _measured)  # switching's children: never started
    monkeypatch.setattr(sys, "argv", [name, str(ckpt), *rest, "--json", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as e:
        main()
    message = str(e.value.code)
    assert message.startswith(f"error: {ckpt}: ") and "\n" not in message, message
    assert "written by `python -m training train`" in message  # the fix
    assert not (tmp_path / "out.json").exists()


SERVED = {
    "load": load.main,
    "http": http.main,
    "overload": overload.main,
    "rebuild": rebuild.main,
}  # they hand the checkpoint to servers


@pytest.mark.parametrize("problem", ["no such file", "a directory"])
@pytest.mark.parametrize("name", SERVED)
def test_a_checkpoint_no_server_could_load_is_refused_before_any_starts(
    name: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load and http handed a missing checkpoint to their first server, whose refusal named LCS_CHECKPOINT
    (which the benchmark sets, not the user); overload said only 'no such checkpoint'."""
    ckpt = tmp_path / "model.safetensors"
    if problem == "a directory":
        ckpt.mkdir()
    started: list[object] = []
    for module in (load, overload, rebuild):
        monkeypatch.setattr(module, "start_server", lambda *a, **k: started.append(a))
    monkeypatch.setattr(http.subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr(sys, "argv", [name, "--checkpoint", str(ckpt)])
    with pytest.raises(SystemExit) as e:
        SERVED[name]()
    message = str(e.value.code)
    assert message.startswith(f"error: --checkpoint {ckpt}: {problem}") and "\n" not in message, message
    assert message.endswith("; pass --checkpoint a .safetensors checkpoint") and started == []


NUMBERS = [  # (benchmark, flag, a value it refuses): counts, durations and rates above 0, alphas in [0, 1]
    *[("alphas", "--repeats", v) for v in ("0", "-3")],
    ("alphas", "--alphas", "-1"),
    ("alphas", "--alphas", "1.5"),
    *[("ops", flag, "0") for flag in ("--batch", "--threads", "--runs")],
    ("ops", "--alpha", "2"),
    ("ops", "--alpha", "nan"),
    *[("memory", flag, "0") for flag in ("--builds", "--threads")],
    ("memory", "--alphas", "-0.5"),
    ("switching", "--calls", "0"),
    *[("load", flag, "0") for flag in ("--images", "--duration", "--slo", "--capacity")],
    ("load", "--duration", "-2"),
    ("load", "--duration", "inf"),
    *[
        ("overload", flag, "0")
        for flag in ("--duration", "--factor", "--max-rate", "--capacity-seconds", "--images", "--slo")
    ],
    *[
        ("overload", flag, "-1")
        for flag in ("--rss-bound-mib", "--timeout", "--connections", "--max-lag", "--queue-max")
    ],
    *[
        ("rebuild", flag, "0")
        for flag in ("--images", "--factor", "--duration", "--idle", "--capacity-seconds", "--slo", "--cycles")
    ],
    *[("http", flag, "0") for flag in ("--duration", "--rounds", "--threads", "--plain-threads", "--connections")],
    ("http", "--duration", "2.5"),  # wrk counts whole seconds
    ("http", "--max-wait-ms", "-1"),  # passed through unchecked, the server refused it as LCS_MAX_WAIT_MS
    ("http", "--max-wait-ms", "soon"),
]
MAINS = {
    "alphas": alphas.main,
    "ops": ops.main,
    "memory": memory.main,
    "switching": switching.main,
    "load": load.main,
    "overload": overload.main,
    "rebuild": rebuild.main,
    "http": http.main,
}


@pytest.mark.parametrize(("name", "flag", "value"), NUMBERS)
def test_a_number_out_of_range_is_refused_as_the_flag_is_parsed(
    name: str, flag: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    owner, start = OUTPUTS[name][3]
    monkeypatch.setattr(owner, start, _measured)
    positional = ["model.safetensors"] if name in ("alphas", "ops", "memory", "switching") else []
    alpha = ["--alpha", "0"] if name == "ops" and flag != "--alpha" else []
    monkeypatch.setattr(sys, "argv", [name, *positional, *alpha, f"{flag}={value}"])
    with pytest.raises(SystemExit) as e:
        MAINS[name]()
    assert e.value.code == 2  # argparse's refusal, before anything is read or started
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {flag}: " in error and value in error, error


@pytest.mark.parametrize("name", MAINS)
def test_ctrl_c_ends_a_benchmark_with_one_line_and_exit_code_130(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m benchmarks.<name>`, interrupted (here as it parses its flags): no traceback."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    with warnings.catch_warnings():  # run again as __main__, though imported above: nothing here depends on it
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            runpy.run_module(f"benchmarks.{name}", run_name="__main__")
        except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
            pytest.fail("Ctrl-C escaped the benchmark: a traceback")
        except SystemExit as e:
            assert e.code == 130
        else:
            pytest.fail("the benchmark went on after Ctrl-C")
    assert capsys.readouterr().err == "interrupted; no results written\n"


def test_sigterm_unwinds_a_benchmark_like_ctrl_c_with_exit_code_143(capsys: pytest.CaptureFixture[str]) -> None:
    """`timeout 60 python -m benchmarks.load ...` sends SIGTERM: by default Python ended at once, leaving the
    servers and CPU burners it had started running. Now the `finally` blocks that stop them run."""
    cleaned: list[str] = []

    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # not reached: the handler raises as soon as the signal arrives
            return 0
        finally:
            cleaned.append("servers stopped")

    def ignored(signum: int, frame: object) -> None:  # this test session's, in place of dying by SIGTERM
        cleaned.append("SIGTERM not handled by the benchmark")

    before = signal.signal(signal.SIGTERM, ignored)
    try:
        with pytest.raises(SystemExit) as e:
            command(main)
        assert signal.getsignal(signal.SIGTERM) == ignored  # put back: the caller carries on as it was
    finally:
        signal.signal(signal.SIGTERM, before)
    assert e.value.code == 143 and cleaned == ["servers stopped"]
    assert capsys.readouterr().err == "terminated; no results written\n"


def _exit_code(main: Callable[[], int]) -> object:
    """`command(main)`'s exit code, this test session's SIGTERM handler a no-op meanwhile (a signal that got
    past the benchmark's own handler must not end the test run)."""
    before = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        with pytest.raises(SystemExit) as e:
            command(main)
    finally:
        signal.signal(signal.SIGTERM, before)
    return e.value.code


def test_results_that_cannot_be_written_are_one_line_and_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk at the end of a run: the results' write was a traceback."""
    from lcs.paths import write_json

    def main() -> int:
        write_json(Path("/dev/full"), {"rows": []})
        return 0

    if not Path("/dev/full").exists():
        pytest.skip("needs Linux's /dev/full")
    assert _exit_code(main) == 1
    assert capsys.readouterr().err == "error: /dev/full: cannot write it (No space left on device)\n"


def test_a_second_sigterm_does_not_cut_the_clean_up_short(capsys: pytest.CaptureFixture[str]) -> None:
    """A second SIGTERM (an impatient `timeout -s TERM`, a supervisor's retry) raised again inside the
    `finally` blocks, printing "terminated" twice and skipping what was left to stop."""
    cleaned: list[str] = []

    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # not reached
            return 0
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the second, while stopping the servers
            cleaned.append("servers stopped")

    assert _exit_code(main) == 143 and cleaned == ["servers stopped"]
    assert capsys.readouterr().err == "terminated; no results written\n"


@pytest.mark.parametrize(("name", "rest"), [("ops", ["--alpha", "0.3"]), ("memory", ["--alphas", "1", "0.3"])])
def test_an_alpha_off_the_checkpoints_grid_is_refused_in_one_line_before_any_is_measured(
    name: str, rest: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grid of a checkpoint has the BatchNorm statistics: a ValueError traceback before (memory: after
    measuring the alphas before it); a baseline's grid is its one alpha."""
    from tests.service.service_support import make_checkpoint

    ckpt = make_checkpoint(tmp_path, "structured").path  # grid 0, 0.5, 1
    module = {"ops": ops, "memory": memory}[name]
    monkeypatch.setattr(module, "build", _measured)
    monkeypatch.setattr(sys, "argv", [name, str(ckpt), *rest, "--json", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as e:
        module.main()
    flag = rest[0]
    assert e.value.code == (
        f"error: {flag} 0.3: alpha 0.3 has no BatchNorm statistics in this checkpoint; use one of its grid alphas "
        "[0.0, 0.5, 1.0]"
    )


def test_a_wait_may_be_zero_where_a_count_may_not() -> None:
    from benchmarks.cli import positive

    assert positive(float, zero=True)("0") == 0.0 and positive(float, zero=True)("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="is not above 0"):
        positive(float)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="is not 0 or more"):
        positive(float, zero=True)("-1")


def test_a_measuring_child_that_fails_is_one_line_under_its_own_error(capfd: pytest.CaptureFixture[str]) -> None:
    """alphas and switching time in fresh processes: one that failed was a CalledProcessError traceback of the
    parent's, with the child's own error captured and never shown."""
    crash = [sys.executable, "-c", "import sys; print('the reason', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(SystemExit) as e:
        run_child(crash, "the 2-thread timing process")
    assert e.value.code == "error: the 2-thread timing process exited with code 3; its error is above"
    assert capfd.readouterr().err == "the reason\n"
    fine = [sys.executable, "-c", "print('warming up'); print('[1, 2]')"]
    assert run_child(fine, "a child") == [1, 2]  # the JSON its output ends with


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "error: a child was killed by SIGKILL"),
        ("pass", "error: a child exited 0 but its output did not end with JSON (its last line: nothing)"),
        (
            "print('[1]'); print('done')",
            "error: a child exited 0 but its output did not end with JSON (its last line: 'done')",
        ),
    ],
)
def test_a_child_killed_or_without_json_is_one_line_too(code: str, error: str) -> None:
    """Killed (by the kernel for memory, most often) there is no error of its own above, and "exited with code -9"
    said there was; one printing no JSON was an IndexError or JSONDecodeError traceback of the parent's."""
    with pytest.raises(SystemExit) as e:
        run_child([sys.executable, "-c", code], "a child")
    assert e.value.code == error


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_benchmark_stopped_late_keeps_what_it_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signum: int, code: int, word: str
) -> None:
    """Ctrl-C or SIGTERM twenty minutes into `benchmarks.load` lost every trace run so far. Inside
    `kept_if_stopped` what was measured is written, marked interrupted, after the servers are stopped."""
    out = tmp_path / "results" / "run.json"
    done: list[str] = []
    measured = {"runs": [1, 2], "p99_ms": float("nan")}  # a trace with no answers yet

    def main() -> int:
        with kept_if_stopped(out, lambda: measured):
            try:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # not reached
                return 0
            finally:
                done.append("servers stopped" if not out.exists() else "stopped after the write")

    assert _exit_code(main) == code and done == ["servers stopped"]
    strict = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is no JSON"))
    assert strict == {"runs": [1, 2], "p99_ms": None, "interrupted": True}
    assert capsys.readouterr().err == f"{word}; wrote what was measured to {out}\n"


def test_a_benchmark_stopped_before_it_measured_anything_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"

    def main() -> int:
        with kept_if_stopped(out, lambda: None):
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        command(main)
    assert e.value.code == 130 and not out.exists()
    assert capsys.readouterr().err == "interrupted; no results written\n"
