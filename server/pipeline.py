"""The main job, as the server runs it: align the policy with GRPO on the clients'
router-fused, encrypted rewards (docs/architecture.md). Independent of Flower: the nodes are
reached through a `Transport` (Flower's grid in `server.app`, in-process in tests).

Stages of `align(transport, run_dir, config)`, each resumable:

1. policy: build the tiny policy and warm-start it with SFT (kept if present);
   evaluate it on the held-out set (`eval/sft.json`);
2. connect: every node says who it is and publishes its Ed25519 key to the
   registry (`<run>/keys`); the server publishes its own; the key authority
   opens its CKKS context and signs it, and the server relays context and signature
   to the clients, which take it only if the authority key of the registry they
   trust themselves signed it (clients.node). In a
   deployment (`registry` set: the operator's registry of public keys), the
   server trusts only the registry's keys and refuses a node that presents another;
3. clients: each trains its reward model with DP-SGD under (epsilon, delta), once
   per run directory (a later `align` in the same directory reuses it, spending nothing);
4. router (fusion "mor"): trained on the public calibration preferences without
   seeing any client's margins (`server.router_training`), once per run directory;
5. answer prior: every answer scored on the server's labelled questions, to take the fused
   reward's image-independent preference for some answers out of it
   (`FederatedReward.learn_answer_prior`);
6. GRPO (TRL) with `FederatedReward`; checkpoints; `resume` continues a killed run;
7. evaluation of the aligned policy, and `results.json`.

Outputs of one configuration go to `<run>/align/<label>/` (label: the fusion,
e.g. `mor`, `uniform`, `single-1`), so several fusions can share one run
directory's SFT policy and clients.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from secure_mor.config import EASY_VQA, DataSpec, RunDir
from secure_mor.crypto.context import ContextError, verify_public_context
from secure_mor.crypto.params import DEFAULT_K_MIN, ReleaseConfig, min_score_half_width
from secure_mor.crypto.pki import PkiError, read_registry_signed
from secure_mor.crypto.signing import Signer, key_passphrase, load_or_create_signer, publish_public_key
from secure_mor.data import FederatedData, calibration_set
from secure_mor.device import resolve_device
from secure_mor.files import write_json
from secure_mor.ledger import KIND_ROUTER_SETUP, Ledger, no_privacy_cost_event
from secure_mor.policy import SFTSettings
from secure_mor.protocol import (
    AUTHORITY_PARTY,
    OBJECTIVES,
    REWARD_MODEL_MEASURES,
    SERVER_PARTY,
    AuthoritySetupReply,
    ClientSetupRequest,
    ClientTrainingSettings,
    IdentifyReply,
    MarginsRequest,
    Message,
    ProtocolError,
    RouterSetupReply,
    RouterSetupRequest,
    TrainReply,
    TrainRequest,
)
from secure_mor.routing import Router, RouterConfig, RouterSetup, RouterState, encode_gradient_query
from secure_mor.server.grpo import GRPOSettings
from secure_mor.server.reward import FederatedReward, prompt_key
from secure_mor.server.router import ONE_CLIENT_FUSIONS, family_features, family_map, parse_fusion, prompt_features
from secure_mor.server.router_training import RouterTrainingConfig, train_router_securely
from secure_mor.server.secure_round import AuthorityLink, RoundRefused, SecureRound, client_replies
from secure_mor.server.session import SecureSession
from secure_mor.server.transport import Pending, Transport

Log = Callable[[str], None]
SCHEMA = "secure-mor/results/v2"


# GRPO of the main job, calibrated with the oracle reward (experiments.oracle; README, "The main job"):
# 32 prompts x 4 answers per step and one scoring round per step (16 x 8 and 8 x 8 lifted less: the
# number of distinct prompts is what teaches), lr 3e-4 (1e-4 barely moved the policy in 80 steps; 5e-4
# and 1e-3 collapsed families onto one answer), KL beta 0.2 (at 0.04 the families GRPO cannot improve
# drifted: shape lost 0.1), the vision tower frozen (GRPOSettings.train_vision).
# The SFT term (GRPOSettings.ptx_coef) is off: at 0.5 it lifted MoR's policy +0.099 +- 0.053 over its SFT start
# (epsilon 4, seeds 0-2), but a reward of 0 for every answer with the same term lifted it as much: the lift was
# more supervised training, not alignment (README, DP ablation, session 7).
DEFAULT_GRPO = GRPOSettings(num_generations=4, batch_size=128, steps_per_generation=1, max_steps=60,
                            learning_rate=3e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=6,
                            beta=0.2, save_steps=10)


class AlignError(RuntimeError):
    """A stage of the pipeline cannot run (bad configuration, a node failed, a refused release)."""


@dataclass(frozen=True)
class AlignConfig:
    """One configuration of the main job.

    fusion: "mor" (learned router), "uniform", "single:<k>" or "by-family" (evaluation only);
    epsilon, delta: each client's DP budget for its reward model (inf: non-private);
    objective: the alignment objective GRPO optimises (one of protocol.OBJECTIVES);
    k_min: a scoring round needs at least this many clients (and at least the key authority's
    announced k_min, which it enforces);
    the router's floor per client is the key authority's w_min, which it announces at setup;
    allow_single_client: fusions "single:k" and "by-family" put all but the floor on one client by
    construction, so each release reveals that client's score within the documented bound
    (crypto.params.min_score_half_width); the server refuses them in a deployment (registry set)
    unless this is set;
    reply_timeout: seconds a scoring round waits for the clients (later replies are dropped);
    client_training: what the server sets of the clients' DP training (protocol.ClientTrainingSettings);
    eval_per_family: held-out questions per family for the policy evaluation; curve_per_family: for the
    held-out accuracy curve during GRPO (another draw of the held-out set; reported, never used to choose);
    validation_per_family: the server's own labelled validation questions per family (public questions,
    images no policy stage trained on) measured along GRPO; the aligned policy is the step best on them
    for the objective (`validation_score`), SFT's included (0: the last step's policy);
    policy_threads: torch's CPU threads for the SFT warm start, which runs while the clients train (0: torch's
    default, all cores); where the clients share the server's machine (the simulation runtime) the rest of it;
    answer_prior_questions: labelled questions per family on which every answer is scored before GRPO, to take the
    fused reward's image-independent answer preference out of it (`FederatedReward.learn_answer_prior`;
    0: off);
    family_gate: GRPO trains only on the families whose fused reward ranks the true answer first more often than
    the SFT policy answers right, both measured on those questions (`gated_families`; needs
    answer_prior_questions > 0).
    """

    fusion: str = "mor"
    model: str = ""  # the policy VLM: a local path or a hub id in the local cache; "": the tiny LLaVA built here
    dataset: str = EASY_VQA  # easy-vqa, or a local Hugging Face dataset (config.DataSpec)
    device: str = "auto"  # the policy's (SFT, GRPO, prompt features, evaluation): auto | cpu | cuda (secure_mor.device)
    epsilon: float = 4.0
    delta: float = 1e-5
    seed: int = 0
    num_clients: int = 3
    objective: str = "correctness"
    k_min: int = DEFAULT_K_MIN
    allow_single_client: bool = False
    reply_timeout: float = 600.0
    grpo: GRPOSettings = field(default_factory=lambda: DEFAULT_GRPO)
    router: RouterTrainingConfig = field(default_factory=lambda: RouterTrainingConfig(steps=30, batch_size=96,
                                                                                      sharpness=10.0))
    route_by: str = "family"  # what the router sees of a prompt: "family" or "prompt" (RouterInputs)
    sft: SFTSettings = field(default_factory=SFTSettings)
    client_training: ClientTrainingSettings = field(default_factory=ClientTrainingSettings)
    eval_per_family: int = 200
    curve_per_family: int = 50
    validation_per_family: int = 100
    pairs_per_client: int = 800
    answer_prior_questions: int = 48
    family_gate: bool = True
    calibration_pairs: int = 3000
    policy_threads: int = 0
    resume: bool = False
    registry: str = ""  # the operator's registry of public payload keys ("": what the nodes publish, simulation)
    ca_cert: str = ""  # the operator's CA certificate: every registry entry must carry its signature

    @property
    def label(self) -> str:
        """The run's directory under <run>/align: the fusion, and the objective unless it is correctness."""
        fusion = self.fusion.replace(":", "-")
        return fusion if self.objective == OBJECTIVES[0] else f"{fusion}-{self.objective}"

    @property
    def clients(self) -> list[str]:
        return [f"client-{k}" for k in range(self.num_clients)]

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["epsilon"] = self.epsilon if math.isfinite(self.epsilon) else None
        return out


# ---------------------------------------------------------------- stage 1: the policy


def prepare_data(run: RunDir, config: AlignConfig) -> FederatedData:
    """The run's split (data.json) and untrained policy (policy/base: `config.model`, or the tiny LLaVA built
    from the data's vocabulary), reusing what the run directory holds; a run directory keeps its dataset and
    model, and a run asking for others is refused."""
    from secure_mor.data import DatasetError, sentence_style_problem, vocabulary_texts
    from secure_mor.vlm import PolicyLoadError, TinyVLMConfig, build_tiny_vlm, load_policy, save_policy

    if run.data_spec_path.exists():
        spec = run.data_spec()
        if spec.split.seed != config.seed or len(spec.split.clients) != config.num_clients:
            raise AlignError(f"{run.path} holds a split with seed {spec.split.seed} and {len(spec.split.clients)} "
                             f"clients; this run asks for seed {config.seed} and {config.num_clients}")
        if spec.dataset != config.dataset:
            raise AlignError(f"{run.path} holds a run on dataset {spec.dataset!r}; this run asks for "
                             f"{config.dataset!r}: use another --out")
    else:
        spec = DataSpec.of_run(config.num_clients, config.seed, config.pairs_per_client, config.calibration_pairs,
                               dataset=config.dataset)
    if run.base_policy.exists() and run.policy_source() != config.model:
        raise AlignError(f"{run.path} holds a run of the VLM {run.policy_source() or 'tiny LLaVA (built here)'!r}; "
                         f"this run asks for {config.model or 'the tiny LLaVA (built here)'!r}: use another --out")
    try:
        data = spec.load()
    except DatasetError as err:
        raise AlignError(str(err)) from err
    problem = sentence_style_problem(data.answers)
    if config.objective == "sentences" and problem:
        raise AlignError(problem)
    if not run.base_policy.exists():
        try:
            policy, processor = (load_policy(config.model) if config.model else
                                 build_tiny_vlm(vocabulary_texts(data), TinyVLMConfig(seed=config.seed)))
        except PolicyLoadError as err:
            raise AlignError(str(err)) from err
        run.save_data_spec(spec)
        save_policy(policy, processor, run.base_policy)
        run.save_policy_source(config.model)
    return data


def prepare_policy(run: RunDir, data: FederatedData, config: AlignConfig, log: Log,
                   on_step: Callable[[int, int], None] | None = None) -> None:
    """SFT warm start and its evaluation (eval/sft.json), unless the run directory holds them."""
    from secure_mor.vlm import load_policy, save_policy

    if not run.sft_policy.exists():
        from secure_mor.policy import run_sft

        log("SFT warm start")
        model, processor = load_policy(run.base_policy)
        run_sft(model, processor, data.sft, replace(config.sft, seed=config.seed), run.path, on_step=on_step,
                device=resolve_device(config.device))
        save_policy(model, processor, run.sft_policy)
    cached = run.eval_path("sft")
    rows = evaluation_rows(data, config.eval_per_family, config.seed)
    if not cached.exists() or json.loads(cached.read_text()).get("evaluated") != evaluation_key(run.sft_policy, rows):
        log("evaluating the SFT policy")
        run.write_json(cached, evaluate(run.sft_policy, data, config))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` inside the block (0: unchanged). Why: Ray runs the simulated
    ClientApps at nice 15, so an SFT on both of 2 cores starves them: measured in the demo, client-1 (vit-xattn)
    trained in 382-481 s against 135 s alone; with the SFT on one thread in 264 s, and the demo took 525 s
    (SFT 325 s, now the longest stage) against 552-722 s."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluation_rows(data: FederatedData, per_family: int, seed: int) -> Any:
    from secure_mor.data import stratified_indices

    return data.evaluation.select(stratified_indices(data.evaluation, per_family, seed))


def evaluation_key(policy_path: Path, rows: Any) -> dict[str, Any]:
    """What an evaluation evaluated: the policy's weights and the questions (an evaluation is reused only
    under the same key)."""
    from secure_mor.data import column, directory_digest

    questions = hashlib.sha256("\0".join(f"{i}\0{q}" for i, q in zip(
        column(rows, "image_id"), column(rows, "question"), strict=True)).encode()).hexdigest()
    return {"policy": directory_digest(policy_path), "questions": questions, "n": len(rows)}


def evaluate(policy_path: Path, data: FederatedData, config: AlignConfig) -> dict[str, Any]:
    from secure_mor.policy import evaluate_policy
    from secure_mor.vlm import load_policy

    model, processor = load_policy(policy_path)
    model.to(resolve_device(config.device))
    rows = evaluation_rows(data, config.eval_per_family, config.seed)
    started = time.perf_counter()
    report = evaluate_policy(model, processor, rows, data.answers)
    report.update(policy=str(policy_path), seconds=time.perf_counter() - started,
                  evaluated=evaluation_key(policy_path, rows))
    return report


# ---------------------------------------------------------------- stage 2: connect


@dataclass
class Federation:
    """What the server knows after `connect`."""

    registry: dict[str, str]  # party -> Ed25519 public key hex (clients and authority)
    pub: Any  # PublicContext
    authority_key: str
    clients: list[str]
    w_min: float  # the key authority's floor of every router weight
    k_min: int  # the key authority's least number of contributors


def _ok(replies: Mapping[str, Any], parties: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    failed = {p: getattr(replies.get(p), "reason", "no answer") for p in parties
              if not isinstance(replies.get(p), Mapping)}
    if failed:
        raise AlignError(f"{what} failed on {len(failed)} node(s): {failed}")
    return {p: dict(replies[p]) for p in parties}


def trusted_keys(registry: Path, parties: Sequence[str], presented: Mapping[str, str],
                 ca_cert: Path | None = None) -> dict[str, str]:
    """The operator's registry's key of every party (each entry signed by the operator's CA when
    `ca_cert` is given); refuses a party that is missing from it or presents another key (its
    payloads would not verify: better to stop before any work)."""
    try:
        keys = read_registry_signed(registry, ca_cert)
    except PkiError as err:
        raise AlignError(f"refused by the key registry: {err}") from err
    wrong = {p: "not in the registry" for p in parties if p not in keys}
    wrong.update({p: "presents a key that is not the registry's" for p in parties
                  if p in keys and presented[p] != keys[p]})
    if wrong:
        raise AlignError(f"refused by the key registry {registry}: {wrong}")
    return {p: keys[p] for p in parties}


def server_signer(run: RunDir) -> Signer:
    """The server's signing key (encrypted under $SECURE_MOR_KEY_PASSPHRASE when set; a deployment's
    operator makes it beforehand with `secure-mor keys new server`, a simulation on first use)."""
    return load_or_create_signer(SERVER_PARTY, run.path / SERVER_PARTY / "keys", key_passphrase())


def connect(transport: Transport, run: RunDir, spec: DataSpec, clients: list[str], registry: str = "",
            ca_cert: str = "") -> Federation:
    parties = [*clients, AUTHORITY_PARTY]
    who = {p: _decoded(IdentifyReply, r, p) for p, r in _ok(transport.ask(parties, "identify", {}), parties,
                                                              "identify").items()}  # fmt: skip
    for party, reply in who.items():
        if reply.party != party:
            raise AlignError(f"node addressed as {party} says it is {reply.party}")
    server = server_signer(run)
    publish_public_key(server, run.path / "keys")
    keys = {p: r.public_key for p, r in who.items()}
    if registry:
        keys = trusted_keys(Path(registry), [*parties, SERVER_PARTY], {**keys, SERVER_PARTY: server.public_key_hex},
                            Path(ca_cert) if ca_cert else None)  # fmt: skip
    setup = _ok(transport.ask([AUTHORITY_PARTY], "setup", {}), [AUTHORITY_PARTY], "key authority setup")
    authority = _decoded(AuthoritySetupReply, setup[AUTHORITY_PARTY], AUTHORITY_PARTY)
    if sorted(authority.clients) != sorted(clients):
        raise AlignError(f"the key authority knows clients {authority.clients}, expected {clients}")
    context, fingerprint, signature = authority.context, authority.fingerprint, authority.context_signature
    try:  # the clients check the same against their own registry's authority key
        pub = verify_public_context(context, fingerprint, signature, keys[AUTHORITY_PARTY])
    except ContextError as err:
        raise AlignError(f"the key authority's setup: {err}") from err
    request = ClientSetupRequest(context, fingerprint, signature, json.dumps(spec.to_json()))
    _ok(transport.ask(clients, "setup", request.encode()), clients, "client setup")
    return Federation({p: keys[p] for p in parties}, pub, keys[AUTHORITY_PARTY], clients, authority.w_min,
                      authority.k_min)


def _decoded(message: type[Message], reply: Mapping[str, Any], party: str) -> Any:
    try:
        return message.decode(reply)
    except ProtocolError as err:
        raise AlignError(f"{party}'s reply: {err}") from err


# ---------------------------------------------------------------- stage 3: the clients' reward models


def start_client_training(transport: Transport, federation: Federation, config: AlignConfig, log: Log) -> Pending:
    """Ask every client to train its reward model with DP-SGD; collect with `client_results`."""
    log(f"clients train their reward models with DP-SGD (epsilon {config.epsilon:g}, delta {config.delta:g})")
    request = TrainRequest(config.epsilon, config.delta, training=config.client_training)
    return transport.submit(federation.clients, "train", request.encode())


def client_results(pending: Pending, federation: Federation, families: Sequence[str]) -> dict[str, Any]:
    replies = _ok(pending.wait(), federation.clients, "client training")
    out = {}
    for party, answer in replies.items():
        reply = _decoded(TrainReply, answer, party)
        out[party] = {
            "arch": reply.arch,
            "family": reply.family,
            "budget_epsilon": _finite(reply.budget_epsilon),
            "total_epsilon": _finite(reply.total_epsilon),
            "reused": reply.reused,
            "seconds": reply.seconds,
            "reward_model": {measure: {f: reply.measures[measure][f] for f in families if f in reply.measures[measure]}
                             for measure in REWARD_MODEL_MEASURES},
        }
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None  # JSON has no inf: null = unbounded


# ---------------------------------------------------------------- stage 4: the router


@dataclass
class PolicyFeatures:
    """Pooled prompt features of the frozen reference (the starting policy), computed on its device; the
    loaded model is the server's one copy of the starting policy outside GRPO (its greedy answers too)."""

    model: Any
    processor: Any

    @classmethod
    def load(cls, policy_path: Path, device: str = "cpu") -> PolicyFeatures:
        from secure_mor.vlm import load_policy

        model, processor = load_policy(policy_path)
        return cls(model.to(device), processor)

    def __call__(self, images: Sequence[Any], questions: Sequence[str]) -> np.ndarray:
        return prompt_features(self.model, self.processor, [{"image": i, "question": q} for i, q in
                                                            zip(images, questions, strict=True)])  # fmt: skip


# What the router sees of a prompt (AlignConfig.route_by).
ROUTE_BY = ("family", "prompt")


@dataclass(frozen=True)
class RouterInputs:
    """The router's input of each prompt: its question family one-hot ("family") or the starting policy's
    pooled prompt features ("prompt"). Measured (epsilon 4, seed 0, the clients' real calibration margins,
    plaintext, the 30 steps of 96 pairs the item budget allows): on the pooled features (PCA to 32) the
    linear router put 0.47 / 0.10 / 0.07 on the colour specialist for colour / shape / presence and never
    more than the floor on the shape specialist; its 2-8 leading components carry no family (the same
    weights for every family); the last token's or the text tokens' states moved colour to 0.57 / 0.67 but kept
    the shape specialist at the floor.
    On the family it learns one mix per family and objective, which the calibration pairs can pin down."""

    kind: str
    policy: PolicyFeatures
    families: tuple[str, ...]

    def __call__(self, images: Sequence[Any], questions: Sequence[str], families: Sequence[str]) -> np.ndarray:
        if self.kind == "family":
            return family_features(list(families), self.families)
        return self.policy(images, questions)


def train_router(transport: Transport, federation: Federation, run: RunDir, data: FederatedData,
                 features_of: RouterInputs, config: AlignConfig, log: Log) -> tuple[Router, dict]:
    """Train (or load) the router of this run directory."""
    path = run.path / SERVER_PARTY / "router.npz"
    report_path = run.path / SERVER_PARTY / "router.json"
    if path.exists():
        report = json.loads(report_path.read_text())
        trained = {"route-by": report.get("features", "prompt"), "router-sharpness": report.get("sharpness", 1.0)}
        asked = {"route-by": features_of.kind, "router-sharpness": config.router.sharpness}
        if trained != asked:
            raise AlignError(f"{path} is a router trained with {trained}; this run asks for {asked}: use another --out")
        return Router.from_state(RouterState.from_bytes(path.read_bytes())), report
    pairs = calibration_set(data)
    unseen = sorted(set(data.families) - set(pairs["family"]))
    if unseen:  # the router would weigh their prompts with weights no pair trained
        raise AlignError(f"the calibration set has no pair of the families {unseen}: raise calibration-pairs")
    log(f"router: features of {len(pairs)} calibration prompts")
    x = features_of(list(pairs["image"]), list(pairs["question"]), list(pairs["family"]))
    # A family one-hot is standardised, not projected: its centred columns have rank F - 1, and the PCA's
    # null direction would be rounding noise the clients could not reproduce exactly.
    router_config = RouterConfig(feature_dim=x.shape[1], objectives=OBJECTIVES, num_clients=config.num_clients,
                                 w_min=federation.w_min, seed=config.seed,
                                 input_dim=None if features_of.kind == "family" else RouterConfig.input_dim)
    router = Router(router_config).fit_input_projection(x)
    objective_ids = router_config.objective_ids(list(pairs["objective"]))
    run_id = f"{run.path.name}-{secrets.token_hex(4)}:router"
    server = server_signer(run)
    clients = federation.clients
    # The public parts every gradient query must agree with: the clients pin them, the ledger logs them.
    setup = RouterSetup.of(router, x, objective_ids)
    pinned = _ok(transport.ask(clients, "router_setup", RouterSetupRequest(setup.to_bytes()).encode(),
                               timeout=config.reply_timeout), clients, "router setup")  # fmt: skip
    if any(_decoded(RouterSetupReply, reply, party).setup_sha256 != setup.digest for party, reply in pinned.items()):
        raise AlignError("a client pinned another router setup than the one sent")
    (run.path / SERVER_PARTY).mkdir(parents=True, exist_ok=True)
    (run.path / SERVER_PARTY / "router_setup.npz").write_bytes(setup.to_bytes())
    Ledger(run.path / "ledger.jsonl").append(
        server, KIND_ROUTER_SETUP, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
        accountant="none (nothing released)", total_epsilon=0.0,
        details={"run_id": run_id, "setup_sha256": setup.digest, "pairs": len(x), "router": router_config.to_json()},
    )  # fmt: skip

    def reply_bytes(answers: Mapping[str, Any], what: str) -> dict[str, bytes]:
        replies, _, failures, _ = client_replies(answers)
        for failure in failures:
            log(f"router {what}: {failure}")
        return replies

    def margins(fields: dict[str, Any], items: np.ndarray) -> dict[str, bytes]:
        request = MarginsRequest(**fields, items=_npy(items)).encode()
        replies = transport.ask(clients, "margins", request, timeout=config.reply_timeout)
        return reply_bytes(replies, f"margins of step {fields['step']}")

    def gradients(fields: dict[str, Any], query: Any) -> dict[str, bytes]:
        replies = transport.ask(clients, "router_gradient", {**fields, **encode_gradient_query(query)},
                                timeout=config.reply_timeout)
        return reply_bytes(replies, f"gradients of step {fields['step']}")


    log(f"router: secure training, {config.router.steps} steps of {config.router.batch_size} pairs")
    started = time.perf_counter()
    rounds = SecureRound(federation.pub, server, {c: federation.registry[c] for c in clients}, clients,
                         federation.authority_key, run_id, federation.w_min,
                         AuthorityLink(transport, config.reply_timeout))  # fmt: skip
    schedule = replace(config.router, seed=config.seed)  # the run's seed orders the batches (as SFT's, GRPO's)
    try:
        result = train_router_securely(router, x, objective_ids, rounds=rounds, get_encrypted_margins=margins,
                                       get_encrypted_gradients=gradients, config=schedule)  # fmt: skip
    except RoundRefused as err:  # router training needs every release (a GRPO round would be skipped)
        raise AlignError(f"the key authority refused a router release: {err}") from err
    if result.steps_taken == 0:
        raise AlignError(f"router training took no step: {[r.skipped for r in result.history]}")
    families = np.asarray(pairs["family"])
    weights = router.weights(x, objective_ids)
    held_out = evaluation_rows(data, config.eval_per_family, config.seed)
    x_held_out = features_of(list(held_out["image"]), list(held_out["question"]), list(held_out["family"]))
    held_out_families = np.asarray(held_out["family"])
    report = {
        "run_id": run_id,
        "features": features_of.kind,
        "sharpness": config.router.sharpness,
        "steps": result.steps_taken,
        "skipped": [r.skipped for r in result.history if r.skipped],
        "losses": result.losses,
        "seconds": time.perf_counter() - started,
        # The calibration prompts it trained on, per objective and family ...
        "mean_weights": {
            objective: {f: weights[(families == f) & (objective_ids == j)].mean(axis=0).round(4).tolist()
                        for f in data.families if ((families == f) & (objective_ids == j)).any()}
            for j, objective in enumerate(OBJECTIVES)
        },
        # ... and the held-out prompts, which it never saw: does it route to each family's specialist?
        "held_out_weights": {
            objective: {f: router.weights(x_held_out[held_out_families == f],
                                          np.full((held_out_families == f).sum(), j)).mean(axis=0).round(4).tolist()
                        for f in data.families if (held_out_families == f).any()}
            for j, objective in enumerate(OBJECTIVES)
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(router.state().to_bytes())
    run.write_json(report_path, report)
    return router, report


def _npy(array: np.ndarray) -> bytes:
    from secure_mor.protocol import array_bytes

    return array_bytes(array)


# ---------------------------------------------------------------- the whole job


def align(transport: Transport, run_dir: Path | str, config: AlignConfig, log: Log = print) -> dict[str, Any]:
    """Run every stage (module docstring); returns and writes `<run>/align/<label>/results.json`."""
    started = time.perf_counter()
    run = RunDir(run_dir)
    out = run.path / "align" / config.label
    if (out / "results.json").exists() and not config.resume:
        raise AlignError(f"{out} already holds a finished run: use another --out, or --resume to re-run its tail")
    if out.exists() and not config.resume and any(out.glob("checkpoint-*")):
        raise AlignError(f"{out} holds an interrupted run: pass --resume to continue it")
    kind, _ = parse_fusion(config.fusion, config.num_clients)
    if config.objective not in OBJECTIVES:
        raise AlignError(f"unknown objective {config.objective!r}; known: {list(OBJECTIVES)}")
    if config.route_by not in ROUTE_BY:
        raise AlignError(f"unknown route-by {config.route_by!r}; known: {list(ROUTE_BY)}")
    if config.answer_prior_questions < 0:
        raise AlignError(f"answer-prior-questions must be >= 0 (0: off), got {config.answer_prior_questions}")
    if config.policy_threads < 0:
        raise AlignError(f"policy-threads must be >= 0 (0: all cores), got {config.policy_threads}")
    try:
        resolve_device(config.device)
    except ValueError as err:
        raise AlignError(str(err)) from err
    if config.registry and not config.ca_cert:
        raise AlignError("a key registry is trusted only through the operator's CA: set ca-cert with registry")
    if kind in ONE_CLIENT_FUSIONS and config.registry and not config.allow_single_client:
        raise AlignError(f"fusion {config.fusion!r} reveals one client's scores by construction; a deployment "
                         "refuses it unless the run config sets allow-single-client=true")
    timings: dict[str, float] = {}
    user_log = log

    def log(message: str) -> None:
        write_progress(out, message)
        user_log(message)

    # The clients train their reward models while the server warm-starts its policy.
    t = time.perf_counter()
    data = prepare_data(run, config)
    federation = connect(transport, run, run.data_spec(), config.clients, config.registry, config.ca_cert)
    training = start_client_training(transport, federation, config, log)
    with torch_threads(config.policy_threads):
        prepare_policy(run, data, config, log, on_step=lambda step, total: write_progress(out, "SFT", step, total))
    timings["policy_s"] = time.perf_counter() - t
    clients = client_results(training, federation, data.families)
    timings["clients_s"] = time.perf_counter() - t  # from the start: overlaps policy_s

    k_min = max(config.k_min, federation.k_min)  # a round the authority would refuse is skipped, not sent
    if kind in ONE_CLIENT_FUSIONS:
        all_, fewest = (min_score_half_width(federation.w_min, k, ReleaseConfig().value_bound)
                        for k in (config.num_clients, k_min))  # fmt: skip
        log(f"WARNING: fusion {config.fusion} gives one client all but the floor on every item: each release "
            f"tells the server that client's score within +-{all_:.3f} (+-{fewest:.3f} after dropouts to {k_min})")
    policy = PolicyFeatures.load(run.sft_policy, resolve_device(config.device))
    features_of = RouterInputs(config.route_by, policy, tuple(data.families))
    router, router_report = None, None
    t = time.perf_counter()
    if kind == "mor":
        router, router_report = train_router(transport, federation, run, data, features_of, config, log)
    timings["router_s"] = time.perf_counter() - t

    state = _run_state(out, config)
    server = server_signer(run)
    session = SecureSession(
        transport=transport, pub=federation.pub, signer=server,
        registry={c: federation.registry[c] for c in federation.clients}, clients=federation.clients,
        authority_key=federation.authority_key, run_id=state["run_id"], state_dir=out,
        ledger=Ledger(run.path / "ledger.jsonl"), w_min=federation.w_min, k_min=k_min,
        reply_timeout=config.reply_timeout,
    )
    reward = FederatedReward(session, config, router, features_of, family_map(data.config.clients),
                             data.answers)
    answer_prior, prior_path = None, out / "answer_prior.json"
    if prior_path.exists():  # a resumed run keeps the prior it measured (and released) before
        answer_prior = json.loads(prior_path.read_text())
        reward.answer_prior = {f: v["offsets"] for f, v in answer_prior["families"].items()}
    elif config.answer_prior_questions:
        log(f"answer prior: every answer scored on {config.answer_prior_questions} labelled questions per family")
        answer_prior = reward.learn_answer_prior(data.sft, config.answer_prior_questions, config.seed)
        measure_policy_on_prior_questions(answer_prior, policy.model, policy.processor, data)
        run.write_json(prior_path, answer_prior)
    gate = config.family_gate and answer_prior is not None
    needed = ("rows", "style_levels") if config.objective in STYLE_OBJECTIVES else ("rows",)
    if gate and any(key not in f for f in answer_prior["families"].values() for key in needed):
        log("the run's answer prior predates the family gate (it names no questions or style levels): every family "
            "is rewarded")
    elif gate and config.objective in STYLE_OBJECTIVES:
        reward.style_only = style_only_families(answer_prior)
        reward.reference_answers = reference_answers(policy.model, policy.processor, grpo_prompts(data, config.seed),
                                                     data, reward.style_only)
        log("GRPO rewards the answers of the families where the fused reward ranks the true answer first more often "
            f"than the SFT policy answers right, and only the fused reward's style elsewhere: {reward.style_only}")
    elif gate:
        reward.families = gated_families(answer_prior) or None
        log("GRPO rewards the families where the fused reward ranks the true answer first more often than the SFT "
            f"policy answers right: {reward.families or 'none, so every family (validation decides)'}")
    results = align_policy(run, data, config, reward, out, timings, log)
    ledger = Ledger(run.path / "ledger.jsonl").head()  # the auditor's anchor (audit verify, report)
    results.update(
        config={**config.summary(), "w_min": federation.w_min},
        run_id=state["run_id"],
        clients=clients,
        router=router_report,
        answer_prior=answer_prior,
        ledger={"path": str(run.path / "ledger.jsonl"), "entries": ledger.entries,
                "head": ledger.head if ledger.entries else None},
    )
    results["grpo"].update(rounds=session.timings.rounds, skipped_rounds=session.timings.skipped)
    results["timings"].update(total_s=time.perf_counter() - started,
                              scoring={**session.timings.as_dict(), **reward.seconds})
    run.write_json(out / "results.json", results)
    write_progress(out, "done")
    return results


def measure_policy_on_prior_questions(answer_prior: dict[str, Any], model: Any, processor: Any,
                                      data: FederatedData) -> None:
    """Adds `policy_accuracy` to each family of `answer_prior` (learn_answer_prior's report): the greedy
    accuracy of the (starting) policy on the same labelled questions (the server's own; no release)."""
    from secure_mor.policy import accuracy_report, generate_answers

    families = answer_prior["families"]
    rows = data.sft.select([i for f in families.values() for i in f["rows"]])
    per_family = accuracy_report(generate_answers(model, processor, rows), rows, data.answers)["per_family"]
    for f, measured in families.items():
        measured["policy_accuracy"] = per_family[f]["accuracy"]


def gated_families(answer_prior: dict[str, Any]) -> list[str]:
    """The families GRPO trains on (AlignConfig.family_gate): those where the corrected fused reward ranks the
    true answer first more often than the SFT policy answers right, on the same labelled questions. Where it
    does not, GRPO can only move the policy towards the reward's mistakes. Measured (epsilon 4, seed 0): the
    fused shape reward ranked 0.62 right, the SFT policy answered 0.78 of shapes right, and GRPO on every family
    took shape to 0.60-0.66 while presence (reward 0.69, policy 0.59) rose to 0.755. The other families' prompts
    stay in GRPO with advantage 0 (`FederatedReward.families`): trained on presence prompts alone, the same
    policy lost colour 0.92 -> 0.58 and shape 0.74 -> 0.32 in 40 steps; with them, the KL term holds them."""
    return [f for f, m in answer_prior["families"].items()
            if m["fused_top1"][str(m["shrinkage"])] > m["policy_accuracy"]]


# Objectives with a style beside the answer: where the gate finds the fused reward's answers worse than the
# policy's, GRPO can still learn the style from it (style_only_families).
STYLE_OBJECTIVES = ("sentences",)


def style_only_families(answer_prior: dict[str, Any]) -> dict[str, dict[str, float]]:
    """For an objective with a style: the families the gate leaves out (gated_families), each with the fused
    reward's level per style there (`style_levels`), which is all GRPO gets of them. Why: on `sentences` the
    router gives client-1, the one client that annotates in sentences, 0.96 of every family, and its answers
    rank below the policy's (colour top-1 0.41 against 0.99); with its whole reward GRPO took the sentence share
    0.015 -> 0.94 and held-out accuracy down 0.039 (DP ablation, session 8). The style level is what the
    reward knows better than the policy."""
    gated = gated_families(answer_prior)
    return {f: m["style_levels"] for f, m in answer_prior["families"].items() if f not in gated}


def reference_answers(model: Any, processor: Any, prompts: Any, data: FederatedData,
                      families: Mapping[str, Any]) -> dict[str, str]:
    """The SFT policy's greedy answer word to each GRPO prompt of `families` (the server's own policy: no
    release), by prompt key. A style-only family pays its style only to a completion with this answer: the
    style level alone paid a wrong answer in a sentence as much as a right one, and GRPO drifted (DP ablation,
    session 11: shape 0.86 -> 0.785 on seed 1, though the SFT policy made to answer in sentences loses nothing)."""
    from secure_mor.data import column
    from secure_mor.policy import extract_answer, generate_answers

    rows = prompts.select([i for i, f in enumerate(column(prompts, "family")) if f in families])
    if not len(rows):
        return {}
    completions = generate_answers(model, processor, rows)
    return {prompt_key(i, q): extract_answer(c, f, data.answers) for i, q, f, c in
            zip(column(rows, "image_id"), column(rows, "question"), column(rows, "family"), completions, strict=True)}


def grpo_prompts(data: FederatedData, seed: int) -> Any:
    """GRPO's prompts: the public pool with every question family cut to the size of the smallest
    (easy-VQA's pool is 74 % yes/no questions: measured, GRPO on it drifted the other families)."""
    from secure_mor.data import family_counts, stratified_indices

    smallest = min(family_counts(data.prompt_pool).values())
    return data.prompt_pool.select(stratified_indices(data.prompt_pool, smallest, seed))


def align_policy(run: RunDir, data: FederatedData, config: AlignConfig, reward: Callable[..., list],
                 out: Path, timings: dict[str, float], log: Log) -> dict[str, Any]:
    """Stages 6 and 7: GRPO on `reward` from the SFT policy, then the held-out evaluation; returns the
    results common to every reward (accuracy, GRPO's reward and held-out curves, timings)."""
    from secure_mor.server.grpo import run_grpo

    log(f"GRPO: {config.grpo.max_steps} steps, reward {getattr(reward, '__name__', 'reward')}, "
        f"fusion {config.fusion}, objective {config.objective}")
    curve_rows = evaluation_rows(data, config.curve_per_family, config.seed + 1)
    validation = validation_rows(data, config.validation_per_family, config.seed)

    def held_out(model: Any, processor: Any) -> dict[str, float]:
        metrics = held_out_accuracy(model, processor, curve_rows, data)
        if validation is not None:
            checked = held_out_accuracy(model, processor, validation, data)
            metrics.update({f"validation_{k}": v for k, v in checked.items()},
                           validation_score=checked[VALIDATION_SCORE[config.objective]])
        return metrics

    t = time.perf_counter()
    grpo = run_grpo(run.sft_policy, grpo_prompts(data, config.seed), reward, replace(config.grpo, seed=config.seed),
                    out, on_step=lambda step, total: write_progress(out, "GRPO", step, total), resume=config.resume,
                    held_out=held_out, select="validation_score" if validation is not None else None,
                    device=resolve_device(config.device), labelled=data.sft)
    timings["grpo_s"] = time.perf_counter() - t
    t = time.perf_counter()
    log("evaluating the aligned policy")
    aligned = evaluate(Path(grpo["policy_path"]), data, config)
    run.write_json(out / "eval.json", aligned)
    timings["eval_s"] = time.perf_counter() - t
    sft = json.loads(run.eval_path("sft").read_text())
    rewards = [h["reward"] for h in grpo["history"] if h.get("reward") is not None]
    quarter = max(1, len(rewards) // 4)
    return {
        "schema": SCHEMA,
        "accuracy": {
            "sft": {"overall": sft["overall"], "per_family": sft["per_family"]},
            "aligned": {"overall": aligned["overall"], "per_family": aligned["per_family"]},
        },
        "grpo": {
            "steps": grpo["global_step"],
            "resumed_from": grpo["resumed_from"],
            # Means over the first and the last quarter of the scoring rounds: one round's mean reward
            # (a few prompts) varies by about 0.1 from round to round.
            "reward_first_quarter": float(np.mean(rewards[:quarter])) if rewards else None,
            "reward_last_quarter": float(np.mean(rewards[-quarter:])) if rewards else None,
            "held_out_curve": grpo["held_out"],
            "selected": grpo["selected"],
            "families": list(getattr(reward, "families", None) or data.families),
            "style_only": sorted(getattr(reward, "style_only", {})),
            "log": str(grpo["log_path"]),
        },
        "timings": timings,
    }


# What the server's validation questions measure of each objective (they choose GRPO's kept step).
VALIDATION_SCORE = {"correctness": "accuracy", "sentences": "right_sentences"}


def validation_rows(data: FederatedData, per_family: int, seed: int) -> Any:
    """The server's labelled validation questions: `per_family` of the split's public questions per
    family (None when there are none, or per_family is 0)."""
    from secure_mor.data import stratified_indices

    if not per_family or data.public is None or not len(data.public):
        return None
    return data.public.select(stratified_indices(data.public, per_family, seed))


def held_out_accuracy(model: Any, processor: Any, rows: Any, data: FederatedData) -> dict[str, float]:
    """Greedy accuracy and sentence shares on a held-out subset (GRPO's curve and validation; the server
    evaluates its own policy, no release)."""
    from secure_mor.policy import accuracy_report, generate_answers

    report = accuracy_report(generate_answers(model, processor, rows), rows, data.answers)
    overall = report["overall"]
    return {"accuracy": overall["accuracy"], "sentences": overall["sentences"],
            "right_sentences": overall["right_sentences"],
            **{f"accuracy_{f}": v["accuracy"] for f, v in report["per_family"].items()}}


def write_progress(out: Path, stage: str, done: int = 0, total: int = 0) -> None:
    """`<out>/progress.json`: what the job is doing now (the CLI draws its progress bar from it)."""
    write_json(out / "progress.json", {"stage": stage, "done": done, "total": total})


def _run_state(out: Path, config: AlignConfig) -> dict[str, Any]:
    """The run id of this configuration, fixed at its first start (resume keeps it)."""
    path = out / "run.json"
    if path.exists():
        return json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    state = {"run_id": f"{config.label}-s{config.seed}-{secrets.token_hex(4)}", "config": config.summary()}
    path.write_text(json.dumps(state, indent=2, default=str))
    return state
