"""Whether the Hugging Face Hub answers, asked once per process with a short timeout.

transformers and datasets retry an unreachable Hub for 25-30 s before they fail; models
and datasets that are not on this machine ask here first, so a user without the Hub hears
so at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

#: How long to wait for the Hub to accept a connection.
HUB_PROBE_TIMEOUT_S = 3.0
#: Environment variables by which a user says the Hub is not to be used.
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """The user set the Hub offline (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV_VARS)


@functools.lru_cache(maxsize=4)
def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """The Hub's endpoint accepts a TCP connection within ``timeout_s``."""
    import huggingface_hub.constants

    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
