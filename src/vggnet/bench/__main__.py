"""The memory section's subprocess: ``python -m vggnet.bench --memory-child '[name, size, head, batch, threads]'``
prints :func:`vggnet.bench.memory.memory_child`'s record as one JSON line."""

import json
import sys

from vggnet.bench.memory import memory_child

if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
    print(json.dumps(memory_child(*json.loads(sys.argv[2]))))
else:
    sys.exit("usage: vggnet bench (python -m vggnet.bench is the entry point of its memory subprocesses)")
