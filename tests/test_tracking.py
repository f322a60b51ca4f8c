"""MLflow tracking against a throwaway sqlite store: names, nesting, artifacts, and the off switch."""

import json

import pytest
from mlflow.tracking import MlflowClient

from cf import tracking
from cf.config import load_config
from cf.config.load import ROOT, to_yaml
from cf.store import artifact_location


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module (creating one costs ~2 s of migrations); one experiment per test."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def store(db, request):
    return f"sqlite:///{db / 'mlflow.db'}", request.node.name


def cfg_for(store, *overrides):
    uri, experiment = store
    return load_config("smoke", overrides=[f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                                           "tracking.ablation=memory", *overrides])


def runs_by_stage(store):
    uri, experiment = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}


def test_nested_runs_carry_config_tags_metrics_and_artifacts(store, db, tmp_path, capfd):
    cfg = cfg_for(store)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracking.start_run(cfg, "pipeline") as parent:
        with tracking.start_run(cfg, "teacher", extra_tags={"seed": 0}) as child:
            tracking.log_metrics({"teacher/loss": 0.5, "bench/dino@30s": 0.9}, step=3)
            tracking.log_metrics({"teacher/loss": 0.25}, step=4)
            tracking.log_artifact(note)
        with tracking.start_run(cfg, "student", parent_run_id=parent.run_id):
            pass
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # MLflow kept quiet

    client, runs = runs_by_stage(store)
    assert set(runs) == {"pipeline", "teacher", "student"}
    assert runs["teacher"].info.run_id == child.run_id
    assert runs["teacher"].data.tags["mlflow.parentRunId"] == parent.run_id
    assert runs["student"].data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in runs["pipeline"].data.tags
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.params == tracking.flatten_config(cfg)  # same names in every run
        tags = run.data.tags
        assert (tags["method"], tags["memory"], tags["preset"], tags["ablation"]) == (
            "context_forcing", "slowfast", "smoke", "memory")
        assert tags["git_sha"] and tags["git_sha"] != ""
    assert runs["teacher"].data.tags["seed"] == "0"
    assert runs["teacher"].data.params["memory.policy"] == "slowfast"
    assert json.loads(runs["teacher"].data.params["data.revisit_lags"]) == [4, 8]
    history = client.get_metric_history(child.run_id, "teacher/loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5), (4, 0.25)]
    assert runs["teacher"].data.metrics["bench/dino_at_30s"] == 0.9
    names = {a.path for a in client.list_artifacts(child.run_id)}
    assert names == {"config.yaml", "note.txt"}
    config_file = client.download_artifacts(child.run_id, "config.yaml", str(tmp_path))
    assert open(config_file).read() == to_yaml(cfg)
    assert (db / "mlruns").is_dir()  # artifacts beside the sqlite file


def test_failed_stage_is_marked_failed(store):
    cfg = cfg_for(store)
    with pytest.raises(RuntimeError):
        with tracking.start_run(cfg, "teacher"):
            raise RuntimeError("boom")
    _, runs = runs_by_stage(store)
    assert runs["teacher"].info.status == "FAILED"
    assert tracking.active_run() is None


def test_resuming_a_run_continues_it(store):
    cfg = cfg_for(store)
    with tracking.start_run(cfg, "teacher") as run:
        tracking.log_metrics({"teacher/loss": 1.0}, step=1)
    with tracking.start_run(cfg, "teacher", run_id=run.run_id):
        tracking.log_metrics({"teacher/loss": 0.5}, step=2)
    client, runs = runs_by_stage(store)
    assert len(runs) == 1
    assert [m.value for m in client.get_metric_history(run.run_id, "teacher/loss")] == [1.0, 0.5]


def test_lightning_logger_writes_into_the_open_run(store, tmp_path):
    from test_train_base import Toy, ToyData, toy_cfg

    from cf.train.base import fit, make_trainer

    uri, experiment = store
    cfg = toy_cfg("trainer.max_steps=3", "trainer.log_every=1", "tracking.enabled=true",
                  f"tracking.uri={uri}", f"tracking.experiment={experiment}")
    with tracking.start_run(cfg, "toy") as run:
        trainer = make_trainer(cfg, tmp_path, "toy", logger=run.lightning_logger())
        fit(trainer, Toy(cfg), ToyData(), tmp_path, "toy")
        assert MlflowClient(uri).get_run(run.run_id).info.status == "RUNNING"  # Lightning did not end it
    client, runs = runs_by_stage(store)
    assert list(runs) == ["toy"] and runs["toy"].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "toy/loss")] == [0, 1, 2]


def test_disabled_tracking_touches_nothing(tmp_path, monkeypatch):
    store = (f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}", "cf")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    with tracking.start_run(cfg_for(store, "tracking.enabled=false"), "teacher") as run:
        tracking.log_metrics({"teacher/loss": 1.0}, step=1)
        tracking.log_artifact(tmp_path / "missing.txt")
        assert run.run_id is None and run.lightning_logger() is False
    assert list(tmp_path.iterdir()) == []


def test_only_rank_zero_tracks(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with tracking.start_run(cfg_for((f"sqlite:///{tmp_path / 'mlflow.db'}", "cf")), "teacher") as run:
        tracking.log_metrics({"teacher/loss": 1.0}, step=1)
    assert run.run_id is None and list(tmp_path.iterdir()) == []


def test_store_resolution_order(monkeypatch):
    cfg = load_config("smoke")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking.tracking_uri(cfg) == f"sqlite:///{ROOT / 'mlflow.db'}"
    assert artifact_location(tracking.tracking_uri(cfg)) == (ROOT / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5000"
    assert artifact_location("http://127.0.0.1:5000") is None
    cfg.tracking.uri = "sqlite:///elsewhere.db"
    assert tracking.tracking_uri(cfg) == "sqlite:///elsewhere.db"


def test_metric_names_are_made_valid():
    assert tracking.metric_key("bench/dino_consistency@30s") == "bench/dino_consistency_at_30s"
    assert tracking.metric_key("cdmd/loss (x)") == "cdmd/loss _x_"
    assert tracking.metric_key("teacher/loss") == "teacher/loss"
