"""Protocol recognition from the first bytes of a connection: sans-IO, bytes in, verdict out."""
