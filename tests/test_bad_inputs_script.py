"""scripts/bad_inputs.py on a reduced table: one row per case, then `bad_inputs_clear: N/M`."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reduced_table_format():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bad_inputs.py"), "--cases", "unknown_key,bad_yaml", "--no-warm"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("input")
    rows = {}
    for line in lines[1:3]:
        label, code, seconds, untouched, clear, first = [f.strip() for f in line.split(" | ", 5)]
        rows[label] = (code, float(seconds), untouched, clear, first)
        assert clear == ("yes" if code == "2" and untouched == "yes" and float(seconds) < 5 and first.startswith("error:") else "no")
    assert rows["topk=3"][0] == "2" and rows["topk=3"][2] == "yes"
    assert rows["topk=3"][4] == "error: unknown config key 'topk'; did you mean 'ranking.top_k'?"
    code, _, untouched, _, first = rows["--config with a YAML syntax error"]
    assert code == "2" and untouched == "yes" and first.startswith("error: config file ") and "is not valid YAML" in first
    m = re.fullmatch(r"bad_inputs_clear: (\d+)/2", lines[3])
    assert m and int(m.group(1)) == sum(r[3] == "yes" for r in rows.values())
