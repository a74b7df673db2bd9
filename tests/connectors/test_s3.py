"""S3 storage that cannot be reached: a wrong endpoint is named in the
first line of the error. (Jobs with everything on S3 run in
test_log_end_to_end.py, test_sink_contract.py and the chaos tests.)"""

import time

import pytest

from sluiceway.checkpoint.errors import StorageError
from sluiceway.jobs import run
from sluiceway.jobs.examples import clicks as example


def test_a_wrong_s3_endpoint_is_named_in_the_first_line(s3_endpoint, monkeypatch, capsys):
    import s3fs

    from sluiceway.jobs.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the message is under test, not botocore's retries (~20 s)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        flow = example.build(output="s3://nowhere/out", rows_per_partition=10)
        started = time.time()
        with pytest.raises(StorageError) as err:
            run(flow, "s3://nowhere/ckpt")
        first = str(err.value).splitlines()[0]
        assert first.startswith("checkpoint dir 's3://nowhere/ckpt' is not usable: cannot write s3://nowhere/ckpt/")
        assert 'Could not connect to the endpoint URL: "http://127.0.0.1:9/' in first, first
        assert time.time() - started < 60
        assert main(["log", "topics", "--log-dir", "s3://nowhere/log"]) == 1
        assert "127.0.0.1:9" in capsys.readouterr().err.splitlines()[0]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
