"""The studies of experiments/: configs build on meta, micro runs end to end, resumption."""

import json
import math

import pytest
import yaml

from experiments.studies import ablate_dilation, long_range, paper_table2
from experiments.studies import runner as study
from experiments.studies.schema import Table2Spec, load_study
from settings.loading import load_run_config
from tests.support.runs import TINY_CONFIG


def micro_train(corpus) -> list[str]:
    """train.py arguments that make any tiny model config a micro one on the test corpus (the
    debug YAML is merged after the run's model YAML, overrides after both)."""
    return [
        str(TINY_CONFIG),
        "model.vocab_size=null",
        f"data.path={corpus / 'corpus'}",
        f"data.cache_dir={corpus / 'cache'}",
        "trainer.val_check_interval=2",
    ]


def micro_table2(corpus, path):
    spec = {
        "name": "micro_table2",
        "tokens_per_batch": 64,
        "steps": 2,
        "schedule": {"segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4]},
        "runs": [
            {
                "model": "transformer",
                "config": "configs/model/transformer_tiny.yaml",
                "seq_len": 16,
            },
            {
                "model": "sparse_transformer",
                "config": "configs/model/sparse_transformer_tiny.yaml",
                "seq_len": 32,
            },
            {"model": "longnet", "config": "configs/model/longnet_tiny.yaml", "seq_len": 32},
        ],
        "train": micro_train(corpus),
        "eval": {"context_lengths": [16, 64], "args": ["split=val", "dense_blockwise=true"]},
        "paper": {"lengths": [2048], "rows": [["Transformer", 2048, 256, 4.24]]},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("scale", ["recipe", "tiny", "paper"])
def test_table2_configs_build_on_meta(scale, capsys):
    paper_table2.main(["--scale", scale, "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("plan: ") == {"recipe": 8, "tiny": 5, "paper": 7}[scale]  # recipe: stages
    assert "sparse_transformer_8192" in out


def test_table2_micro_end_to_end_and_resume(corpus, tmp_path, capsys):
    config = micro_table2(corpus, tmp_path / "study.yaml")
    out = tmp_path / "study"
    results = paper_table2.main(["--config", str(config), "--out", str(out)])
    assert [r["name"] for r in results["runs"]] == [
        "transformer_16",
        "sparse_transformer_32",
        "longnet_32",
    ]
    batches = [r["batch"] for r in results["runs"]]
    assert batches == [4, 2, 2]  # equal tokens per batch
    for r in results["runs"]:
        assert r["train"]["steps"] == 2
        assert set(r["eval"]) == {16, 64} and all(v > 0 for v in r["eval"].values())
    table = (out / "table.md").read_text()
    assert "| Sparse Transformer | 32 | 2 |" in table and "The paper's Table 2" in table
    assert (out / "ppl_vs_context.png").stat().st_size > 0
    capsys.readouterr()

    done = {r: (out / r / "done.json").stat().st_mtime_ns for r in ("longnet_32",)}
    again = paper_table2.main(["--config", str(config), "--out", str(out)])
    log = capsys.readouterr().out
    assert log.count("finished before, skipped") == 3
    assert log.count("evaluated before, skipped") == 3
    assert (out / "longnet_32" / "done.json").stat().st_mtime_ns == done["longnet_32"]
    assert again["runs"][2]["eval"] == results["runs"][2]["eval"]
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 3


def test_a_curriculum_stage_comes_before_each_run_and_counts_in_its_cost(corpus, tmp_path):
    config = micro_table2(corpus, tmp_path / "study.yaml")
    spec = yaml.safe_load(config.read_text())
    spec["curriculum"] = {"seq_len": 8, "steps": 3, "train": ["data.copy_fraction=0.5"]}
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    runs = paper_table2.plan(load_study(config, Table2Spec), [], out)
    assert [(r.name, r.stage) for r in runs][:2] == [
        ("transformer_16.8", "transformer_16"),
        ("transformer_16", None),
    ]
    stage, run = runs[:2]
    assert (stage.cfg.data.seq_len, stage.cfg.data.batch_size) == (8, 8)  # same tokens per batch
    assert stage.cfg.trainer["max_steps"] == 3 and stage.cfg.data.copy_fraction == 0.5
    assert run.cfg.init_from == str(out / "transformer_16.8" / "checkpoints" / "last.ckpt")
    assert run.cfg.data.copy_fraction == 0.0 and run.cfg.trainer["max_steps"] == 2
    assert [r.name for r in study.select(runs, ["longnet_32"], None, config)] == [
        "longnet_32.8",  # a stage goes with its run
        "longnet_32",
    ]
    assert [r.name for r in study.select(runs, None, "1/3", config)] == [
        "sparse_transformer_32.8",
        "sparse_transformer_32",
    ]
    finished = [study.FinishedRun(r, {"train_seconds": 10.0 + i}, {}) for i, r in enumerate(runs)]
    merged = study.without_stages(finished)
    assert [r.name for r in merged] == ["transformer_16", "sparse_transformer_32", "longnet_32"]
    assert (
        merged[0].train["train_seconds"] == 21.0
        and merged[0].train["stage"]["train_seconds"] == 10.0
    )


def test_a_shared_stage_comes_before_every_run_once(corpus, tmp_path):
    config = micro_table2(corpus, tmp_path / "study.yaml")
    spec = yaml.safe_load(config.read_text())
    spec["curriculum"] = {"seq_len": 8, "steps": 3, "shared": True}
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    runs = paper_table2.plan(load_study(config, Table2Spec), [], out)
    assert [(r.name, r.stage) for r in runs] == [
        ("transformer_16.8", study.SHARED),
        ("transformer_16", None),
        ("sparse_transformer_32", None),
        ("longnet_32", None),
    ]
    stage = str(out / "transformer_16.8" / "checkpoints" / "last.ckpt")
    assert all(r.cfg.init_from == stage for r in runs[1:])
    for shard in ("0/2", "1/2"):  # each process needs it (train_run's lock: it trains once)
        assert study.select(runs, None, shard, config)[0].name == "transformer_16.8"
    finished = [study.FinishedRun(r, {"train_seconds": 10.0}, {}) for r in runs]
    assert [r.train["train_seconds"] for r in study.without_stages(finished)] == [10.0] * 3
    assert "one 3-step stage at 8 tokens" in study.curriculum_text(
        load_study(config, Table2Spec), finished[:1]
    )


def test_train_run_waits_for_another_process_training_the_same_run(tmp_path, monkeypatch):
    """Two shards needing one shared stage: the second blocks on the lock, then skips it."""
    import fcntl
    import threading

    calls = []
    monkeypatch.setattr(study, "_train_run", lambda d, a: calls.append(d) or {"steps": 1})
    with open(tmp_path / ".stage.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process holds it
        t = threading.Thread(target=study.train_run, args=(tmp_path / "stage", []))
        t.start()
        t.join(0.3)
        assert t.is_alive() and not calls  # waiting
        fcntl.flock(lock, fcntl.LOCK_UN)
        t.join(5)
    assert calls == [tmp_path / "stage"]


def test_table2_bad_study(corpus, tmp_path):
    config = micro_table2(corpus, tmp_path / "study.yaml")
    spec = yaml.safe_load(config.read_text())
    spec["runs"][0]["model"] = "perceiver"
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(study.ConfigError, match="'perceiver' is not one of"):
        paper_table2.main(["--config", str(config), "--dry-run"])
    spec["runs"][0]["model"] = "transformer"
    spec["tokens_per_batch"] = 60
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(study.ConfigError, match="tokens_per_batch=60 is not a multiple"):
        paper_table2.main(["--config", str(config), "--dry-run"])


def test_geometric_schedules():
    assert ablate_dilation.geometric(128, 2, 1024) == ([128, 256, 512, 1024], [1, 2, 4, 8])
    assert ablate_dilation.geometric(128, 4, 1024) == ([128, 512, 2048], [1, 4, 16])
    assert ablate_dilation.geometric(128, 4, 1024, drop_largest=1) == ([128, 512], [1, 4])
    with pytest.raises(study.ConfigError, match="drop_largest=3 must be in 0..2"):
        ablate_dilation.geometric(128, 4, 1024, drop_largest=3)
    with pytest.raises(study.ConfigError, match="ratio must be an integer >= 2, got 1"):
        ablate_dilation.geometric(128, 1, 1024)


def test_ablation_config_builds_on_meta(capsys):
    ablate_dilation.main(["--dry-run"])
    out = capsys.readouterr().out
    assert out.count("plan: ") == 9 and "w0=512_ratio=4_drop=1: w=[512, 2048] r=[1, 4]" in out


def test_ablation_micro_end_to_end_and_resume(corpus, tmp_path, capsys):
    spec = {
        "name": "micro_ablation",
        "model": "configs/model/longnet_tiny.yaml",
        "seq_len": 32,
        "tokens_per_batch": 64,
        "steps": 2,
        "grid": {"w0": [8], "ratio": [2], "reach": [32], "drop_largest": [1]},  # two runs
        "schedules": {"flat": {"segment_lengths": [32], "dilation_rates": [1]}},
        "train": micro_train(corpus),
        "eval": {"context_lengths": [16, 64], "args": ["split=val", "suffix=8"]},
        "bench": {"seq_len": 64, "repeats": 1},
    }
    config = tmp_path / "ablation.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    results = ablate_dilation.main(["--config", str(config), "--out", str(out)])
    names = {r["name"] for r in results["runs"]}
    assert names == {"w0=8_ratio=2_drop=1", "flat"}  # the grid's names: the dry-run test
    ppl = [r["eval"][64] for r in results["runs"]]
    assert ppl == sorted(ppl)  # ranked by perplexity at the longest length
    for r in results["runs"]:
        assert r["attn_ms_per_1k"] > 0 and r["keys_per_query"] > 0
        assert set(r["prompting"]) == {16, 64}
    table = (out / "table.md").read_text()
    assert "| 1 |" in table and "keys/query @32" in table
    assert (out / "ppl_vs_context.png").stat().st_size > 0
    assert (out / "prompting.png").stat().st_size > 0
    capsys.readouterr()
    ablate_dilation.main(["--config", str(config), "--out", str(out), "--only", "flat"])
    log = capsys.readouterr().out
    assert "flat: finished before, skipped" in log and "evaluated before, skipped" in log
    with pytest.raises(study.ConfigError, match="not runs of"):
        ablate_dilation.main(["--config", str(config), "--only", "nope", "--dry-run"])


def test_set_overrides_every_run_and_is_checked():
    spec = load_study(study.ROOT / "configs" / "study" / "paper_table2_tiny.yaml", Table2Spec)
    runs = [vars(r) for r in paper_table2.plan(spec, ["seed=7", "model.n_layer=2"])]
    assert all(r["cfg"].seed == 7 and r["cfg"].model.n_layer == 2 for r in runs)
    with pytest.raises(study.ConfigError, match="unknown key model.n_layers"):
        paper_table2.plan(spec, ["model.n_layers=2"])


def test_long_range_plan_builds_every_run(capsys):
    """Every run of the long-range study resolves and builds (meta device), quick included."""
    assert long_range.main(["--dry-run"]) == {}
    out = capsys.readouterr().out
    assert out.count("plan: ") == 18 and "longnet_stretch.64: dilated" in out
    long_range.main(["--dry-run", "--quick"])
    assert capsys.readouterr().out.count("plan: ") == 4
    long_range.main(["--dry-run", "--shard", "1/2"])  # runs 1, 3, 5, 7 with their stages
    out = capsys.readouterr().out
    assert out.count("plan: ") == 8 and "plan: sliding_64.64:" in out and "dense" not in out
    with pytest.raises(study.ConfigError, match="--shard must be I/N"):
        long_range.main(["--dry-run", "--shard", "2/2"])


def test_long_range_area_is_the_mean_over_the_log_grid():
    from experiments.studies.long_range import area

    rows = [{"length": 64, "distance": d, "accuracy": a, "note": ""}
            for d, a in ((16, 1.0), (32, 0.5), (64, 0.0))]  # fmt: skip
    assert area(rows, 64) == 0.5 and math.isnan(area(rows, 128))


def test_long_range_micro_end_to_end_and_resume(tmp_path, capsys):
    spec = {
        "name": "micro_long_range",
        "model": "configs/model/transformer_tiny.yaml",
        "seq_len": 64,
        "tokens_per_batch": 128,
        "steps": 2,
        "train": ["model.d_model=32", "model.n_layer=1", "model.d_ff=64", "data.source=recall",
                  "data.recall_keys=16", "data.recall_values=8", "data.recall_records=4",
                  "data.num_workers=0", "trainer.val_check_interval=2",
                  "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"],
        "runs": {"dense": ["model.attention=dense"],
                 "longnet": ["model.attention=dilated", "model.segment_lengths=[16,32]",
                             "model.dilation_rates=[1,2]"]},
        "quick": {"runs": ["dense"], "steps": 1},
        "curriculum": {"seq_len": 32, "steps": 1, "train": ["data.recall_records=2"]},
        "eval": {"context_lengths": [64, 128], "args": ["recall_sequences=2"]},
    }  # fmt: skip
    config = tmp_path / "long_range.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    results = long_range.main(["--config", str(config), "--out", str(out)])
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"dense", "longnet"}  # the curriculum stages are not ranked
    for name in runs:  # each run started from its own short stage's weights
        stage = load_run_config([str(out / f"{name}.32" / "config.yaml")])
        assert (stage.data.seq_len, stage.data.batch_size, stage.data.recall_records) == (32, 4, 2)
        main = load_run_config([str(out / name / "config.yaml")])
        assert main.init_from == str(out / f"{name}.32" / "checkpoints" / "last.ckpt")
        assert (main.data.seq_len, main.data.recall_records) == (64, 4)
        assert 0.0 <= runs[name]["val_accuracy"] <= 1.0
    assert runs["dense"]["gflop"] > runs["longnet"]["gflop"] > 0
    per = [r["area_per_gflop"] for r in results["runs"]]
    assert per == sorted(per, reverse=True)  # ranked best first
    assert 0.0 <= runs["dense"]["area"] <= 1.0
    assert {x["distance"] for x in runs["dense"]["recall"]} == {16, 32, 64}
    table = (out / "table.md").read_text()
    assert "area per GFLOP" in table and "each after 1 steps at 32 tokens" in table
    assert (out / "accuracy_vs_distance.png").stat().st_size > 0
    capsys.readouterr()
    long_range.main(["--config", str(config), "--out", str(out), "--only", "dense"])
    log = capsys.readouterr().out
    assert "finished before, skipped" in log and "evaluated before, skipped" in log
    assert "dense.32: finished before, skipped" in log and "longnet.32" not in log


# -- the typed study config: checked before anything trains ------------------------------------

SCHEMAS = {
    "paper_table2_tiny": "Table2Spec",
    "paper_table2_recipe": "Table2Spec",
    "ablate_dilation_recipe": "AblationSpec",
    "paper_table2_paper": "Table2Spec",
    "ablate_dilation_tiny": "AblationSpec",
    "long_range_tiny": "LongRangeSpec",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_shipped_study_loads_under_its_schema(name):
    from experiments.studies import schema

    spec = load_study(
        study.ROOT / "configs" / "study" / f"{name}.yaml", getattr(schema, SCHEMAS[name])
    )
    assert spec.name == name and spec.eval.context_lengths


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to train fails the test: the errors below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a run trained before the study's config was checked")

    monkeypatch.setattr(study, "train", refuse)


def ablation_with(tmp_path, corpus, **sections):
    spec = {
        "name": "micro_ablation",
        "model": "configs/model/longnet_tiny.yaml",
        "seq_len": 32,
        "tokens_per_batch": 64,
        "steps": 2,
        "schedules": {"flat": {"segment_lengths": [32], "dilation_rates": [1]}},
        "train": micro_train(corpus),
        "eval": {"context_lengths": [16, 64], "args": ["split=val"]},
        "bench": {"seq_len": 64, "repeats": 1},
        **sections,
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"bench": {"seq_lenn": 64}},
         r"unknown key bench\.seq_lenn in study config .*ablation\.yaml.*"
         r"did you mean bench\.seq_len\?"),
        ({"eval": {"context_length": [16]}}, r"unknown key eval\.context_length in study config"),
        ({"bench": {"seq_len": 64, "repeats": "three"}}, r"bench\.repeats in study config"),
        ({"eval": {"args": ["split=val"]}}, r"eval\.context_lengths in study config .*missing"),
        ({"stepz": 2}, r"unknown key stepz .*did you mean steps\?"),
    ],
)  # fmt: skip
def test_a_typo_in_a_study_is_named_before_any_run_trains(
    sections, message, tmp_path, corpus, no_training
):
    config = ablation_with(tmp_path, corpus, **sections)
    with pytest.raises(study.ConfigError, match=message):
        ablate_dilation.main(["--config", str(config), "--out", str(tmp_path / "study")])
    assert not (tmp_path / "study").exists()


def test_a_typo_in_a_runs_train_overrides_fails_before_any_run_trains(
    tmp_path, corpus, no_training
):
    config = micro_table2(corpus, tmp_path / "study.yaml")
    spec = yaml.safe_load(config.read_text())
    spec["runs"][2]["seq_lenn"] = 32
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(study.ConfigError, match=r"unknown key seq_lenn .*Table2Run"):
        paper_table2.main(["--config", str(config)])
    del spec["runs"][2]["seq_lenn"]
    spec["train"].append("optim.lrr=1.0")  # the last run's train.py config is checked too
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(study.ConfigError, match=r"unknown key optim\.lrr"):
        paper_table2.main(["--config", str(config)])
