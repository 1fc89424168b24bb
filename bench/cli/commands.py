"""The commands: run, list, show, leaderboard."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bench.cli.app import app, user_errors
from bench.errors import BenchError

DbOpt = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL of the result store "
                                              "[default: $BENCH_DB or sqlite:///bench.db]", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]


def _store(db: str | None) -> Any:
    """Open an existing result store: never creates one, nor writes into a file that is not one
    (only ``bench run`` creates a store, after its input is checked)."""
    from bench.results.store import Store

    return Store(db, create=False)


def _stored_or_executed(resolved: Any, db: str | None) -> tuple[Any, int, bool, Any]:
    """The run ``resolved`` as stored (finished), else prepared and executed: ``(store, run_id,
    stored, progress)``. Nothing is created on disk until :func:`prepare` has checked every input
    (parameters, dataset files, checkpoint); a finished run is looked up without importing torch."""
    from bench.results.schema import RunStatus
    from bench.results.store import Store, resolve_url

    url = resolve_url(db)
    store = Store.existing(url)  # None: no store there yet, and none is created by looking
    existing = store.find_run(resolved.key) if store is not None else None
    if existing is not None and existing.status is RunStatus.FINISHED:
        return store, existing.id, True, None
    from bench.cli.output import stderr
    from bench.harness.runner import execute, prepare
    from bench.progress import RichProgress

    progress = RichProgress(stderr)
    prepared = prepare(resolved, progress)
    store = store or Store(url, create=True)
    return store, execute(prepared, store, progress), False, progress


def _parse_hparams(items: list[str], option: str = "--hparam") -> tuple[tuple[str, Any], ...]:
    """``key=value`` pairs; values are JSON when they parse (numbers, lists, mappings), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"invalid {option} '{item}'; use key=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return tuple(sorted(out.items()))


def _parse_radii(text: str | None) -> tuple[float, ...]:
    if text is None:
        return ()
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchError(f"invalid --radii '{text}'; use comma-separated numbers, e.g. 0,0.25,0.5") from None
    if not values:
        raise BenchError("invalid --radii: no radius given")
    return tuple(sorted(set(values)))


def _certify_params(sigma: float | None, n0: int | None, n: int | None, alpha: float | None, sequential: bool,
                    items: list[str]) -> tuple[tuple[str, Any], ...]:
    params = dict(_parse_hparams(items, "--certify-param"))
    named = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "sequential": True if sequential else None}
    params.update({k: v for k, v in named.items() if v is not None})
    return tuple(sorted(params.items()))


@app.command()
@user_errors
def run(
    defense: Annotated[str, typer.Option("--defense", "-d", help="Defense registry name (see `bench list defenses`).")],
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset registry name.")] = "digits",
    protocol: Annotated[Optional[str], typer.Option(help="Named protocol, e.g. pgd or pgd@1 [default: pgd].",
                                                    show_default=False)] = None,
    attack: Annotated[Optional[list[str]], typer.Option("--attack", help="Custom protocol: attack name (repeatable).")] = None,
    norm: Annotated[Optional[str], typer.Option(help="Custom protocol: Linf or L2.")] = None,
    eps: Annotated[Optional[list[str]], typer.Option("--eps", help="Custom protocol: eps, e.g. 0.1 or 8/255 (repeatable).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Custom protocol: attack steps.")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Custom protocol: attack restarts.")] = None,
    attack_param: Annotated[Optional[list[str]], typer.Option(
        "--attack-param", help="Custom protocol: attack parameter key=value (JSON value, repeatable); a key the "
        "attack does not take goes to the attack it wraps (eot, bpda), e.g. draws=8 steps=5.")] = None,
    draws: Annotated[Optional[int], typer.Option(help="Custom protocol: R, the draws scoring a randomized model "
                                                 "(default 10).")] = None,
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", "-n", help="Evaluate a seeded subset of this size.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for training, the example subset and attacks.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    recipe: Annotated[str, typer.Option(help="Training recipe: auto (cpu preset without a GPU), paper or cpu.")] = "auto",
    epochs: Annotated[Optional[int], typer.Option(help="Override the recipe's number of epochs.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Load this checkpoint instead of training.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset root [default: $BENCH_DATA/<dataset>].")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize images to this side length.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate, e.g. test, val, isic2018-test.")] = "test",
    download: Annotated[bool, typer.Option("--download", help="Let datasets that support it (CIFAR) download "
                                           "their files (needs internet).")] = False,
    hparam: Annotated[Optional[list[str]], typer.Option("--hparam", help="Defense hyperparameter key=value (repeatable).")] = None,
    certify: Annotated[Optional[list[str]], typer.Option("--certify", help="Certifier (repeatable): smoothing, "
                                                         "lipschitz [default with certification options: the "
                                                         "defense's own certificates].")] = None,
    sigma: Annotated[Optional[float], typer.Option(help="smoothing: noise level (pixel units) [default: the "
                                                   "defense's training sigma].", show_default=False)] = None,
    n0: Annotated[Optional[int], typer.Option(help="smoothing: selection samples [default 100].",
                                              show_default=False)] = None,
    n_samples: Annotated[Optional[int], typer.Option("--n-samples", help="smoothing: estimation samples n "
                                                     "(the maximum with --sequential); lipschitz: draws of a "
                                                     "randomized model [default 100000 / 1000].",
                                                     show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Certification failure probability [default 0.001].",
                                                   show_default=False)] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="smoothing: anytime-valid sequential "
                                             "certification (stops once the radius grid level is decided).")] = False,
    radii: Annotated[Optional[str], typer.Option(help="Radius grid for certified accuracy, e.g. 0,0.25,0.5 "
                                                 "[default: the dataset's].", show_default=False)] = None,
    certify_param: Annotated[Optional[list[str]], typer.Option(
        "--certify-param", help="Certifier parameter key=value (JSON value, repeatable), e.g. batch=2000.")] = None,
    escalate: Annotated[bool, typer.Option("--escalate", help="After the protocol, run the standard remedy of every "
                                           "triggered check (EOT, BPDA, more Square queries) as extra stages; "
                                           "both results are stored.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train or load a defense, attack it, store every per-example outcome, print the result."""
    from bench.config import RunConfig, parse_eps
    from bench.harness.resolve import resolve
    from bench.results.queries import run_summary
    from bench.results.store import resolve_url

    resolve_url(db)  # an empty --db or $BENCH_DB is refused before anything else
    config = RunConfig(
        defense=defense, dataset=dataset, protocol=protocol, attacks=tuple(attack or ()), norm=norm,
        eps=tuple(parse_eps(e) for e in (eps or ())), steps=steps, restarts=restarts, draws=draws,
        attack_params=_parse_hparams(attack_param or [], "--attack-param"), n_examples=n_examples,
        certify=tuple(certify or ()), radii=_parse_radii(radii),
        certify_params=_certify_params(sigma, n0, n_samples, alpha, sequential, certify_param or []),
        seed=seed, batch_size=batch_size, device=device, recipe=recipe, epochs=epochs,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        data_dir=str(data_dir) if data_dir is not None else None, image_size=image_size, split=split,
        download=download,
        hparams=_parse_hparams(hparam or []),
    )
    resolved = resolve(config)  # validates the options before any store is looked at
    store, run_id, stored, progress = _stored_or_executed(resolved, db)
    if escalate:
        from bench.cli.output import stderr
        from bench.harness.escalate import escalate as run_remedies
        from bench.progress import RichProgress

        stored = not run_remedies(store, run_id, progress or RichProgress(stderr), resolved.config.device) and stored
    summary = run_summary(store, run_id)
    from bench.cli.output import warn
    from bench.harness.protocol import is_adaptive

    if getattr(getattr(resolved.defense, "info", None), "randomized", False) and \
            not is_adaptive(resolved.protocol.name):
        warn(f"'{resolved.defense.name}' is randomized but protocol {resolved.protocol.key} is not adaptive: its "
             "robust accuracy is likely overestimated (the leaderboard marks it with †); use --protocol adaptive")
    if config.n_examples is not None and config.n_examples > summary["n_examples"]:
        warn(f"-n {config.n_examples} exceeds the split: evaluated all {summary['n_examples']} examples")
    elif config.n_examples is not None:
        warn(f"evaluated a seeded subset of {summary['n_examples']} examples: compare only with runs on the same subset")
    if as_json:
        from bench.cli.output import print_json

        print_json(summary)
    else:
        from bench.cli.output import print_summary

        print_summary(summary, stored=stored)


@app.command()
@user_errors
def attack(
    run_id: Annotated[int, typer.Argument(help="Stored run to extend (see `bench list runs`).")],
    name: Annotated[str, typer.Option("--attack", help="Attack registry name.")],
    norm: Annotated[Optional[str], typer.Option(help="Linf or L2 [default: each of the run's threat models].",
                                                show_default=False)] = None,
    eps: Annotated[Optional[list[str]], typer.Option("--eps", help="eps, e.g. 0.1 or 8/255 (repeatable) "
                                                     "[default: the run's eps for the norm].", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Attack steps.")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Attack restarts.")] = None,
    attack_param: Annotated[Optional[list[str]], typer.Option(
        "--attack-param", help="Attack parameter key=value (JSON value, repeatable); a key the attack does not "
        "take goes to the attack it wraps (eot, bpda).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add an attack to a stored run: it runs on the examples still robust, so robust accuracy can only drop."""
    from bench.config import AttackSpec, ThreatModel, parse_eps, parse_norm
    from bench.harness.extend import add_attack
    from bench.results.queries import get_run_or_fail, run_summary

    store = _store(db)
    run = get_run_or_fail(store, run_id)
    for value, label in ((steps, "steps"), (restarts, "restarts")):
        if value is not None and value < 1:
            raise BenchError(f"invalid --{label} {value}: must be >= 1")
    from bench.harness.protocol import route_params
    from bench.registry import ATTACKS

    overrides = dict(_parse_hparams(attack_param or [], "--attack-param"))
    overrides.update({k: v for k, v in (("steps", steps), ("restarts", restarts)) if v is not None})
    routed, used = route_params(name, overrides)
    if set(overrides) - used:
        raise BenchError(f"attack '{name}' takes no parameter(s) {', '.join(sorted(set(overrides) - used))}; "
                         "see `bench list attacks`")
    params = tuple(sorted(routed.items()))

    supported = ATTACKS.get(name).info.norms
    run_threats = [(parse_norm(a["norm"]), a["eps"]) for a in run.config["protocol"]["attacks"]]
    if norm is not None:
        norms = [parse_norm(norm)]  # an unsupported explicit norm is reported by the attack
    else:
        norms = [n for n in dict.fromkeys(n for n, _ in run_threats) if n in supported] or list(supported[:1])
    if eps:
        threats = [ThreatModel(n, parse_eps(e)) for n in norms for e in eps]
    else:
        threats = [ThreatModel(n, e) for n, e in dict.fromkeys(run_threats) if n in norms]
        if not threats:
            raise BenchError(f"run {run_id} has no {'/'.join(n.value for n in norms)} threat model for attack "
                             f"'{name}'; give --norm and --eps")
    from bench.cli.output import stderr
    from bench.progress import RichProgress

    for threat in threats:
        add_attack(store, run_id, AttackSpec(name, threat, params), RichProgress(stderr), device)
    summary = run_summary(store, run_id)
    if as_json:
        from bench.cli.output import print_json

        print_json(summary)
    else:
        from bench.cli.output import print_summary

        print_summary(summary)


class ListWhat(str, Enum):
    defenses = "defenses"
    attacks = "attacks"
    certifiers = "certifiers"
    datasets = "datasets"
    protocols = "protocols"
    runs = "runs"


@app.command("list")
@user_errors
def list_(
    what: Annotated[Optional[ListWhat], typer.Argument(help="What to list [default: all registries].")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="runs: only this dataset.")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered defenses, attacks, certifiers, datasets, protocols, or stored runs."""
    from bench.cli.output import print_json, stdout

    if what is ListWhat.runs:
        _list_runs(dataset, db, as_json)
        return
    if what is ListWhat.protocols:
        _list_protocols(as_json)
        return
    from rich.table import Table

    from bench.registry import ATTACKS, CERTIFIERS, DATASETS, DEFENSES

    registries = {"defenses": DEFENSES, "attacks": ATTACKS, "certifiers": CERTIFIERS, "datasets": DATASETS}
    chosen = {what.value: registries[what.value]} if what else registries
    if as_json:
        print_json({kind: [{"name": n, "summary": reg.summary(n)} for n in reg.names()] for kind, reg in chosen.items()})
        return
    for kind, reg in chosen.items():
        table = Table(title=kind)
        table.add_column("name")
        table.add_column("description")
        for name in reg.names():
            table.add_row(name, reg.summary(name))
        if not reg.names():
            table.add_row("(none yet)", "")
        stdout.print(table)


def _list_protocols(as_json: bool) -> None:
    from rich.table import Table

    from bench.cli.output import print_json, stdout
    from bench.harness.protocol import describe_protocols

    protocols = describe_protocols()
    if as_json:
        print_json(protocols)
        return
    table = Table(title="protocols (use --protocol NAME or NAME@VERSION)")
    table.add_column("protocol")
    table.add_column("description")
    for p in protocols:
        table.add_row(p["key"], p["description"])
    stdout.print(table)


def _list_runs(dataset: str | None, db: str | None, as_json: bool) -> None:
    from rich.table import Table

    from bench.cli.output import print_json, stdout

    runs = _store(db).list_runs(dataset=dataset)
    items = [{"run_id": r.id, "defense": r.defense, "dataset": r.dataset, "protocol": f"{r.protocol}@{r.protocol_version}",
              "status": r.status.value, "n_examples": r.n_examples, "wall_time_s": r.wall_time_s,
              "created_at": r.created_at.isoformat() if r.created_at else None} for r in runs]
    if as_json:
        print_json(items)
        return
    table = Table(title="runs")
    for col in ("run_id", "defense", "dataset", "protocol", "status", "n_examples", "wall_time_s"):
        table.add_column(col)
    for item in items:
        table.add_row(*[f"{item[c]:.1f}" if c == "wall_time_s" else str(item[c]) for c in
                        ("run_id", "defense", "dataset", "protocol", "status", "n_examples", "wall_time_s")])
    stdout.print(table)


@app.command()
@user_errors
def show(
    run_id: Annotated[int, typer.Argument(help="Run id (see `bench list runs`).")],
    examples: Annotated[bool, typer.Option("--examples", help="Per-example outcomes instead: CSV of index, label, "
                                           "clean correctness and the attack that broke it per threat model "
                                           "(JSON with --json).")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one stored run: accuracies, checks, provenance."""
    from bench.cli.output import print_json, print_summary, stdout
    from bench.results.queries import example_outcomes, run_summary

    if examples:
        records = example_outcomes(_store(db), run_id)
        if as_json:
            print_json(records)
            return
        import csv
        import sys

        threats = list(records[0]["broken_by"]) if records else []
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["index", "label", "clean_correct", "robust", *(f"broken_by {t}" for t in threats)])
        for r in records:
            writer.writerow([r["index"], r["label"], int(r["clean_correct"]), int(r["robust"]),
                             *(r["broken_by"][t] or "" for t in threats)])
        return
    summary = run_summary(_store(db), run_id)
    if as_json:
        print_json(summary)
        return
    print_summary(summary, stored=summary.get("status") == "finished")
    prov = summary.get("provenance") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (prov.get("packages") or {}).items() if v)
    git = prov.get("git") or {}
    stdout.print(f"provenance: bench {prov.get('bench_version')}"
                 + (f" (git {git.get('commit', '')[:10]}{', dirty' if git.get('dirty') else ''})" if git else "")
                 + f"; python {prov.get('python')}; {packages}; device {prov.get('device')}; seed {prov.get('seed')}")
    model = summary.get("model")
    stdout.print(f"model: {model['source'] if model else None} checkpoint sha256 "
                 f"{model['checkpoint_sha256'] if model else None}; examples hash {summary.get('indices_hash')}")
    if summary.get("error"):
        stdout.print(f"last error: {summary['error']}")


class Format(str, Enum):
    table = "table"
    md = "md"
    latex = "latex"
    csv = "csv"
    json = "json"


@app.command()
@user_errors
def leaderboard(
    dataset: Annotated[str, typer.Option(help="Dataset whose runs to rank.")] = "digits",
    protocol: Annotated[Optional[str], typer.Option(help="Protocol name[@version] [default: the most used].",
                                                    show_default=False)] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    db: DbOpt = None,
) -> None:
    """Rank defenses on a dataset: clean, per-attack, worst-case robust and certified accuracy."""
    from bench.cli.output import stdout
    from bench.results.leaderboard import build_board, render, render_rich

    board = build_board(_store(db), dataset, protocol)
    if fmt is Format.table:
        if output is not None:
            raise BenchError("--format table prints to the terminal; use md, latex, csv or json with -o")
        stdout.print(render_rich(board))
        return
    text = render(board, fmt.value)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise BenchError(f"cannot write {output}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {output}", err=True)


class PlotFormat(str, Enum):
    png = "png"
    svg = "svg"
    both = "both"


@app.command()
@user_errors
def plot(
    run_ids: Annotated[list[int], typer.Argument(help="Run ids to plot (see `bench list runs`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path without suffix, or a directory "
                                                "(a .png or .svg suffix is dropped; --format decides) [default: "
                                                "bench-plot-<ids> in the current directory].",
                                                show_default=False)] = None,
    fmt: Annotated[PlotFormat, typer.Option("--format", "-f", help="File format(s) to write.")] = PlotFormat.both,
    db: DbOpt = None,
) -> None:
    """Plot certified accuracy against L2 radius, one curve per run and certifier, with empirical L2
    robust accuracy as points; prints the written paths."""
    from bench.results.plot import FORMATS, curves, draw
    from bench.results.queries import run_summary

    ids = list(dict.fromkeys(run_ids))
    store = _store(db)
    plotted = curves([run_summary(store, run_id) for run_id in ids])
    default = Path(f"bench-plot-{'-'.join(str(i) for i in ids)}")
    if out is None:
        stem = default
    elif out.is_dir():
        stem = out / default
    else:
        stem = out.with_suffix("") if out.suffix.lower() in (".png", ".svg") else out
    for path in draw(plotted, stem, FORMATS if fmt is PlotFormat.both else (fmt.value,)):
        typer.echo(str(path))


@app.command()
@user_errors
def audit(
    run_id: Annotated[int, typer.Argument(help="Stored run whose certificates to audit (see `bench list runs`).")],
    examples: Annotated[int, typer.Option("--examples", help="Examples per audit: the Lipschitz bound is probed "
                                          "at the first N, each certification stage attacked on its first N "
                                          "certified examples.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as one JSON list on stdout.")] = False,
) -> None:
    """Try to break a run's certificates (declared Lipschitz bound, attacks inside certified radii,
    certified vs empirical accuracy); stores and prints each check. Exit status 0 even when a check
    triggers: the outcome is a result."""
    from bench.harness.audit import audit_run
    from bench.cli.output import stderr, stdout
    from bench.progress import RichProgress

    if examples < 1:
        raise BenchError(f"invalid --examples {examples}: must be >= 1")
    checks = audit_run(_store(db), run_id, progress=RichProgress(stderr), device=device, max_examples=examples)
    if as_json:
        from bench.cli.output import print_json

        print_json([{"name": c.name, "triggered": c.triggered, "detail": c.detail} for c in checks])
        return
    for check in checks:
        stdout.print(f"{check.name}: {'TRIGGERED' if check.triggered else 'OK'} - {check.detail}", markup=False)
