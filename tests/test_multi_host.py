"""FAMO and the aggregators across ``jax.distributed`` processes, checkpoints, and failures.

Local CPU processes, started by ``examples/multi_host.py``'s ``launch_local``,
form one multi-controller JAX job (coordinator on 127.0.0.1 at a free port,
gloo CPU collectives). Every method is trained: FAMO same-batch and lagged,
and CAGrad and MGDA on the shared trunk.

- 2 processes x 2 CPU devices, float32, ``shard_map`` (FAMO's ``axis_name``
  reducing over local and remote devices at once), ``STEPS`` steps; the job
  saves an orbax checkpoint after ``CHECKPOINT_STEP`` and checks that it
  restores, and the run resumes, bit for bit; this process restores that
  checkpoint and continues on one device;
- 4 processes x 1 device, float64, sharded ``jit``, through the example's
  command line, resuming a checkpoint that this (single) process saved.

One style per job: the processes' CPU time is mostly compiling, one program
per style, so both styles in both jobs would add half the module's time; the
example runs both by default.

This process also runs the same training on its one device: the
single-process run on the global batch that the jobs must reproduce.

Tolerances. Every process of a job must end with bit-identical states. Against
the single process (absolute on parameters, optimizer and FAMO states;
relative on the task losses, which reach ~25):

- float32, ``TOLERANCE = 1e-5``. The runs differ in the order of the batch
  reductions only; measured (the example's ``--reference``, 2 processes x 2
  devices, 8 steps, both styles): FAMO and MGDA below 3e-7.
- CAGrad in float32, ``CAGRAD_FLOAT32_TOLERANCE = 5e-4``: its float32 weights
  are accurate to ~1e-4 relative only (on this problem's first Gram matrix they
  differ from the float64 solution by 4e-5, and a 1e-7 relative change of the
  Gram matrix moves them by 4e-5, against 4e-7 in float64), so reordered
  reductions move each CAGrad step at that level; measured: up to 4.3e-5 after
  6 steps (3 of them after a restore), 6.7e-6 in the example's 8 steps.
- float64, ``TOLERANCE_FLOAT64 = 1e-12``: measured below 5e-16 for every
  method, CAGrad included, after 6 steps on 4 processes x 1 device (3e-16
  after 12 steps), which shows that the
  float32 gap of CAGrad is its solver's precision, not the data parallelism.

The failure scenarios (which mostly wait for JAX's timeouts) and the
two-process job run in background threads from the first test on, so that they
overlap with this process's runs and the four-process job. Every job has a
launcher timeout, after which its processes are killed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import famo_jax
from examples import multi_host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_STEP = 6, 3
TOLERANCE = 1e-5
CAGRAD_FLOAT32_TOLERANCE = 5e-4
TOLERANCE_FLOAT64 = 1e-12
JOB_TIMEOUT = 300.0  # seconds per training job, then its processes are killed
# The failure scenarios: JAX's timeouts, and the bounds the test allows on top
# of them for a busy machine (starting a process, importing JAX, compiling).
HEARTBEAT_TIMEOUT = 3
INITIALIZATION_TIMEOUT = 4
DETECTION_SLACK = 30.0
FAULT = [sys.executable, "-u", os.path.join(REPO, "tests", "_multi_host_fault.py")]


def _worker(*argv: str) -> list[str]:
    return multi_host.worker_command(list(argv))


def _failure_scenarios() -> dict:
    quick = ["--steps", "4", "--methods", "famo", "--styles", "jit", "--no-reference"]
    quick += ["--initialization-timeout", str(INITIALIZATION_TIMEOUT)]
    launch = lambda command, n, **kw: multi_host.launch_local(
        command, n, timeout=120.0, failure_grace=60.0, cwd=REPO, **kw
    )
    return {
        # Process 1 dies after 2 steps; process 0 (which hosts the coordinator) waits for it.
        "worker_dies": lambda: launch(FAULT + ["1", "2", str(HEARTBEAT_TIMEOUT)], 2),
        # The coordinator's process dies after 2 steps.
        "coordinator_dies": lambda: launch(FAULT + ["0", "2", str(HEARTBEAT_TIMEOUT)], 2),
        # Only process 1 of 2 is started: nothing listens at the coordinator's address.
        "coordinator_unreachable": lambda: launch(_worker(*quick), 2, process_ids=[1]),
        # Only process 0 of 2 is started: the coordinator waits for a process that never joins.
        "process_never_joins": lambda: launch(_worker(*quick), 2, process_ids=[0]),
        # The launcher's own limits, on processes that would never end.
        "launcher_timeout": lambda: multi_host.launch_local(
            [sys.executable, "-c", "import time; time.sleep(600)"], 2, timeout=1.0
        ),
        "launcher_failure_grace": lambda: multi_host.launch_local(
            [
                sys.executable,
                "-c",
                "import os, sys, time\n"
                "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit('process 1 gives up')\n"
                "time.sleep(600)",
            ],
            2,
            timeout=120.0,
            failure_grace=1.0,
        ),
    }


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """Starts every failure scenario and the two-process job; ``background[name]`` waits for one.

    The first fixtures request it, so that all of them run while this process
    computes its own runs and the four-process job runs.
    """
    jobs = _failure_scenarios()
    checkpoint_dir = str(tmp_path_factory.mktemp("two_process_checkpoint"))
    out = str(tmp_path_factory.mktemp("two_process_states"))
    jobs["two_processes"] = lambda: _two_process_job(checkpoint_dir, out)
    pid_dir = str(tmp_path_factory.mktemp("terminated_launcher"))
    jobs["launcher_terminated"] = lambda: _terminate_a_launcher(pid_dir)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs))
    futures = {name: executor.submit(run) for name, run in jobs.items()}

    class Results(dict):
        def __missing__(self, name):
            return futures[name].result(timeout=JOB_TIMEOUT + 60)

    yield Results()
    executor.shutdown(wait=True)


def _load(directory, name: str, num_processes: int) -> list[dict[str, np.ndarray]]:
    paths = [os.path.join(directory, f"{name}.process{i}.npz") for i in range(num_processes)]
    out = []
    for path in paths:
        with np.load(path) as data:
            out.append(dict(data))
    return out


def _unflatten(like, flat: dict[str, np.ndarray]):
    """``like``'s structure holding the arrays of ``flat`` (keyed as ``multi_host.flatten``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(
        treedef, [flat[jax.tree_util.keystr(path)] for path, _ in leaves]
    )


def _assert_flat_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _assert_close(actual: dict, expected: dict):
    """Within the tolerances of the module docstring; integers (step counters) equal."""
    assert actual.keys() == expected.keys() and actual
    for key, value in actual.items():
        if not np.issubdtype(value.dtype, np.floating):  # steps, num_updates, num_skipped
            np.testing.assert_array_equal(value, expected[key], err_msg=key)
            continue
        if value.dtype == np.float64:
            tolerance = TOLERANCE_FLOAT64
        else:
            tolerance = CAGRAD_FLOAT32_TOLERANCE if "['cagrad']" in key else TOLERANCE
        if key.endswith(".prev_losses"):
            np.testing.assert_allclose(value, expected[key], rtol=tolerance, err_msg=key)
        else:
            np.testing.assert_allclose(value, expected[key], rtol=0, atol=tolerance, err_msg=key)


# --- the single-process run and the two jobs ---------------------------------------------------


def _single_process_run(checkpoint_dir: str, dtype: str, styles: tuple[str, ...]) -> dict:
    # One device; every style's states are trained with the one-device step
    # (style jit), and the checkpoint has the structure the jobs restore.
    config = multi_host.RunConfig(steps=STEPS, dtype=dtype, styles=styles)
    mesh = multi_host.make_global_mesh(jax.devices()[:1])
    initial = multi_host.initial_states(config, mesh)
    checkpointed = multi_host.train(initial, config, mesh, CHECKPOINT_STEP, step_style="jit")
    multi_host.save_checkpoint(checkpoint_dir, CHECKPOINT_STEP, checkpointed)
    final = multi_host.train(checkpointed, config, mesh, STEPS, step_style="jit")
    flat = lambda tree: multi_host.flatten(multi_host.to_host(tree))
    return {
        "initial": flat(initial),
        "checkpointed": flat(checkpointed),
        "final": flat(final),
        "host_final": multi_host.to_host(final),
        "checkpoint_dir": checkpoint_dir,
        "mesh": mesh,
    }


@pytest.fixture(scope="module")
def failures(background):
    return background


TWO_PROCESS_STYLE, FOUR_PROCESS_STYLE = "shard_map", "jit"


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, background):
    """This process, one device, float32: the run, with a checkpoint after ``CHECKPOINT_STEP``."""
    directory = str(tmp_path_factory.mktemp("single_float32"))
    return _single_process_run(directory, "float32", (TWO_PROCESS_STYLE,))


@pytest.fixture(scope="module")
def single_process_float64(tmp_path_factory, background):
    """The same run in float64 (what the four-process job resumes and must reproduce)."""
    directory = str(tmp_path_factory.mktemp("single_float64"))
    with jax.enable_x64(True):
        return _single_process_run(directory, "float64", (FOUR_PROCESS_STYLE,))


def _two_process_job(checkpoint_dir: str, out: str) -> dict:
    """2 processes x 2 devices, ``shard_map``, checkpoint after ``CHECKPOINT_STEP``."""
    result = multi_host.launch_local(
        _worker(
            *("--steps", str(STEPS), "--styles", TWO_PROCESS_STYLE, "--no-reference"),
            *("--checkpoint-dir", checkpoint_dir, "--checkpoint-step", str(CHECKPOINT_STEP)),
            *("--out", out),
        ),
        2,
        devices_per_process=2,
        timeout=JOB_TIMEOUT,
        cwd=REPO,
    ).check()
    return {
        "result": result,
        "checkpoint_dir": checkpoint_dir,
        **{name: _load(out, name, 2) for name in ("start", "checkpointed", "final")},
    }


@pytest.fixture(scope="module")
def two_processes(background):
    return background["two_processes"]


@pytest.fixture(scope="module")
def four_processes(single_process_float64, tmp_path_factory):
    """4 processes x 1 device, float64, resuming this process's checkpoint, through ``main``."""
    out = str(tmp_path_factory.mktemp("four_process_states"))
    argv = ["--local-processes", "4", "--devices-per-process", "1", "--timeout", str(JOB_TIMEOUT)]
    argv += ["--steps", str(STEPS), "--dtype", "float64", "--no-reference"]
    argv += ["--styles", FOUR_PROCESS_STYLE]
    argv += ["--out", out]
    argv += ["--resume", "--checkpoint-dir", single_process_float64["checkpoint_dir"]]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = multi_host.main(argv)
    return {
        "result": result,
        "printed": printed.getvalue(),
        **{name: _load(out, name, 4) for name in ("start", "final")},
    }


def test_the_runs_cover_every_method_and_famo_moved(single_process):
    methods = multi_host.METHODS
    final = single_process["host_final"][TWO_PROCESS_STYLE]
    assert set(final) == set(methods)
    for method in methods:
        assert int(final[method].step) == STEPS
        if method == "famo":
            assert int(final[method].weighting_state.num_updates) == STEPS
        if method.endswith("_lagged"):  # the first update has NaN previous losses: skipped
            assert int(final[method].weighting_state.num_skipped) == 1
        if method not in ("cagrad", "mgda"):
            # The logits moved, so the comparisons below cover the update, not only the init.
            assert np.ptp(final[method].weighting_state.logits) > 0.01, method


# The four-process job runs here, while the two-process job runs in the background.


@pytest.mark.parametrize("name", ["start", "final"])
def test_four_processes_hold_bit_identical_states(four_processes, name):
    first, *others = four_processes[name]
    for other in others:
        _assert_flat_equal(first, other)


def test_four_processes_resume_the_single_process_checkpoint(
    four_processes, single_process_float64
):
    start, final = four_processes["start"][0], four_processes["final"][0]
    # Restored bit for bit onto the four-process job's global mesh...
    _assert_flat_equal(start, single_process_float64["checkpointed"])
    # ...and continued to where the single process got to.
    _assert_close(final, single_process_float64["final"])
    assert final["['jit']['famo'].params['trunk']['w']"].dtype == np.float64
    assert final["['jit']['famo'].weighting_state.logits"].dtype == np.float64
    assert "4 process(es), 4 devices (1 per process)" in four_processes["printed"]
    assert f"steps {CHECKPOINT_STEP}..{STEPS}" in four_processes["printed"]
    assert four_processes["result"].ok


@pytest.mark.parametrize("name", ["start", "checkpointed", "final"])
def test_two_processes_hold_bit_identical_states(two_processes, name):
    first, second = two_processes[name]
    _assert_flat_equal(first, second)


def test_two_processes_start_from_the_single_process_initial_states(two_processes, single_process):
    _assert_flat_equal(two_processes["start"][0], single_process["initial"])


@pytest.mark.parametrize("name", ["checkpointed", "final"])
def test_two_processes_equal_the_single_process_run(two_processes, single_process, name):
    _assert_close(two_processes[name][0], single_process[name])


def test_two_process_job_restores_and_resumes_its_checkpoint_bit_for_bit(two_processes):
    printed = two_processes["result"].processes[0].stdout
    assert "2 process(es), 4 devices (2 per process)" in printed
    assert "every process holds the same parameters, optimizer and method states: yes" in printed
    assert (
        f"checkpoint at step {CHECKPOINT_STEP}: restored bit for bit: yes; resumed run equals "
        "the uninterrupted one bit for bit: yes"
    ) in printed


def test_two_process_checkpoint_restores_into_one_process_and_continues(
    two_processes, single_process
):
    mesh = single_process["mesh"]
    config = multi_host.RunConfig(steps=STEPS, styles=(TWO_PROCESS_STYLE,))  # as the job saved
    fresh = multi_host.initial_states(config, mesh)
    restored = multi_host.restore_checkpoint(two_processes["checkpoint_dir"], fresh)
    assert isinstance(restored[TWO_PROCESS_STYLE]["famo"].weighting_state, famo_jax.FAMOState)
    saved = two_processes["checkpointed"][0]
    # Bit for bit what the job held when it saved.
    _assert_flat_equal(multi_host.flatten(multi_host.to_host(restored)), saved)
    resumed = multi_host.flatten(
        multi_host.to_host(multi_host.train(restored, config, mesh, STEPS, step_style="jit"))
    )
    # Continuing bit-identically: as from the saved arrays themselves, on this one device.
    from_saved = multi_host.replicate(_unflatten(multi_host.to_host(fresh), saved), mesh)
    _assert_flat_equal(
        resumed,
        multi_host.flatten(
            multi_host.to_host(multi_host.train(from_saved, config, mesh, STEPS, step_style="jit"))
        ),
    )
    # And where the two-process job itself got to, within the tolerance.
    _assert_close(resumed, two_processes["final"][0])


# --- failures ----------------------------------------------------------------------------------


def _by_id(result, process_id):
    return next(p for p in result.processes if p.process_id == process_id)


# What a survivor reports: JAX's health check ("tasks are unhealthy (stopped
# sending heartbeats)", or its RPCs to a dead coordinator fail), or, when it is
# inside a gloo reduction with the dead process, gloo's "Connection closed by peer".
SURVIVOR_ERRORS = (
    "JAX distributed service detected fatal errors",
    "Gloo all-reduce failed",
)


@pytest.mark.parametrize(
    "scenario, dying, message",
    [
        ("worker_dies", 1, r"stopped sending heartbeats|Connection closed by peer"),
        ("coordinator_dies", 0, r"coordination service|Connection closed by peer"),
    ],
)
def test_a_process_that_dies_stops_the_others_in_bounded_time(failures, scenario, dying, message):
    result = failures[scenario]
    dead, survivor = _by_id(result, dying), _by_id(result, 1 - dying)
    assert dead.returncode == 3 and "trained 2 steps" in dead.stdout
    assert "trained 2 steps" in survivor.stdout and "finished" not in survivor.stdout
    # It stopped on its own (JAX's health check aborts it), not by the launcher...
    assert not survivor.killed and survivor.returncode != 0
    assert any(error in survivor.error for error in SURVIVOR_ERRORS), survivor.error
    assert re.search(message, survivor.error), survivor.error
    # ...within the heartbeat timeout of the death, plus slack for a busy machine.
    assert survivor.elapsed - dead.elapsed < HEARTBEAT_TIMEOUT + DETECTION_SLACK
    assert not result.timed_out
    with pytest.raises(multi_host.JobFailed, match="process 1"):
        result.check()


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time(failures):
    result = failures["coordinator_unreachable"]
    (process,) = result.processes
    assert process.returncode == 1 and not process.killed
    assert process.error.startswith("CoordinatorUnreachableError: process 1 could not reach")
    assert f"within {INITIALIZATION_TIMEOUT} s" in process.error
    assert process.elapsed < INITIALIZATION_TIMEOUT + DETECTION_SLACK


def test_a_process_that_never_joins_stops_the_coordinator_in_bounded_time(failures):
    result = failures["process_never_joins"]
    (process,) = result.processes
    assert not process.killed and process.returncode != 0
    assert "DEADLINE_EXCEEDED" in process.error
    assert process.elapsed < INITIALIZATION_TIMEOUT + DETECTION_SLACK


def test_the_launcher_kills_a_job_that_outlives_its_timeout(failures):
    result = failures["launcher_timeout"]
    assert result.timed_out and not result.ok
    assert all(p.killed and p.returncode < 0 for p in result.processes)
    assert result.elapsed < 10.0
    for p in result.processes:  # gone, not just abandoned
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)
    with pytest.raises(multi_host.JobFailed, match="timed out"):
        result.check()


def test_the_launcher_kills_the_rest_once_a_process_has_failed(failures):
    result = failures["launcher_failure_grace"]
    failed, left = _by_id(result, 1), _by_id(result, 0)
    assert failed.returncode == 1 and not failed.killed
    assert failed.error == "process 1 gives up"
    assert left.killed and not result.timed_out
    assert left.elapsed - failed.elapsed < 10.0


_SLEEPER = (
    "import os, time\n"
    "with open(os.path.join(os.environ['PID_DIR'], os.environ['JAX_PROCESS_ID']), 'w') as f:\n"
    "    f.write(str(os.getpid()))\n"
    "time.sleep(600)"
)
_TERMINATED_LAUNCHER = f"""
import sys
sys.path.insert(0, {REPO!r})
from examples import multi_host
with multi_host.exit_on_sigterm():
    multi_host.launch_local([sys.executable, "-c", {_SLEEPER!r}], 2, timeout=120.0)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate_a_launcher(pid_dir: str) -> dict:
    """Starts a launcher of two sleepers, sends it SIGTERM once both run; what was left."""
    env = {**os.environ, "PID_DIR": pid_dir}
    launcher = subprocess.Popen([sys.executable, "-c", _TERMINATED_LAUNCHER], env=env)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60.0
        while len(pids) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
            files = [os.path.join(pid_dir, name) for name in ("0", "1")]
            if all(os.path.exists(f) and os.path.getsize(f) for f in files):
                pids = [int(open(f).read()) for f in files]
        if len(pids) < 2:
            return {"started": False}
        launcher.send_signal(signal.SIGTERM)
        returncode = launcher.wait(timeout=30)
        return {"started": True, "returncode": returncode, "alive": [_alive(p) for p in pids]}
    finally:
        launcher.kill()
        launcher.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_terminated_launcher_takes_its_processes_with_it(failures):
    """SIGTERM to the launcher (a scheduler cancelling the job) kills the processes it started."""
    result = failures["launcher_terminated"]
    assert result["started"], "the launcher did not start its processes within 60 s"
    assert result["returncode"] == 128 + signal.SIGTERM
    assert result["alive"] == [False, False]


# --- small pieces ------------------------------------------------------------------------------


def test_join_job_without_settings_is_a_single_process_run(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert multi_host.join_job() is False


def test_join_job_rejects_partial_settings(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        multi_host.join_job()


def test_wait_for_coordinator():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        multi_host.wait_for_coordinator(f"127.0.0.1:{listening.getsockname()[1]}", 5.0)
    port = multi_host.free_port()
    with pytest.raises(multi_host.CoordinatorUnreachableError, match=f"127.0.0.1:{port} within"):
        multi_host.wait_for_coordinator(f"127.0.0.1:{port}", 0.3, process_id=3)


def test_error_summary():
    traceback = "Traceback (most recent call last):\n  File 'x', line 1\nValueError: bad value\n"
    assert multi_host.error_summary("noise\n" + traceback) == "ValueError: bad value"
    abort = (
        "E1202 12:36:04.017547    8994 coordination_service.cc:1549] an error\n"
        "F1202 12:36:04.018607    9005 client.h:80] Terminating process because the JAX "
        "distributed service detected fatal errors. This most likely indicates that another "
        "task died. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped "
        "sending heartbeats):\n1\n*** Check failure stack trace: ***\n    @ 0x7f1374c40634\n"
    )
    assert multi_host.error_summary(abort) == (
        "Terminating process because the JAX distributed service detected fatal errors: "
        "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats): 1"
    )
    assert multi_host.error_summary("just this\n") == "just this"
    assert multi_host.error_summary("") == ""


def test_worker_argv_drops_only_the_launch_options():
    argv = ["--local-processes", "4", "--steps=3", "--devices-per-process=1", "--timeout", "9"]
    assert multi_host._worker_argv(argv + ["--resume"]) == ["--steps=3", "--resume"]
