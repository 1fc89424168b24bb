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


def _threads(threads: int | None) -> None:
    """``--threads`` / ``$BENCH_THREADS`` (the oversubscription warning comes with the plan, once
    every input is checked), and the allocator setting (:func:`bench.device.configure_allocator`)."""
    from bench.device import configure_allocator, configure_threads

    configure_threads(threads)
    configure_allocator()


def _print_dry_run(resolved: Any, as_json: bool) -> None:
    """``bench run --dry-run``: the resolved configuration and the plan with an estimate."""
    from bench.cli.output import print_json, stderr
    from bench.harness.runner import dry_run
    from bench.progress import RichProgress

    shown = dry_run(resolved, RichProgress(stderr))
    if as_json:
        print_json({k: v for k, v in shown.items() if k != "lines"})
        return
    print("configuration (run key " + shown["key"] + "):")
    print(json.dumps(shown["config"], indent=2, sort_keys=True))
    print(f"plan (upper bounds: every example reaches every attack, none stops early; one forward pass takes "
          f"{1e6 * shown['seconds_per_example_pass']:.1f} us per example here; training is not estimated):")
    for line in shown["lines"]:
        print(line)
    print(f"total evaluation: up to ~{shown['seconds_upper_bound'] / 60:.1f} min. Nothing was trained or stored.")


def _stored_or_executed(resolved: Any, db: str | None) -> tuple[Any, int, bool, Any]:
    """:func:`bench.harness.runner.stored_or_executed` with the CLI's progress (Rich on rank 0,
    silent on the other torchrun ranks): ``(store, run_id, stored, progress)``, progress ``None``
    for a stored result."""
    from bench.cli.output import stderr
    from bench.harness.runner import stored_or_executed
    from bench.progress import Progress, RichProgress
    from bench.results.store import resolve_url
    from bench.training import distributed

    progress = RichProgress(stderr) if distributed.is_main() else Progress()
    store, run_id, stored = stored_or_executed(resolved, resolve_url(db), progress)
    return store, run_id, stored, None if stored else progress


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


def _model_hparams(spec: str, args: list[str], normalize: str | None, name: str | None,
                   hparams: tuple[tuple[str, Any], ...], pretrained: bool) -> tuple[tuple[str, Any], ...]:
    """The ``model`` defense's hyperparameters from ``--model`` and its options (``--hparam``
    may add the declarations: randomized, sigma, lipschitz_bound)."""
    out = dict(hparams)
    clash = {"model", "args", "normalize", "name", "pretrained"} & set(out)
    if clash:
        raise BenchError(f"--hparam {', '.join(sorted(clash))}: use --model, --model-arg, --normalize, --name "
                         "and --download instead")
    out.update(model=spec, args=dict(_parse_hparams(args, "--model-arg")), pretrained=pretrained)
    out.update({k: v for k, v in (("normalize", normalize), ("name", name)) if v is not None})
    return tuple(sorted(out.items()))


def _certify_params(sigma: float | None, n0: int | None, n: int | None, alpha: float | None, sequential: bool,
                    items: list[str]) -> tuple[tuple[str, Any], ...]:
    params = dict(_parse_hparams(items, "--certify-param"))
    named = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "sequential": True if sequential else None}
    params.update({k: v for k, v in named.items() if v is not None})
    return tuple(sorted(params.items()))


@app.command()
@user_errors
def run(
    defense: Annotated[Optional[str], typer.Option("--defense", "-d", help="Defense registry name (see `bench list "
                                                   "defenses`).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Your own model instead of a defense: "
                                                 "torchvision:NAME, timm:NAME or MODULE:FACTORY, weights from "
                                                 "--checkpoint (see docs/own-model.md).", show_default=False)] = None,
    model_arg: Annotated[Optional[list[str]], typer.Option(
        "--model-arg", help="--model factory keyword argument key=value (JSON value, repeatable).")] = None,
    normalize: Annotated[Optional[str], typer.Option(
        help="--model: normalization outside the model, applied first: cifar10, cifar100, imagenet or "
             "MEAN/STD (comma-separated channels).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="--model: the run's name on the leaderboard "
                                                "[default: the SPEC].", show_default=False)] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset registry name.")] = "digits",
    protocol: Annotated[Optional[str], typer.Option(help="Named protocol, e.g. autoattack, pgd or pgd@1 "
                                                    "[default: the defense's; autoattack for deterministic models].",
                                                    show_default=False)] = None,
    attack: Annotated[Optional[list[str]], typer.Option("--attack",
                                                        help="Custom protocol: attack name (repeatable).")] = None,
    norm: Annotated[Optional[str], typer.Option(help="Custom protocol: Linf or L2.")] = None,
    eps: Annotated[Optional[list[str]], typer.Option(
        "--eps", help="Custom protocol: eps, e.g. 0.1 or 8/255 (repeatable).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Custom protocol: attack steps.")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Custom protocol: attack restarts.")] = None,
    attack_param: Annotated[Optional[list[str]], typer.Option(
        "--attack-param", help="Custom protocol: attack parameter key=value (JSON value, repeatable); a key the "
        "attack does not take goes to the attack it wraps (eot, bpda), e.g. draws=8 steps=5.")] = None,
    draws: Annotated[Optional[int], typer.Option(help="Custom protocol: R, the draws scoring a randomized model "
                                                 "(default 10).")] = None,
    exact_draws: Annotated[bool, typer.Option(
        "--exact-draws", help="Score a randomized model with every draw of its declared draw space (DCS: "
        "its masks), so each example's single-draw accuracy is exact instead of estimated from R draws.")] = False,
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", "-n",
                                                      help="Evaluate a seeded subset of this size.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for training, the example subset and attacks.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 128,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    recipe: Annotated[str, typer.Option(
        help="Training recipe: auto (cpu preset without a GPU), paper or cpu.")] = "auto",
    epochs: Annotated[Optional[int], typer.Option(help="Override the recipe's number of epochs.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Load this checkpoint instead of training.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset root [default: $BENCH_DATA/<dataset>].")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize images to this side length.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate, e.g. test, val, isic2018-test.")] = "test",
    download: Annotated[bool, typer.Option("--download", help="Let datasets that support it (CIFAR, MedMNIST) "
                                           "download their files, and --model torchvision:/timm: models without "
                                           "--checkpoint their pretrained weights (needs internet).")] = False,
    hparam: Annotated[Optional[list[str]], typer.Option(
        "--hparam", help="Defense hyperparameter key=value (repeatable).")] = None,
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
    sequential: Annotated[bool, typer.Option("--sequential", help="smoothing: sequential certification "
                                             "(stops once the radius grid level is decided; same guarantee).")] = False,
    radii: Annotated[Optional[str], typer.Option(help="Radius grid for certified accuracy, e.g. 0,0.25,0.5 "
                                                 "[default: the dataset's].", show_default=False)] = None,
    certify_param: Annotated[Optional[list[str]], typer.Option(
        "--certify-param", help="Certifier parameter key=value (JSON value, repeatable), e.g. batch=2000.")] = None,
    escalate: Annotated[bool, typer.Option("--escalate", help="After the protocol, run the standard remedy of every "
                                           "triggered check (EOT, BPDA, more Square queries) as extra stages; "
                                           "both results are stored.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch's CPU threads [default: $BENCH_THREADS, else "
                                                   "torch's choice]; processes x threads <= cores.",
                                                   show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration and the plan with an "
                                          "estimated time, then exit: nothing is trained or stored.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train or load a defense, attack it, store every per-example outcome, print the result."""
    from bench.config import RunConfig, parse_eps
    from bench.harness.resolve import resolve
    from bench.results.queries import run_summary
    from bench.results.store import resolve_url

    resolve_url(db)  # an empty --db or $BENCH_DB is refused before anything else
    hparams = _parse_hparams(hparam or [])
    if model is not None and defense is not None:
        raise BenchError("give either --defense NAME or --model SPEC, not both")
    if model is not None:
        defense, hparams = "model", _model_hparams(model, model_arg or [], normalize, name, hparams,
                                                   pretrained=download and checkpoint is None)
    elif defense is None:
        raise BenchError("give --defense NAME (see `bench list defenses`) or --model SPEC")
    elif model_arg or normalize is not None or name is not None:
        raise BenchError("--model-arg, --normalize and --name apply to --model runs only")
    config = RunConfig(
        defense=defense, dataset=dataset, protocol=protocol, attacks=tuple(attack or ()), norm=norm,
        eps=tuple(parse_eps(e) for e in (eps or ())), steps=steps, restarts=restarts, draws=draws,
        exact_draws=exact_draws,
        attack_params=_parse_hparams(attack_param or [], "--attack-param"), n_examples=n_examples,
        certify=tuple(certify or ()), radii=_parse_radii(radii),
        certify_params=_certify_params(sigma, n0, n_samples, alpha, sequential, certify_param or []),
        seed=seed, batch_size=batch_size, device=device, recipe=recipe, epochs=epochs,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        data_dir=str(data_dir) if data_dir is not None else None, image_size=image_size, split=split,
        download=download,
        hparams=hparams,
    )
    resolved = resolve(config)  # validates the options before any store is looked at
    _threads(threads)
    if dry_run:
        _print_dry_run(resolved, as_json)
        return
    store, run_id, stored, progress = _stored_or_executed(resolved, db)
    from bench.training.distributed import is_main

    if not is_main():
        return  # under torchrun only rank 0 reports (and escalates); the other ranks print nothing
    if escalate:
        from bench.cli.output import stderr
        from bench.harness.escalate import escalate as run_remedies
        from bench.progress import RichProgress

        stored = not run_remedies(store, run_id, progress or RichProgress(stderr), resolved.config.device) and stored
    summary = run_summary(store, run_id)
    from bench.cli.output import warn
    from bench.harness.protocol import is_adaptive

    if resolved.info.randomized and not is_adaptive(resolved.protocol.name):
        warn(f"'{resolved.label}' is randomized but protocol {resolved.protocol.key} is not adaptive: its "
             "robust accuracy is likely overestimated (the leaderboard marks it with †); use --protocol adaptive")
    if config.n_examples is not None and config.n_examples > summary["n_examples"]:
        warn(f"-n {config.n_examples} exceeds the split: evaluated all {summary['n_examples']} examples")
    elif config.n_examples is not None:
        warn(f"evaluated a seeded subset of {summary['n_examples']} examples: "
             "compare only with runs on the same subset")
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
                                                     "[default: the run's eps for the norm].",
                                                     show_default=False)] = None,
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
    from bench.config import AttackSpec
    from bench.harness.extend import add_attack, attack_threats
    from bench.results.queries import get_run_or_fail, run_summary

    store = _store(db)
    run = get_run_or_fail(store, run_id)
    for value, label in ((steps, "steps"), (restarts, "restarts")):
        if value is not None and value < 1:
            raise BenchError(f"invalid --{label} {value}: must be >= 1")
    from bench.harness.protocol import route_params

    overrides = dict(_parse_hparams(attack_param or [], "--attack-param"))
    overrides.update({k: v for k, v in (("steps", steps), ("restarts", restarts)) if v is not None})
    routed, used = route_params(name, overrides)
    if set(overrides) - used:
        raise BenchError(f"attack '{name}' takes no parameter(s) {', '.join(sorted(set(overrides) - used))}; "
                         "see `bench list attacks`")
    params = tuple(sorted(routed.items()))

    threats = attack_threats(run, name, norm, eps or [])
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
        print_json({kind: [{"name": n, "summary": reg.summary(n)} for n in reg.names()]
                    for kind, reg in chosen.items()})
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
    items = [{"run_id": r.id, "defense": r.defense, "dataset": r.dataset,
              "protocol": f"{r.protocol}@{r.protocol_version}", "status": r.status.value,
              "n_examples": r.n_examples, "wall_time_s": r.wall_time_s,
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
    html = "html"


class LatexLayout(str, Enum):
    auto = "auto"
    wide = "wide"
    narrow = "narrow"
    transposed = "transposed"


@app.command()
@user_errors
def leaderboard(
    dataset: Annotated[str, typer.Option(help="Dataset whose runs to rank.")] = "digits",
    protocol: Annotated[Optional[str], typer.Option(help="Protocol name[@version] [default: the most used].",
                                                    show_default=False)] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
                                                   help="Write to this file instead of stdout.")] = None,
    latex_layout: Annotated[LatexLayout, typer.Option(
        "--latex-layout", help="latex: auto (by column count), wide (table*), narrow (one column) or transposed "
        "(defenses as columns).")] = LatexLayout.auto,
    caption: Annotated[Optional[str], typer.Option(help="latex: the table's caption [default: dataset, protocol "
                                                   "and what was left out].", show_default=False)] = None,
    label: Annotated[Optional[str], typer.Option(help="latex: the table's label [default: tab:leaderboard-DATASET].",
                                                 show_default=False)] = None,
    references: Annotated[Optional[list[Path]], typer.Option(
        "--references", help="A references file of your own (the format of `bench references`); loaded into the "
        "store beside the packaged published numbers. Repeatable.", show_default=False)] = None,
    rank_by: Annotated[str, typer.Option("--rank-by", help="The column that ranks the rows: robust (default), "
                                         "clean, certified@R, or certified:CERTIFIER@R. ACR never ranks.")] = "robust",
    db: DbOpt = None,
) -> None:
    """Rank defenses on a dataset: clean, per-attack, worst-case robust and certified accuracy."""
    from bench.cli.output import stdout
    from bench.results.leaderboard import LatexOptions, build_board, render_rich
    from bench.results.render import render

    store = _store(db)
    from bench.results.ranking import rank_board

    board = _with_published(store, rank_board(build_board(store, dataset, protocol), rank_by), references or [])
    if fmt is Format.table:
        if output is not None:
            raise BenchError("--format table prints to the terminal; use md, latex, csv, json or html with -o")
        stdout.print(render_rich(board, stdout.width))
        return
    text = render(board, fmt.value, LatexOptions(latex_layout.value, caption, label))
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
    """Plot certified accuracy against L2 radius, one curve per run and certifier (the exact step
    function of the stored per-example radii, with its 95% Clopper-Pearson band), with empirical L2
    robust accuracy as points; prints the written paths."""
    from bench.cli.output import warn
    from bench.results.perexample import certified_radii
    from bench.results.plot import FORMATS, curves, draw, mixed_examples
    from bench.results.queries import run_summary

    ids = list(dict.fromkeys(run_ids))
    store = _store(db)
    plotted = curves([run_summary(store, run_id) for run_id in ids],
                     {run_id: certified_radii(store, run_id) for run_id in ids})
    if mixed_examples(plotted):
        warn(mixed_examples(plotted))
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
    from bench.cli.output import stderr, stdout
    from bench.harness.audit import audit_run
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


def _with_published(store: Any, board: Any, files: list[Path]) -> Any:
    """``board`` with the published rows of its defenses: the packaged references and ``files``
    are first loaded into ``store`` (idempotently, keyed by record id); a store that cannot be
    written (read-only) is left as it is, with a warning, and the files' references are shown."""
    from bench.cli.output import warn
    from bench.errors import StoreError
    from bench.results.references import add_published, from_references, from_rows, load_references, sync_references

    refs = load_references(files)
    try:
        sync_references(store, refs.records)
    except StoreError as exc:
        warn(f"published numbers not loaded into the store ({exc}); shown from the reference files")
        return add_published(board, from_references(refs.for_dataset(board.dataset)))
    return add_published(board, from_rows(store.references(board.dataset), refs))


class ReferenceFormat(str, Enum):
    table = "table"
    md = "md"
    csv = "csv"
    json = "json"


@app.command("references")
@user_errors
def references_(
    dataset: Annotated[Optional[str], typer.Option(help="Only the published numbers on this dataset.",
                                                   show_default=False)] = None,
    fmt: Annotated[ReferenceFormat, typer.Option("--format", "-f", help="Output format.")] = ReferenceFormat.table,
    references: Annotated[Optional[list[Path]], typer.Option(
        "--references", help="A references file of your own, listed with the packaged ones (same format; "
        "a record with an id already present replaces it). Repeatable.", show_default=False)] = None,
    db: Annotated[Optional[str], typer.Option("--db", help="Also load them into this result store's references "
                                              "table (an existing store; idempotent).", show_default=False)] = None,
) -> None:
    """List the published numbers (paper, table, protocol, value and source) that the leaderboard
    shows beside measured rows."""
    from bench.results.references import load_references, render_references, rich_references, sync_references

    refs = load_references(references or [])
    if db is not None:
        sync_references(_store(db), refs.records)
    chosen = refs.for_dataset(dataset)
    if fmt is ReferenceFormat.table:
        from bench.cli.output import stdout

        stdout.print(rich_references(chosen))
        return
    typer.echo(render_references(chosen, fmt.value), nl=False)


@app.command()
@user_errors
def compare(
    run_a: Annotated[int, typer.Argument(help="The first run (see `bench list runs`).")],
    run_b: Annotated[int, typer.Argument(help="The second run.")],
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two runs example by example: per stage, the examples correct in one run and not the
    other, and McNemar's exact test on them. Runs on different example sets are compared on the
    examples both evaluated."""
    from bench.results.compare import compare_runs

    comparison = compare_runs(_store(db), run_a, run_b)
    if as_json:
        from bench.cli.output import print_json

        print_json(comparison.to_dict())
        return
    from rich.table import Table

    from bench.cli.output import stdout

    table = Table(title=f"run {run_a} (A) vs run {run_b} (B) · {comparison.common} common examples",
                  caption=comparison.note or None)
    for title in ("stage", "examples", "A correct", "B correct", "only A", "only B", "McNemar p"):
        table.add_column(title, justify="left" if title == "stage" else "right")
    for s in comparison.stages:
        table.add_row(s.stage, str(s.n), str(s.correct_a), str(s.correct_b), str(len(s.only_a)), str(len(s.only_b)),
                      f"{s.p_value:.3g}")
    stdout.print(table)


@app.command()
@user_errors
def delete(
    run_id: Annotated[int, typer.Argument(help="The run to delete (see `bench list runs`).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOpt = None,
) -> None:
    """Delete a run: its row, evaluations, per-example rows and checks. The model and its
    checkpoint file are kept."""
    from bench.results.compare import delete_run, run_contents
    from bench.results.queries import get_run_or_fail

    store = _store(db)
    run = get_run_or_fail(store, run_id)
    counts = run_contents(store, run_id)
    what = (f"run {run_id} ({run.defense} on {run.dataset}, protocol {run.protocol}@{run.protocol_version}, "
            f"{run.status.value}) with {counts['evaluations']} evaluation(s), {counts['example_results']} "
            f"per-example row(s) and {counts['checks']} check(s)")
    if not yes and not _confirmed(f"delete {what}? The model and its checkpoint file are kept"):
        typer.echo("nothing deleted", err=True)
        return
    delete_run(store, run_id)
    typer.echo(f"deleted {what}")


def _confirmed(question: str) -> bool:
    """The user's yes/no answer on the terminal; no answer (end of input) is a no."""
    try:
        return bool(typer.confirm(question, default=False))
    except typer.Abort:
        return False


@app.command("export")
@user_errors
def export_(
    run_id: Annotated[int, typer.Argument(help="The finished run to export (see `bench list runs`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The capsule file to write "
                                         "(gzip'd JSON, e.g. run.bench.json.gz).")],
    db: DbOpt = None,
) -> None:
    """Export a finished run as a provenance capsule: its resolved configuration, protocol,
    provenance, model (checkpoint sha256), every per-example row and every check."""
    from bench.results.capsule import export_run, write_capsule

    capsule = export_run(_store(db), run_id)
    rows = sum(len(ev["rows"]) for ev in capsule["evaluations"])
    write_capsule(capsule, output)
    typer.echo(f"exported run {run_id} ({len(capsule['evaluations'])} evaluation(s), {rows} per-example row(s), "
               f"{len(capsule['checks'])} check(s)) to {output}")


@app.command("import")
@user_errors
def import_(
    capsule_file: Annotated[Path, typer.Argument(help="A capsule written by `bench export`.")],
    db: DbOpt = None,
) -> None:
    """Add a capsule's run to a result store (created if needed); importing it again adds nothing."""
    from bench.results.capsule import import_capsule, read_capsule
    from bench.results.store import Store

    capsule = read_capsule(capsule_file)
    outcome = import_capsule(Store(db, create=True), capsule)
    run = capsule["run"]
    what = f"{run['defense']} on {run['dataset']}, protocol {run['protocol']}@{run['protocol_version']}"
    if outcome.added:
        typer.echo(f"imported run {outcome.run_id} ({what})")
    else:
        typer.echo(f"already stored as run {outcome.run_id} ({what}); nothing added")


@app.command()
@user_errors
def verify(
    capsule_file: Annotated[Path, typer.Argument(help="A capsule written by `bench export`.")],
    examples: Annotated[str, typer.Option("--examples", help="How many seeded examples to re-run, or 'all'.")] = "16",
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="The model checkpoint [default: the "
                                                      "path the capsule records]; its sha256 must match.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the choice of examples.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Re-run K seeded examples of a capsule's run (each in its original seeded batch) and compare
    them with the stored rows, stage by stage. Exit status 0 only when every re-run example
    agrees (docs/publishing.md, "Provenance capsules"); 1 on a disagreement or a checkpoint that
    is not the capsule's; 2 on bad input."""
    from bench.harness.verify import verify_capsule
    from bench.results.capsule import read_capsule

    if examples.strip().lower() == "all":
        k: int | None = None
    else:
        try:
            k = int(examples)
        except ValueError:
            raise BenchError(f"invalid --examples {examples!r}: a positive integer or 'all'") from None
        if k < 1:
            raise BenchError(f"invalid --examples {k}: must be >= 1")
    result = verify_capsule(read_capsule(capsule_file), examples=k, checkpoint=checkpoint, seed=seed,
                            device=device)
    for stage in result.stages:
        state = ("skipped" if stage.skipped else "AGREES" if stage.disagreement is None else "DISAGREES")
        typer.echo(f"stage {stage.position} {stage.label}: {state} ({stage.compared} example(s) compared, "
                   f"{stage.batches} batch(es) re-run)")
    first = result.first_disagreement
    if result.checkpoint_mismatch is not None:
        typer.echo(f"verify failed: {result.checkpoint_mismatch}", err=True)
    if first is not None:
        typer.echo(f"verify failed: stage {first.position} {first.label}, {first.disagreement}", err=True)
    if not result.ok:
        raise typer.Exit(code=1)
    typer.echo(f"verified: {len(result.examples)} example(s) agree in every stage")
