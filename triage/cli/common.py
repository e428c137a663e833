"""What every subcommand shares: the config flags, loading the config, logging set-up."""

from __future__ import annotations

import argparse
import logging
from typing import Any

SubParsers = Any  # argparse's _SubParsersAction, which it does not export


def config_args(p: argparse.ArgumentParser) -> None:
    """Add ``--config`` and ``--data-dir`` to a subcommand."""
    p.add_argument("--config", metavar="PATH", help="config file (default: the shipped config.toml)")
    p.add_argument("--data-dir", metavar="DIR", help="override storage.data_dir")


def load_config(args: argparse.Namespace, **extra: Any) -> Any:
    """Load the config named by ``--config`` and apply the common CLI overrides.

    Returns the frozen Config. Raises ConfigError.
    """
    from triage import config

    cfg = config.load(args.config)
    return config.override(cfg, **{"storage.data_dir": getattr(args, "data_dir", None)}, **extra)


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger (only the CLI does this) and quieten chatty libraries.

    Called again once the config is read: the second call sets the configured
    level (``basicConfig`` alone would keep the first one).
    """
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(lvl)
    # pynetdicom narrates every message at INFO; our own handlers log what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Alembic narrates its plugins and context; triage logs the migration itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # APScheduler narrates each job it adds, and warns when a busy sweep skips a
    # turn (the next turn does the work); a job that fails is still logged.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    # highdicom logs each source dataset's UIDs at DEBUG while it builds an SR or an
    # overlay; identifiers never go to triage's log, whatever logging.level says.
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def quiet_decoders() -> None:
    """Silence pydicom's per-plugin tracebacks: a failed decode is reported once, as a reason."""
    import warnings

    import pydicom  # noqa: F401  (its import resets the "pydicom" logger level)

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="pydicom")


def scoring_setup(args: argparse.Namespace) -> tuple[Any, Any]:
    """Return (config, model) for a command that scores files here: the config from the
    flags, logging set up, decoder warnings quietened, and the model from ``--model`` /
    ``--card`` (else the config's). Raises InputError when the model cannot be loaded."""
    from triage.inference.model import OnnxModel

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    quiet_decoders()
    model = OnnxModel.load_files(args.model or cfg.model.onnx_path,
                                 args.card or (None if args.model else cfg.model.card_path),
                                 cfg.model.threads, getattr(args, "session", "daemon"))
    return cfg, model
