"""Client k's side of the federation protocol (secure_mor.protocol), independent of Flower.

`ClientNode.handle(action, payload)` is what the ClientApp calls for every message
addressed to a client. A node keeps everything on disk under its state directory
(`<state>/clients/client-k/`, as `secure-mor client train` does), so any worker
process can serve its next message: Flower's simulation runs nodes in a pool of
Ray workers and does not promise the same worker twice, and its deployment runtime
starts a fresh process per message. It trains on the preference pairs in `data_dir`
(an institution's own annotations) or, without one, on its share of the public split,
and signs with the key in `key_dir` (the institution's own, made there with `secure-mor
keys new` and encrypted under $SECURE_MOR_KEY_PASSPHRASE) or under its state directory.

It encrypts only under a public context that the key authority signed
(crypto.context.verify_public_context). The server relays the context and its signature
at setup, but the key that must have signed it is the authority's from the registry the
client trusts itself: `registry` (a deployment's: the operator's, every entry signed by
the CA `ca_cert`, which a registry needs) or the directory the parties publish to,
`<state>/keys` (simulation). A context whose signature does not verify is refused and
never stored; a stored one is verified again whenever a process loads it, and scoring,
margins and router gradients run under no other.

What leaves the node: its public key, its training metrics (epsilon spent, and the
preference accuracy of its model on the public held-out set), and ciphertexts signed
with its key. Scores, margins and router-gradient terms are masked with a mask only it
and the server can derive (the request's `mask_key`, crypto.blinding) and encrypted under
the key authority's public context before they leave: the server cannot read them, and
the key authority, which fuses and decrypts them, sees masked values only. Scoring and
margins spend no budget (post-processing of the DP-trained model).
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from secure_mor.clients.client import ClientConfig, RewardClient, client_dir
from secure_mor.clients.models import DEFAULT_ARCHS
from secure_mor.clients.scoring import prompt_digests
from secure_mor.crypto.context import ContextError, PublicContext, verify_public_context
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.pki import PkiError, read_registry_signed
from secure_mor.crypto.signing import KEY_PASSPHRASE_ENV, key_passphrase, load_or_create_signer, publish_public_key
from secure_mor.crypto.wire import seal_reply
from secure_mor.files import write_json
from secure_mor.protocol import (
    AUTHORITY_PARTY,
    ROLE_CLIENT,
    ClientSetupRequest,
    IdentifyReply,
    MarginsRequest,
    PartyReply,
    Payload,
    ProtocolError,
    RoundFields,
    RouterSetupReply,
    RouterSetupRequest,
    ScoreRequest,
    SealedReply,
    TrainReply,
    TrainRequest,
    bytes_array,
    calibration_digests,
)
from secure_mor.routing import (
    ItemUseLimiter,
    QueryLimits,
    RouterSetup,
    answer_gradient_query,
    decode_gradient_query,
    pair_margins,
)

if TYPE_CHECKING:
    from secure_mor.config import DataSpec
    from secure_mor.data import FederatedData

# Flower's deployment runtime starts a fresh process for every message: a scoring process must
# start fast, so what only training and calibration need (datasets, Opacus) is imported there.

NODE_FILE = "node.json"
CONTEXT_FILE = "public_context.bin"
# Per key-authority context: the pinned router setup's digest and every calibration item's uses
# over all run ids (the file of an older version, router_item_uses.json, counted per run id).
ROUTER_FILE = "router_contexts.json"
MARGINS_FILE = "calibration_margins.npy"  # of the current reward model; removed when it is retrained

_DATA_CACHE: dict[str, FederatedData] = {}


def federated_data(spec: DataSpec) -> FederatedData:
    """The public split (cached per process: every node of a simulation worker shares it)."""
    key = json.dumps(spec.to_json(), sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = spec.load()
    return _DATA_CACHE[key]


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and a simulation worker
    that trained a reward model would hold its peak for the rest of the run)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class ClientNode:
    """One client institution: its reward model, keys and protocol state under `state_dir`."""

    def __init__(
        self, state_dir: Path | str, client_id: int, *, data_dir: Path | str | None = None,
        key_dir: Path | str | None = None, registry: Path | str | None = None, ca_cert: Path | str | None = None,
    ) -> None:
        if registry and not ca_cert:  # an operator's registry is trusted only through its CA's signatures
            raise ProtocolError(f"the key registry {registry} needs the operator's CA certificate (ca-cert)")
        self.state_dir = Path(state_dir)
        self.client_id = client_id
        self.directory = client_dir(self.state_dir, client_id)
        # The institution's own preference pairs; without them (simulation, demo) its share of the
        # public split stands in for them.
        self.data_dir = Path(data_dir) if data_dir else None
        # A deployment's key (made by the institution beforehand) is never made here: a missing one is an error.
        self.key_dir = Path(key_dir) if key_dir else None
        # Where the key authority's public key is read from, to verify its context: never from the server.
        self.registry = Path(registry) if registry else self.state_dir / "keys"
        self.ca_cert = Path(ca_cert) if ca_cert else None
        self._public: PublicContext | None = None
        self._loaded: RewardClient | None = None
        self._margins: np.ndarray | None = None

    @property
    def party(self) -> str:
        return f"client-{self.client_id}"

    # ------------------------------------------------------------ persisted node state

    def _node_state(self) -> dict[str, Any]:
        path = self.directory / NODE_FILE
        if not path.exists():
            raise ProtocolError(f"{self.party} has not been set up (no {path})")
        return json.loads(path.read_text())

    def _spec(self) -> DataSpec:
        from secure_mor.config import DataSpec

        return DataSpec.from_json(self._node_state()["data_spec"])

    def _authority_key(self) -> str:
        """The key authority's payload key from the registry this client trusts (see the module docstring)."""
        try:
            keys = read_registry_signed(self.registry, self.ca_cert)
        except PkiError as err:
            raise ProtocolError(f"{self.party}: {err}") from err
        if AUTHORITY_PARTY not in keys:
            raise ProtocolError(f"{self.party}: the key authority's public key is not in the registry {self.registry}")
        return keys[AUTHORITY_PARTY]

    def _verified(self, context: bytes, fingerprint: str, signature: bytes) -> PublicContext:
        try:
            return verify_public_context(context, fingerprint, signature, self._authority_key())
        except ContextError as err:
            raise ProtocolError(f"{self.party} refuses the public context: {err}") from err

    def _public_context(self) -> PublicContext:
        """The stored context, verified again against the registry's authority key (ProtocolError
        without one that verifies): what every reply is encrypted under."""
        if self._public is None:
            state = self._node_state()
            if "context_signature" not in state:
                raise ProtocolError(f"{self.party} holds no verified public context (set up by an older version, "
                                    "without the key authority's signature): set it up again")  # fmt: skip
            self._public = self._verified((self.directory / CONTEXT_FILE).read_bytes(), state["fingerprint"],
                                          bytes.fromhex(state["context_signature"]))  # fmt: skip
        return self._public

    def _client(self) -> RewardClient:
        if self._loaded is None:
            self._loaded = RewardClient.load(self.state_dir, self.client_id, key_dir=self._key_dir())
        return self._loaded

    def _key_dir(self) -> Path | None:
        """The key-dir of a deployment: the institution's own key, made there and encrypted at rest."""
        if self.key_dir is not None and not (self.key_dir / f"{self.party}.key").exists():
            raise ProtocolError(f"{self.party}: no signing key {self.party}.key in key-dir {self.key_dir}")
        if self.key_dir is not None and key_passphrase() is None:
            raise ProtocolError(f"{self.party}: the signing key in key-dir is encrypted: set {KEY_PASSPHRASE_ENV}")
        return self.key_dir

    # ------------------------------------------------------------ actions

    def handle(self, action: str, payload: Mapping[str, Any]) -> Payload:
        handlers: dict[str, Callable[[Mapping[str, Any]], Payload]] = {
            "identify": self.identify,
            "setup": self.setup,
            "train": self.train,
            "router_setup": self.router_setup,
            "margins": self.margins,
            "router_gradient": self.router_gradient,
            "score": self.score,
        }
        if action not in handlers:
            raise ProtocolError(f"a client does not handle {action!r}")
        return handlers[action](payload)

    def identify(self, payload: Mapping[str, Any]) -> Payload:
        signer = load_or_create_signer(self.party, self._key_dir() or self.directory / "keys", key_passphrase())
        publish_public_key(signer, self.state_dir / "keys")
        return IdentifyReply(self.party, ROLE_CLIENT, signer.public_key_hex).encode()

    def setup(self, payload: Mapping[str, Any]) -> Payload:
        """Store the authority's public context, once its signature verifies with the registry's
        authority key (nothing is stored otherwise), and the public split."""
        request = ClientSetupRequest.decode(payload)
        context, fingerprint, signature = request.context, request.fingerprint, request.context_signature
        self._verified(context, fingerprint, signature)  # refuses a context the authority did not sign
        data_spec = json.loads(request.data_spec)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / CONTEXT_FILE).write_bytes(context)
        state = {"fingerprint": fingerprint, "context_signature": signature.hex(), "data_spec": data_spec}
        (self.directory / NODE_FILE).write_text(json.dumps(state, indent=2))
        self._public = None
        return PartyReply(self.party).encode()

    def train(self, payload: Mapping[str, Any]) -> Payload:
        """Train the reward model with DP-SGD under budget (epsilon, delta), once: a client
        already trained with the same budget answers with its stored metrics and spends nothing."""
        from secure_mor.clients.client import train_client
        from secure_mor.clients.training import default_train_config
        from secure_mor.data import directory_digest, load_annotations, public_annotations

        request = TrainRequest.decode(payload)
        epsilon, delta = request.epsilon, request.delta
        spec = self._spec()
        data = federated_data(spec)
        data_config = data.config.clients[self.client_id]
        split: dict[str, Any] = {
            "seed": spec.split.seed,
            "skew": spec.split.skew,
            "pairs_per_client": spec.split.pairs_per_client,
            "num_clients": len(spec.split.clients),
        }
        if self.data_dir is not None:
            annotations = load_annotations(self.data_dir)
            split = {"private_data_sha256": directory_digest(self.data_dir), "annotations": len(annotations)}
        else:
            annotations = data.clients[self.client_id]
        config = ClientConfig(
            client_id=self.client_id,
            arch=request.arch or DEFAULT_ARCHS[self.client_id % len(DEFAULT_ARCHS)],
            family=data_config.family,
            style=data_config.style,
            budget_epsilon=epsilon,
            budget_delta=delta,
            split=split,
        )
        started = time.perf_counter()
        if RewardClient.exists(self.state_dir, self.client_id) and self._client().config == config:
            client, reused = self._client(), True
        else:
            overrides = request.training.overrides()
            public_epochs = overrides.pop("public_epochs", None)  # None: the default; 0: no public warm start
            train_config = default_train_config(config.arch, epsilon, delta=delta, seed=spec.split.seed, **overrides)
            public = None if public_epochs == 0 else public_annotations(data, config.style, config.family,
                                                                          seed=spec.split.seed)
            client, _ = train_client(self.state_dir, config, annotations, train_config, key_dir=self._key_dir(),
                                     public=public, public_epochs=public_epochs)
            self._loaded, self._margins, reused = client, None, False
            (self.directory / MARGINS_FILE).unlink(missing_ok=True)
            release_freed_memory()  # DP-SGD's per-pair gradients are gone; give their pages back
        metrics = client.metrics()
        if "held_out" not in metrics:
            metrics["held_out"] = client.evaluate(data, seed=spec.split.seed)
            client.save_metrics(metrics)
        total = metrics["runs"][-1]["total_epsilon"]  # None: non-private, unbounded
        return TrainReply(self.party, config.arch, config.family, epsilon, math.inf if total is None else float(total),
                          reused, time.perf_counter() - started, metrics["held_out"]).encode()

    def _calibration_margins(self) -> np.ndarray:
        """clip(R(chosen) - R(rejected)) for every public calibration pair, cached in memory and on
        the node's disk: Flower's deployment runtime starts a fresh process for every message."""
        path = self.directory / MARGINS_FILE
        if self._margins is None and path.exists():
            self._margins = np.load(path, allow_pickle=False)
        if self._margins is None:
            from secure_mor.data import calibration_set, column

            client = self._client()
            pairs = calibration_set(federated_data(self._spec()))
            images, questions = list(pairs["image"]), column(pairs, "question")
            chosen = client.score(list(zip(images, questions, column(pairs, "chosen_text"), strict=True)))
            rejected = client.score(list(zip(images, questions, column(pairs, "rejected_text"), strict=True)))
            self._margins = pair_margins(chosen, rejected, ReleaseConfig().value_bound)
            np.save(path, self._margins, allow_pickle=False)
        return self._margins

    def _seal(
        self, fields: RoundFields, purpose: str, values: np.ndarray, started: float,
        items: list[bytes], query: str | None = None,
    ) -> SealedReply:
        """Mask (with the server's round key), encrypt and sign `values`, committing to the items'
        digests and to the router query it answers."""
        reply = seal_reply(
            self._client().signer(),
            self._public_context(),
            run_id=fields.run_id,
            step=fields.step,
            nonce=fields.nonce,
            purpose=purpose,
            scores=values,
            mask_key=fields.mask_key,
            items=items,
            query=query,
        )
        return SealedReply(reply, time.perf_counter() - started)

    def _router_context(self) -> tuple[dict[str, Any], Callable[[], None]]:
        """This context's router state (the pinned setup's digest, the items' uses), and its saver:
        persisted, so that no worker process can be asked twice."""
        path = self.directory / ROUTER_FILE
        contexts = json.loads(path.read_text()) if path.exists() else {}
        state = contexts.setdefault(self._node_state()["fingerprint"], {"setup_sha256": None})

        def save() -> None:
            write_json(path, contexts)

        return state, save

    def _admit(self, run_id: str, step: int, items: list[int]) -> None:
        """Count a router step's items against their uses over every run id of the context."""
        state, save = self._router_context()
        limiter = ItemUseLimiter.from_json(QueryLimits().item_uses, state)
        limiter.admit(run_id, step, items)
        state.update(limiter.to_json())
        save()

    def _pinned_setup(self) -> RouterSetup:
        digest = self._router_context()[0]["setup_sha256"]
        if digest is None:
            raise ProtocolError(f"{self.party}: no router setup is pinned for this context (router_setup first)")
        setup = RouterSetup.from_bytes((self.directory / f"router-setup-{digest[:16]}.npz").read_bytes())
        if setup.digest != digest:
            raise ProtocolError(f"{self.party}: the stored router setup is not the pinned one")
        return setup

    def router_setup(self, payload: Mapping[str, Any]) -> Payload:
        """Pin a router training's public parts for this context (routing.RouterSetup): every later
        gradient query must agree with them. One setup per context; the same one again is a no-op."""
        setup = RouterSetup.from_bytes(RouterSetupRequest.decode(payload).setup)
        setup.validate(len(self._calibration_margins()))
        state, save = self._router_context()
        if state["setup_sha256"] not in (None, setup.digest):
            raise ProtocolError(f"{self.party}: this context's router setup is pinned "
                                f"({state['setup_sha256'][:16]}...): another router needs a new key-authority context")
        (self.directory / f"router-setup-{setup.digest[:16]}.npz").write_bytes(setup.to_bytes())
        state["setup_sha256"] = setup.digest
        save()
        return RouterSetupReply(self.party, setup.digest).encode()

    def margins(self, payload: Mapping[str, Any]) -> Payload:
        started = time.perf_counter()
        self._public_context()  # nothing is computed or counted without a verified context
        request = MarginsRequest.decode(payload)
        items = bytes_array(request.items).astype(np.int64)
        self._admit(request.run_id, request.step, items.tolist())
        margins = self._calibration_margins()[items]
        return self._seal(request, "reward", margins, started, calibration_digests(items.tolist())).encode()

    def router_gradient(self, payload: Mapping[str, Any]) -> Payload:
        started = time.perf_counter()
        self._public_context()
        query, fields = decode_gradient_query(payload), RoundFields.decode(payload)
        setup = self._pinned_setup()
        self._admit(fields.run_id, query.step, query.items.tolist())
        values = answer_gradient_query(query, self._calibration_margins(), self.client_id,
                                       value_bound=ReleaseConfig().value_bound, setup=setup)  # fmt: skip
        return self._seal(fields, "router_gradient", values, started, calibration_digests(query.items.tolist()),
                          query.digest).encode()  # fmt: skip

    def score(self, payload: Mapping[str, Any]) -> Payload:
        started = time.perf_counter()
        self._public_context()
        request = ScoreRequest.decode(payload)
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in request.images]
        index, questions, answers = request.image_index, request.questions, request.answers
        if not len(index) == len(questions) == len(answers) or any(not 0 <= i < len(images) for i in index):
            raise ProtocolError("a score request's images, questions and answers do not line up")
        client = self._client()
        scores = client.score([(images[i], q, a) for i, q, a in zip(index, questions, answers, strict=True)])
        digests = prompt_digests(client.encoder, images, index, questions)  # the prompts as its model reads them
        return replace(self._seal(request, "reward", scores, started, digests), items=b"".join(digests)).encode()
