"""Runner configurations: they load, the Dataflow translation is a streaming job with the stateful
update step, and a missing Flink job-server jar gives a clear error."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import cli
from pipelines.freshrec_pipeline import build_pipeline, make_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "runner_configs")
GCP_ENV = {"GOOGLE_CLOUD_PROJECT": "freshrec-demo", "FRESHREC_REGION": "us-central1",
           "FRESHREC_BUCKET": "freshrec-demo-bucket", "FRESHREC_IMAGE": "us-docker.pkg.dev/freshrec-demo/w/worker:1"}


@pytest.mark.parametrize("name", ["direct", "flink", "dataflow"])
def test_configs_load_as_pipeline_flags(name, monkeypatch):
    for k, v in GCP_ENV.items():
        monkeypatch.setenv(k, v)
    flags = cli.load_runner_config(os.path.join(CONFIGS, f"{name}.yaml"))
    runner = {"direct": "DirectRunner", "flink": "FlinkRunner", "dataflow": "DataflowRunner"}[name]
    assert f"--runner={runner}" in flags
    assert not any("${" in f for f in flags)
    if name == "flink":
        assert "--checkpointing_interval=30000" in flags and "--checkpointing_mode=EXACTLY_ONCE" in flags
        assert "--state_backend=rocksdb" in flags and "--parallelism=4" in flags
        assert not any(f.startswith("--flink_job_server_jar") for f in flags)  # unset env var: left out
    if name == "dataflow":
        assert "--enable_streaming_engine" in flags and "--streaming" in flags
        assert any(f.startswith("--resource_hints=accelerator=") for f in flags)


@pytest.mark.parametrize("name, runner", [("flink", "FlinkRunner"), ("dataflow", "DataflowRunner")])
def test_no_option_of_a_runner_config_reads_as_a_typo_of_our_flags(name, runner, monkeypatch):
    """The CLI takes a flag close to one of ours for a typo (``check_unknown``): a new flag of ours must not
    come that close to an option the shipped configs pass to their runner (``--checkpointing_interval``)."""
    for k, v in GCP_ENV.items():
        monkeypatch.setenv(k, v)
    flags = cli.load_runner_config(os.path.join(CONFIGS, f"{name}.yaml"))
    cli.check_unknown(flags, cli.make_parser(), runner)  # raises UsageError on a near miss


def test_dataflow_dry_run_translates_a_streaming_job_with_the_stateful_update(monkeypatch):
    pytest.importorskip("apitools", reason="DataflowRunner needs apache-beam[gcp]")
    for k, v in GCP_ENV.items():
        monkeypatch.setenv(k, v)
    argv = cli.split_runner_config([
        "--runner_config", os.path.join(CONFIGS, "dataflow.yaml"), "--dry_run=True",
        "--events_subscription", "projects/freshrec-demo/subscriptions/events",
        "--scores_topic", "projects/freshrec-demo/topics/scores",
        "--deltas_topic", "projects/freshrec-demo/topics/deltas",
        "--dead_letter_topic", "projects/freshrec-demo/topics/dead-letter",
        "--rollbacks_topic", "projects/freshrec-demo/topics/rollbacks"])
    opts = make_options(argv)
    p = beam.Pipeline(options=opts)
    build_pipeline(p, opts)
    result = p.run()
    job = result.job
    assert job.proto.type.name == "JOB_TYPE_STREAMING"
    update = [t for t in job.proto_pipeline.components.transforms.values()
              if t.unique_name.endswith("UpdateShardModel/ParDo(UpdateShardModelWithIntervalFlush)")]
    assert len(update) == 1
    payload = beam_runner_api_pb2.ParDoPayload.FromString(update[0].spec.payload)
    assert {"buffer", "snapshot", "journal", "meta"} <= set(payload.state_specs)
    assert {"ts-flush_at_watermark", "ts-flush_after_interval"} <= set(payload.timer_family_specs)
    env = job.proto_pipeline.components.environments
    assert any(GCP_ENV["FRESHREC_IMAGE"] in e.payload.decode("latin-1") for e in env.values())


def test_missing_flink_job_server_jar_is_a_clear_error(capsys, tmp_path):
    rc = cli.main(["--runner_config", os.path.join(CONFIGS, "flink.yaml"),
                   "--flink_job_server_jar", str(tmp_path / "missing.jar"), "--output_dir", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "beam-runners-flink-2.2-job-server-2.77.0.jar" in err
    assert "https://repo.maven.apache.org/maven2/org/apache/beam/beam-runners-flink-2.2-job-server/2.77.0/" in err
