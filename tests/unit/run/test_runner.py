"""Resource planning and expected output rows, without starting Ray."""

import pytest

from pipeline.config import parse_job
from pipeline.errors import JobError, RunError
from pipeline.run.dataset import input_rows
from pipeline.run.plan import expected_ids
from pipeline.run.resources import MIN_OBJECT_STORE, TILE_BYTES, object_store_budget, resources_for

BASE = {"task": "caption", "input": "in", "output": "out", "model": "m"}


def test_cpu_cluster_leaves_cpus_for_preprocessing():
    r = resources_for(parse_job(BASE, overrides=["compute.replicas=2"]), cluster_cpus=8, cluster_gpus=0)
    assert (r.replicas, r.gpus_per_replica, r.cpu_workers) == ((2, 2), 0.0, 6)


def test_gpu_cluster_puts_replicas_on_gpus():
    r = resources_for(parse_job(BASE, overrides=["compute.replicas=4"]), cluster_cpus=32, cluster_gpus=4)
    assert (r.gpus_per_replica, r.cpu_workers) == (1.0, 32)


def test_explicit_cpu_workers_and_cpu_device_on_gpu_cluster():
    job = parse_job(BASE, overrides=["compute.device=cpu", "compute.cpu_workers=3"])
    r = resources_for(job, cluster_cpus=16, cluster_gpus=8)
    assert (r.gpus_per_replica, r.cpu_workers) == (0.0, 3)


def test_cuda_without_gpus_is_refused():
    with pytest.raises(RunError, match="GPUs"):
        resources_for(parse_job(BASE, overrides=["compute.device=cuda"]), cluster_cpus=4, cluster_gpus=0)


def test_object_store_budget_is_a_few_batches_of_the_largest_samples_per_replica():
    def budget(*overrides):
        job = parse_job(BASE, overrides=list(overrides))
        return object_store_budget(job, resources_for(job, cluster_cpus=64, cluster_gpus=8))

    assert budget() == 8 * 8 * 13 * TILE_BYTES  # 8 batches of 8 samples of 12 tiles + thumbnail: 478 MiB
    assert budget("compute.batch_size=2") == MIN_OBJECT_STORE
    assert budget("compute.replicas=[1, 4]", "compute.batch_size=16") == 8 * 16 * 13 * TILE_BYTES * 4
    assert budget("compute.batch_size=16", "video.num_frames=32") == 8 * 16 * 32 * TILE_BYTES
    assert budget("compute.object_store_mb=100") == 100 * 1024**2
    job = parse_job(BASE)
    resources = resources_for(job, cluster_cpus=4, cluster_gpus=0)
    assert object_store_budget(job, resources, cluster_store=400 * 1024**2) == 200 * 1024**2  # half the cluster's store
    with pytest.raises(Exception, match="object_store_mb"):
        parse_job(BASE, overrides=["compute.object_store_mb=1"])


def test_input_rows_are_lazy_read_tasks_carrying_only_their_rows():
    import pyarrow as pa
    from ray import cloudpickle  # how Ray ships a read task

    rows = pa.table({"id": [f"{i:06d}" for i in range(10_000)], "uri": [f"s3://bucket/images/{i:06d}.jpg" for i in range(10_000)]})
    tasks = input_rows(rows, per_block=16).get_read_tasks(parallelism=1)
    assert len(tasks) == 625 and [t.metadata.num_rows for t in tasks[-2:]] == [16, 16]
    blocks = [block for task in tasks for block in task()]
    assert pa.concat_tables(blocks).equals(rows)
    assert len(cloudpickle.dumps(tasks[3])) < 10_000  # a slice of the listing would pickle all 10k rows (~400 KB)


def test_expected_ids_one_per_question():
    import pyarrow as pa

    rows = pa.table({"id": ["a", "b", "c"], "questions": [["q1", "q2"], None, []]})
    job = parse_job({**BASE, "task": "vqa", "questions": ["x", "y", "z"]})
    assert expected_ids(job, rows) == [["a#0", "a#1"], ["b#0", "b#1", "b#2"], ["c#0", "c#1", "c#2"]]
    assert expected_ids(parse_job(BASE), pa.table({"id": ["a"]})) == [["a"]]


def test_metrics_count_rows_by_status_and_error_type(monkeypatch):
    import pipeline.run.metrics as runner
    from pipeline.stages.write import ShardStats

    class FakeCounter:
        made: dict = {}

        def __init__(self, name, description="", tag_keys=()):
            self.calls = []
            FakeCounter.made[name] = self

        def inc(self, value, tags=None):
            self.calls.append((value, tags))

    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Counter", FakeCounter)
    monkeypatch.setattr(runner, "_METRICS", {})
    runner.record_metrics(ShardStats(ok=3, errors={"decode_error": 1, "not_found": 2}, tiles=10, generated_tokens=0))
    rows = FakeCounter.made["internvl_batch_rows"].calls
    assert sorted((v, t["status"], t["error_type"]) for v, t in rows) == [
        (1, "error", "decode_error"), (2, "error", "not_found"), (3, "ok", "")]
    assert FakeCounter.made["internvl_batch_tiles"].calls == [(10, None)]
    assert FakeCounter.made["internvl_batch_generated_tokens"].calls == []


def test_engine_is_chosen_once_at_plan_time():
    from pipeline.run.dataset import model_stage_class
    from pipeline.stages.generate import AsyncGenerate, Generate
    from pipeline.stages.score import AsyncScore, Score

    job = parse_job(BASE)
    assert resources_for(job, cluster_cpus=8, cluster_gpus=2, vllm_installed=True).engine == "vllm"
    assert resources_for(job, cluster_cpus=8, cluster_gpus=2, vllm_installed=False).engine == "transformers"
    assert resources_for(job, cluster_cpus=8, cluster_gpus=0, vllm_installed=True).engine == "transformers"
    forced = parse_job(BASE, overrides=["compute.engine=transformers"])
    assert resources_for(forced, cluster_cpus=8, cluster_gpus=2, vllm_installed=True).engine == "transformers"
    with pytest.raises(JobError, match="not installed"):
        resources_for(parse_job(BASE, overrides=["compute.engine=vllm"]), cluster_cpus=8, cluster_gpus=2)
    assert model_stage_class("caption", "vllm") is AsyncGenerate and model_stage_class("vqa", "transformers") is Generate
    assert model_stage_class("score", "vllm") is AsyncScore and model_stage_class("score", "transformers") is Score
    # vllm-native (vLLM's own InternVL path, the baseline): only when asked for, never by auto; async like vllm
    native = parse_job(BASE, overrides=["compute.engine=vllm-native", "compute.vllm.max_concurrent_batches=3"])
    r = resources_for(native, cluster_cpus=8, cluster_gpus=2, vllm_installed=True)
    assert r.engine == "vllm-native" and r.model_stage_args()["max_concurrency"] == 3
    with pytest.raises(JobError, match="vllm-native, but vLLM is not installed"):
        resources_for(native, cluster_cpus=8, cluster_gpus=2)
    assert model_stage_class("vqa", "vllm-native") is AsyncGenerate and model_stage_class("score", "vllm-native") is AsyncScore
    assert native.fingerprint() != parse_job(BASE, overrides=["compute.engine=vllm"]).fingerprint()  # other tiles
    assert parse_job(BASE, overrides=["compute.engine=vllm"]).fingerprint() == job.fingerprint()


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vllm_replica_is_one_actor_holding_its_tp_gpus(tp):
    """vLLM runs its tensor-parallel workers itself: one Ray Data actor per replica asks for all tp GPUs (Ray puts
    them on one node), no placement group; several batches in flight (max_concurrency); a replica whose engine
    died is restarted a bounded number of times, its batches re-run (max_restarts, max_task_retries)."""
    from pipeline.run.resources import VLLM_RESTARTS

    restarts = {"max_restarts": VLLM_RESTARTS, "max_task_retries": -1}
    job = parse_job(BASE, overrides=[f"compute.tp={tp}", "compute.engine=vllm", "compute.replicas=2",
                                     "compute.vllm.max_concurrent_batches=6"])
    r = resources_for(job, cluster_cpus=64, cluster_gpus=16, node_gpus=8, vllm_installed=True)
    assert r.model_stage_args() == {"num_cpus": 1.0, "num_gpus": float(tp), "max_concurrency": 6, **restarts}
    assert r.cpu_workers == 64
    with pytest.raises(RunError, match=f"compute.tp={tp * 2} needs {tp * 2} GPUs on one node"):
        resources_for(parse_job(BASE, overrides=[f"compute.tp={tp * 2}", "compute.engine=vllm"]),
                       cluster_cpus=64, cluster_gpus=4 * tp, node_gpus=tp, vllm_installed=True)
    cpu = resources_for(job, cluster_cpus=8, cluster_gpus=0, vllm_installed=True)  # the CPU test lane
    assert cpu.model_stage_args() == {"num_cpus": 1.0, "num_gpus": None, "max_concurrency": 6, **restarts}


def test_replica_usage_counts_overlapping_batches_once_and_gives_rates():
    from pipeline.run.summary import RunTally
    from pipeline.stages.busy_clock import BusyClock

    clock = BusyClock()  # two batches in flight together (the async stage), then one alone
    clock.begin(), clock.begin()
    assert clock.end() >= 0 and clock.in_flight == 1
    first = clock.end()
    clock.begin()
    assert clock.end() >= first and clock.in_flight == 0
    # `busy` is the replica's cumulative busy seconds at each batch's end
    batches = [{"replica": "a", "ready": 0.0, "start": 1.0, "end": 3.0, "samples": 8, "tokens": 800, "busy": 2.0},
               {"replica": "a", "ready": 0.0, "start": 2.0, "end": 5.0, "samples": 8, "tokens": 400, "busy": 4.0},
               {"replica": "b", "ready": 0.0, "start": 1.0, "end": 2.0, "samples": 2, "tokens": 0, "busy": 1.0}]
    # a vLLM replica's prefix cache: prompt tokens looked up and found, cumulative like `busy`
    batches[1].update(cache_queries=300, cache_hits=200)
    batches[0].update(cache_queries=100, cache_hits=0)
    tally = RunTally()
    tally.add(0, 0, 0, batches[1:2])
    tally.add(0, 0, 0, [batches[0], batches[2]])  # shards arrive in any order
    busy, usage = tally.replica_usage()
    assert usage["a"] == {"batches": 2, "busy_s": 4.0, "span_s": 5.0, "samples": 16, "generated_tokens": 1200,
                          "images_per_s": 4.0, "tokens_per_s": 300.0, "prefix_cache_queries": 300,
                          "prefix_cache_hit_rate": round(2 / 3, 4)}
    assert usage["b"]["images_per_s"] == 2.0 and busy == round(5 / 7, 4)
    assert "prefix_cache_hit_rate" not in usage["b"]  # the transformers engine has no prefix cache


@pytest.mark.parametrize("overrides", [["compute.tp=2"], ["compute.replicas=2"], ["compute.tp=2", "compute.replicas=2"]])
def test_tp_and_replicas_on_a_two_cpu_machine_share_the_cpus(overrides):
    """tp on CPU is for trying tp before a GPU cluster: on 2 CPUs the ranks (or replicas) share what one
    preprocessing task leaves, and the plan says so in one line."""
    job = parse_job(BASE, overrides=[*overrides, "compute.device=cpu"])
    r = resources_for(job, cluster_cpus=2, cluster_gpus=0)
    low = r.replicas[0]
    assert r.cpus_per_replica * low == pytest.approx(1.0)  # 2 CPUs - 1 preprocessing task
    assert r.rank_cpus == pytest.approx(r.cpus_per_replica / r.tp) and r.cpu_workers == 1
    assert r.note.startswith("CPUs shared:") and "\n" not in r.note


def test_shared_rank_cpus_reach_the_placement_group_bundles():
    from pipeline.run.replica import replica_bundles

    r = resources_for(parse_job(BASE, overrides=["compute.tp=2"]), cluster_cpus=2, cluster_gpus=0)
    assert replica_bundles(r.tp, on_gpu=False, rank_cpus=r.rank_cpus) == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert r.model_stage_args() == {"num_cpus": 0, "num_gpus": 0}
    one = resources_for(parse_job(BASE, overrides=["compute.replicas=2"]), cluster_cpus=2, cluster_gpus=0)
    assert one.model_stage_args() == {"num_cpus": 0.5, "num_gpus": None}
    alone = resources_for(parse_job(BASE), cluster_cpus=2, cluster_gpus=0)  # the default on 2 CPUs: nothing shared
    assert (alone.cpus_per_replica, alone.cpu_workers, alone.note) == (1.0, 1, None)


def test_short_gpus_and_a_one_cpu_machine_are_still_refused():
    with pytest.raises(RunError, match="tp=2 needs 2 GPUs on one node"):
        resources_for(parse_job(BASE, overrides=["compute.tp=2"]), cluster_cpus=2, cluster_gpus=2, node_gpus=1)
    with pytest.raises(RunError, match="leave none"):
        resources_for(parse_job(BASE), cluster_cpus=1, cluster_gpus=0)


def test_input_rows_copy_each_block_from_a_contiguous_slice():
    """Regression (issue 16): `take` on the whole listing rebuilt every multi-chunk column once per read task, so
    building the read tasks cost rows x blocks. Counted as bytes allocated, not timed: each block's rows are
    copied once, so the work is a small multiple of the table, however many blocks."""
    import pyarrow as pa

    chunks = [pa.table({"id": [f"{i:06d}" for i in range(s, s + 1000)], "uri": [f"s3://b/{i}.jpg" for i in range(s, s + 1000)],
                        "questions": [["q1", "q2"]] * 1000}) for s in range(0, 20_000, 1000)]
    rows = pa.concat_tables(chunks)  # 20 chunks per column, as a manifest read in parts has
    assert rows.column("id").num_chunks == 20
    pool = pa.default_memory_pool()
    before = pool.total_bytes_allocated()
    tasks = input_rows(rows, per_block=16).get_read_tasks(parallelism=1)
    allocated = pool.total_bytes_allocated() - before
    assert len(tasks) == 1250
    # a copy per block (small buffers, padded): a few times the table; the old `take`: ~1250 times the table (1.1 GB)
    assert allocated < 20 * rows.nbytes, allocated
    assert pa.concat_tables([b for t in tasks for b in t()]).equals(rows)


def test_id_indicators_count_done_missing_and_duplicated_rows():
    import pyarrow as pa

    from pipeline.run.ids import indicators

    grouped = pa.table({"id": ["a", "b", "c", "d", "e", "f", "g"], "e": [1, 1, 2, 0, 1, 1, 1], "d": [1, 0, 1, 1, 2, 0, 1],
                        "first": [1, 1, 1, 0, 1, 1, 1], "sample_id": ["a", "b", "c", None, "e", "f", "g"],
                        "w": [0, 0, 0, 0, 0, 1, 1]})  # f waits for a retry; g was retried, its copy not yet cleared
    sums = {k: sum(v) for k, v in indicators(grouped).to_pydict().items()}
    assert sums == {"rows_expected": 6, "dup_expected": 1, "rows_done": 5, "rows_any": 7, "dup_done": 1, "missing": 1,
                    "unexpected": 1, "rows_waiting": 1, "samples": 6, "rows_out": 6}


def test_shard_totals_sum_to_the_output_counts():
    import pyarrow as pa

    from pipeline.run.sources import SHARD_COLUMN, SIZE_COLUMN
    from pipeline.run.totals import shard_totals

    batch = pa.table({"id": ["a", "b", "c"], "status": ["ok", "error", "error"], "error_type": [None, "not_found", None],
                      "num_tiles": [3, None, 1], "num_input_tokens": [10, 0, 5], "num_generated_tokens": [2, 0, 1],
                      "score": [0.05, None, 0.99], "passed": [True, None, False],
                      SHARD_COLUMN: ["p1", "p1", "p1"], SIZE_COLUMN: [7, 7, 7]})
    row = shard_totals(batch, [("score", "score")], True).to_pylist()[0]
    assert (row["shard"], row["size"]) == ("p1", 7)
    assert (row["rows"], row["ok"], row["tiles"], row["passed"]) == (3, 1, 4, 1)
    assert row["error:not_found"] == 1 and row["error:unknown"] == 1
    assert [row[f"hist:score:{k}"] for k in (0, 9)] == [1, 1]


def test_writer_keeps_only_the_rows_a_resumed_sample_is_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.output import OutputFolder
    from pipeline.io.schema import TODO_COLUMN
    from pipeline.stages.write import WriteShards
    from tests.outputs import done_rows

    rows = done_rows(["s#0", "s#1", "t"], ["/x/s.jpg", "/x/s.jpg", "/x/t.jpg"], sample_ids=["s", "s", "t"])
    rows = rows.append_column(TODO_COLUMN, pa.array([["s#1"], ["s#1"], None], pa.list_(pa.string())))
    job = parse_job({**BASE, "output": str(tmp_path)})
    stats = WriteShards(job, OutputFolder(str(tmp_path)), ["id", "uri", TODO_COLUMN])(rows).to_pylist()[0]
    written = pq.read_table(tmp_path / stats["file"])
    assert stats["rows"] == 2 and written.column("id").to_pylist() == ["s#1", "t"]
    assert TODO_COLUMN not in written.column_names


def test_run_tally_folds_shards_into_totals_and_one_record_per_replica():
    """The driver sums each shard's stats as it arrives (a 100M-row run writes 100k shards of ~125 model batches
    each): totals and per-replica usage, never a list of shards or batches."""
    from pipeline.run.summary import RunTally

    tally = RunTally()
    for s in range(1000):  # 1000 shards, 3 batches each, alternating replicas
        batches = [{"replica": f"r{k % 2}", "ready": 0.0, "start": 10.0 * (3 * s + k), "end": 10.0 * (3 * s + k) + 5}
                   for k in range(3)]
        tally.add(8, 2, 3, batches + batches[:1])  # a batch's timing counted once even if repeated
    busy, replicas = tally.replica_usage()
    assert (tally.shards, tally.rows, tally.tiles, tally.generated_tokens) == (1000, 8000, 2000, 3000)
    assert len(tally.per_replica) == 2 and replicas["r0"]["batches"] + replicas["r1"]["batches"] == 3000
    assert replicas["r0"]["busy_s"] == 5.0 * replicas["r0"]["batches"]
    assert 0 < busy < 1
    assert RunTally().replica_usage() == (None, {})
