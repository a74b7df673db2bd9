"""The README's example job runs as written and commits every kept row once."""

import pathlib
import re

import pytest

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_job_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"## A job\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary, rows = namespace["summary"], namespace["rows"]
    assert summary["stopped"] == "idle" and summary["rows_in"] == 20_000
    kept = [i for p in range(2) for i in range(10_000) if i % 97 >= 5]
    assert rows.num_rows == len(kept)
