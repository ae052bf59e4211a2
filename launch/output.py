"""Line-prefixed output: every line a child writes reaches our stdout/stderr as
`[worker 3] line`, and its own log file (unprefixed) when --log-dir is given."""


class LinePrefixer:
    """Cuts one child stream into lines and writes each with the child's prefix.

    Children write in arbitrary chunks; we only ever write whole lines so that
    two children's output never mixes within one line.
    """

    def __init__(self, prefix, sink, log_file=None, divert=None):
        self.prefix = prefix.encode()
        self.divert = divert  # divert(line) -> True takes a line away (launch.observe)
        self.sink = sink  # a binary stream: sys.stdout.buffer or sys.stderr.buffer
        self.log_file = log_file
        self.partial = b""

    def feed(self, chunk):
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if lines:
            self._write(lines)

    def close(self):
        """Writes a last line that had no newline."""
        if self.partial:
            self._write([self.partial])
            self.partial = b""

    def _write(self, lines):
        if self.divert is not None:
            lines = [line for line in lines if not self.divert(line)]
        if self.sink is not None:
            try:
                self.sink.write(b"".join(self.prefix + line + b"\n" for line in lines))
                self.sink.flush()
            except BrokenPipeError:
                # Our reader (`| head`) went away: the job goes on, the log file still gets it.
                self.sink = None
        if self.log_file is not None:
            self.log_file.write(b"".join(line + b"\n" for line in lines))
            self.log_file.flush()


def prefix_for(name):
    """`[scheduler] `, `[server 0] `, `[worker 3] `."""
    return f"[{name}] "
