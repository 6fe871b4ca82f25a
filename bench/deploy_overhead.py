"""Deployment vs simulation runtime: what Flower's deployment engine adds per GRPO optimizer step.

The same tiny secure alignment (secure_mor.deployment.TINY_RUN, with more GRPO steps) runs
twice, in one invocation: on Flower's simulation runtime (`run_local_simulation`: Ray
workers that stay up) and on the deployment runtime (`LocalDeployment`: a SuperLink with
TLS and SuperNode authentication, a SuperNode per party on 127.0.0.1, a fresh ClientApp
process per message). A scoring round (one message to each client, one to the key
authority) costs seconds there, so GRPO scores `--steps-per-round` optimizer steps per round
(TRL's steps_per_generation) and the cost is amortised over them.

It prints, per runtime, the rounds, the optimizer steps per round, the seconds of a scoring
round (clients and key authority, as the server waits for them) and the GRPO seconds per
optimizer step (`results.json` timings.grpo_s / steps: generation, scoring rounds, updates;
not the set-up stages), then the per-step time ratio and the seconds the deployment adds
per optimizer step. Goal: <= 1 s per step, amortised.

    .venv/bin/python bench/deploy_overhead.py [--steps 64] [--steps-per-round 32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from secure_mor.deployment import TINY_RUN, LocalDeployment
from secure_mor.federation import run_local_simulation

CLIENTS = 3
POLL_SECONDS = 15.0  # `flwr list` polls of the run's status: each is a Python process taking CPU from the run


def _per_step(results: dict) -> tuple[int, int, float, float]:
    """Optimizer steps, scoring rounds, GRPO seconds per step, seconds per scoring round."""
    steps, rounds = int(results["grpo"]["steps"]), int(results["grpo"]["rounds"])
    seconds_per_round = float(results["timings"]["scoring"]["round"]) / max(rounds, 1)
    return steps, rounds, float(results["timings"]["grpo_s"]) / max(steps, 1), seconds_per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="GRPO optimizer steps of each run")
    parser.add_argument("--steps-per-round", type=int, default=32, help="optimizer steps per scoring round")
    parser.add_argument("--dir", type=Path, default=None, help="keep both runs here (default: a temporary directory)")
    args = parser.parse_args()
    rounds = {"grpo-max-steps": args.steps, "grpo-steps-per-generation": args.steps_per_round,
              "grpo-save-steps": args.steps}
    overrides = {**TINY_RUN, **rounds}

    with tempfile.TemporaryDirectory(prefix="smor-bench-") as scratch:
        root = (args.dir or Path(scratch)).resolve()
        started = time.perf_counter()
        with LocalDeployment(root / "deployment", CLIENTS) as deployment:
            deployment.run(overrides, poll_seconds=POLL_SECONDS)
            deployed = json.loads((deployment.run_dir / "align" / "mor" / "results.json").read_text())
        deployment_wall = time.perf_counter() - started

        started = time.perf_counter()
        run_local_simulation(
            {**overrides, "num-clients": CLIENTS, "run-dir": str(root / "simulation")},
            CLIENTS + 1,
            poll_seconds=POLL_SECONDS,
        )
        simulation = json.loads((root / "simulation" / "align" / "mor" / "results.json").read_text())
        simulation_wall = time.perf_counter() - started

    print(f"{'runtime':<12} {'rounds':>6} {'steps/round':>11} {'s/round':>7} {'GRPO s/step':>11} {'wall s':>7}")
    per_step = {}
    for name, results, wall in (("simulation", simulation, simulation_wall), ("deployment", deployed, deployment_wall)):
        steps, rounds, seconds, round_seconds = _per_step(results)
        per_step[name] = seconds
        steps_per_round = steps / max(rounds, 1)
        print(f"{name:<12} {rounds:>6} {steps_per_round:>11.1f} {round_seconds:>7.1f} {seconds:>11.2f} {wall:>7.0f}")
    added = per_step["deployment"] - per_step["simulation"]
    per_round = added * args.steps_per_round
    print(f"per-step time ratio deployment/simulation: {per_step['deployment'] / per_step['simulation']:.2f}")
    print(f"deployment adds {added:+.2f} s per optimizer step (goal: <= 1 s), {per_round:+.1f} s per scoring round:")
    steps = max(1, math.ceil(per_round))
    print(f"  <= 1 s per step from {steps:d} optimizer steps per round (grpo-steps-per-generation)")


if __name__ == "__main__":
    main()
