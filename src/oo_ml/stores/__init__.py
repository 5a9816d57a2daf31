"""Storage adapters for the ports in `oo_ml.domain.ports`.

codec      domain values <-> oo.state.v1 bytes (the only module that knows that proto)
memory     an in-memory StateStore (tests, the simulator)
profile_model  the profile rules and feature cache both profile stores share
sqlite/    the embedded default: `db` (the group-commit executor), `scoring` (state and
           decision log), `profiles` and `profile_writes` (the ingest's tables)
nats/      JetStream KV and streams shared by replicas (`OO_STATE=nats`)
"""
