"""Command-line entry points for trime_fairseq."""
import logging
import os

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


def setup_cli_logging() -> None:
    """The entry points' logging: level from ``$LOGLEVEL`` (default INFO), one format,
    replacing whatever importing fairseq configured."""
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format=LOG_FORMAT, force=True)
