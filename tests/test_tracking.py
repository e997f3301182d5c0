"""`--report-to`: each tracker writes what its user then opens, read back with its own tools.

TensorBoard: the event file, through tensorboard's EventAccumulator. MLflow: the file store,
through MlflowClient. W&B: the offline run's `.wandb` record log, parsed with wandb's own
protobuf messages. The whole `todi train` path (rank 0's records, the final evaluation) is
checked in tests/test_train.py on the reference run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from todi.trainer.config import ConfigError, TrainConfig
from todi.trainer.tracking import REPORTERS, Trackers, TrackingError, parse_report_to

RECORDS = [
    {"step": s, "epoch": 0, "loss": 3.0 / s, "ce": 4.0 / s, "lr": 1e-4 * s, "tokens": 100 * s}
    for s in (1, 2, 3)
]
CONFIG = {"loss": "todi", "beta": 1.0, "lr": 1e-4, "report_to": ["tensorboard"], "max_steps": 3}


# -- readers: what a user's tools see ------------------------------------------------------


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_text(logdir: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    event = acc.Tensors(f"{tag}/text_summary")[0]
    return event.tensor_proto.string_val[0].decode()


def mlflow_run(store: Path):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=Path(store).absolute().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "todi-distill"]
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def wandb_records(out: Path) -> list:
    """Every record of the offline run under OUT/wandb (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(out, "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    out_records = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out_records.append(rec)
    return out_records


def wandb_history(out: Path) -> tuple[list[dict], dict, dict]:
    """(history rows, config, summary) of the offline run, as the W&B app would show them."""
    history, config, summary = [], {}, {}
    for rec in wandb_records(out):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})  # fmt: skip
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            summary.update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                 for i in rec.summary.update}
            )  # fmt: skip
    return history, config, summary


# -- tests ---------------------------------------------------------------------------------


def test_parse_report_to():
    assert parse_report_to("tensorboard, MLflow") == ["tensorboard", "mlflow"]
    assert parse_report_to(["wandb", "wandb"]) == ["wandb"]
    assert parse_report_to("all") == list(REPORTERS)
    assert parse_report_to("none") == parse_report_to("") == parse_report_to(None) == []
    with pytest.raises(TrackingError, match="unknown tracker 'comet'"):
        parse_report_to("tensorboard,comet")
    cfg = TrainConfig(shards="s", student="x", out="o", report_to="tensorboard,wandb")
    assert cfg.report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="report_to"):
        from todi.trainer.config import load_config

        load_config(None, {"shards": "s", "student": "x", "out": "o", "report_to": "neptune"})


@pytest.mark.timeout(300)
def test_each_tracker_writes_what_its_user_opens(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trackers = Trackers(["all"], tmp_path, run_name="unit")
    trackers.log_config(CONFIG)
    for r in RECORDS:
        trackers.log_step(r)
    trackers.log_final({"todi": 1.25, "top1_agreement": 0.5, "note": "x"}, "eval")
    trackers.close()

    # TensorBoard: the event file
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in RECORDS]
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in RECORDS])
    assert "train/step" not in scalars and "train/epoch" in scalars
    assert scalars["eval/todi"] == [(3, 1.25)]
    assert "| beta | 1.0 |" in tensorboard_text(tmp_path / "tensorboard", "config")

    # MLflow: its own client on its own file store
    client, run = mlflow_run(tmp_path / "mlruns")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in RECORDS]
    assert run.data.params["loss"] == "todi" and run.data.params["max_steps"] == "3"
    assert run.data.metrics["eval/todi"] == 1.25 and "eval/note" not in run.data.metrics
    assert run.info.status == "FINISHED"

    # W&B: the offline run's record log
    rows, config, summary = wandb_history(tmp_path)
    losses = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in RECORDS]
    assert config["beta"] == 1.0 and config["loss"] == "todi"
    assert summary["eval/todi"] == 1.25
