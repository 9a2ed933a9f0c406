"""The output folder and everything under it: `OutputFolder` (folder.py) owns it; the names are in layout.py; the
lease in lease.py (over lockstore.py); rows waiting for a retry in pending.py; incremental state in state.py."""

from pipeline.io.output.folder import OutputFolder

__all__ = ["OutputFolder"]
