"""`python -m disttrain.plot`: a picture from the metrics files of a run."""
import json

import pytest

from disttrain import plot


def write_lines(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_plot_draws_a_png_from_worker_and_server_lines(tmp_path):
    pytest.importorskip("matplotlib")
    for rank in (0, 1):
        steps = [{"step": s, "time": 1000.0 + 0.05 * s, "loss": 2.0 / s, "lr": 0.1, "accuracy": 0.5,
                  "samples_per_s": 640.0, "step_s": 0.05, "compute_s": 0.03, "push_s": 0.005,
                  "pull_s": 0.014, "apply_s": 0.001} for s in range(1, 60)]
        write_lines(tmp_path / f"worker-{rank}.jsonl", steps + [{"step": 59, "time": 1003.0,
                                                                 "eval": {"test_accuracy": 0.9}}])
    write_lines(tmp_path / "server-0.jsonl", [
        {"time": 1001.0 + t, "server": 0, "interval_s": 1.0, "messages_in": 40, "messages_out": 40,
         "bytes_in": 10 ** 7, "bytes_out": 10 ** 7, "busy_s": 0.1, "update_s": {}, "queue_depth": 1,
         "last_at_clock": []} for t in range(3)])
    output = plot.draw(str(tmp_path), str(tmp_path / "run.png"))
    assert open(output, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_directory_without_worker_lines_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="--metrics-dir"):
        plot.load(str(tmp_path))


def test_a_cut_last_line_of_a_crashed_run_is_left_out(tmp_path):
    (tmp_path / "worker-0.jsonl").write_text('{"step": 1, "time": 1.0}\n{"step": 2, "ti')
    steps, _, _ = plot.load(str(tmp_path))
    assert steps == {0: [{"step": 1, "time": 1.0}]}
