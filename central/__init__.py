"""The central recorder: hosts ship their hash-chained records here over HTTPS (mTLS); stored in PostgreSQL.

Imports nothing of proxy/ or interceptor/: the record format is recorder.records, shared with the hosts.
docs/RECORDER.md describes the API, the schema and how it scales."""
