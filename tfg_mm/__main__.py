"""``python -m tfg_mm <command>``: see ``python -m tfg_mm --help``."""

from tfg_mm.cli import main

raise SystemExit(main())
