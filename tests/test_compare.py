"""The seeds comparison over an MLflow store: three seeds of two methods, checked by hand."""
from __future__ import annotations

import json
import math

import pytest

from prvr.compare import compare, group_runs, load_runs, mean_std, protocol_metrics

# (method, seed, hidden, standard r1/r5/r10/r100, dense sumr); SumR = the sum of the four
RUNS = [
    ("gmmformer_v2", 1, 384, (10.0, 30.0, 40.0, 70.0), 160.0),
    ("gmmformer_v2", 2, 384, (11.0, 31.0, 41.0, 70.0), 170.0),
    ("gmmformer_v2", 3, 384, (15.0, 32.0, 39.0, 70.0), 180.0),
    ("toy_method", 1, 64, (5.0, 20.0, 25.0, 50.0), 110.0),
    ("toy_method", 2, 64, (5.0, 20.0, 25.0, 50.0), 110.0),
    ("toy_method", 3, 64, (7.0, 22.0, 27.0, 50.0), 116.0),
    ("gmmformer_v2", 1, 128, (1.0, 2.0, 3.0, 4.0), 20.0),   # another setting: its own group
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("prvr-tvr", artifact_location=(tmp_path / "art").as_uri())
    for i, (method, seed, hidden, rec, dense) in enumerate(RUNS):
        run = client.create_run(exp, tags={"method": method, "dvc_exp_name": f"exp-{i}"})
        rid = run.info.run_id
        params = {"method": method, "train.seed": seed, "model.hidden_size": hidden,
                  "optim.lr": 0.001, "settings_hash": f"h{i}", "train.device": "cpu"}
        metrics = {**{f"test_{k}": v for k, v in zip(("r1", "r5", "r10", "r100"), rec)},
                   **{f"test_denseval_v_{k}": v for k, v in zip(("r1", "r5", "r10", "r100"), rec)},
                   "test_sumr": sum(rec), "test_denseval_v_sumr": dense, "val_sumr": 1.0}
        client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(rid, "FINISHED")
    unfinished = client.create_run(exp, tags={"method": "gmmformer_v2"}).info.run_id
    client.log_metric(unfinished, "test_sumr", 999.0)            # still running: left out
    no_test = client.create_run(exp, tags={"method": "gmmformer_v2"}).info.run_id
    client.set_terminated(no_test, "FINISHED")                     # no test metrics: left out
    return uri


def test_mean_std_and_metric_names():
    assert mean_std([150.0, 153.0, 156.0]) == (153.0, 3.0, 3)
    assert mean_std([7.0]) == (7.0, None, 1)
    assert protocol_metrics({"test_r1": 1, "test_r5": 2, "test_r10": 3, "test_r100": 4,
                             "test_sumr": 10, "test_dense_x_r1": 1, "val_sumr": 5}) == {
        "standard": {"r1": 1.0, "r5": 2.0, "r10": 3.0, "r100": 4.0, "sumr": 10.0}}


def test_comparison_over_three_seeds_of_two_methods(tmp_path, store):
    uri = store
    runs = load_runs("tvr", uri)
    assert len(runs) == len(RUNS)
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [
        ("gmmformer_v2 (model.hidden_size=384)", 3), ("toy_method", 3),
        ("gmmformer_v2 (model.hidden_size=128)", 1)]

    record = compare("tvr", tmp_path / "out", uri)
    std = {r["group"]: r for r in record["protocols"]["standard"]}
    g = std["gmmformer_v2 (model.hidden_size=384)"]
    # R@1 10, 11, 15: mean 12, std sqrt((4 + 1 + 9) / 2); SumR 150, 153, 156: mean 153, std 3
    assert g["n"] == 3 and g["r1"]["mean"] == pytest.approx(12.0)
    assert g["r1"]["std"] == pytest.approx(math.sqrt(7.0))
    assert (g["sumr"]["mean"], g["sumr"]["std"]) == pytest.approx((153.0, 3.0))
    t = std["toy_method"]  # SumR 100, 100, 106: mean 102, std sqrt((4 + 4 + 16) / 2)
    assert (t["sumr"]["mean"], t["sumr"]["std"]) == pytest.approx((102.0, math.sqrt(12.0)))
    assert std["gmmformer_v2 (model.hidden_size=128)"]["sumr"]["std"] is None
    dense = {r["group"]: r for r in record["protocols"]["denseval_v"]}
    assert (dense["toy_method"]["sumr"]["mean"], dense["toy_method"]["sumr"]["std"]) == \
        pytest.approx((112.0, math.sqrt(12.0)))
    assert dense["gmmformer_v2 (model.hidden_size=384)"]["sumr"]["std"] == pytest.approx(10.0)
    # seeds, settings hashes and devices never split a group; the hidden size and the method do
    assert record["differing_settings"] == {"method": ["gmmformer_v2", "toy_method", "gmmformer_v2"],
                                            "model.hidden_size": ["384", "64", "128"]}

    md = (tmp_path / "out" / "compare.md").read_text(encoding="utf-8")
    assert "| gmmformer_v2 (model.hidden_size=384) | gmmformer_v2 | 3 | 12.0 ± 2.6 |" in md
    assert "153.0 ± 3.0 |" in md and "102.0 ± 3.5 |" in md
    assert "| gmmformer_v2, paper | gmmformer_v2 | - | 16.2 | 37.6 | 48.8 | 86.4 | 189.1 |" in md
    assert "## Test, split `denseval_v`" in md and "| `model.hidden_size` | `384` | `64` | `128` |" in md
    assert all(f"exp-{i}" in md for i in range(len(RUNS)))        # every run is listed
    assert "█" in md and "(n=3)" in md                              # the text bar chart
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["dataset"] == "tvr"


def test_a_store_without_the_experiment_is_a_clear_error(store):
    with pytest.raises(ValueError, match="no MLflow experiment 'prvr-cha'"):
        load_runs("cha", store)
