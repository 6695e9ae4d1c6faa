"""The quota-managed image store: safe names, the ledger (backend.py, sqlite.py), blob stores
(blobs.py), quotas, and the StorageManager facade with cleanup and check."""
