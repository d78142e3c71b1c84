"""Decide once per process whether the Hugging Face Hub is reachable, and switch the libraries offline if not."""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 2.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def ensure_hub_mode(offline: bool | None = None) -> bool:
    """Return True if the Hub is to be treated as offline; in that case set the offline env vars.

    `offline=True` forces offline mode, `offline=False` skips the probe, `None` probes the endpoint
    (at most once per process, bounded by PROBE_TIMEOUT_S). Call before importing `datasets`, which
    reads the variables at import time; already imported Hugging Face modules are patched as well.
    """
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        offline = True
    if offline:
        _set_offline()
    return offline


def _set_offline() -> None:
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    for module_name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            setattr(module, attr, True)


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    parts = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = parts.hostname or "huggingface.co"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="jtok-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])
