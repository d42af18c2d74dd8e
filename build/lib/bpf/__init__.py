"""Kernel programs (C, compiled by bcc at load time) and the header shared with Python."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
