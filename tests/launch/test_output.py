"""Prefixed, whole-line relaying of child output."""

import io

from launch.output import LinePrefixer, prefix_for


def test_chunks_are_cut_into_whole_prefixed_lines():
    sink = io.BytesIO()
    relay = LinePrefixer(prefix_for("worker 3"), sink)
    relay.feed(b"hel")
    assert sink.getvalue() == b""  # half a line waits for its end
    relay.feed(b"lo\nwor")
    relay.feed(b"ld\n\nlast")
    relay.close()
    assert sink.getvalue() == b"[worker 3] hello\n[worker 3] world\n[worker 3] \n[worker 3] last\n"


def test_log_file_gets_the_same_lines_without_prefix():
    sink, log = io.BytesIO(), io.BytesIO()
    relay = LinePrefixer(prefix_for("scheduler"), sink, log)
    relay.feed(b"a\nb\n")
    assert sink.getvalue() == b"[scheduler] a\n[scheduler] b\n"
    assert log.getvalue() == b"a\nb\n"


def test_close_without_a_partial_line_writes_nothing():
    sink = io.BytesIO()
    relay = LinePrefixer(prefix_for("server 0"), sink)
    relay.feed(b"done\n")
    relay.close()
    assert sink.getvalue() == b"[server 0] done\n"


class ClosedPipe:
    def write(self, data):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_a_reader_that_went_away_stops_the_terminal_copy_but_not_the_log():
    log = io.BytesIO()
    relay = LinePrefixer(prefix_for("worker 0"), ClosedPipe(), log)
    relay.feed(b"one\n")
    relay.feed(b"two\n")
    assert log.getvalue() == b"one\ntwo\n"
