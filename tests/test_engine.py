"""The attack engine: chunked = whole, content-addressed reuse, kill-and-resume, corrupt shards,
ensembles (worst case, broken_by, only still-robust samples attacked), Dask scale-out, the run
summary and the progress output."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT
from rcat import attacks as attacks_module
from rcat import engine
from rcat.attacks import OUTCOME_COLUMNS, attack_outcomes, build_attack
from rcat.config import AttackConfig, EngineConfig, parse_params
from rcat.dask_executor import keep_slots_busy
from rcat.data import Split
from rcat.errors import ConfigError, InputError

EPS = 0.1
APGD = AttackConfig(name="apgd", loss="dlr", eps=EPS, steps=5, batch_size=16)
PGD = AttackConfig(name="pgd", loss="ce", eps=EPS, steps=5, batch_size=16)
WEAK = AttackConfig(name="fgsm", loss="ce", eps=0.02, batch_size=16)
ENSEMBLE = AttackConfig(eps=EPS, batch_size=16, ensemble=[WEAK, PGD])
PROVENANCE = {"split": "validation", "model": "mlp", "model_digest": "m" * 64, "split_digest": "s" * 64}


def whole(network, split, config, seed=0, **kwargs):
    return attack_outcomes(network, split.images, split.labels, split.sample_index, config, num_classes=split.num_classes,
                           seed=seed, provenance=PROVENANCE, **kwargs)


def chunked(network, split, config, cache_dir, chunk_size=32, seed=0, **kwargs):
    return engine.run_attack(network, split, config, num_classes=split.num_classes, seed=seed, provenance=PROVENANCE,
                             cache_dir=cache_dir, chunk_size=chunk_size, **kwargs)


@pytest.fixture
def count_attacks(monkeypatch):
    """Count calls of the attack adapter made by the engine (one per computed chunk)."""
    calls = []
    original = engine.attack_outcomes

    def counting(*args, **kwargs):
        calls.append(kwargs.get("position_offset", 0))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "attack_outcomes", counting)
    return calls


@pytest.mark.parametrize("config", [APGD, ENSEMBLE], ids=["apgd", "ensemble"])
def test_chunked_result_equals_one_call_on_the_whole_split(config, trained_mlp, tiny_split, tmp_path):
    network, _ = trained_mlp
    expected = whole(network, tiny_split, config)
    result = chunked(network, tiny_split, config, tmp_path, chunk_size=32)  # 4 chunks, the last partial (120 = 3*32 + 24)
    pd.testing.assert_frame_equal(result, expected)
    key_dir = next(tmp_path.iterdir())
    assert sorted(p.name for p in key_dir.glob("chunk-*.parquet")) == [f"chunk-{i:05d}.parquet" for i in range(4)]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    assert manifest["key"] == key_dir.name and manifest["n_samples"] == 120 and [c["rows"] for c in manifest["chunks"]] == [32, 32, 32, 24]


def test_position_offset_reproduces_the_whole_split_batches(trained_mlp, tiny_split):
    network, _ = trained_mlp
    full, full_adv = whole(network, tiny_split, PGD, return_adversarial=True)
    part = Split("validation", tiny_split.images[48:96], tiny_split.labels[48:96], tiny_split.sample_index[48:96], 10, "digits")
    piece, piece_adv = whole(network, part, PGD, return_adversarial=True, position_offset=48)
    assert torch.equal(piece_adv, full_adv[48:96])
    pd.testing.assert_frame_equal(piece, full.iloc[48:96].reset_index(drop=True))


def test_cached_rerun_reads_shards_without_attacking(trained_mlp, tiny_split, tmp_path, count_attacks):
    network, _ = trained_mlp
    first = chunked(network, tiny_split, APGD, tmp_path)
    assert count_attacks == [0, 32, 64, 96]
    count_attacks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact cache is reused without any warning
        second = chunked(network, tiny_split, APGD, tmp_path)
    assert count_attacks == []
    pd.testing.assert_frame_equal(first, second)
    # provenance is not cached: the same weights attacked under another role get their own labels
    other = engine.run_attack(network, tiny_split, APGD, num_classes=10, seed=0, cache_dir=tmp_path, chunk_size=32,
                              provenance={**PROVENANCE, "model": "at", "split": "test"})
    assert count_attacks == []
    assert set(other["model"]) == {"at"} and set(other["split"]) == {"test"}


def test_key_changes_with_every_input_and_not_with_batch_size_or_cache_dir(trained_mlp, tiny_split):
    network, spec = trained_mlp
    base = engine.run_key(network, tiny_split, APGD, seed=0, chunk_size=32)
    # weights
    other = spec.build()
    other.load_state_dict(network.state_dict())
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    assert engine.run_key(other, tiny_split, APGD, 0, 32) != base
    # data: one pixel, one label, one sample index
    images = tiny_split.images.clone()
    images[0, 0, 0, 0] = 1 - images[0, 0, 0, 0]
    assert engine.run_key(network, (images, tiny_split.labels, tiny_split.sample_index), APGD, 0, 32) != base
    index = tiny_split.sample_index.clone()
    index[0] += 10_000
    assert engine.run_key(network, (tiny_split.images, tiny_split.labels, index), APGD, 0, 32) != base
    # attack config, seed, chunk size
    assert engine.run_key(network, tiny_split, APGD.model_copy(update={"steps": 6}), 0, 32) != base
    assert engine.run_key(network, tiny_split, APGD.model_copy(update={"eps": 0.05}), 0, 32) != base
    assert engine.run_key(network, tiny_split, ENSEMBLE, 0, 32) != base
    assert engine.run_key(network, tiny_split, APGD, 1, 32) != base
    assert engine.run_key(network, tiny_split, APGD, 0, 64) != base
    # not: batch size (not part of the attack's identity), cache_dir (not an input of the key)
    assert engine.run_key(network, tiny_split, APGD.model_copy(update={"batch_size": 32}), 0, 32) == base
    assert engine.attack_key("m", "s", APGD.identity(), 0, 32) == engine.attack_key("m", "s", APGD.identity(), 0, 32)
    assert engine.attack_key("m", "s", APGD.identity(), 0, 32) != engine.attack_key("m2", "s", APGD.identity(), 0, 32)
    assert engine.attack_key("m", "s", APGD.identity(), 0, 32) != engine.attack_key("m", "s2", APGD.identity(), 0, 32)


def test_same_key_in_any_cache_dir(trained_mlp, tiny_split, tmp_path):
    network, _ = trained_mlp
    chunked(network, tiny_split, APGD, tmp_path / "a", chunk_size=64)
    chunked(network, tiny_split, APGD.model_copy(update={"batch_size": 32}), tmp_path / "b", chunk_size=64)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [p.name for p in (tmp_path / "b").iterdir()]


def test_chunk_size_must_be_a_multiple_of_batch_size(trained_mlp, tiny_split, tmp_path):
    network, _ = trained_mlp
    with pytest.raises(InputError, match="multiple of attack.batch_size 16"):
        chunked(network, tiny_split, APGD, tmp_path, chunk_size=40)


def test_corrupt_or_foreign_shard_is_recomputed_with_a_warning(trained_mlp, tiny_split, tmp_path, count_attacks):
    network, _ = trained_mlp
    first = chunked(network, tiny_split, APGD, tmp_path)
    key_dir = next(tmp_path.iterdir())
    shard = key_dir / "chunk-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-40] + b"\0" * 40)  # a truncated footer
    count_attacks.clear()
    with pytest.warns(engine.CacheWarning, match="chunk-00001"):
        again = chunked(network, tiny_split, APGD, tmp_path)
    assert count_attacks == [32]
    pd.testing.assert_frame_equal(first, again)
    # a shard from another chunk in its place (valid parquet, wrong rows) is caught too, even without a manifest
    (key_dir / "manifest.json").unlink()
    (key_dir / "chunk-00002.parquet").write_bytes((key_dir / "chunk-00000.parquet").read_bytes())
    count_attacks.clear()
    with pytest.warns(engine.CacheWarning, match="chunk-00002"):
        third = chunked(network, tiny_split, APGD, tmp_path)
    assert count_attacks == [64]
    pd.testing.assert_frame_equal(first, third)
    assert (key_dir / "manifest.json").is_file()


def test_manifest_of_another_key_is_not_trusted(trained_mlp, tiny_split, tmp_path, count_attacks):
    network, _ = trained_mlp
    first = chunked(network, tiny_split, APGD, tmp_path)
    manifest_path = next(tmp_path.iterdir()) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "key": "0" * 64}))
    count_attacks.clear()
    with pytest.warns(engine.CacheWarning, match="another key"):
        again = chunked(network, tiny_split, APGD, tmp_path)
    assert count_attacks == []  # the shards themselves are intact and carry the right key
    pd.testing.assert_frame_equal(first, again)
    assert json.loads(manifest_path.read_text())["key"] == manifest["key"]


def test_save_adversarial_writes_float32_points_per_chunk(trained_mlp, tiny_split, tmp_path):
    from rcat.safe_io import read_tensors

    network, _ = trained_mlp
    _, expected_adv = whole(network, tiny_split, APGD, return_adversarial=True)
    chunked(network, tiny_split, APGD, tmp_path, chunk_size=64, save_adversarial=True)
    key_dir = next(tmp_path.iterdir())
    pieces = [read_tensors(key_dir / f"chunk-{i:05d}.adversarial.safetensors")[0] for i in range(2)]
    assert all(p["adversarial"].dtype == torch.float32 for p in pieces)
    assert torch.equal(torch.cat([p["adversarial"] for p in pieces]), expected_adv)
    assert torch.equal(torch.cat([p["sample_index"] for p in pieces]), tiny_split.sample_index)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from safetensors.torch import load_file
    from rcat import engine
    from rcat.config import AttackConfig, DataConfig
    from rcat.data import load_dataset, split_dataset
    from rcat.models import ModelSpec

    weights, cache_dir = sys.argv[1], sys.argv[2]
    network = ModelSpec("mlp", (1, 8, 8), 10, {"hidden": [32]}).build()
    network.load_state_dict(load_file(weights))
    split = split_dataset(load_dataset("digits"), DataConfig(), seed=0)["validation"]
    images, labels, index = split.images[:120], split.labels[:120], split.sample_index[:120]
    compute = engine.compute_chunk

    def slow(*args, **kwargs):  # slow enough to be killed midway
        record = compute(*args, **kwargs)
        time.sleep(0.4)
        return record

    engine.compute_chunk = slow
    config = AttackConfig(name="apgd", loss="dlr", eps=0.1, steps=5, batch_size=16)
    engine.run_attack(network, (images, labels, index), config, num_classes=10, seed=0, cache_dir=cache_dir, chunk_size=16,
                      provenance={"split": "validation", "model": "mlp", "model_digest": "m" * 64, "split_digest": "s" * 64})
""")


def test_killed_run_resumes_at_the_first_missing_shard(trained_mlp, tiny_split, tmp_path, count_attacks):
    network, _ = trained_mlp
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    cache = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(weights), str(cache)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 45
    try:
        while time.monotonic() < deadline and len(list(cache.glob("*/chunk-*.parquet"))) < 3:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = sorted(p.name for p in cache.glob("*/chunk-*.parquet"))
    assert 3 <= len(done) < 8, done
    assert not list(cache.glob("*/manifest.json"))
    count_attacks.clear()
    resumed = chunked(network, tiny_split, APGD, cache, chunk_size=16)
    assert count_attacks == [16 * i for i in range(len(done), 8)]  # only the missing chunks ran
    uninterrupted = chunked(network, tiny_split, APGD, tmp_path / "clean", chunk_size=16)
    pd.testing.assert_frame_equal(resumed, uninterrupted)
    pd.testing.assert_frame_equal(resumed, whole(network, tiny_split, APGD))


# ---------------------------------------------------------------- ensembles


def test_ensemble_records_the_worst_case_and_who_broke_each_sample(trained_mlp, tiny_split, monkeypatch):
    network, _ = trained_mlp
    sizes: dict[str, list[int]] = {}
    original_build = attacks_module.build_attack

    def recording_build(net, config, num_classes, seed=0):
        attack = original_build(net, config, num_classes, seed=seed)

        def call(x, y):
            sizes.setdefault(config.label(), []).append(len(y))
            return attack(x, y)

        return call

    monkeypatch.setattr(attacks_module, "build_attack", recording_build)
    frame, x_adv = whole(network, tiny_split, ENSEMBLE, return_adversarial=True)
    monkeypatch.setattr(attacks_module, "build_attack", original_build)
    first_alone = whole(network, tiny_split, WEAK)
    assert tuple(frame.columns) == (*OUTCOME_COLUMNS, "broken_by")
    weak, strong = WEAK.label(), PGD.label()
    by = frame["broken_by"]
    # the first attack runs on every clean-correct sample, exactly as when it runs alone
    assert sum(sizes[weak]) == int(frame["clean_correct"].sum())
    assert ((by == weak) == (frame["clean_correct"] & ~first_alone["robust"])).all()
    # the second attack runs only on the samples still robust after the first
    assert sum(sizes[strong]) == int((frame["clean_correct"] & first_alone["robust"]).sum())
    second = by == strong
    assert second.any(), "PGD at eps 0.1 should break samples FGSM at eps 0.02 misses"
    assert not frame.loc[second, "robust"].any() and first_alone.loc[second, "robust"].all()
    assert ((by != "") == (frame["clean_correct"] & ~frame["robust"])).all()  # broken_by is set exactly on the broken samples
    # samples robust to all attacks stay robust; clean mistakes are never attacked and never "broken"
    survivors = frame["clean_correct"] & (by == "")
    assert survivors.any() and frame.loc[survivors, "robust"].all()
    assert (by[~frame["clean_correct"]] == "").all()
    wrong = torch.from_numpy(~frame["clean_correct"].to_numpy())
    assert torch.equal(x_adv[wrong], tiny_split.images[wrong])
    assert float((x_adv - tiny_split.images).abs().max()) <= EPS + 1e-6
    assert json.loads(frame["attack_config"].iloc[0]) == {"ensemble": [WEAK.identity(), PGD.identity()]}


def test_autoattack_standard_preset_has_the_original_settings_and_the_seed(trained_mlp):
    network, _ = trained_mlp
    preset = AttackConfig(preset="autoattack-standard", eps=8 / 255, batch_size=64)
    members = preset.members()
    assert [(m.name, m.loss if m.name == "apgd" else None, m.steps, m.restarts) for m in members] == [
        ("apgd", "ce", 100, 1), ("apgdt", None, 100, 1), ("fab_t", None, 100, 1), ("square", None, 5000, 1)]
    assert all(m.eps == 8 / 255 and m.batch_size == 64 for m in members)
    built = [build_attack(network, m, 10, seed=42) for m in members]
    assert [type(a).__name__ for a in built] == ["APGD", "APGDT", "FAB", "Square"]
    assert built[0].loss == "ce" and built[0].steps == 100
    assert built[1].steps == 100
    assert built[2].multi_targeted is True and built[2].steps == 100
    assert built[3].n_queries == 5000
    assert all(a.seed == 42 for a in built)
    assert preset.label() == "autoattack-standard:Linf:eps=0.0313725"
    with pytest.raises(InputError, match="ensemble"):
        build_attack(network, preset, 10)


def test_cascade_preset_is_a_cheap_apgd_then_the_configured_attack_and_never_weaker(trained_mlp, tiny_split):
    network, _ = trained_mlp
    full = AttackConfig(name="apgd", loss="dlr", eps=EPS, steps=20, batch_size=16)
    cascade = full.model_copy(update={"preset": "cascade"})
    cheap, second = cascade.members()
    assert (cheap.name, cheap.loss, cheap.steps, cheap.eps) == ("apgd", "ce", 10, EPS)
    assert second.identity() == full.identity() and not second.is_ensemble
    assert cascade.label() == f"cascade[{cheap.label()},{full.label()}]"
    frame = whole(network, tiny_split, cascade)
    cheap_alone = whole(network, tiny_split, cheap)
    full_alone = whole(network, tiny_split, full)
    # worst case over both: nothing the cheap attack breaks survives, and robust accuracy is at most the cheap attack's
    assert not (frame["robust"] & ~cheap_alone["robust"]).any()
    assert set(frame["broken_by"]) <= {"", cheap.label(), full.label()}
    # as strong as the full attack alone up to its randomness on a different subset: at most a few samples differ
    extra = int((frame["robust"] & ~full_alone["robust"]).sum())
    assert extra <= max(2, int(0.02 * len(frame))), extra
    assert frame["robust"].sum() <= full_alone["robust"].sum() + extra


def test_ensemble_params_validate_and_single_attack_params_stay_valid():
    raw = {"finetune": {"methods": {"at": {"loss": "at"}}}}
    single = parse_params({**raw, "attack": {"name": "apgd", "loss": "dlr", "steps": 50}})
    assert not single.attack.is_ensemble and single.attack.identity()["name"] == "apgd" and single.attack.members() == [single.attack]
    ensemble = parse_params({**raw, "attack": {"batch_size": 8, "ensemble": [{"name": "apgd", "loss": "ce"}, {"name": "square", "loss": "ce"}]}})
    assert [m.name for m in ensemble.attack.members()] == ["apgd", "square"]
    with pytest.raises(ConfigError, match="not both"):
        parse_params({**raw, "attack": {"preset": "autoattack-standard", "ensemble": [{"name": "apgd"}]}})
    with pytest.raises(ConfigError, match="nested"):
        parse_params({**raw, "attack": {"ensemble": [{"preset": "autoattack-standard"}]}})


def test_engine_params_validate():
    raw = {"finetune": {"methods": {"at": {"loss": "at"}}}, "attack": {"batch_size": 100}}
    params = parse_params(raw)
    assert params.engine == EngineConfig()
    assert params.engine.effective_chunk_size(100) == 1000  # the default, rounded down to whole batches
    with pytest.raises(ConfigError, match="multiple of attack.batch_size"):
        parse_params({**raw, "engine": {"chunk_size": 250}})
    with pytest.raises(ConfigError, match="outside data/"):
        parse_params({**raw, "engine": {"cache_dir": "data/cache"}})
    with pytest.raises(ConfigError, match="unknown key 'engine.threads'"):
        parse_params({**raw, "engine": {"threads": 2}})


def test_pipeline_attacks_go_through_the_engine_cache(trained_mlp, tiny_split, tmp_path, count_attacks):
    from rcat.models import LoadedModel
    from rcat.pipeline import attack_model_on_splits

    network, spec = trained_mlp
    model = LoadedModel(network, spec, "d" * 64, "mem")
    config = EngineConfig(cache_dir=str(tmp_path / "cache"), chunk_size=64)
    first = attack_model_on_splits(model, "old", {"validation": tiny_split}, APGD, 0, torch.device("cpu"), config)
    assert len(count_attacks) == 2 and len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
    second = attack_model_on_splits(model, "new", {"validation": tiny_split}, APGD, 0, torch.device("cpu"), config)
    assert len(count_attacks) == 2
    pd.testing.assert_frame_equal(first.drop(columns="model"), second.drop(columns="model"))
    assert set(second["model"]) == {"new"} and set(second["model_digest"]) == {"d" * 64}


# ---------------------------------------------------------------- Dask scale-out


def test_local_workers_give_the_single_process_result_and_leave_the_environment_alone(trained_mlp, tiny_split, tmp_path):
    network, _ = trained_mlp
    single = chunked(network, tiny_split, APGD, tmp_path / "single", chunk_size=32)
    environment = dict(os.environ)
    threads = torch.get_num_threads()
    parallel = chunked(network, tiny_split, APGD, tmp_path / "workers", chunk_size=32, workers=2)
    pd.testing.assert_frame_equal(parallel, single)
    summary = engine.summary_of(parallel)
    assert (summary.workers, summary.chunks_computed, summary.robust_accuracy) == (2, 4, engine.summary_of(single).robust_accuracy)
    assert dict(os.environ) == environment and torch.get_num_threads() == threads  # nothing set in this process
    key_dir = next((tmp_path / "workers").iterdir())
    assert (key_dir / "manifest.json").is_file() and len(list(key_dir.glob("chunk-*.parquet"))) == 4
    # the workers wrote the shards with one torch thread each
    assert {record["torch_threads"] for record in json.loads((key_dir / "manifest.json").read_text())["chunks"]} == {1}


@pytest.mark.slow
def test_an_existing_dask_cluster_gives_the_single_process_result(trained_mlp, tiny_split, tmp_path):
    distributed = pytest.importorskip("distributed")
    network, _ = trained_mlp
    single = chunked(network, tiny_split, APGD, tmp_path / "single", chunk_size=32)
    # the cluster is the user's (its nanny sets worker variables in this process when it starts them); rcat's run on it changes nothing
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        environment = dict(os.environ)
        on_cluster = chunked(network, tiny_split, APGD, tmp_path / "dask", chunk_size=32, dask_address=cluster.scheduler_address)
        assert dict(os.environ) == environment
    pd.testing.assert_frame_equal(on_cluster, single)
    assert engine.summary_of(on_cluster).workers == 2


@pytest.mark.slow
def test_a_cluster_started_under_dask_config_spawns_workers_without_the_nannys_malloc_variable():
    """distributed's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536 (attacks 1.6-2.1x slower, docs/BENCHMARKS.md);
    DASK_CONFIG unsets it for the cluster a user starts with it, and keeps the one-thread numeric settings."""
    distributed = pytest.importorskip("distributed")
    import dask

    from rcat.dask_executor import DASK_CONFIG

    saved = dict(os.environ)  # the nanny writes its variables into the environment of the process that starts it
    try:
        seen = {}
        for name, settings in (("shipped", {}), ("rcat", DASK_CONFIG)):
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # set by an earlier cluster in this process, workers would inherit it
            with dask.config.set(settings), distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                                     dashboard_address=None) as cluster, distributed.Client(cluster) as client:
                seen[name] = client.submit(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")), pure=False).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert seen == {"shipped": ("65536", "1"), "rcat": (None, "1")}


def test_no_module_of_the_core_imports_prefect():
    """Orchestration lives in pipelines/: the library never imports Prefect (a grep of rcat/ would show the same)."""
    offenders = [path.name for path in (Path(engine.__file__).parent).glob("*.py")
                 if re.search(r"^\s*(from|import)\s+prefect", path.read_text(), re.MULTILINE)]
    assert offenders == [], offenders


def test_the_serial_executor_runs_in_order_and_the_local_pool_covers_every_item():
    from rcat.executors import LocalProcessExecutor, SerialExecutor

    with SerialExecutor() as serial:
        assert list(serial.map_unordered(divmod, 7, [1, 2, 3])) == [(0, (7, 0)), (1, (3, 1)), (2, (2, 1))]
    with LocalProcessExecutor(2) as pool:
        assert sorted(pool.map_unordered(divmod, 7, [1, 2, 3, 4, 5])) == [(0, (7, 0)), (1, (3, 1)), (2, (2, 1)), (3, (1, 3)), (4, (1, 2))]
        assert list(pool.map_unordered(divmod, 7, [])) == []


# ---------------------------------------------------------------- summary and progress


def test_every_frame_carries_a_run_summary_and_the_manifest_records_it(trained_mlp, tiny_split, tmp_path):
    network, _ = trained_mlp
    first = chunked(network, tiny_split, APGD, tmp_path)
    summary = engine.summary_of(first)
    assert summary is not None and summary.key == next(tmp_path.iterdir()).name
    assert (summary.samples, summary.chunks, summary.chunks_computed, summary.chunks_reused, summary.samples_computed, summary.workers) == (120, 4, 4, 0, 120, 1)
    assert summary.robust_accuracy == pytest.approx(first["robust"].mean()) and summary.clean_accuracy == pytest.approx(first["clean_correct"].mean())
    assert summary.seconds > 0 and summary.samples_per_second == pytest.approx(120 / summary.seconds)
    metrics = summary.metrics()
    assert set(metrics) == {"samples", "seconds", "samples_per_s", "robust_accuracy", "clean_accuracy", "chunks_computed", "chunks_reused",
                            "samples_computed", "workers"}
    assert all(isinstance(value, float) for value in metrics.values())
    manifest = json.loads((next(tmp_path.iterdir()) / "manifest.json").read_text())
    assert manifest["summary"]["chunks_computed"] == 4 and manifest["summary"]["robust_accuracy"] == pytest.approx(summary.robust_accuracy)
    assert sum(chunk["robust"] for chunk in manifest["chunks"]) == int(first["robust"].sum())
    # a rerun reuses every chunk; its summary says so (the manifest keeps the computing run's)
    again = engine.summary_of(chunked(network, tiny_split, APGD, tmp_path))
    assert (again.chunks_computed, again.chunks_reused, again.samples_computed) == (0, 4, 0)
    assert again.robust_accuracy == summary.robust_accuracy
    assert json.loads((next(tmp_path.iterdir()) / "manifest.json").read_text())["summary"]["chunks_computed"] == 4
    assert engine.summary_of(pd.DataFrame()) is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("progress", [None, True])
def test_progress_bar_on_a_terminal_shows_rate_and_robust_accuracy(trained_mlp, tiny_split, tmp_path, monkeypatch, progress):
    network, _ = trained_mlp
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    frame = chunked(network, tiny_split, APGD, tmp_path, progress=progress)
    text = terminal.getvalue()
    final = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "120/120" in final and "samples/s" in final, final
    assert f"robust acc {frame['robust'].mean():.4f}" in final, final


def test_progress_without_a_terminal_prints_lines_only_when_asked(trained_mlp, tiny_split, tmp_path, monkeypatch):
    network, _ = trained_mlp
    pipe = _Pipe()
    monkeypatch.setattr(sys, "stderr", pipe)
    chunked(network, tiny_split, APGD, tmp_path / "quiet")  # default: no terminal, no output (DVC and CI logs stay clean)
    chunked(network, tiny_split, APGD, tmp_path / "off", progress=False)
    assert pipe.getvalue() == ""
    frame = chunked(network, tiny_split, APGD, tmp_path / "lines", progress=True)
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in pipe.getvalue()
    assert lines[0].endswith(f"chunk 1/4 computed; 32/120 samples, {lines[0].split(', ')[1]}, robust accuracy so far {frame['robust'][:32].mean():.4f}")
    assert "samples/s" in lines[0] and lines[-1].endswith(f"robust accuracy so far {frame['robust'].mean():.4f}")
    pipe.truncate(0)
    pipe.seek(0)
    chunked(network, tiny_split, APGD, tmp_path / "lines", progress=True)
    assert pipe.getvalue().splitlines() == [lines[0].split("]")[0] + "] 4/4 chunks reused from the cache"]


def test_task_groups_are_guided_and_cover_every_chunk_in_order():
    jobs = [(i, 32 * i) for i in range(10)]
    groups = engine.task_groups(jobs, workers=2)
    assert [len(group) for group in groups] == [3, 2, 2, 1, 1, 1]  # ceil(remaining / 4) each
    assert [job for group in groups for job in group] == jobs
    assert engine.task_groups(jobs[:3], workers=2) == [[job] for job in jobs[:3]]
    assert [len(group) for group in engine.task_groups(jobs, workers=1)] == [5, 3, 1, 1]
    assert engine.task_groups([], workers=2) == []
    capped = engine.task_groups(jobs, workers=1, max_chunks=2)
    assert [len(group) for group in capped] == [2, 2, 2, 2, 1, 1] and [job for group in capped for job in group] == jobs
    assert [len(group) for group in engine.task_groups(jobs[:2], workers=1, max_chunks=0)] == [1, 1]  # a chunk above the cap still runs


class _FinishInOrder:
    """distributed.as_completed's interface (iterate, ``add`` while iterating) over futures that
    finish in the order given by ``finish`` (submission order by default)."""

    def __init__(self, futures, finish=None):
        self.queue, self.finish = list(futures), finish

    def add(self, future):
        self.queue.append(future)

    def __iter__(self):
        while self.queue:
            chosen = self.finish(self.queue) if self.finish else self.queue[0]
            self.queue.remove(chosen)
            yield chosen


def test_keep_slots_busy_submits_in_order_one_per_slot_and_refills_the_slot_that_freed():
    submitted, running, most = [], set(), 0

    def submit(item, slot):
        nonlocal most
        submitted.append((item, slot))
        running.add(item)
        most = max(most, len(running))
        return item, f"handle-{item}"

    def finish_first(queue):  # the oldest finishes: no longer running once as_completed yields it
        running.discard(queue[0])
        return queue[0]

    received = []
    for item, handle in keep_slots_busy(range(6), ["a", "b"], submit, lambda futures: _FinishInOrder(futures, finish_first)):
        assert handle == f"handle-{item}"
        # the freed slot is refilled before the caller handles the result
        assert [i for i, _ in submitted] == list(range(min(6, len(received) + 3)))
        received.append(item)
    assert most == 2 and received == list(range(6))
    assert submitted == [(0, "a"), (1, "b"), (2, "a"), (3, "b"), (4, "a"), (5, "b")]


def test_keep_slots_busy_gives_the_next_item_to_the_slot_that_freed_first():
    # the last submitted finishes first: each next item goes to the slot of the one that finished
    def latest(queue):
        return queue[-1]

    placed = {}

    def submit(item, slot):
        placed[item] = slot
        return item, item

    received = [item for item, _ in keep_slots_busy(range(5), ["a", "b", "c"], submit, lambda futures: _FinishInOrder(futures, latest))]
    assert received == [2, 3, 4, 1, 0]
    assert placed == {0: "a", 1: "b", 2: "c", 3: "c", 4: "c"}
    assert list(keep_slots_busy([], ["a"], submit, _FinishInOrder)) == []
    assert [item for item, _ in keep_slots_busy(range(2), ["a"] * 8, submit, _FinishInOrder)] == [0, 1]
