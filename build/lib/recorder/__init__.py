"""Where every session and every decision is written, and read back for review."""
