"""Durable state: the SQLite store behind the ledger, its writer process,
license users, the state dir's entitlement files, the audit trail."""
