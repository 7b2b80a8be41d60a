"""Time to validate an instruction set whose regex families hold many values (docs/benchmarks.md).

Validation holds the API process's GIL; before a regex family compiled once per value, 50,000
values took seconds during which that process answered nobody else.

    OMP_NUM_THREADS=1 .venv/bin/python bench/instruction_validation.py [families] [values]
"""

from __future__ import annotations

import sys
import time

from gatt.instructions import parse_instruction_set


def main(families: int = 5, values: int = 10_000) -> None:
    spec = {
        "families": [
            {
                "name": f"f{i}",
                "verbose": ["Say {value}."],
                "terse": ["{value}"],
                "values": [f"value number {j}" for j in range(values)],
                "verifier": {"type": "regex", "pattern": "^{value}"},
            }
            for i in range(families)
        ]
    }
    start = time.perf_counter()
    parse_instruction_set(spec)
    print(f"{families} regex families x {values} values: validated in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
