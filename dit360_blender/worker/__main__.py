"""Entry point: ``python -m dit360_blender.worker --log-dir DIR --parent-pid PID``.

The token is read from the DIT360_WORKER_TOKEN environment variable (never argv).
"""

from .server import main

raise SystemExit(main())
