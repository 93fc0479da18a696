"""Write docs/configuration.md from the config classes (the same text as ``config-help``).

    python scripts/gen_config_reference.py          # rewrite the file
    python scripts/gen_config_reference.py --check  # exit 1 when the file is out of date

tests/test_docs.py keeps the file current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"


def render() -> str:
    from raft_diffusion.core.config import config_reference
    from raft_diffusion.diffusion.config import RaftConfig
    from raft_diffusion.llm.config import LLMConfig

    head = (
        "# Configuration reference\n\n"
        "Generated from the config classes by `scripts/gen_config_reference.py` (do not edit by hand); "
        "`raft-diffusion config-help` and `raft-diffusion llm config-help` print the same keys. Any key can be set "
        "in a YAML preset or on the command line as a dotted `key=value` (values are parsed as YAML).\n\n"
    )
    diffusion = config_reference(RaftConfig, "Diffusion runs (`raft-diffusion align`)")
    llm = config_reference(LLMConfig, "Language-model runs (`raft-diffusion llm align`)")
    return head + diffusion + "\n" + llm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the file is current")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
