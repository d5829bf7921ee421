"""The sans-IO core: wire codec and messages, the seat pool and the ledger port,
the service, entitlements.  No sockets, no trio, no clock reads: time is passed in."""
