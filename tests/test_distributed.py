"""Two gloo processes on the CPU (issue 14): the same splitting indices, plan and weights as one process,
rank 0 alone writing the run directory, one error for all ranks, and resume after a rank is killed.

Each test starts its processes itself (tests/distributed_worker.py, or torchrun for the command
line) with a time limit, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_worker import checksum, scores_to_json, scoring_setup

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
LIMIT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    for name in ("HWSPLIT_KILL_AT", "HWSPLIT_KILL_RANK"):
        if name not in extra:
            env.pop(name, None)
    return env


def _two_ranks(scenario: str, out: Path) -> list[dict]:
    """Run ``scenario`` on ranks 0 and 1; their result files."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], cwd=ROOT,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LIMIT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-3000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """Every worker scenario on two ranks started once: ([rank 0's results, rank 1's], their folder)."""
    out = tmp_path_factory.mktemp("ranks")
    return _two_ranks("all", out), out


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for u, v in zip(a[name], b[name], strict=True):
            assert abs(u - v) <= rel * max(abs(u), abs(v), 1e-12), (name, u, v)


def test_two_ranks_score_as_one_process(two_ranks) -> None:
    from hwsplit.splitting.score import splitting_indices

    ranks = [r["scores"] for r in two_ranks[0]]
    # one process over the same 96 samples: batches of 32 = the union of the two ranks' batches of 16
    model, loader = scoring_setup(batch_size=32)
    single = {m: scores_to_json(splitting_indices(model, loader, method=m, epochs=2, seed=5))
              for m in ("exact", "rayleigh")}
    for method in ("exact", "rayleigh"):
        assert ranks[0][method] == ranks[1][method]  # the reduced values are the same bits on both ranks
        _close(ranks[0][method], single[method], 1e-5)
        assert any(v < 0 for values in single[method].values() for v in values)  # a non-trivial comparison


def test_two_ranks_grow_the_same_network_and_rank0_alone_writes(two_ranks) -> None:
    r0, r1 = (r["grow"] for r in two_ranks[0])
    tmp_path = two_ranks[1]
    assert r0["selected"] and r0["selected"] == r1["selected"]  # each rank's own selection, before agreement
    assert r0["applied"] == r1["applied"] and len(r0["applied"]) == 2  # the plans split, one per stage
    assert len(r0["checksums"]) == 3 and r0["checksums"] == r1["checksums"]  # seed + 2 stages, same weights
    assert len(set(r0["checksums"])) == 3  # and the weights changed from stage to stage
    assert [r["world_size"] for r in r0["records"]] == [2, 2, 2]
    assert r0["records"] == r1["records"]
    run = tmp_path / "run-rank0"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json", "stage-0.pt", "stage-1.pt", "stage-2.pt",
                                                     "stages.jsonl", "summary.md", "tb"]  # tb/: rank 0's events
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert not (tmp_path / "run-rank1").exists()


def test_two_ranks_train_the_width_baseline_alike_and_rank0_alone_writes(two_ranks) -> None:
    r0, r1 = (r["width"] for r in two_ranks[0])
    assert len(r0["checksums"]) == 2 and r0["checksums"] == r1["checksums"]
    assert r0["world_size"] == [2, 2]
    run = two_ranks[1] / "width-rank0"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "stage-1.pt").exists() and not (two_ranks[1] / "width-rank1").exists()


def test_a_failing_rank_ends_all_ranks_with_its_one_line_error(two_ranks) -> None:
    r0, r1 = (r["fail"] for r in two_ranks[0])
    assert r0 == r1 == {"error": "data: rank one cannot read its shard (rank 1 of 2)", "exit_code": 2}


def _torchrun(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "--monitor-interval", "0.2", str(ROOT / "cli.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT_S)


def test_torchrun_grow_resumes_after_one_rank_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["grow", "--model", "mlp", "--dataset", "digits", "--limit", "300", "--stages", "2", "--epochs", "1",
            "--batch-size", "32", "--out", str(out)]
    killed = _torchrun(*args, env=_env(HWSPLIT_KILL_AT="stage-2:split", HWSPLIT_KILL_RANK="1"))
    assert killed.returncode != 0, killed.stderr[-3000:]
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1]  # stage 2 never completed
    assert (out / "stage-2.pt").exists() is False
    done = _torchrun("grow", "--resume", str(out), env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert [r["world_size"] for r in records] == [2, 2, 2]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone prints the result
    # finetune under torchrun: data-parallel, rank 0 alone writes RUN/finetune/ and prints
    tuned = _torchrun("finetune", str(out), "--stage", "2", "--epochs", "1", env=_env())
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    records = [json.loads(line) for line in (out / "finetune" / "stages.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["source_stage"], r["world_size"]) for r in records] == [(0, 2, 2)]
    assert tuned.stdout.count("run directory:") == 1


def test_one_process_reductions_are_identities() -> None:
    import torch

    from hwsplit.infra import distributed
    from hwsplit.infra.parallel import entry_point, on_main

    t = torch.arange(6.0).reshape(2, 3)
    assert distributed.weighted_mean_across_ranks(t, 0.25) is t
    assert distributed.weighted_mean_across_ranks({"a": t}, 0.25)["a"] is t
    assert distributed.global_sample_count(17, 3) == 17
    assert distributed.broadcast_object({"x": [1, 2]}) == {"x": [1, 2]}
    assert distributed.all_ranks_true(torch.tensor(True)) and not distributed.all_ranks_true(False)
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model) is model
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert entry_point(lambda x: x + 1)(1) == 2 and on_main(lambda: 5) == 5
    # the test checksum sees a permutation of the weights
    before = checksum(model)
    with torch.no_grad():
        model.weight.copy_(model.weight.flip(0))
    assert checksum(model) != before
