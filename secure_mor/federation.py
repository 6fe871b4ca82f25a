"""Run the Flower app on Flower's local simulation runtime, isolated and cleaned up.

`flwr run` (flwr 1.41) submits the app to a local SuperLink that it starts in
the background and never stops, installs the app's dependencies at run time
unless told not to, lets Ray listen on every interface, and exits 0 even when
the run fails. `run_local_simulation` wraps it so that a run:

- uses its own Flower home and Ray temp directory (nothing in `~/.flwr`),
- installs nothing at run time and phones nowhere (telemetry, update checks off),
- keeps Ray and the SuperLink on 127.0.0.1,
- blocks until the run finishes and reports its real status and logs,
- stops every process it started (the SuperLink's whole process tree), also on error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import psutil

APP_DIR = Path(__file__).resolve().parents[1]  # the repository root holds the app's pyproject.toml


class FederationError(RuntimeError):
    """The Flower run could not be started, failed, or timed out; the message carries its logs."""


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    status: str
    details: str
    logs: str
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def flower_shims(directory: Path) -> Path:
    """`directory` filled with one executable per Flower console script that runs it under this
    interpreter; Flower's processes start each other by name, so this directory goes first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    scripts = [e for e in entry_points(group="console_scripts") if e.dist and e.dist.name.lower() == "flwr"]
    if not scripts:
        raise FederationError("Flower is not installed (pip install 'secure-mor[simulation]')")
    for entry in scripts:
        module, _, attr = entry.value.partition(":")
        shim = directory / entry.name
        code = f"import sys; sys.argv[0] = {entry.name!r}; from {module} import {attr}; sys.exit({attr}())"
        shim.write_text(f'#!/bin/sh\nexec {json.dumps(sys.executable)} -c {json.dumps(code)} "$@"\n')
        shim.chmod(0o755)
    return directory


def simulation_env(flwr_home: Path, ray_tmp: Path, bin_dir: Path) -> dict[str, str]:
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": free_port(), "FLWR_LOCAL_CONTROL_API_PORT": free_port()}
    # flwr starts `flower-superlink`, `flower-superexec`, ... by name: `bin_dir` holds them
    # (flower_shims), so that they run this interpreter and import this secure_mor.
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **os.environ,
        "PATH": path,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps every Ray listener on 127.0.0.1
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DEDUP_LOGS": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **{k: str(v) for k, v in ports.items()},
    }


def stop_process_trees(roots: Sequence[int]) -> None:
    """SIGTERM every process in the trees of `roots` (found before any dies: Flower starts its
    SuperExec in a session of its own, out of reach of a process-group signal), then SIGKILL
    whatever is left after 10 s."""
    processes = []
    for pid in roots:
        try:
            root = psutil.Process(pid)
            processes += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)


def _stop_superlink(env: Mapping[str, str]) -> None:
    """Kill the background SuperLink (found by its port) and everything it started."""
    ports = {int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), int(env["FLWR_LOCAL_CONTROL_API_PORT"])}
    owners = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid
    }
    stop_process_trees(sorted(owners))


def flwr_json(args: list[str], env: Mapping[str, str], cwd: Path, timeout: float) -> dict:
    done = subprocess.run(args, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as err:
        raise FederationError(f"`{' '.join(args[1:3])}` failed: {done.stdout[-2000:]}{done.stderr[-2000:]}") from err


def run_overrides(run_config: Mapping[str, object]) -> str:
    """A run config as `flwr run --run-config` takes it."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())


def wait_for_run(
    flwr: str,
    run_id: str,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
    started: float,
    on_poll: Callable[[float], None] | None = None,
    poll_seconds: float = 5.0,
) -> tuple[str, str, str]:
    """Poll `flwr list` until run `run_id` finishes (or stop it `timeout` s after `started`);
    returns its status, status details and logs."""
    while True:
        for _ in range(max(1, round(poll_seconds))):
            if on_poll:
                on_poll(time.perf_counter() - started)
            time.sleep(1.0)
        listing = flwr_json([flwr, "list", "--run-id", run_id, "--format", "json"], env, cwd, 120)
        run = (listing.get("runs") or [{}])[0]
        status, details = str(run.get("status", "")), str(run.get("status-details", ""))
        if status.startswith("finished"):
            break
        if time.perf_counter() - started > timeout:
            subprocess.run([flwr, "stop", run_id], env=dict(env), cwd=cwd, capture_output=True, timeout=60)
            status, details = "finished:timeout", f"no result after {timeout:.0f} s"
            break
    logs = subprocess.run(
        [flwr, "log", run_id, "--show"], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=120
    ).stdout
    return status, details, logs


def run_local_simulation(
    run_config: Mapping[str, object],
    num_supernodes: int,
    *,
    app_dir: Path = APP_DIR,
    timeout: float = 1800.0,
    on_poll: Callable[[float], None] | None = None,
    poll_seconds: float = 5.0,
) -> SimulationResult:
    """Run the Flower app in `app_dir` with `num_supernodes` simulated nodes (1 CPU each).

    The run's status is polled with `flwr list` every `poll_seconds` (each call starts a
    Python process: about a second of CPU); `on_poll(elapsed)` is called every second."""
    if not (app_dir / "pyproject.toml").exists():
        raise FederationError(f"no Flower app at {app_dir} (pyproject.toml with [tool.flwr.app] expected)")
    started = time.perf_counter()
    # Ray's socket paths must stay short (108 bytes): a fresh directory under /tmp.
    with tempfile.TemporaryDirectory(prefix="smor-flwr-") as scratch:
        scratch_dir = Path(scratch)
        env = simulation_env(scratch_dir / "home", scratch_dir / "ray", flower_shims(scratch_dir / "bin"))
        (scratch_dir / "home").mkdir()
        (scratch_dir / "ray").mkdir()
        (scratch_dir / "home" / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        )
        flwr = str(scratch_dir / "bin" / "flwr")
        overrides = run_overrides(run_config)
        federation = f"num-supernodes={int(num_supernodes)} client-resources-num-cpus=1"
        try:
            args = [flwr, "run", str(app_dir), "--format", "json", "--federation-config", federation]
            if overrides:
                args += ["--run-config", overrides]
            submitted = flwr_json(args, env, scratch_dir, timeout=300)
            if "Failed to start local SuperLink" in str(submitted.get("error-message")):
                # flwr gives its SuperLink 15 s to start, too few on a busy machine; it keeps
                # starting, and a second `flwr run` finds it up
                submitted = flwr_json(args, env, scratch_dir, timeout=300)
            if not submitted.get("success") or "run-id" not in submitted:
                raise FederationError(f"flwr run refused the app: {submitted}")
            run_id = str(submitted["run-id"])
            status, details, logs = wait_for_run(
                flwr, run_id, env, scratch_dir, timeout, started, on_poll, poll_seconds
            )
        finally:
            _stop_superlink(env)
    result = SimulationResult(run_id, status, details, logs, time.perf_counter() - started)
    if status != "finished:completed":
        raise FederationError(f"Flower run {run_id} {status}: {details}\n--- logs ---\n{logs[-6000:]}")
    return result
