"""File modes as the user's umask allows: temporary files are private (0600), published files should not be."""
from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask's set-and-restore races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file or directory: 0666 (0777) less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()
