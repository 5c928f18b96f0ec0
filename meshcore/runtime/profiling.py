"""cProfile over a proxy's whole run, on request: where its Python time goes under load.

`MESH_PROFILE=<directory>` (absolute, existing) turns it on; when the run ends (SIGTERM
stops a proxy normally) the profile is written to `<directory>/<name>-<pid>.prof`, for
`python -m pstats`. Unset or empty: nothing is imported or measured. cProfile adds a cost
to every Python call, so a profiled run's throughput is not a measurement; the shares per
function are what it is for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from meshcore.envconfig import EnvConfigError

PROFILE_ENV = "MESH_PROFILE"


def profile_dir(env: Mapping[str, str]) -> Path | None:
    """Where to write the profile, or None when profiling is off. Checked at start, so a
    mistake shows at once and not as a lost profile at the end."""
    raw = env.get(PROFILE_ENV, "").strip()
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        raise EnvConfigError(f"{PROFILE_ENV}={raw!r} must be an absolute directory path")
    if not path.is_dir():
        raise EnvConfigError(f"{PROFILE_ENV}={raw!r} is not an existing directory")
    return path


@contextmanager
def profiled(name: str, directory: Path | None) -> Iterator[None]:
    """Run the body under cProfile and dump the profile when it ends (also on error)."""
    if directory is None:
        yield
        return
    import cProfile  # only when asked: the proxy does not load it otherwise

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = directory / f"{name}-{os.getpid()}.prof"
        try:
            prof.dump_stats(out)
        except OSError as e:
            print(f"{name}: could not write the profile {out}: {e}", file=sys.stderr)
