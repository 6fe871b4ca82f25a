"""The `secure-mor` command line."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from secure_mor.audits.cli import audit_app
from secure_mor.clients.cli import client_app
from secure_mor.config import EASY_VQA, DataSpec, RunDir
from secure_mor.data import DatasetError, SplitConfig, default_clients, family_counts
from secure_mor.experiments.cli import empirical_cmd
from secure_mor.progress import progress_bar

app = typer.Typer(
    help="Secure MoR: privacy-hardened federated alignment of vision-language models.", no_args_is_help=True
)
data_app = typer.Typer(help="Inspect the data and its federated split.", no_args_is_help=True)
policy_app = typer.Typer(help="Build, warm-start (SFT) and evaluate the policy VLM.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(policy_app, name="policy")
app.add_typer(client_app, name="client")
audit_app.command("empirical")(empirical_cmd)  # trains a client: not the auditor's (secure_mor.experiments.cli)
app.add_typer(audit_app, name="audit")
pki_app = typer.Typer(help="The operator's CA, certificates and registry (docs/deployment.md).", no_args_is_help=True)
deploy_app = typer.Typer(help="Flower's deployment runtime (docs/deployment.md).", no_args_is_help=True)
keys_app = typer.Typer(help="A party's own keys, made where it runs (docs/deployment.md).", no_args_is_help=True)
app.add_typer(pki_app, name="pki")
app.add_typer(keys_app, name="keys")
app.add_typer(deploy_app, name="deploy")

console = Console()

OutOption = Annotated[Path, typer.Option("--out", help="Run directory for every output of this run.")]
DatasetOption = Annotated[
    str, typer.Option(help="'easy-vqa' or a local Hugging Face dataset (save_to_disk dir or data files).")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the split and of training.")]
DeviceOption = Annotated[
    str, typer.Option(help="Where the policy runs (SFT, GRPO, prompt features, evaluation): auto | cpu | cuda.")
]
ModelOption = Annotated[
    str, typer.Option(help="The policy VLM: a local path, or a hub id already in the local cache; "
                           "default: a tiny LLaVA built locally.")
]
ClientsOption = Annotated[int, typer.Option("--clients", help="Number of clients (institutions).")]
SkewOption = Annotated[float, typer.Option(help="Fraction of each client's questions from its own family.")]
PairsOption = Annotated[int, typer.Option(help="Annotations per client (one question each: the privacy unit).")]


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # TRL's configs still set a transformers argument that transformers 5 deprecates.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    for name in ("transformers", "datasets", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}")  # escaped: "[video-processors]" is not markup
    return typer.Exit(code=2)


def _data_spec(dataset: str, seed: int, clients: int, skew: float, pairs_per_client: int) -> DataSpec:
    return DataSpec(
        dataset=dataset,
        split=SplitConfig(clients=default_clients(clients), skew=skew, pairs_per_client=pairs_per_client, seed=seed),
    )


def _load_data(spec: DataSpec):  # noqa: ANN202 - FederatedData, imported lazily with datasets
    try:
        with console.status(f"loading {spec.dataset} and building the federated split"):
            return spec.load()
    except DatasetError as err:
        raise _fail(str(err)) from err


def _run_data_spec(run: RunDir) -> DataSpec:
    try:
        return run.data_spec()
    except DatasetError as err:
        raise _fail(str(err)) from err


# ---------------------------------------------------------------- data


@data_app.command("info")
def data_info(
    dataset: DatasetOption = EASY_VQA,
    seed: SeedOption = 0,
    clients: ClientsOption = 3,
    skew: SkewOption = 0.8,
    pairs_per_client: PairsOption = 800,
) -> None:
    """Counts per split, per client and per question family."""
    _quiet_libraries()
    spec = _data_spec(dataset, seed, clients, skew, pairs_per_client)
    data = _load_data(spec)
    table = Table(title=f"{dataset}: federated split (seed {seed}, skew {skew})")
    table.add_column("split")
    table.add_column("holder")
    table.add_column("rows", justify="right")
    for family in data.families:
        table.add_column(family, justify="right")
    table.add_column("notes")

    def add(name: str, holder: str, rows: Any, notes: str = "") -> None:
        counts = family_counts(rows)
        table.add_row(name, holder, str(len(rows)), *[str(counts.get(f, 0)) for f in data.families], notes)

    add("sft", "server", data.sft, "supervised warm start")
    add("prompt pool", "server", data.prompt_pool, "public prompts for GRPO, no answers")
    add("calibration", "server", data.calibration, "public preference pairs for the router")
    for k, (pairs, client) in enumerate(zip(data.clients, data.config.clients, strict=True)):
        flipped = sum(pairs["label_flipped"])
        add(
            f"client-{k}",
            f"client-{k}",
            pairs,
            f"{client.family} specialist, {client.style} style, {flipped} noisy labels",
        )
    add("evaluation", "held out", data.evaluation, "test split, stratified per family")
    console.print(table)
    answers = ", ".join(f"{family}: {len(values)}" for family, values in data.answers.items())
    console.print(f"answers per family: {answers}")


@data_app.command("export")
def data_export(
    client: Annotated[int, typer.Argument(help="the client id K")],
    out: Annotated[Path, typer.Option(help="directory to write (a client node's node config data-dir)")],
    dataset: DatasetOption = EASY_VQA,
    seed: SeedOption = 0,
    clients: ClientsOption = 3,
    skew: SkewOption = 0.8,
    pairs_per_client: PairsOption = 800,
) -> None:
    """Client K's share of the split as its own annotations, where its SuperNode reads them:
    to try a deployment with data that stands in for an institution's annotations."""
    from secure_mor.data import save_annotations

    _quiet_libraries()
    if out.exists():
        raise _fail(f"{out} exists: choose a new directory (nothing is overwritten)")
    data = _load_data(_data_spec(dataset, seed, clients, skew, pairs_per_client))
    if not 0 <= client < len(data.clients):
        raise _fail(f"client {client} is not in a split of {len(data.clients)} clients")
    save_annotations(data.clients[client], out)
    console.print(f"client-{client}: {len(data.clients[client])} annotations written to {out}")


# ---------------------------------------------------------------- policy


@policy_app.command("build")
def policy_build(
    out: OutOption = Path("runs/demo"),
    model: Annotated[
        str | None, typer.Option(help="Use this TRL-supported VLM (path, or hub id already in the local cache).")
    ] = None,
    dataset: DatasetOption = EASY_VQA,
    seed: SeedOption = 0,
    clients: ClientsOption = 3,
    skew: SkewOption = 0.8,
    pairs_per_client: PairsOption = 800,
) -> None:
    """Build the tiny LLaVA policy from the data's vocabulary (or copy --model) into RUN/policy/base."""
    _quiet_libraries()
    from secure_mor.vlm import (
        PolicyLoadError,
        TinyVLMConfig,
        build_tiny_vlm,
        count_parameters,
        load_policy,
        save_policy,
    )

    run = RunDir(out)
    spec = _data_spec(dataset, seed, clients, skew, pairs_per_client)
    data = _load_data(spec)
    if model:
        try:
            policy, processor = load_policy(model)
        except PolicyLoadError as err:
            raise _fail(str(err)) from err
    else:
        from secure_mor.data import vocabulary_texts

        policy, processor = build_tiny_vlm(vocabulary_texts(data), TinyVLMConfig(seed=seed))
    run.save_data_spec(spec)
    save_policy(policy, processor, run.base_policy)
    run.save_policy_source(model or "")
    console.print(
        f"policy: {type(policy).__name__}, {count_parameters(policy):,} parameters, "
        f"vocabulary {len(processor.tokenizer)}; saved to {run.base_policy}"
    )


@policy_app.command("sft")
def policy_sft(
    out: OutOption = Path("runs/demo"),
    examples: Annotated[int | None, typer.Option(help="SFT examples, drawn evenly across question families "
                                                      "(default: the main job's, SFTSettings).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over those examples (default: the main job's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-step batch size (default: the main job's).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate, cosine schedule (default: the "
                                                              "main job's).")] = None,
) -> None:
    """Supervised warm start (TRL SFTTrainer) of RUN/policy/base into RUN/policy/sft; what is not given is the
    main job's setting (`SFTSettings`)."""
    _quiet_libraries()
    from secure_mor.policy import SFTSettings, run_sft
    from secure_mor.vlm import load_policy, save_policy

    run = RunDir(out)
    if not run.base_policy.exists():
        raise _fail(f"{run.base_policy} is missing: run `secure-mor policy build --out {out}` first")
    spec = _run_data_spec(run)
    data = _load_data(spec)
    model, processor = load_policy(run.base_policy)
    given = {"examples": examples, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate}
    settings = SFTSettings(seed=spec.split.seed, **{k: v for k, v in given.items() if v is not None})
    started = time.perf_counter()
    with progress_bar(console) as progress:
        task = progress.add_task("SFT", total=None)
        run_sft(
            model,
            processor,
            data.sft,
            settings,
            run.path,
            on_step=lambda step, total: progress.update(task, completed=step, total=total),
        )
    save_policy(model, processor, run.sft_policy)
    console.print(f"SFT done in {time.perf_counter() - started:.1f} s; saved to {run.sft_policy}")


@policy_app.command("eval")
def policy_eval(
    out: OutOption = Path("runs/demo"),
    stage: Annotated[str, typer.Option(help="Which policy of the run: base, sft, or a path.")] = "sft",
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 64,
) -> None:
    """Greedy-decode the held-out set; print per-family accuracy and write RUN/eval/<stage>.json."""
    _quiet_libraries()
    from secure_mor.policy import evaluate_policy
    from secure_mor.vlm import load_policy

    run = RunDir(out)
    path = {"base": run.base_policy, "sft": run.sft_policy}.get(stage, Path(stage))
    if not path.exists():
        raise _fail(f"no policy at {path}")
    data = _load_data(_run_data_spec(run))
    model, processor = load_policy(path)
    started = time.perf_counter()
    with progress_bar(console) as progress:
        task = progress.add_task(f"evaluating {stage}", total=len(data.evaluation))
        report = evaluate_policy(
            model, processor, data.evaluation, data.answers, batch_size, on_batch=lambda n: progress.advance(task, n)
        )
    report["policy"] = str(path)
    report["seconds"] = time.perf_counter() - started
    tag = stage if stage in ("base", "sft") else Path(stage).name
    written = run.write_json(run.eval_path(tag), report)
    print_accuracy(report, f"held-out accuracy: {tag}")
    console.print(f"written {written}")


def print_accuracy(report: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for name in ("family", "questions", "accuracy", "exact match"):
        table.add_column(name, justify="left" if name == "family" else "right")
    rows = list(report["per_family"].items()) + [("overall", report["overall"])]
    for family, stats in rows:
        table.add_row(family, str(stats["n"]), f"{stats['accuracy']:.3f}", f"{stats['exact_match']:.3f}")
    console.print(table)


# ---------------------------------------------------------------- the main job


def _run_align(out: Path, run_config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One configuration through Flower's simulation runtime, with a progress bar drawn from
    the job's progress file; returns its results.json."""
    from secure_mor.device import resolve_device
    from secure_mor.federation import FederationError, run_local_simulation
    from secure_mor.server.pipeline import AlignError
    from secure_mor.server.run_config import align_config
    from secure_mor.vlm import PolicyLoadError, check_loadable

    try:  # the whole configuration is checked before Flower starts: its logs would bury the reason
        config = align_config(run_config)
        resolve_device(config.device)
    except (AlignError, ValueError) as err:
        raise _fail(str(err)) from err
    if run_config.get("model"):
        try:
            check_loadable(str(run_config["model"]))  # before Flower starts: its logs would bury the reason
        except PolicyLoadError as err:
            raise _fail(str(err)) from err
    if "policy-threads" not in run_config:  # the simulated clients share this machine, one CPU per ClientApp
        cores = os.cpu_count() or 1
        run_config = {**run_config, "policy-threads": max(1, cores - min(config.num_clients, cores))}
    out = out.resolve()
    label = config.label
    progress_file = out / "align" / label / "progress.json"
    with progress_bar(console) as progress:
        task = progress.add_task("starting Flower (simulation runtime)", total=None)

        def poll(elapsed: float) -> None:
            try:
                state = json.loads(progress_file.read_text())
            except (OSError, ValueError):
                return
            progress.update(task, description=state["stage"], completed=state["done"], total=state["total"] or None)

        try:
            result = run_local_simulation(
                {**run_config, "run-dir": str(out)}, config.num_clients + 1, timeout=timeout, on_poll=poll
            )
        except FederationError as err:
            raise _fail(str(err)) from err
    console.print(f"Flower run {result.run_id}: {result.status} in {result.seconds:.0f} s")
    return json.loads((out / "align" / label / "results.json").read_text())


def print_results(results: dict[str, Any]) -> None:
    c = results["config"]
    table = Table(title=f"held-out accuracy: SFT vs aligned (fusion {c['fusion']}, objective {c['objective']})")
    for name in ("family", "SFT", "aligned", "SFT sentences", "aligned sentences"):
        table.add_column(name, justify="left" if name == "family" else "right")
    sft, aligned = results["accuracy"]["sft"], results["accuracy"]["aligned"]
    for family in list(sft["per_family"]) + ["overall"]:
        before = sft["overall"] if family == "overall" else sft["per_family"][family]
        after = aligned["overall"] if family == "overall" else aligned["per_family"][family]
        table.add_row(family, f"{before['accuracy']:.3f}", f"{after['accuracy']:.3f}",
                      f"{before['sentences']:.2f}", f"{after['sentences']:.2f}")
    console.print(table)
    if results.get("clients"):
        clients = Table(title="clients' reward models (held out, own family)",
                        caption="top-1: the best-scored of all the family's answers is right (what GRPO needs)")
        for name in ("client", "arch", "family", "epsilon spent", "top-1", "image dependence", "pairwise"):
            clients.add_column(name)
        for party, m in results["clients"].items():
            spent = "inf (non-private)" if m["total_epsilon"] is None else f"{m['total_epsilon']:.3f}"
            own = {measure: values.get(m["family"]) for measure, values in m["reward_model"].items()}
            clients.add_row(party, m["arch"], m["family"], spent,
                            *(f"{own[k]:.3f}" if own.get(k) is not None else "-"
                              for k in ("top1", "image_dependence", "pairwise")))
        console.print(clients)
    if results.get("router"):
        console.print(f"router (held-out prompts, objective {c['objective']}): mean weights per family "
                      f"{results['router']['held_out_weights'][c['objective']]}")
    grpo = results["grpo"]
    if grpo.get("selected"):
        kept = grpo["selected"]
        style = f" (style only: {', '.join(grpo['style_only'])})" if grpo.get("style_only") else ""
        console.print(f"GRPO rewarded the families {', '.join(grpo['families'])}{style}; the aligned policy is step "
                      f"{kept['step']}{' (the SFT start)' if kept['step'] == 0 else ''}, the best on the server's "
                      f"validation questions ({kept['metric']} {kept['value']:.3f})")
    rounds = f", {grpo['rounds']} scoring rounds ({grpo['skipped_rounds']} skipped)" if "rounds" in grpo else ""
    console.print(
        f"GRPO: {grpo['steps']} steps{rounds}, mean reward {_num(grpo['reward_first_quarter'])} (first quarter of "
        f"the rounds) -> {_num(grpo['reward_last_quarter'])} (last quarter)"
        + (f"; ledger {results['ledger']['entries']} entries, head {results['ledger']['head']}"
           if results.get("ledger") else "")
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command("align")
def align(
    out: OutOption = Path("runs/align"),
    model: ModelOption = "",
    dataset: DatasetOption = EASY_VQA,
    device: DeviceOption = "auto",
    fusion: Annotated[str | None, typer.Option(help="mor | uniform | single:K | by-family (evaluation only)")] = None,
    epsilon: Annotated[float | None, typer.Option(help="each client's DP budget epsilon (inf: non-private)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the split, the training and the evaluation")] = None,
    objective: Annotated[str | None, typer.Option(help="alignment objective: correctness | sentences")] = None,
    steps: Annotated[int | None, typer.Option(help="GRPO optimizer steps (run config grpo-max-steps)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    config: Annotated[
        list[str] | None, typer.Option(help="any other setting, KEY=VALUE (the keys and defaults: pyproject.toml)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 3600.0,
) -> None:
    """One configuration of the secure federated alignment, through Flower's simulation runtime. What is not
    given is the main job's default (server.pipeline.AlignConfig; pyproject.toml lists every key)."""
    given = {"fusion": fusion, "epsilon": epsilon, "seed": seed, "objective": objective, "grpo-max-steps": steps}
    run_config: dict[str, Any] = {"model": _local(model), "dataset": _local(dataset), "device": device,
                                  "resume": resume, **{k: v for k, v in given.items() if v is not None}}  # fmt: skip
    for item in config or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--config takes KEY=VALUE, got {item!r}")
        run_config[key] = _parse_value(value)
    results = _run_align(out, run_config, timeout)
    print_results(results)


def _local(source: str) -> str:
    """A path that exists, made absolute (Flower's processes run elsewhere); anything else as given."""
    return str(Path(source).resolve()) if source and Path(source).exists() else source


def _parse_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


@app.command("demo")
def demo(
    out: OutOption = Path("runs/demo"),
    model: ModelOption = "",
    dataset: DatasetOption = EASY_VQA,
    device: DeviceOption = "auto",
    seed: Annotated[int | None, typer.Option(help="seed of the split, the training and the evaluation")] = None,
    epsilon: Annotated[float | None, typer.Option(help="each client's DP budget epsilon")] = None,
) -> None:
    """The main job on easy-VQA (the defaults of every setting): SFT warm start, DP reward models, secure
    router training, GRPO on the encrypted router-fused reward, evaluation. Writes RUN/results.json."""
    started = time.perf_counter()
    given = {"epsilon": epsilon, "seed": seed}
    results = _run_align(out, {"model": _local(model), "dataset": _local(dataset), "device": device,
                               **{k: v for k, v in given.items() if v is not None}}, 3600.0)  # fmt: skip
    results["timings"]["command_s"] = time.perf_counter() - started
    RunDir(out).write_json(Path(out) / "results.json", results)
    print_results(results)
    elapsed = time.perf_counter() - started
    console.print(f"[bold green]done[/] in {elapsed:.0f} s; results in {Path(out) / 'results.json'}")


@app.command("ablate")
def ablate(
    out: OutOption = Path("runs/ablate"),
    epsilons: Annotated[str, typer.Option(help="client budgets, comma-separated; inf = non-private")] = "inf,4",
    fusions: Annotated[str, typer.Option(help="comma-separated: mor, uniform, single:K, by-family")] = (
        "mor,uniform,single:0,single:1,single:2"
    ),
    objectives: Annotated[str, typer.Option(help="comma-separated: correctness, sentences")] = "correctness,sentences",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    steps: Annotated[int | None, typer.Option(help="GRPO optimizer steps per cell [the main job's]")] = None,
    workers: Annotated[int, typer.Option(help="(seed, epsilon) groups run in parallel")] = 1,
    oracle: Annotated[bool, typer.Option(help="the oracle diagnostic per (seed, objective)")] = True,
    empirical: Annotated[
        bool, typer.Option(help="one-run empirical privacy audit of client-0's training per (seed, epsilon)")
    ] = True,
) -> None:
    """DP ablation sweep (epsilon x fusion x objective x seed, and the oracle) through the real pipeline;
    CSV, summary.md and plots in OUT."""
    _quiet_libraries()
    from dataclasses import replace as _replace

    from secure_mor.experiments.ablate import AblationGrid, run_ablation
    from secure_mor.server.pipeline import AlignConfig

    try:
        grid = AblationGrid(
            epsilons=tuple(float(e) for e in epsilons.split(",")),
            fusions=tuple(f.strip() for f in fusions.split(",")),
            objectives=tuple(o.strip() for o in objectives.split(",")),
            seeds=tuple(int(s) for s in seeds.split(",")),
            oracle=oracle,
        )
    except ValueError as err:
        raise _fail(f"bad grid: {err}") from err
    overrides = {} if steps is None else {"grpo": _replace(AlignConfig().grpo, max_steps=steps)}
    started = time.perf_counter()
    groups = len(grid.seeds) * len(grid.epsilons)
    with progress_bar(console) as progress:
        task = progress.add_task(f"{groups} (seed, epsilon) groups x {len(grid.fusions)} fusions x "
                                 f"{len(grid.objectives)} objectives", total=groups)
        path = run_ablation(out, grid, overrides, workers, lambda done, _: progress.update(task, completed=done),
                            audit={} if empirical else None)  # fmt: skip
    plots = ["summary.md", "policy_accuracy.png", "style.png", "reward_models.png", "router_weights.png"]
    plots += ["empirical_epsilon.png"] if empirical else []
    console.print(f"done in {time.perf_counter() - started:.0f} s: {path}, " + ", ".join(str(out / p) for p in plots))


@app.command("oracle")
def oracle(
    out: OutOption = Path("runs/demo"),
    seed: SeedOption = 0,
    objective: Annotated[str, typer.Option(help="alignment objective: correctness | sentences")] = "correctness",
    steps: Annotated[int | None, typer.Option(help="GRPO optimizer steps [the main job's]")] = None,
) -> None:
    """Diagnostic, not a fusion: GRPO from the run's SFT policy on a reward that reads the true answers.
    If it does not lift held-out accuracy, no learned reward can. No client, router or key authority
    takes part. Writes RUN/align/oracle[-OBJECTIVE]/results.json."""
    _quiet_libraries()
    from dataclasses import replace as _replace

    from secure_mor.experiments.oracle import run_oracle
    from secure_mor.server.pipeline import AlignConfig, AlignError

    config = AlignConfig(seed=seed, objective=objective)
    if steps is not None:
        config = _replace(config, grpo=_replace(config.grpo, max_steps=steps))
    with progress_bar(console) as progress:
        task = progress.add_task("oracle diagnostic", total=None)
        try:
            results = run_oracle(out, config, log=lambda m: progress.update(task, description=m))
        except AlignError as err:
            raise _fail(str(err)) from err
    print_results(results)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (of `demo`, `align` or an ablation cell).")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the report [RUN_DIR/report].")] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Allowed epsilon difference in the recomputation (as `audit recompute`).")
    ] = 0.05,
) -> None:
    """Privacy report of a run for auditors: OUT/report.html (one offline file) and OUT/report.md with its PNGs.

    It verifies the ledger against RUN_DIR/keys and the ledger heads recorded in the results.json files,
    recomputes every epsilon, compares each party's spending with its budget, shows the empirical audits
    (RUN_DIR/audits/empirical-*.json) and the run's results.

    Exit codes: 0 every check passed; 1 a check FAILED (tampered ledger, wrong epsilon, budget overrun,
    empirical bound above a claim, a lost ledger of a run that released; the report says which line and
    why); 2 RUN_DIR is not a run directory (nothing written); 3 the ledger could not be checked (no
    ledger or no keys) or lines of it are UNANCHORED (no recorded head covers them).
    """
    from secure_mor.audits.report import build_report  # matplotlib, dp-accounting: slow to import
    from secure_mor.audits.run_files import ReportError

    try:
        result = build_report(run_dir, out, tolerance)
    except ReportError as err:
        raise _fail(str(err)) from None
    colour = {"PASS": "green", "FAIL": "red"}.get(result.status, "yellow")
    for check in result.checks:
        console.print(
            f"{check.status:>12}  {check.name}: {check.detail}", highlight=False, markup=False, soft_wrap=True
        )
    console.print(f"[bold {colour}]{result.status}[/] report written to {result.html} and {result.markdown}")
    raise typer.Exit(result.exit_code)


# ---------------------------------------------------------------- deployment

PkiDirOption = Annotated[Path, typer.Option("--dir", help="The PKI directory (the operator's).")]


@pki_app.command("init")
def pki_init(
    directory: PkiDirOption = Path("pki"),
    host: Annotated[
        list[str] | None,
        typer.Option(help="a host name or address the SuperLink is reached at (repeat; default: localhost, loopback)"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity of the CA and the SuperLink certificate")] = 365,
) -> None:
    """A CA and the SuperLink's TLS certificate (SANs: every --host)."""
    from secure_mor.crypto.pki import DEFAULT_HOSTS, PkiError, init_pki

    try:
        pki = init_pki(directory, hosts=tuple(host or DEFAULT_HOSTS), days=days)
    except PkiError as err:
        raise _fail(str(err)) from err
    console.print(f"CA {pki.ca_cert} (its key {pki.ca_key}: keep it offline); SuperLink certificate "
                  f"{pki.superlink_cert} and key {pki.superlink_key}")


@pki_app.command("register")
def pki_register(
    name: Annotated[str, typer.Argument(help="the party: client-K, authority or server")],
    public: Annotated[Path, typer.Option(help="the public files NAME sent (NAME.pub, supernode-auth.pub): their dir")],
    directory: PkiDirOption = Path("pki"),
) -> None:
    """The operator registers NAME from its public keys only: the SuperNode key for `flwr supernode register`,
    and the payload key into the registry, signed by the CA."""
    from secure_mor.crypto.pki import PkiError, register_party

    try:
        pki = register_party(directory, name, public)
    except PkiError as err:
        raise _fail(str(err)) from err
    console.print(f"{name}: payload key in {pki.registry / (name + '.pub')} (signed: {name}.sig)"
                  + (f"; register {pki.auth_public_key(name)} with `flwr supernode register`"
                     if pki.auth_public_key(name).exists() else ""))  # fmt: skip


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="this party: client-K, authority or server")],
    directory: Annotated[Path, typer.Option("--dir", help="this party's key directory (its node config key-dir)")],
) -> None:
    """Run by each party where it runs: its Ed25519 payload-signing key, encrypted under
    $SECURE_MOR_KEY_PASSPHRASE, and (but for the server) its SuperNode authentication key pair.
    Send the operator the public files it prints, never the private keys."""
    from secure_mor.crypto.pki import PkiError, party_keys
    from secure_mor.crypto.signing import KEY_PASSPHRASE_ENV, key_passphrase

    passphrase = key_passphrase()
    if passphrase is None:
        raise _fail(f"set {KEY_PASSPHRASE_ENV}: the signing key is encrypted at rest under it")
    try:
        public = party_keys(directory, name, passphrase, supernode=name != "server")
    except PkiError as err:
        raise _fail(str(err)) from err
    console.print(f"{name}: private keys in {directory} (0600); send the operator {', '.join(map(str, public))}")


@deploy_app.command("local")
def deploy_local(
    directory: Annotated[Path, typer.Option("--dir", help="where every party's directory goes")] = Path(
        "runs/deployment"
    ),
    clients: ClientsOption = 3,
    steps: Annotated[int, typer.Option(help="GRPO optimizer steps of the tiny run")] = 2,
    run: Annotated[bool, typer.Option(help="run the tiny job; --no-run keeps the deployment up until Ctrl-C")] = True,
    timeout: Annotated[float, typer.Option(help="give up on the run after this many seconds")] = 3600.0,
) -> None:
    """A whole deployment on 127.0.0.1 (SuperLink with TLS and SuperNode authentication, one SuperNode
    per client and one for the key authority) running a tiny secure alignment; every process is
    stopped at the end."""
    from secure_mor.deployment import TINY_RUN, LocalDeployment
    from secure_mor.federation import FederationError

    started = time.perf_counter()
    deployment = LocalDeployment(directory, clients)
    try:
        with deployment:
            console.print(f"SuperLink on https://{deployment.address} (CA {deployment.pki.ca_cert}); "
                          f"{len(deployment.parties)} SuperNodes online after {time.perf_counter() - started:.0f} s")
            if not run:
                home = deployment.root / "operator" / "flwr-home"
                console.print(f"try: FLWR_HOME={home} {deployment.flwr_run_command(TINY_RUN)}", soft_wrap=True)
                console.print("Ctrl-C stops every process.")
                while True:
                    time.sleep(3600)
            result = deployment.run({**TINY_RUN, "grpo-max-steps": steps}, timeout=timeout)
            console.print(f"Flower run {result.run_id}: {result.status} in {result.seconds:.0f} s")
    except FederationError as err:
        raise _fail(str(err)) from err
    except KeyboardInterrupt:
        console.print("stopped")
        return
    results = json.loads((deployment.run_dir / "align" / "mor" / "results.json").read_text())
    print_results(results)


if __name__ == "__main__":
    app()
