"""The fault suite's toolbox: bad-input factories, a SIGKILL-and-resume harness, output checks.

Users run the three jobs for days on preemptible machines over millions of unchecked files, so
the suite has to show two things with evidence rather than assertions of intent:

* every bad input gets a clear answer (encoded correctly when it is merely unusual, skipped and
  listed when it is broken, refused with a message naming the culprit when a run cannot go on),
* a job killed with SIGKILL at a random moment and re-run with the same command ends with exactly
  the output of an uninterrupted run: no sample lost, none duplicated, no half-written file.

It is a test harness, not part of the package users install. Both ``tests/test_faults.py`` / ``tests/test_bad_inputs.py`` and ``benchmarks/bench_faults.py``
drive these functions, so the figures the benchmark prints come from the same checks the tests
assert. Every check reads outputs independently of the stage's own readers where it can
(``tarfile`` for shards, ``numpy`` for arrays), so a bug in a stage's reader cannot hide itself.

Nothing here ever unpickles: the planted payloads are hand-written pickle opcodes that would
create a marker file if anything executed them; the checks assert the marker never appears.
"""

from .common import *  # noqa: F401,F403
from .inputs import *  # noqa: F401,F403
from .kills import *  # noqa: F401,F403
