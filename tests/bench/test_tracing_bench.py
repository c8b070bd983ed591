"""The tracing overhead bench end to end at toy size: real servers (off, 1%, 100%), a real OTLP receiver in a
process of its own, one table."""

import re

from bench.tracing_overhead import main


def test_the_tracing_bench_prints_its_table_and_the_traced_servers_export(tmp_path, capsys):
    assert main(["--rounds", "1", "--seconds", "0.5", "--clients", "4", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for mode in ("off", "1%", "100%"):
        assert re.search(rf"^\| {re.escape(mode)} \| [\d,]+ \|", out, re.M), out
    assert re.search(r"^\| off \| [\d,]+ \| [\d,]+-[\d,]+ \| 1\.000 \|", out, re.M)
    exports = int(re.search(r"OTLP receiver: (\d+) exports", out).group(1))
    assert exports > 0  # the 100% server's spans reached the receiver
    assert "| event loop, per call, 100% |" in out
