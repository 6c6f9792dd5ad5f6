"""The vocabulary of tenant specs, shared by the agent and the controller. Pure code.

A tenant spec travels in ``DesiredState.tenants``; the controller checks it when
an operator sets it and the agent checks it again when it arrives, so both must
agree on what a valid id, source kind, source option, preprocessing key and
result sink are. Only the vocabulary lives here; each side phrases its errors.
"""

from __future__ import annotations

import re

# No '.' in tenant ids: "{tenant}.shadow" names the tenant's shadow candidate.
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SHADOW_SUFFIX = ".shadow"

# Where a tenant's results go.
SINKS = frozenset({"grpc", "mqtt"})

# Options each source kind understands (anything else is a typo worth reporting).
SOURCE_OPTIONS: dict[str, frozenset[str]] = {
    "video": frozenset({"loop", "fps"}),
    "camera": frozenset({"width", "height", "fps"}),
    "wav": frozenset({"loop", "chunk"}),
    "microphone": frozenset({"sample_rate", "channels", "chunk"}),
    "csv": frozenset({"loop", "skip_header", "delimiter"}),
    "lines": frozenset({"baud", "delimiter"}),
    "synthetic": frozenset({"shape", "dtype", "count", "seed", "sample_kind"}),
}

# Image keys, then audio/sensor windowing keys.
PREPROCESS_KEYS = frozenset(
    {"input", "crop", "resize", "color", "scale", "mean", "std", "layout", "dtype"}
    | {"window", "hop", "features", "n_fft", "n_mels", "batch"}
)
