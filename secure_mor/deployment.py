"""Run the Flower app on Flower's deployment runtime, as real processes on 127.0.0.1.

`LocalDeployment` is what docs/deployment.md describes, on one machine: a SuperLink
with TLS and SuperNode authentication, one SuperNode per client institution and one
for the key authority, each party in its own directory (institutions share no disk),
the operator's PKI (`secure_mor.crypto.pki`) and `flwr run`. Every process it starts
is stopped, with everything it spawned, when the deployment is closed, also on error.

Layout under `root`:

    pki/                  the operator's CA, SuperLink certificate, the parties' public keys, registry
    operator/flwr-home/   the `flwr` CLI's configuration (the SuperLink connection "deployment")
    superlink/            its log and Flower home
    client-K/, authority/ each SuperNode: state/ (node config `state-dir`), keys/ (the keys the
                          party made itself: its SuperNode key and its encrypted payload-signing
                          key, `key-dir`), data/ (a client's own preference pairs, `data-dir`),
                          registry/ (its own copy of the public payload keys), flwr-home/, its log
    server/               the ServerApp's run directory run/ (its encrypted signing key in
                          run/server/keys) and its copy of the registry
    secrets/PARTY/        each party's passphrases (0700; outside every state directory), handed
                          to its process in the environment, as a secrets store would

Keys are made the way docs/deployment.md prescribes: each party makes its own where it runs
(`crypto.pki.party_keys`) and gives the operator only the public halves, which the operator
registers (`crypto.pki.register_party`: the CA signs each registry entry).

The Flower commands run under this interpreter (`federation.flower_shims` in `<root>/bin`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

from secure_mor.crypto.pki import AUTH_KEY, Pki, init_pki, party_keys, register_party, signing_key_dir
from secure_mor.crypto.signing import KEY_PASSPHRASE_ENV, read_or_create_secret
from secure_mor.federation import (
    APP_DIR,
    FederationError,
    flower_shims,
    free_port,
    run_overrides,
    stop_process_trees,
    toml_value,
    wait_for_run,
)
from secure_mor.protocol import AUTHORITY_PARTY, SERVER_PARTY

HOST = "127.0.0.1"
CONNECTION = "deployment"  # the `flwr` CLI's name for this SuperLink
PASSPHRASE_ENV = "SECURE_MOR_AUTHORITY_PASSPHRASE"  # as secure_mor.authority.node reads it
SUPEREXEC_POLL_SECONDS = 0.2

# The tiny job of the deployment test and of `secure-mor deploy local`: minutes, not hours, on a CPU.
TINY_RUN: dict[str, object] = {
    "fusion": "mor",
    "epsilon": 4.0,
    "seed": 0,
    "grpo-max-steps": 2,
    "sft-examples": 64,
    "sft-epochs": 1.0,
    "sft-vision-epochs": 1,
    "pairs-per-client": 100,
    "calibration-pairs": 300,
    "answer-prior-questions": 3,
    "client-epochs": 2,
    "client-public-epochs": 1,
    "router-steps": 2,
    "grpo-batch-size": 8,
    "grpo-steps-per-generation": 1,
    "grpo-save-steps": 1,
    "eval-per-family": 8,
    "validation-per-family": 4,
}


@dataclass(frozen=True)
class DeploymentResult:
    run_id: str
    status: str
    details: str
    logs: str
    seconds: float


def app_run_config(app_dir: Path = APP_DIR) -> dict[str, object]:
    """The app's default run config (`[tool.flwr.app.config]` of its pyproject.toml)."""
    with (app_dir / "pyproject.toml").open("rb") as file:
        return dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])


def node_config_arg(config: Mapping[str, object]) -> str:
    """A node config as `flower-supernode --node-config` takes it."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"the process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.5)
    raise FederationError(f"nothing listens on {HOST}:{port} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


class LocalDeployment:
    """A SuperLink (TLS, SuperNode authentication), `num_clients` client SuperNodes and one key
    authority SuperNode on 127.0.0.1 under `root` (module docstring). Use as a context manager,
    or call `start()` and, always, `stop()`."""

    def __init__(self, root: Path | str, num_clients: int, *, k_min: int = 2, app_dir: Path = APP_DIR) -> None:
        self.root = Path(root).resolve()
        self.num_clients = num_clients
        self.k_min = k_min
        self.app_dir = app_dir
        self.pki = Pki(self.root / "pki")
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []
        self._bin = self.root / "bin"

    # ------------------------------------------------------------ layout

    @property
    def parties(self) -> list[str]:
        return [*(f"client-{k}" for k in range(self.num_clients)), AUTHORITY_PARTY]

    def state_dir(self, party: str) -> Path:
        return self.root / party / "state"

    @property
    def run_dir(self) -> Path:
        return self.root / SERVER_PARTY / "run"

    def key_dir(self, party: str) -> Path:
        """Where the party keeps the keys it made (node config `key-dir`; the server's: in its run directory)."""
        return signing_key_dir(self.run_dir, SERVER_PARTY) if party == SERVER_PARTY else self.root / party / "keys"

    def secret(self, party: str, name: str) -> str:
        """One of the party's passphrases, kept in its own secrets directory (0700, outside its state)."""
        directory = self.root / "secrets" / party
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        return read_or_create_secret(directory / name)

    def data_dir(self, party: str) -> Path:
        """A client institution's own preference pairs (node config `data-dir`)."""
        return self.root / party / "data"

    def registry(self, party: str) -> Path:
        return self.root / party / "registry"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def env(self, home: str) -> dict[str, str]:
        """The environment of a Flower process whose Flower home is `<root>/<home>/flwr-home`."""
        flwr_home = self.root / home / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "PATH": os.pathsep.join([str(self._bin), os.environ.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            # How often a SuperExec asks its SuperNode for a message to start a ClientApp for
            # (Flower's default 1 s, paid on every message of every scoring round).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_SECONDS),
        }

    # ------------------------------------------------------------ keys

    def prepare(self) -> None:
        """The operator's PKI; every party's keys, made by the party in its own key directory; the
        operator's registration of their public halves; each party's own copy of the registry."""
        flower_shims(self._bin)
        if not self.pki.ca_key.exists():
            init_pki(self.pki.directory, hosts=("localhost", HOST))
        for party in [*self.parties, SERVER_PARTY]:
            if not (self.key_dir(party) / f"{party}.key").exists():  # the party, where it runs
                party_keys(self.key_dir(party), party, self.secret(party, "signing-key"),
                           supernode=party != SERVER_PARTY)  # fmt: skip
            if not (self.pki.registry / f"{party}.pub").exists():  # the operator, from the public files
                register_party(self.pki.directory, party, self.key_dir(party))
        for party in [*self.parties, SERVER_PARTY]:
            shutil.copytree(self.pki.registry, self.registry(party), dirs_exist_ok=True)
        home = self.root / "operator" / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.pki.ca_cert}"\n'
        )

    # ------------------------------------------------------------ processes

    def _spawn(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
        log_path = self.root / name / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        self._logs.append(log)
        process = subprocess.Popen(
            list(args), env=dict(env), cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.root / name / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self, *, tls: bool = True, node_auth: bool = True) -> None:
        args = [str(self._bin / "flower-superlink"), "--host", HOST, "--port", str(self.port)]
        args += ["--disable-runtime-dependency-installation"]  # the app is installed: nothing is fetched
        if tls:
            args += [
                "--ssl-ca-certfile", str(self.pki.ca_cert),
                "--ssl-certfile", str(self.pki.superlink_cert),
                "--ssl-keyfile", str(self.pki.superlink_key),
            ]  # fmt: skip
        else:
            args += ["--insecure"]
        if node_auth:
            args += ["--enable-supernode-auth"]
        # The ServerApp runs under the SuperLink's SuperExec: it reads the server's key passphrase there.
        env = {**self.env("superlink"), KEY_PASSPHRASE_ENV: self.secret(SERVER_PARTY, "signing-key")}
        process = self._spawn("superlink", args, env)
        _wait_for_port(self.port, process, self.root / "superlink" / "superlink.log")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """A `flwr` command as the operator (connection "deployment", TLS with the CA)."""
        return subprocess.run(
            [str(self._bin / "flwr"), *args], env=self.env("operator"), cwd=self.root / "operator",
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def register(self, party: str) -> None:
        """`flwr supernode register` the party's SuperNode authentication key."""
        done = self.flwr("supernode", "register", str(self.pki.auth_public_key(party)), "--format", "json")
        if done.returncode != 0 or '"success": true' not in done.stdout:
            raise FederationError(f"registering {party} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def node_config(self, party: str) -> dict[str, object]:
        """What the party's SuperNode is told about itself (secure_mor.protocol.node_role)."""
        where = {"state-dir": str(self.state_dir(party)), "key-dir": str(self.key_dir(party))}
        if party == AUTHORITY_PARTY:
            return {"role": "authority", **where, "registry": str(self.registry(party)),
                    "ca-cert": str(self.pki.ca_cert), "k-min": self.k_min}  # fmt: skip
        client_id = int(party.removeprefix("client-"))
        # its registry: the key authority's key in it verifies the context the server relays
        return {"role": "client", "client-id": client_id, **where, "data-dir": str(self.data_dir(party)),
                "registry": str(self.registry(party)), "ca-cert": str(self.pki.ca_cert)}  # fmt: skip

    def start_node(
        self,
        party: str,
        *,
        auth_key: Path | None = None,
        authenticate: bool = True,
        tls: bool = True,
        max_retries: int | None = None,
    ) -> subprocess.Popen:
        """Start the party's SuperNode. The keyword arguments make the strangers of the fault tests:
        another authentication key, none, no TLS, and how often it may retry to connect."""
        args = [
            str(self._bin / "flower-supernode"),
            "--superlink", self.address,
            "--host", HOST,
            "--port", str(free_port()),
            "--node-config", node_config_arg(self.node_config(party)),
        ]  # fmt: skip
        if authenticate:
            args += ["--auth-supernode-private-key", str(auth_key or self.key_dir(party) / AUTH_KEY)]
        args += ["--root-certificates", str(self.pki.ca_cert)] if tls else ["--insecure"]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        # One thread per party, as Flower's simulation gives each node one CPU: the parties stand
        # for separate machines, and sharing this one's cores they would oversubscribe it.
        env = {**self.env(party), "OMP_NUM_THREADS": "1", KEY_PASSPHRASE_ENV: self.secret(party, "signing-key")}
        if party == AUTHORITY_PARTY:
            env[PASSPHRASE_ENV] = self.secret(party, "ckks-key")  # its CKKS secret key at rest
        return self._spawn(party, args, env)

    def online_nodes(self) -> int:
        done = self.flwr("supernode", "ls", "--format", "json")
        try:
            nodes = json.loads(done.stdout).get("nodes", [])
        except json.JSONDecodeError as err:
            raise FederationError(f"`flwr supernode ls` failed: {done.stdout[-2000:]}{done.stderr[-2000:]}") from err
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_nodes(self, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise FederationError(f"only {online} of {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(2.0)

    def stop_node(self, party: str) -> None:
        process = self.processes.pop(party, None)
        if process is not None:
            stop_process_trees([process.pid])

    def start(self) -> LocalDeployment:
        """Keys, SuperLink, registration of every SuperNode key, every SuperNode; returns once all are online."""
        try:
            self.prepare()
            self.start_superlink()
            for party in self.parties:
                self.register(party)
                self.start_node(party)
            self.wait_for_nodes(len(self.parties))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process this deployment started, with everything each one spawned."""
        stop_process_trees([p.pid for p in self.processes.values()])
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()
        stop_process_trees(self.strays())
        for log in self._logs:
            log.close()
        self._logs.clear()

    def strays(self) -> list[int]:
        """Flower processes of this deployment outside the trees of the processes it holds, found by
        their Flower home under `root`: a SuperNode starts its SuperExec before it connects, and when
        the SuperLink refuses it (or it is killed) that orphan runs on until it notices."""
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.pid != os.getpid() and process.environ().get("FLWR_HOME", "").startswith(f"{self.root}/"):
                    found.append(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ runs

    def run_config(self, overrides: Mapping[str, object]) -> dict[str, object]:
        """The run config of a run on this deployment: the server's run directory and registry."""
        return {
            "num-clients": self.num_clients,
            "k-min": self.k_min,
            **overrides,
            "run-dir": str(self.run_dir),
            "registry": str(self.registry(SERVER_PARTY)),
            "ca-cert": str(self.pki.ca_cert),
        }

    def flwr_run_command(self, overrides: Mapping[str, object]) -> str:
        """The `flwr run` command line of a run on this deployment, for a person to paste."""
        args = [str(self._bin / "flwr"), "run", str(self.app_dir), CONNECTION, "--run-config"]
        return shlex.join([*args, run_overrides(self.run_config(overrides))])

    def export_client_data(self, overrides: Mapping[str, object]) -> None:
        """Give each client institution its private annotations in its own `data-dir`: here, its
        share of the split of the dataset the run asks for (what `secure-mor data export` writes)."""
        if all(self.data_dir(p).exists() for p in self.parties if p != AUTHORITY_PARTY):
            return
        from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

        from secure_mor.config import EASY_VQA, DataSpec
        from secure_mor.data import save_annotations

        config = {**app_run_config(self.app_dir), **self.run_config(overrides)}
        spec = DataSpec.of_run(int(config["num-clients"]), int(config["seed"]), int(config["pairs-per-client"]),
                               int(config["calibration-pairs"]), dataset=str(config.get("dataset", EASY_VQA)))
        data = spec.load()
        bars = is_progress_bar_enabled()
        disable_progress_bar()  # one bar per client would interleave with the caller's output
        try:
            for k in range(self.num_clients):
                if not self.data_dir(f"client-{k}").exists():
                    save_annotations(data.clients[k], self.data_dir(f"client-{k}"))
        finally:
            if bars:
                enable_progress_bar()

    def submit(self, overrides: Mapping[str, object]) -> str:
        """`flwr run` the app (each client's data exported first); returns the run id."""
        self.export_client_data(overrides)
        args = ["run", str(self.app_dir), CONNECTION, "--format", "json", "--run-config"]
        done = self.flwr(*args, run_overrides(self.run_config(overrides)), timeout=300)
        try:
            submitted = json.loads(done.stdout)
        except json.JSONDecodeError as err:
            raise FederationError(f"`flwr run` failed: {done.stdout[-2000:]}{done.stderr[-2000:]}") from err
        if not submitted.get("success") or "run-id" not in submitted:
            raise FederationError(f"flwr run refused the app: {submitted}")
        return str(submitted["run-id"])

    def wait(
        self,
        run_id: str,
        *,
        timeout: float = 1800.0,
        on_poll: Callable[[float], None] | None = None,
        poll_seconds: float = 5.0,
    ) -> DeploymentResult:
        """Block until run `run_id` finishes (polling `flwr list` every `poll_seconds`: each poll
        is a Python process, about a second of CPU); its status and logs."""
        started = time.perf_counter()
        flwr = str(self._bin / "flwr")
        status, details, logs = wait_for_run(
            flwr, run_id, self.env("operator"), self.root / "operator", timeout, started, on_poll, poll_seconds
        )
        return DeploymentResult(run_id, status, details, logs, time.perf_counter() - started)

    def run(
        self, overrides: Mapping[str, object], *, timeout: float = 1800.0, poll_seconds: float = 5.0
    ) -> DeploymentResult:
        """`flwr run` the app and wait for it; raises FederationError unless it completed."""
        started = time.perf_counter()
        result = self.wait(self.submit(overrides), timeout=timeout, poll_seconds=poll_seconds)
        result = DeploymentResult(result.run_id, result.status, result.details, result.logs,
                                  time.perf_counter() - started)  # fmt: skip
        if result.status != "finished:completed":
            raise FederationError(f"Flower run {result.run_id} {result.status}: {result.details}\n"
                                  f"--- logs ---\n{result.logs[-6000:]}")  # fmt: skip
        return result
