"""The Hugging Face hub, looked for once per process.

:func:`offline` says whether models, tokenizers and datasets named by a hub id must come from the
local cache: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) is set, or
the hub's host does not answer a short connect (not tried behind a proxy). In the second case it
switches the Hugging Face libraries to their offline mode, so a load that is not cached fails in
about a second instead of a minute of retries, and :func:`not_reachable` words that failure as
one line.
"""
from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
CONNECT_TIMEOUT_S = 3.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def offline_reason() -> str:
    """Why hub loads must come from the local cache (see the module docstring); "" when they need not."""
    for name in OFFLINE_ENV:
        if _env_true(name):
            return f"{name} is set"
    if any(os.environ.get(name) for name in PROXY_ENV):
        return ""  # the hub is reached through the proxy: a direct connect would say nothing
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=CONNECT_TIMEOUT_S).close()
        return ""
    except OSError:
        _switch_libraries_offline()
        return f"{host} cannot be reached"


def offline() -> bool:
    return bool(offline_reason())


def _switch_libraries_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # read at import by the libraries not imported yet (and by child processes)
    # the ones imported already took a copy of the variable at import
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        constants.HF_HUB_OFFLINE = True
    if (datasets_config := sys.modules.get("datasets.config")) is not None:
        datasets_config.HF_HUB_OFFLINE = True


def not_reachable(key: str, spec: str, instead: str) -> str:
    """The one-line message for a hub id that is neither cached nor reachable: ``key`` is the
    config key that named ``spec``; ``instead`` says what to set for a local copy."""
    return f"{key}={spec!r} is a Hugging Face hub id, not in the local cache, and {offline_reason()}: {instead}"
