"""The quota-managed image store: safe names, the SQLite ledger, quotas and the manager."""
