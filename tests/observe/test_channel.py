"""The observe channel: marked stderr lines that the launcher takes out of a process's output."""
from disttrain.observe import channel


def test_a_sent_message_is_one_marked_line_that_parses_back(capfd):
    print("ordinary output", file=__import__("sys").stderr)
    channel.send("report", {"rank": 3, "median_step_s": 0.0125})
    lines = capfd.readouterr().err.encode().split(b"\n")
    assert lines[0] == b"ordinary output" and lines[2] == b""
    assert channel.parse(lines[1]) == {"kind": "report", "rank": 3, "median_step_s": 0.0125}


def test_other_lines_and_damaged_marked_lines_are_not_messages():
    assert channel.parse(b"[worker 0] loss 0.5") is None
    assert channel.parse(channel.MARKER + b"{not json") is None
    assert channel.parse(channel.MARKER + b'{"no": "kind"}') is None
    assert channel.parse(channel.MARKER + b"[1, 2]") is None


def test_sending_to_a_closed_stderr_does_not_end_the_program(monkeypatch):
    def broken(fd, data):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(channel.os, "write", broken)
    channel.send("report", {"rank": 0})   # nothing raised
