"""Give files and directories the permissions the user's umask asks for.

``tempfile.mkdtemp`` creates 0700 directories and safetensors' ``save_file`` 0600 files, whatever the umask:
a converted checkpoint or an embedding store would be unreadable to the other users or containers that
share it. Outputs are re-moded as ``open``/``mkdir`` would have created them.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def current_umask() -> int:
    # Reading the umask means setting it; the lock keeps two readers from seeing each other's 0.
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_created(path: str | os.PathLike, *, directory: bool = False) -> None:
    """``chmod`` ``path`` to what the umask gives a new file (0666 & ~umask) or directory (0777 & ~umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
