"""``python scripts/sass_load_distance.py LIB.so [NAME_PART ...]``: how soon each kernel waits
for its global loads, read from the sm_90 machine code (no GPU needed).

For every data load (``LDG ... CONSTANT``, i.e. ``__ldg``) the script finds the first later
instruction, in program order, whose control bits wait on that load's scoreboard, and prints
the distances per kernel. A load waited for a few instructions after it is issued stalls its
warp for the whole memory latency; that is how the streaming window kernels' read-ahead was
found to keep one row in flight instead of two (a register ``MOV`` of the newest load, 3
instructions after it). Program order is a proxy: branches and loops are not followed.

Needs ``cuobjdump`` (CUDA toolkit, or ``pip install nvidia-cuda-cuobjdump``: it lands in
``site-packages/nvidia/cu13/bin``). Volta-and-later control bits: bits 41-61 of each
instruction's second 64-bit word hold stall (4), yield (1), write barrier (3), read barrier (3)
and the wait mask (6).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

FUNCTION = re.compile(r"Function : (\S+)")
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?);\s*/\* 0x[0-9a-f]{16} \*/")
CONTROL_WORD = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/")
NO_BARRIER = 7


def read_kernels(sass: str) -> Dict[str, List[Tuple[str, Optional[int]]]]:
    """Kernel name -> [(instruction text, second encoding word)] in program order."""
    kernels: Dict[str, List[Tuple[str, Optional[int]]]] = {}
    current: Optional[List[Tuple[str, Optional[int]]]] = None
    for line in sass.splitlines():
        if m := FUNCTION.search(line):
            # A library may embed the same cubin twice: keep the first copy.
            current = kernels.setdefault(m.group(1), []) if m.group(1) not in kernels else []
        elif current is not None and (m := INSTRUCTION.search(line)):
            current.append((m.group(1).strip(), None))
        elif current and current[-1][1] is None and (m := CONTROL_WORD.match(line)):
            current[-1] = (current[-1][0], int(m.group(1), 16))
    return kernels


def write_barrier(word: int) -> int:
    return (word >> 46) & 7


def wait_mask(word: int) -> int:
    return (word >> 52) & 0x3F


def load_distances(code: List[Tuple[str, Optional[int]]]) -> List[int]:
    """For each data load, instructions until the first one that waits on its barrier."""
    out = []
    for i, (text, word) in enumerate(code):
        if word is None or "LDG" not in text or "CONSTANT" not in text:
            continue
        barrier = write_barrier(word)
        if barrier == NO_BARRIER:
            continue
        for j in range(i + 1, len(code)):
            later = code[j][1]
            if later is not None and wait_mask(later) >> barrier & 1:
                out.append(j - i)
                break
    return out


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    tool = shutil.which("cuobjdump")
    if tool is None:
        print("sass_load_distance: cuobjdump not found on PATH", file=sys.stderr)
        return 2
    sass = subprocess.run([tool, "-sass", argv[0]], capture_output=True, text=True,
                          check=True).stdout
    for name, code in read_kernels(sass).items():
        if argv[1:] and not any(part in name for part in argv[1:]):
            continue
        distances = sorted(load_distances(code))
        if distances:
            print(f"{len(distances):4d} loads, nearest waits {distances[:8]}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
