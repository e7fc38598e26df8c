"""The project's Hydra configuration, shipped as package data (``scaling_lab.conf``).

``CONF_DIR`` is the folder every command composes from (``@hydra.main(config_path=str(CONF_DIR))``), in a checkout
and in an installed wheel alike.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
