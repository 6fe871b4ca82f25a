"""Encrypted vs plaintext fusion in the same short GRPO run: the time ratio, in one run.

Both arms run the same GRPO (same policy, prompts, seed, steps) on the same trained
client reward models, in this process (LocalTransport: no network):

- secure: `server.reward.FederatedReward`: clients score, mask, encrypt (CKKS) and
  sign; the server verifies and forwards the replies; the key authority verifies them,
  fuses homomorphically, decrypts, floods, rounds and signs; the server removes the masks;
- INSECURE plaintext: the server reads every client's plaintext scores and fuses them
  in the clear (`crypto.fusion.insecure_plaintext_fusion`). A benchmark baseline only:
  it is exactly what the system exists to prevent.

The arms alternate (plaintext, secure, plaintext, secure, ...) so that drift in a
shared machine's load hits both. Per arm and round it prints the breakdown:
generation (TRL's sampling), scoring (clients' reward models, incl. encryption and
signing in the secure arm), crypto (server verification and unmasking, the authority's
round trip: its verification, fusion and decryption), update (log-probs, loss, backward,
optimizer). It also prints the release error: the largest difference between a reward the
secure arm released and the plaintext fusion of the same items' scores (computed after the
arm, outside its clock). Messaging over Flower's runtime is not in this in-process
benchmark; `results.json` of a Flower run reports it (`timings.scoring`).

    .venv/bin/python bench/he_overhead.py [--steps 10] [--repeats 2] [--run RUN]

`--run` reuses a run directory that already holds an SFT policy and trained clients
(e.g. the main job's `runs/demo`); without it a small one is prepared first (~2 min).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PrinterCallback

from secure_mor.authority.node import AuthorityNode
from secure_mor.clients.node import ClientNode
from secure_mor.config import RunDir
from secure_mor.crypto.fusion import insecure_plaintext_fusion
from secure_mor.crypto.signing import load_or_create_signer
from secure_mor.ledger import Ledger
from secure_mor.policy import SFTSettings
from secure_mor.protocol import AUTHORITY_PARTY, SERVER_PARTY, ClientTrainingSettings
from secure_mor.server.grpo import GRPOSettings, build_grpo_trainer
from secure_mor.server.pipeline import (
    AlignConfig,
    client_results,
    connect,
    prepare_data,
    prepare_policy,
    start_client_training,
)
from secure_mor.server.reward import FederatedReward
from secure_mor.server.session import SecureSession
from secure_mor.server.transport import LocalTransport

CLIENTS = ["client-0", "client-1", "client-2"]


def request_items(request: dict) -> list:
    """The (image, question, answer) items of a scoring request, images decoded as the clients decode them."""
    images = [Image.open(io.BytesIO(png)) for png in request["images"]]
    return [(images[i], q, a) for i, q, a in zip(request["image_index"], request["questions"], request["answers"],
                                                 strict=True)]  # fmt: skip


class InsecurePlaintextSession:
    """INSECURE: reads each client's plaintext scores and fuses them in the clear. Benchmark baseline
    only. It stands in for SecureSession under the same FederatedReward, so both arms send the same
    items (answers only, one router row per item) and differ only in the crypto."""

    def __init__(self, nodes: dict, w_min: float) -> None:
        self.nodes, self.w_min = nodes, w_min
        self.seconds = {"scoring": 0.0, "fusion": 0.0}

    def fused_rewards(self, request: dict, weights: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        items = request_items(request)
        scores = [self.nodes[c]._client().score(items) for c in CLIENTS]
        scored = time.perf_counter()
        fused = insecure_plaintext_fusion(scores, weights)
        self.seconds["scoring"] += scored - started
        self.seconds["fusion"] += time.perf_counter() - scored
        return fused


class RecordedSession(SecureSession):
    """The secure session, keeping each round's request, weights and released rewards (a list append:
    no measurable time) so that the release error can be measured after the arm."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recorded: list[tuple[dict, np.ndarray, np.ndarray | None]] = []

    def fused_rewards(self, request, weights):
        values = super().fused_rewards(request, weights)
        self.recorded.append((request, np.asarray(weights), values))
        return values


def release_error(session: RecordedSession, nodes: dict) -> float:
    """Largest |released - plaintext fusion| over every round of the secure arm (scored again, in the clear)."""
    worst = 0.0
    for request, w, values in session.recorded:
        if values is None:
            continue
        scores = [nodes[c]._client().score(request_items(request)) for c in CLIENTS]
        worst = max(worst, float(np.max(np.abs(np.asarray(values) - insecure_plaintext_fusion(scores, w)))))
    return worst


def timed(obj, name: str, bucket: dict, key: str) -> None:
    """Wrap obj.name so that its wall time accumulates in bucket[key]."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - started

    setattr(obj, name, wrapper)


def run_arm(run: RunDir, prompts, reward, settings: GRPOSettings, out: Path) -> dict[str, float]:
    trainer = build_grpo_trainer(run.sft_policy, prompts, reward, settings, out)
    trainer.remove_callback(PrinterCallback)
    spent: dict[str, float] = {}
    timed(trainer, "_generate", spent, "generation")
    timed(trainer, "_calculate_rewards", spent, "rewards")
    started = time.perf_counter()
    trainer.train()
    spent["total"] = time.perf_counter() - started
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="GRPO optimizer steps per arm")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repetitions of both arms")
    parser.add_argument("--run", type=Path, default=None, help="a run directory with SFT policy and trained clients")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scratch = tempfile.TemporaryDirectory(prefix="he-overhead-")
    root = args.run or Path(scratch.name) / "run"
    run = RunDir(root)
    config = AlignConfig(
        fusion="uniform",
        sft=SFTSettings(examples=960, epochs=1.0, vision_epochs=1),
        pairs_per_client=200,
        client_training=ClientTrainingSettings(epochs=5, public_epochs=1),
        eval_per_family=8,
    )
    nodes = {**{c: ClientNode(root, k) for k, c in enumerate(CLIENTS)}, AUTHORITY_PARTY: AuthorityNode(root)}
    transport = LocalTransport(nodes)
    data = prepare_data(run, config)
    federation = connect(transport, run, run.data_spec(), CLIENTS)
    client_results(start_client_training(transport, federation, config, print), federation, data.families)
    prepare_policy(run, data, config, print)

    settings = replace(config.grpo, max_steps=args.steps, save_steps=0)
    prompts = data.prompt_pool.shuffle(seed=0).select(range(settings.prompts_per_round * args.steps))
    warm = [(prompts[0]["image"], prompts[0]["question"], "yes")]

    def fresh_clients() -> None:
        """New client nodes for each arm, loaded before the clock starts: both arms then score with
        cold text-embedding caches (minilm-head caches the texts it has embedded)."""
        for k, party in enumerate(CLIENTS):
            nodes[party] = ClientNode(root, k)
            nodes[party]._client().score(warm)

    rows: dict[str, list[dict[str, float]]] = {"plaintext (INSECURE)": [], "secure": []}
    errors: list[float] = []
    for repeat in range(args.repeats):
        fresh_clients()
        plain = InsecurePlaintextSession(nodes, federation.w_min)
        reward = FederatedReward(plain, config, None, None, {}, data.answers)
        spent = run_arm(run, prompts, reward, settings, Path(scratch.name) / f"plain-{repeat}")
        rows["plaintext (INSECURE)"].append(
            {**spent, "scoring": plain.seconds["scoring"], "crypto": plain.seconds["fusion"]}
        )
        session = RecordedSession(
            transport=transport,
            pub=federation.pub,
            signer=load_or_create_signer(SERVER_PARTY, root / SERVER_PARTY / "keys"),
            registry={c: federation.registry[c] for c in CLIENTS},
            clients=CLIENTS,
            authority_key=federation.authority_key,
            run_id=f"bench-{time.time_ns()}",
            state_dir=Path(scratch.name) / f"session-{repeat}",
            ledger=Ledger(Path(scratch.name) / "ledger.jsonl"),
            w_min=federation.w_min,
        )
        fresh_clients()
        secure = FederatedReward(session, config, None, None, {}, data.answers)
        spent = run_arm(run, prompts, secure, settings, Path(scratch.name) / f"secure-{repeat}")
        t = session.timings
        rows["secure"].append(
            {**spent, "scoring": t.client_compute, "crypto": t.server_crypto + t.authority_round_trip}
        )
        errors.append(release_error(session, nodes))

    rounds = args.steps // settings.steps_per_round
    print(
        f"\nGRPO {args.steps} steps ({rounds} scoring rounds of {settings.generation_batch_size} completions, "
        f"K = {len(CLIENTS)}), {args.repeats} alternating repeats; seconds per round, mean over repeats"
    )
    print(f"{'arm':<22}{'total':>9}{'generation':>12}{'scoring':>10}{'crypto':>9}{'update':>9}")
    totals = {}
    for arm, measured in rows.items():
        mean = {k: float(np.mean([m[k] for m in measured])) for k in measured[0]}
        update = mean["total"] - mean["generation"] - mean["rewards"]
        totals[arm] = mean["total"]
        print(
            f"{arm:<22}{mean['total'] / rounds:>9.3f}{mean['generation'] / rounds:>12.3f}"
            f"{mean['scoring'] / rounds:>10.3f}{mean['crypto'] / rounds:>9.3f}{update / rounds:>9.3f}"
        )
    ratio = totals["secure"] / totals["plaintext (INSECURE)"]
    print(f"\nratio secure / plaintext GRPO wall time: {ratio:.3f} (goal <= 1.10)")
    print(f"release error: max |released - plaintext fusion| over {len(errors) * rounds} secure rounds: "
          f"{max(errors):.2e} (goal <= 1e-4)")
    scratch.cleanup()


if __name__ == "__main__":
    main()
