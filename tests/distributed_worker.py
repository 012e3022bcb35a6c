"""One rank of the multi-process tests (tests/test_distributed.py starts two of these with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set): ``python tests/distributed_worker.py SCENARIO OUT_DIR``.

Each scenario writes ``OUT_DIR/rank-R.json`` with what the test compares across ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from conftest import synthetic_data, tiny_mobilenet  # noqa: E402

from hwsplit.training.bundle import TensorImageDataset  # noqa: E402
from hwsplit.training.loaders import TensorBatchLoader  # noqa: E402


class Float64Loader:
    """A :class:`TensorBatchLoader` whose inputs are float64 (the loader itself yields float32)."""

    def __init__(self, loader: TensorBatchLoader) -> None:
        self.loader, self.shard_size = loader, loader.shard_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.double(), y


def scoring_setup(rank: int = 0, world_size: int = 1, batch_size: int = 16):
    """A fixed float64 model and a float64 loader over 96 fixed samples (this rank's shard, in order)."""
    x, y = synthetic_data(96, seed=3)
    ds = TensorImageDataset(x, y, mean=(0.0,) * 3, std=(1.0,) * 3)
    model = tiny_mobilenet(seed=1).double().eval()
    loader = TensorBatchLoader(ds, batch_size, shuffle=False, rank=rank, world_size=world_size)
    return model, Float64Loader(loader)


def scores_to_json(scores) -> dict:
    return {name: s.eigenvalues.tolist() for name, s in scores.items()}


def scenario_scores(rank: int, world: int) -> dict:
    from hwsplit.splitting.score import splitting_indices

    model, loader = scoring_setup(rank, world, batch_size=16)
    return {method: scores_to_json(splitting_indices(model, loader, method=method, epochs=2, seed=5))
            for method in ("exact", "rayleigh")}


def checksum(model) -> float:
    """A float64 checksum of every parameter and buffer (position-weighted, so permutations differ)."""
    import torch

    total = 0.0
    for i, t in enumerate(model.state_dict().values()):
        flat = t.detach().reshape(-1).to(torch.float64).cpu()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / max(flat.numel(), 1)
        total += (i + 1) * float((flat * weights).sum())
    return total


def scenario_grow(rank: int, world: int, out: Path) -> dict:
    import hwsplit.run.grow as grow_module
    import hwsplit.run.grower as grower_module  # a stage's selection and split are Grower.grow_step's
    import hwsplit.run.stages as stages_module  # every loop trains through stages.record_stage
    from hwsplit.run.config import GrowConfig

    selected, applied, sums = [], [], []
    select, apply, record = grower_module.select_stage, grower_module.apply_split, stages_module.train_and_record

    def spy_select(*args, **kwargs):
        plan, info = select(*args, **kwargs)
        selected.append({k: v.tolist() for k, v in plan.items()})
        return plan, info

    def spy_apply(model, plan, *args, **kwargs):
        if kwargs.get("step"):  # the split itself, not the budget fit's trial splits at step 0
            applied.append({k: v.tolist() for k, v in plan.items()})
        return apply(model, plan, *args, **kwargs)

    def spy_record(session, model, *args, **kwargs):
        result = record(session, model, *args, **kwargs)
        sums.append(checksum(model))
        return result

    grower_module.select_stage, grower_module.apply_split = spy_select, spy_apply
    stages_module.train_and_record = spy_record
    config = GrowConfig(model="mlp", dataset="digits", data_limit=300, stages=2, epochs=1, batch_size=32,
                        split_epochs=1, seed=0)
    try:
        records = grow_module.grow(config, out / f"run-rank{rank}")  # rank 1 must write nothing there
    finally:
        grower_module.select_stage, grower_module.apply_split = select, apply
        stages_module.train_and_record = record
    return {"selected": selected, "applied": applied, "checksums": sums,
            "records": [{"stage": r["stage"], "world_size": r["world_size"], "test_top1": r["test_top1"]}
                        for r in records]}


def scenario_width(rank: int, world: int, out: Path) -> dict:
    """The width baseline on every rank; rank 1's run directory must stay unwritten."""
    import hwsplit.run.baselines as baselines
    import hwsplit.run.stages as stages_module  # every loop trains through stages.record_stage
    from hwsplit.run.config import GrowConfig

    sums = []
    record = stages_module.train_and_record

    def spy_record(session, model, *args, **kwargs):
        result = record(session, model, *args, **kwargs)
        sums.append(checksum(model))
        return result

    stages_module.train_and_record = spy_record
    config = GrowConfig(model="mlp", dataset="digits", data_limit=300, batch_size=32, seed=0)
    try:
        records = baselines.width_baseline(config, [0.5, 1.0], out / f"width-rank{rank}", epochs=1)
    finally:
        stages_module.train_and_record = record
    return {"checksums": sums, "world_size": [r["world_size"] for r in records]}


def scenario_fail(rank: int, world: int) -> dict:
    """Rank 1 raises while rank 0 waits at a barrier: both must end with the same one-line error."""
    from hwsplit.infra.distributed import barrier
    from hwsplit.infra.parallel import RankFailed, entry_point

    @entry_point
    def command() -> None:
        if rank == 1:
            raise ValueError("data: rank one cannot read its shard")
        barrier()

    try:
        command()
    except RankFailed as err:
        return {"error": str(err), "exit_code": err.exit_code}
    return {"error": None}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    from hwsplit.infra.parallel import init_from_env, shutdown

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = {}
    if scenario == "all":  # one start-up for every scenario; "fail" breaks the group, so it comes last
        init_from_env()
        result = {"scores": scenario_scores(rank, world), "grow": scenario_grow(rank, world, out),
                  "width": scenario_width(rank, world, out)}
        result["fail"] = scenario_fail(rank, world)
        shutdown()
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
