"""The parameter server: wire protocol, transport, scheduler, servers and the worker's KVStore."""
