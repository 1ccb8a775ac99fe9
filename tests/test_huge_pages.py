"""The scripts ask PyTorch for transparent huge pages (THP_MEM_ALLOC_ENABLE, set before torch starts), and a user's
own setting wins. Checked in fresh processes by the huge pages a 64 MB tensor gets (Linux /proc)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = ("import eval, os, torch\n"
         "x = torch.empty(2**24); x.fill_(1)\n"
         "kb = open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0]\n"
         "print(os.environ['THP_MEM_ALLOC_ENABLE'], kb)\n")


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_scripts_set_huge_pages_and_the_users_setting_wins():
    setting, huge_kb = probe()
    assert setting == "1"
    user_setting, user_huge_kb = probe(THP_MEM_ALLOC_ENABLE="0")
    assert user_setting == "0"
    mode = MODE.read_text() if MODE.exists() else ""
    if "[madvise]" not in mode and "[always]" not in mode:
        pytest.skip(f"transparent huge pages are {mode.strip() or 'absent'} on this machine: the effect of the "
                    "setting cannot be seen")
    assert huge_kb >= 32 * 1024  # most of the 64 MB tensor
    if "[madvise]" in mode:  # under "always" every process gets huge pages, asked or not
        assert user_huge_kb == 0
