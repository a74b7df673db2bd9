"""A user's mistake gives a first line that names it (issue 23), without Ray:
the line the CLI prints, its exit status, and that nothing else leaks
(sluiceway's frames, Ray wrappers, terminal colours)."""

import uuid

import pytest

from sluiceway.checkpoint.storage import JobStorage
from sluiceway.jobs import Dataflow, run
from sluiceway.jobs.cli import main
from sluiceway.jobs.cli.common import error_text
from sluiceway.jobs.cli.run import how_it_ends
from sluiceway.jobs.jobfile import load_flow
from sluiceway.jobs.testing import CollectSink
from sluiceway.operators.sources import GeneratorSource, ListSource


@pytest.fixture(autouse=True)
def no_recorded_cluster(tmp_path, monkeypatch):
    """No command here may find (and join) a cluster `sluiceway up` recorded elsewhere."""
    monkeypatch.setenv("SLUICEWAY_HOME", str(tmp_path / "home"))


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_job_file_with_a_syntax_error_names_file_line_and_error(tmp_path, capsys):
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\nflow = Dataflow('syntax')\nx = (1,\n")
    assert main(["run", str(job), "--embedded"]) == 2
    assert stderr_lines(capsys) == [f"sluiceway: error: {job}:3: SyntaxError: '(' was never closed",
                                    "    x = (1,", "        ^"]


def test_an_error_of_the_flow_leads_and_only_the_users_frames_follow(tmp_path, capsys):
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.sources import ListSource\n"
                   "flow = Dataflow('agg')\n"
                   "rows = flow.source(ListSource([{'k': 1, 'v': 2}]), name='rows')\n"
                   "rows.key_by('k').aggregate([('v', 'median_of_means')], name='a')\n")
    assert main(["run", str(job), "--embedded"]) == 2
    err = stderr_lines(capsys)
    assert err[0].startswith(f"sluiceway: error: {job}:5: aggregate function 'median_of_means' is not supported"), err
    assert err[1:] == [f'  File "{job}", line 5, in <module>',
                       "    rows.key_by('k').aggregate([('v', 'median_of_means')], name='a')"], err


def test_a_users_exception_in_a_helper_shows_its_type_and_the_users_frames_only(tmp_path, capsys):
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("def build():\n    return undefined_name\n")
    job = tmp_path / "job.py"
    job.write_text(f"import {helper}\nflow = {helper}.build()\n")
    assert main(["run", str(job), "--embedded"]) == 2
    err = stderr_lines(capsys)
    assert err[0] == f"sluiceway: error: {tmp_path / helper}.py:2: NameError: name 'undefined_name' is not defined"
    assert [line for line in err if line.lstrip().startswith("File ")] == [
        f'  File "{job}", line 2, in <module>', f'  File "{tmp_path / helper}.py", line 2, in build']


def test_a_helper_module_beside_the_job_file_imports(tmp_path):
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("ROWS = [{'n': 1}, {'n': 2}]\n")
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.sources import ListSource\n"
                   f"import {helper}\n"
                   "flow = Dataflow('helped')\n"
                   f"flow.source(ListSource({helper}.ROWS), name='rows')\n")
    assert list(load_flow(str(job)).graph.steps) == ["rows"]


def test_checkpoints_and_history_of_an_unknown_job_name_the_jobs_there(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    for name in ("clicks", "orders"):
        JobStorage(ckpt, name).write_job({"job": name, "max_key_groups": 128})
    for command in (["checkpoints", "list"], ["history"]):
        assert main([*command, "click", "--checkpoint-dir", ckpt]) == 1
        assert stderr_lines(capsys) == [f"sluiceway: error: no job named 'click' under {ckpt} (the jobs there: "
                                        "clicks, orders); check the name and --checkpoint-dir"]
    assert main(["history", "clicks", "--checkpoint-dir", str(tmp_path / "empty")]) == 1
    assert stderr_lines(capsys) == [f"sluiceway: error: no job named 'clicks' under {tmp_path / 'empty'} (no job has "
                                    "run there); check the name and --checkpoint-dir"]
    assert main(["history", "clicks", "--checkpoint-dir", ckpt]) == 0  # a job with no history yet: not an error


def bounded_flow() -> Dataflow:
    """A flow whose runs here are refused before anything starts."""
    flow = Dataflow("bounded")
    flow.source(ListSource([{"n": 1}]), name="rows").sink(CollectSink(), name="out")
    return flow


def test_parallelism_zero_is_refused():
    with pytest.raises(ValueError) as err:
        run(bounded_flow(), "unused", parallelism=0)
    assert str(err.value) == ("parallelism must be a whole number of tasks per step, 1 or more (None: the flow's, "
                              "else one per CPU), got 0")


def test_an_empty_checkpoint_dir_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(tmp_path / "job.py"), "--checkpoint-dir", ""])
    assert exit_.value.code == 2
    assert stderr_lines(capsys)[0] == ("sluiceway run: error: argument --checkpoint-dir: is empty: give a path or "
                                       "fsspec URL (leave the flag out for the default)")
    with pytest.raises(ValueError, match=r"^checkpoint_dir is empty: give a path or fsspec URL"):
        run(bounded_flow(), "")


def test_a_checkpoint_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    job = tmp_path / "job.py"
    job.write_text("from sluiceway.jobs import Dataflow\n"
                   "from sluiceway.operators.sinks import ParquetSink\n"
                   "from sluiceway.operators.sources import ListSource\n"
                   "flow = Dataflow('nowhere')\n"
                   f"flow.source(ListSource([{{'n': 1}}])).sink(ParquetSink({str(tmp_path / 'out')!r}))\n")
    assert main(["run", str(job), "--checkpoint-dir", "/proc/ckpt", "--embedded"]) == 1
    err = stderr_lines(capsys)
    assert len(err) == 1, err
    assert err[0].startswith("sluiceway: error: checkpoint dir '/proc/ckpt' is not usable: cannot write "
                             "file:///proc/ckpt/nowhere/.probe-"), err
    assert err[0].endswith(": /proc/ckpt: No such file or directory. Check that the checkpoint dir is a folder you "
                           "can read and write"), err


def test_log_produce_from_a_missing_file_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "clicks.jsonl")
    assert main(["log", "produce", "clicks", missing, "--log-dir", str(tmp_path / "log")]) == 2
    assert stderr_lines(capsys) == [f"sluiceway: error: cannot read {missing!r}: No such file or directory; give a "
                                    "file of JSON lines, or none to read them from stdin"]


def test_the_start_line_says_whether_the_job_stops_by_itself():
    flow = Dataflow("mixed")
    flow.source(ListSource([{"n": 1}]), name="rows")
    assert how_it_ends(flow, None) == ("every source is bounded: it stops once they are read to the end, after a "
                                       "final checkpoint")
    flow.source(GeneratorSource(lambda p, a, b: None, 1, 10.0), name="ticks")
    assert how_it_ends(flow, None) == ("source 'ticks' is unbounded: it runs until Ctrl-C (--epochs N stops it "
                                       "after N epochs)")
    assert how_it_ends(flow, 3) == "it stops after 3 new epoch(s) and a final checkpoint"


def test_error_text_unwraps_ray_and_drops_colours_and_our_frames():
    class RayTaskError(Exception):  # stands for ray.exceptions.RayTaskError: a wrapper that carries the cause
        pass

    RayTaskError.__module__ = "ray.exceptions"
    cause = ValueError("\x1b[31mbad value\x1b[0m\nTraceback (most recent call last):\n"
                       '  File "/site-packages/ray/_private/worker.py", line 3, in main_loop\n    run()\n'
                       "ValueError: bad value")
    wrapper = RayTaskError("\x1b[36mray::CoordinatorActor.run()\x1b[39m ...")
    wrapper.cause = cause
    assert error_text(wrapper) == "bad value"
