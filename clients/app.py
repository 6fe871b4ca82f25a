"""The client's Flower ClientApp: thin handlers over the client task modules.

Until the reward-model and scoring handlers land, the app answers one query:
the size of this client's private partition, per question family.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secure_mor.data import FAMILIES, SplitConfig, build_federated_data, default_clients, family_counts

app = ClientApp()


@app.query()
def describe(message: Message, context: Context) -> Message:
    config = message.content["config"]
    client_id = int(context.node_config["partition-id"])
    split = SplitConfig(
        clients=default_clients(int(config["num-clients"])), skew=float(config["data-skew"]), seed=int(config["seed"])
    )
    pairs = build_federated_data(split).clients[client_id]
    counts = family_counts(pairs)
    metrics = MetricRecord({"pairs": len(pairs), **{f"pairs-{f}": counts.get(f, 0) for f in FAMILIES}})
    return Message(
        RecordDict({"metrics": metrics, "identity": ConfigRecord({"client": f"client-{client_id}"})}),
        reply_to=message,
    )
