"""The suite's hypothesis profiles, one place for both (docs/building.md, "Property tests").

`ci`, the default (`make test`, CI): derandomized, so a run is decided by the code alone, never by the seed it drew;
no example database, so no run replays another's failure. Hypothesis's own caches go to the temp folder, so
nothing lands in the work tree. `fuzz`
(HYPOTHESIS_PROFILE=fuzz, `make fuzz`): random seeds and FUZZ_FACTOR times each test's examples, for people hunting
bugs; a failure prints the blob that reproduces it (@reproduce_failure).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# before hypothesis first writes its caches (charmaps, constants), which it would put in ./.hypothesis
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "spatialthinker-hypothesis"))

from hypothesis import settings  # noqa: E402

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_FACTOR = 10

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, deadline=None, print_blob=True)
if PROFILE not in ("ci", "fuzz"):
    raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r}: the suite's profiles are ci (the default) and fuzz")
settings.load_profile(PROFILE)


def examples(count: int) -> int:
    """A test's example count under the loaded profile: `count` in ci, FUZZ_FACTOR times it under fuzz."""
    return count * FUZZ_FACTOR if PROFILE == "fuzz" else count
