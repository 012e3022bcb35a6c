"""The run layer's seams (issue 24): option values to settings with the cost model built once, the one resume
trimming of a run directory, the one record step of every loop, and the scorer's options as one dataclass."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hwsplit.infra.errors import ConfigError
from hwsplit.network.checkpoint import save_checkpoint
from hwsplit.network.models import architecture, build_model
from hwsplit.run.config import GrowConfig, stage_epochs_in_all
from hwsplit.run.options import grow_settings, resume_settings, width_settings
from hwsplit.run.rundir import RunDir


def test_width_settings_take_a_runs_settings_and_replace_only_what_was_given(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    grown = GrowConfig(model="mobilenet_v1_cifar", model_options={"width_mult": 1.0, "activation": "relu"},
                       batch_size=32, epochs=3, data_limit=300)
    (run / "config.json").write_text(json.dumps(grown.to_dict()))
    fields = {"batch_size": 64, "epochs": 15, "data_limit": None, "lr": 0.05, "model_options": {"width_mult": 2.0}}
    config = width_settings(run, fields, given={"lr", "model_options"})
    assert (config.batch_size, config.epochs, config.data_limit) == (32, 3, 300)  # the run's, not the defaults
    assert config.lr == 0.05 and config.model_options == {"width_mult": 2.0, "activation": "relu"}  # merged
    alone = width_settings(None, fields, given=set())  # no run: every value counts, given or default
    assert (alone.batch_size, alone.epochs, alone.lr) == (64, 15, 0.05)


def test_grow_settings_parse_the_budget_in_the_cost_models_unit_and_apply_the_recipe():
    config, cost_model = grow_settings({"cost": "flops", "selection": "lp"}, budget="50k", recipe="authors",
                                       selection={"price": "linear"})
    assert cost_model.unit == "MACs" and config.budget == 50_000.0
    assert config.recipe == "authors" and config.price == "linear"  # given beside the preset: it wins
    assert config.group_budgets == "authors" and config.lp_threshold == 0.99
    with pytest.raises(ValueError, match="budget"):
        grow_settings({"cost": "flops"}, budget="4.5ms")  # a latency budget for a MAC cost model
    with pytest.raises(ConfigError, match="profile"):
        grow_settings({"cost": "lut"})  # which cost options combine is checked before a profile is read


def test_grow_uses_the_cost_model_it_is_given(tmp_path, monkeypatch):
    """grow(config, out, cost_model=...) builds no second cost model: the session prices with the one given."""
    import hwsplit.run.session as session_module
    from hwsplit.run.grow import grow

    config, cost_model = grow_settings(dict(data_limit=100, test_limit=40, stages=0, epochs=1, seed_epochs=1,
                                            batch_size=32, tensorboard=False))

    def refuse(config):
        raise AssertionError("the cost model was built a second time")

    monkeypatch.setattr(session_module, "build_cost_model", refuse)
    records = grow(config, tmp_path / "run", cost_model=cost_model)
    assert len(records) == 1 and records[0]["cost"]["unit"] == "MACs"
    assert records[0]["epochs_in_all"] == stage_epochs_in_all(config, 0) == 1
    resumed = resume_settings(tmp_path / "run", stages=2)  # the run's config.json, extended
    assert resumed.stages == 2 and dataclasses.replace(resumed, stages=config.stages) == config


def _run_with(tmp_path, n_records: int, checkpoints: list[int]) -> tuple[RunDir, list[dict]]:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    model = build_model("mlp", in_features=4, num_classes=3, widths=[5])
    records = [{"stage": k, "architecture": architecture(model), "test_top1": 0.5, "macs": 1, "params": 1,
                "cost": {"name": "flops", "unit": "MACs", "value": 1}} for k in range(n_records)]
    run.write_records(records)
    for k in checkpoints:
        save_checkpoint(run.checkpoint(k), model, stage=k)
    return run, records


def test_trim_to_completed_keeps_the_records_with_a_checkpoint_and_removes_the_rest(tmp_path):
    run, records = _run_with(tmp_path, 3, [0, 1, 3])
    run.partial(2).write_bytes(b"the next stage's training state")
    run.partial(1).write_bytes(b"stale")
    (run.path / ".stages.jsonl.abc.tmp").write_text("torn")
    kept = run.trim_to_completed()
    assert kept == records[:2] and run.records() == records[:2]
    assert sorted(run.checkpoints()) == [0, 1]  # stage-3.pt had no record
    assert [p.name for p in run.partials()] == ["partial-2.pt"] and not run.temporaries()


def test_trim_to_completed_refuses_a_checkpoint_of_another_architecture(tmp_path):
    run, records = _run_with(tmp_path, 2, [0, 1])
    other = build_model("mlp", in_features=4, num_classes=3, widths=[7])
    save_checkpoint(run.checkpoint(1), other, stage=1)
    with pytest.raises(ValueError, match="does not hold the architecture recorded for stage 1"):
        run.trim_to_completed()
    assert run.records() == records  # nothing removed


def test_scoring_options_are_the_keywords_of_splitting_indices(trained_tiny):
    from hwsplit.splitting.score import ScoringOptions, splitting_indices

    model, data = trained_tiny
    data = data[:4]
    by_keywords = splitting_indices(model, data, ritz_vectors=3, seed=5)
    by_options = splitting_indices(model, data, ScoringOptions(ritz_vectors=3, seed=5))
    overridden = splitting_indices(model, data, ScoringOptions(ritz_vectors=9), ritz_vectors=3, seed=5)
    for name, score in by_keywords.items():
        torch.testing.assert_close(by_options[name].eigenvalues, score.eigenvalues, rtol=0, atol=0)
        torch.testing.assert_close(overridden[name].eigenvalues, score.eigenvalues, rtol=0, atol=0)
    for fields, message in (({"method": "power"}, "method"), ({"ritz_from": 1.0}, "ritz_from"),
                            ({"epochs": 0}, "epochs")):
        with pytest.raises(ValueError, match=message):
            ScoringOptions(**fields)
    with pytest.raises(TypeError):
        splitting_indices(model, data, not_an_option=1)


def test_a_stage_record_is_unchanged_by_the_record_helper(tmp_path):
    """The seed record of a tiny grow run has exactly the keys a record had before the record step was shared."""
    from hwsplit.run.grow import grow

    config = GrowConfig(data_limit=100, test_limit=40, stages=0, epochs=1, seed_epochs=1, batch_size=32,
                        tensorboard=False)
    record = grow(config, tmp_path / "run")[0]
    assert set(record) == {"stage", "architecture", "layers", "widths", "macs", "params", "cost", "train_loss",
                           "train_top1", "test_loss", "test_top1", "test_top5", "test_samples", "schedule",
                           "seconds", "world_size", "threads", "split", "neurons_split", "epochs_in_all"}
    on_disk = json.loads((tmp_path / "run" / "stages.jsonl").read_text().splitlines()[0])
    assert on_disk["stage"] == 0 and on_disk["epochs_in_all"] == 1


def test_a_resume_accepts_another_spelling_of_the_same_data_directory_and_profile(tmp_path, monkeypatch):
    # a run started with a relative path resumes from the absolute one (or from a process that spells it so)
    from hwsplit.run.grow import _resume_preflight

    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "p.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    saved = GrowConfig(dataset="npz", data_dir="data", cost="lut", cost_options={"profile": "p.json"})
    run.config.write_text(json.dumps(saved.to_dict()))
    _resume_preflight(run, dataclasses.replace(saved, data_dir=str(tmp_path / "data"),
                                               cost_options={"profile": str(tmp_path / "p.json")}))
    with pytest.raises(ConfigError, match="data_dir differs"):
        _resume_preflight(run, dataclasses.replace(saved, data_dir="other"))


def test_a_derived_job_continues_when_its_config_spells_a_path_another_way(tmp_path, monkeypatch):
    # a fine-tune/prune/width job whose config.json says "data" continues (keeps its records) when asked
    # again with the absolute path; another data directory is another job
    from hwsplit.run.rundir import _same_job

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    dest = RunDir(tmp_path / "job")
    dest.path.mkdir()
    dest.config.write_text(json.dumps({"data_dir": "data", "finetune": {"source": "run", "epochs": 3}}))
    assert _same_job(dest, {"data_dir": str(tmp_path / "data"),
                            "finetune": {"source": str(tmp_path / "run"), "epochs": 3}})
    assert not _same_job(dest, {"data_dir": "other", "finetune": {"source": "run", "epochs": 3}})
