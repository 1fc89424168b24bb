"""torchrun: the process-group helpers, the training loop's share of a global batch, evaluation
sharded by batch (rows identical for any world size), and real 2- and 3-process ``torchrun``
runs on CPU (gloo, one thread per process) that store the rows of a one-process run, train with
DDP, and resume across world sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.attacks.pgd import PGD
from bench.config import AttackSpec, RunConfig, ThreatModel
from bench.errors import BenchError
from bench.harness.checks import LARGE_EPS
from bench.harness.runner import execute
from bench.harness.stages import Evaluator, Scoring
from bench.progress import Progress
from bench.results.schema import EvalKind, RunStatus
from bench.results.store import Store
from bench.training import distributed
from bench.training.loop import _share, fit
from bench.training.recipe import Recipe
from helpers import linear_model, train_full_batch

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, local: int | None = None) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank if local is None else local))


def test_without_torchrun_the_world_has_one_process(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_main()
    assert distributed.local_device("cuda") == "cuda"
    distributed.init("cpu")
    distributed.barrier()
    with distributed.main_first():
        pass
    assert not torch.distributed.is_initialized()  # nothing was joined
    assert distributed.from_main({"a": 1}) == {"a": 1}


def test_torchrun_environment_names_the_rank_and_its_device(monkeypatch):
    _as_rank(monkeypatch, 3, 4, local=1)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (4, 3, 1)
    assert not distributed.is_main()
    assert distributed.local_device("cuda") == "cuda:1"  # one GPU per local rank
    assert distributed.local_device("cpu") == "cpu" and distributed.local_device("cuda:0") == "cuda:0"
    monkeypatch.setenv("RANK", "three")
    with pytest.raises(BenchError, match=r"\$RANK"):
        distributed.rank()


def test_the_ranks_shares_make_the_global_batch_and_its_mean_loss(monkeypatch):
    losses = torch.rand(10, dtype=torch.float64)
    for world in (2, 3, 4):
        shares = []
        for rank in range(world):
            _as_rank(monkeypatch, rank, world)
            shares.append(_share(torch.arange(10)))
        assert torch.cat([part for part, _ in shares]).tolist() == list(range(10))  # each example once, in order
        ddp_average = sum(weight * losses[part].mean() for part, weight in shares) / world
        assert torch.isclose(ddp_average, losses.mean())
    _as_rank(monkeypatch, 2, 3)  # a batch smaller than the world: a stand-in example of weight 0
    part, weight = _share(torch.arange(2))
    assert part.tolist() == [0] and weight == 0.0
    for name in ENV:
        monkeypatch.delenv(name)
    part, weight = _share(torch.arange(7))
    assert part.tolist() == list(range(7)) and weight is None  # a world of one: the batch itself, unweighted


def _rows(store: Store, run_id: int) -> list[tuple]:
    evaluations = store.evaluations(run_id)
    position = {e.id: e.position for e in evaluations}
    return sorted((position[r.evaluation_id], r.example_index, r.label, r.prediction, r.correct, r.correct_draws,
                   r.perturbation_norm) for r in store.results([e.id for e in evaluations]))


def _scripted_claims(monkeypatch: pytest.MonkeyPatch, world: int, seed: int) -> None:
    """Replace the rendezvous-store counter: the ranks of the sequential simulation below enter
    each stage in turn (rank 0, 1, ...); each gets the batches a seeded random partition gives it
    (every rank at least one), in increasing order, as if the ranks had raced for them."""
    generator = torch.Generator().manual_seed(seed)
    requests: dict[str, int] = {}
    owners: dict[str, torch.Tensor] = {}

    def claimer(key: str):
        requests[key] = requests.get(key, 0) + 1
        rank = (requests[key] - 1) % world
        if key not in owners:  # one partition of the stage's batch numbers, shared by its ranks
            owners[key] = torch.cat([torch.arange(world), torch.randint(world, (1000,), generator=generator)])
        owner = owners[key]
        mine = iter([number for number in range(len(owner)) if owner[number] == rank])
        return lambda: next(mine)

    monkeypatch.setattr(distributed, "claimer", claimer)


def _sharded_evaluation(store: Store, model, data, world: int, attacks: list[AttackSpec]) -> tuple[int, list[int]]:
    """The stages of one run computed by ``world`` sharded Evaluators in turn, each stage completed
    by every rank before the next (what the barrier guarantees), then rank 0's unsharded pass."""
    run_id = store.create_run(f"world-{world}", defense="standard", dataset="synthetic", protocol="custom",
                              protocol_version=1, config={}, seed=0, n_examples=len(data))
    ranks = [Evaluator(store, run_id, model, data, torch.device("cpu"), 4, 0, Scoring(), Progress(),
                       shard=(rank, world)) for rank in range(world)]
    alive = [ev.clean() for ev in ranks][-1]  # the last rank to finish sees every rank's rows
    for position, spec in enumerate(attacks, start=1):
        alive = [ev.attack(position, spec, alive) for ev in ranks][-1]
    if world > 1:
        assert not any(e.finished for e in store.evaluations(run_id))  # sharded stages leave that to rank 0
        passes = ranks[0].forward_passes
        ranks[0].shard = (0, 1)
        assert ranks[0].clean() is not None
        survivors = alive
        for position, spec in enumerate(attacks, start=1):
            survivors = ranks[0].attack(position, spec, survivors)
        assert survivors == alive and ranks[0].forward_passes == passes  # every row was there: nothing computed
    return run_id, [ev.forward_passes for ev in ranks]


def test_sharded_stages_store_the_rows_of_one_process(data, db_url, one_thread, monkeypatch):
    train, test = data
    model = train_full_batch(linear_model(), train, steps=60)
    subset = test.subset(torch.arange(30))
    attacks = [AttackSpec("pgd", ThreatModel("Linf", 0.1), (("steps", 3),)),
               AttackSpec("pgd", ThreatModel("Linf", 0.1), (("steps", 5), ("restarts", 2)))]
    store = Store(db_url)
    rows = {}
    for world in (1, 2, 3):
        _scripted_claims(monkeypatch, world, seed=world)
        run_id, passes = _sharded_evaluation(store, model, subset, world, attacks)
        rows[world] = _rows(store, run_id)
        assert all(p > 0 for p in passes)  # every rank computed a share
        assert all(e.finished for e in store.evaluations(run_id))
    assert rows[1] == rows[2] == rows[3]
    assert {position for position, *_ in rows[1]} == {0, 1, 2} and len(rows[1]) > 30


def _fit_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from bench.data.base import get_dataset

    distributed.init("cpu")
    train = get_dataset("synthetic").load("train")
    model = linear_model(seed=0)
    summary = fit(model, train, Recipe(epochs=2, batch_size=25, lr=0.1, optimizer="sgd", momentum=0.9),
                  device=torch.device("cpu"), seed=3)
    torch.save({"state": model.state_dict(), "history": summary.history}, f"{out}/rank{rank}.pt")
    distributed.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ddp_training_gives_every_rank_the_one_process_model(tmp_path, data, monkeypatch, one_thread):
    """Two ranks of DDP on shares of each global batch train the model one process trains (up to
    float rounding: the model has no BatchNorm and no randomness), and end with the same weights."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    torch.multiprocessing.spawn(_fit_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model = linear_model(seed=0)
    summary = fit(model, data[0], Recipe(epochs=2, batch_size=25, lr=0.1, optimizer="sgd", momentum=0.9),
                  device=torch.device("cpu"), seed=3)
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])
        assert torch.allclose(ranks[0]["state"][name], value, atol=1e-5), name
    assert ranks[0]["history"] == ranks[1]["history"]
    for theirs, ours in zip(ranks[0]["history"], summary.history):
        assert theirs["train_accuracy"] == pytest.approx(ours["train_accuracy"], abs=0.02)
        assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-4)


# -- real torchrun ---------------------------------------------------------------------------

RUN_ARGS = ["--defense", "standard", "--dataset", "digits", "--epochs", "1", "-n", "48", "--batch-size", "8",
            "--attack", "pgd", "--norm", "Linf", "--eps", "0.1", "--steps", "2"]
CONFIG = RunConfig(defense="standard", dataset="digits", epochs=1, n_examples=48, batch_size=8, attacks=("pgd",),
                   norm="Linf", eps=(0.1,), steps=2)
CRASHING = Path(__file__).with_name("torchrun_crash.py")


def _torchrun(nproc: int, db_url: str, *args: str, script: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BENCH_DB", None)
    target = script or ["-m", "bench"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *target, "run", *RUN_ARGS, "--db", db_url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env,
                          cwd=Path(__file__).parents[1])


def test_torchrun_evaluation_stores_the_rows_of_one_process(tmp_path, one_thread):
    """The same (cached) checkpoint evaluated by 1 and 2 processes: identical rows in every stage,
    only rank 0 prints, and the run is finished."""
    reference = Store(f"sqlite:///{tmp_path / 'one.db'}")
    ref_id = execute(CONFIG, reference)  # trains the model once; torchrun finds it in the cache
    url = f"sqlite:///{tmp_path / 'two.db'}"
    done = _torchrun(2, url, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"run_id"') == 1  # one JSON document: rank 1 printed nothing
    assert "using cached model" in done.stderr and "training" not in done.stderr
    store = Store(url)
    (run,) = store.list_runs()
    assert run.status is RunStatus.FINISHED
    assert _rows(store, run.id) == _rows(reference, ref_id)
    assert all(e.finished for e in store.evaluations(run.id))


@pytest.mark.postgres
def test_torchrun_two_processes_write_to_postgresql(tmp_path, postgres_url, one_thread):
    """2 torchrun processes sharing one PostgreSQL database store the rows of one process."""
    reference = Store(f"sqlite:///{tmp_path / 'one.db'}")
    ref_id = execute(CONFIG, reference)
    done = _torchrun(2, postgres_url, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    store = Store(postgres_url)
    (run,) = store.list_runs()
    assert run.status is RunStatus.FINISHED and all(e.finished for e in store.evaluations(run.id))
    assert _rows(store, run.id) == _rows(reference, ref_id)
    store.close()


@pytest.mark.slow
def test_torchrun_three_processes_and_ddp_training(tmp_path, monkeypatch, one_thread):
    """3 processes store the rows of 1; a 2-process run that trains (DDP) completes, rank 0 caches
    the checkpoint, and its rows are those of one process evaluating that checkpoint."""
    reference = Store(f"sqlite:///{tmp_path / 'one.db'}")
    ref_id = execute(CONFIG, reference)
    three = _torchrun(3, f"sqlite:///{tmp_path / 'three.db'}")
    assert three.returncode == 0, three.stderr[-3000:]
    store = Store(f"sqlite:///{tmp_path / 'three.db'}")
    assert _rows(store, store.list_runs()[0].id) == _rows(reference, ref_id)

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))  # an empty model cache: torchrun trains
    trained = _torchrun(2, f"sqlite:///{tmp_path / 'trained.db'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "training standard" in trained.stderr
    (checkpoint,) = (tmp_path / "home" / "checkpoints").glob("standard-digits-*.pt")
    store = Store(f"sqlite:///{tmp_path / 'trained.db'}")
    (run,) = store.list_runs()
    assert run.status is RunStatus.FINISHED
    one = Store(f"sqlite:///{tmp_path / 'one-on-it.db'}")
    one_id = execute(CONFIG, one)  # the same configuration, one process: the cached DDP-trained model
    one_run = one.get_run(one_id)
    assert store.get_model(run.model_id).checkpoint_sha256 == one.get_model(one_run.model_id).checkpoint_sha256
    assert _rows(store, run.id) == _rows(one, one_id)
    assert checkpoint.exists()


@pytest.mark.slow
def test_resume_across_world_sizes(tmp_path, monkeypatch, one_thread):
    """A 2-process run killed mid-attack is finished by 1 process, and a 1-process run interrupted
    after its clean stage is finished by 2: both end with the rows of an uninterrupted run."""
    reference = Store(f"sqlite:///{tmp_path / 'reference.db'}")
    ref_id = execute(CONFIG, reference)
    expected = _rows(reference, ref_id)

    url = f"sqlite:///{tmp_path / 'two-then-one.db'}"
    crashed = _torchrun(2, url, script=[str(CRASHING)])
    assert crashed.returncode != 0
    store = Store(url)
    (run,) = store.list_runs()
    assert run.status is not RunStatus.FINISHED
    clean = [e for e in store.evaluations(run.id) if e.kind is EvalKind.CLEAN][0]
    assert store.count_results(clean.id) == 48 and len(_rows(store, run.id)) < len(expected)
    assert _rows(store, execute(CONFIG, store)) == expected

    url = f"sqlite:///{tmp_path / 'one-then-two.db'}"
    store = Store(url)
    original = PGD.run

    def crashing_run(self, model, x, y, threat):
        if threat.eps != LARGE_EPS:  # the protocol's attack (not the large_eps check's)
            raise RuntimeError("simulated crash after the clean stage")
        return original(self, model, x, y, threat)

    monkeypatch.setattr(PGD, "run", crashing_run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        execute(CONFIG, store)
    monkeypatch.setattr(PGD, "run", original)
    finished = _torchrun(2, url)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming run" in finished.stderr
    assert _rows(store, store.list_runs()[0].id) == expected
