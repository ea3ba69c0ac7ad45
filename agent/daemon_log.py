"""The daemon's log: stderr, with a syslog priority prefix on every line under journald."""

import logging
import os
import sys

log = logging.getLogger("egress-agent")


class _JournalFormatter(logging.Formatter):
    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        # journald reads the prefix per line: every line of a multi-line message (a reload's list
        # of problems, a traceback) must carry it, or `journalctl -p err` shows only the first.
        prefix = f"<{self.LEVELS.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging():
    h = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        h.setFormatter(_JournalFormatter("%(message)s"))
    else:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [h]
    log.setLevel(logging.INFO)
    log.propagate = False
